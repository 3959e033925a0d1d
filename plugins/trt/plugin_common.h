// What the awq-edge TensorRT plugins share: logging through TensorRT's logger and reading
// the plugin fields that the ONNX parser makes from node attributes.
#pragma once

#include <cstdint>
#include <exception>
#include <string>

#include <NvInferRuntime.h>

namespace awq_edge {

// Logs through TensorRT's logger once the library was loaded with a logger finder.
void logError(std::string const& message) noexcept;
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

// One integer field; ONNX ints may arrive as int32 or int64.
bool readIntField(nvinfer1::PluginField const& field, int32_t& value);
// One float field; ONNX floats arrive as float32 (float64 accepted too).
bool readFloatField(nvinfer1::PluginField const& field, float& value);

// A dimension that is still unknown at build time (-1) matches anything.
inline bool dimIs(int64_t actual, int64_t expected) { return actual == -1 || actual == expected; }

// What every plugin here shares: one object serves the core, build and runtime capabilities,
// and a copy is made from the plugin's fields (`Params`, kept in mParams).
template <typename Plugin, typename Params>
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime {
public:
    explicit PluginBase(Params params) : mParams(params) {}

    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
        switch (type) {
            case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
            case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
            case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    nvinfer1::IPluginV3* clone() noexcept override {
        try {
            return new Plugin(mParams);
        } catch (std::exception const& e) {
            logError(e.what());
            return nullptr;
        }
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept override {
        return clone();
    }

protected:
    Params mParams;
};

// What every creator here does with the fields TensorRT hands it: `readField(field, params)`
// stores one field (true for fields it does not know, such as plugin_version; false for a
// wrong type or length), then params.problem() must be empty. Failures are logged with the
// op name and give nullptr, as TensorRT expects.
template <typename Plugin, typename Params, typename ReadField>
nvinfer1::IPluginV3* createFromFields(char const* op, nvinfer1::PluginFieldCollection const* fc,
                                      ReadField readField) noexcept {
    try {
        Params params;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
            if (!readField(fc->fields[i], params)) {
                logError(std::string(op) + ": field " + fc->fields[i].name + " has the wrong type or length");
                return nullptr;
            }
        }
        std::string const problem = params.problem();
        if (!problem.empty()) {
            logError(std::string(op) + ": " + problem);
            return nullptr;
        }
        return new Plugin(params);
    } catch (std::exception const& e) {
        logError(std::string(op) + ": " + e.what());
        return nullptr;
    }
}

}  // namespace awq_edge
