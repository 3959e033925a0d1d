// What the awq-edge TensorRT plugins share: logging through TensorRT's logger and reading
// the plugin fields that the ONNX parser makes from node attributes.
#pragma once

#include <cstdint>
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

}  // namespace awq_edge
