#include "plugin_common.h"

using namespace nvinfer1;

namespace awq_edge {
namespace {
ILoggerFinder* gLoggerFinder = nullptr;
}  // namespace

void setLoggerFinder(ILoggerFinder* finder) noexcept { gLoggerFinder = finder; }

void logError(std::string const& message) noexcept {
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr) logger->log(ILogger::Severity::kERROR, ("awq-edge plugin: " + message).c_str());
}

bool readIntField(PluginField const& field, int32_t& value) {
    if (field.data == nullptr || field.length != 1) return false;
    if (field.type == PluginFieldType::kINT32) {
        value = *static_cast<int32_t const*>(field.data);
        return true;
    }
    if (field.type == PluginFieldType::kINT64) {
        value = static_cast<int32_t>(*static_cast<int64_t const*>(field.data));
        return true;
    }
    return false;
}

bool readFloatField(PluginField const& field, float& value) {
    if (field.data == nullptr || field.length != 1) return false;
    if (field.type == PluginFieldType::kFLOAT32) {
        value = *static_cast<float const*>(field.data);
        return true;
    }
    if (field.type == PluginFieldType::kFLOAT64) {
        value = static_cast<float>(*static_cast<double const*>(field.data));
        return true;
    }
    return false;
}

}  // namespace awq_edge
