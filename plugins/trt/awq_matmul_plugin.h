// TensorRT IPluginV3 for the op AwqMatMulW4A16 (contract: plugins/README.md).
//
// One class implements the three capability interfaces (core, build, runtime); the
// creator turns the ONNX attributes K, N, group_size into a plugin. The work itself is
// awq_w4a16_matmul() from plugins/kernels (GEMV for up to 8 rows, GEMM above).
#pragma once

#include <string>
#include <vector>

#include <NvInferRuntime.h>

#include "plugin_common.h"

namespace awq_edge {

constexpr char const* kAwqMatMulName = "AwqMatMulW4A16";
constexpr char const* kAwqMatMulVersion = "1";
constexpr char const* kAwqMatMulNamespace = "";

// The plugin fields = the ONNX attributes of the contract (plugin_version and
// plugin_namespace are consumed by the ONNX parser for the lookup).
struct AwqMatMulParams {
    int32_t K = 0;
    int32_t N = 0;
    int32_t group_size = 0;

    int32_t groups() const { return (K + group_size - 1) / group_size; }
    // Empty when valid, else what is wrong (for the log).
    std::string problem() const;
};

class AwqMatMulPlugin : public PluginBase<AwqMatMulPlugin, AwqMatMulParams> {
public:
    using PluginBase::PluginBase;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return kAwqMatMulName; }
    char const* getPluginVersion() const noexcept override { return kAwqMatMulVersion; }
    char const* getPluginNamespace() const noexcept override { return kAwqMatMulNamespace; }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return 1; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                               nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                            int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    // Checks the shapes of X, qweight, scales, zeros against K, N, G (-1 = not known yet).
    bool shapesMatch(nvinfer1::Dims const& x, nvinfer1::Dims const& qweight, nvinfer1::Dims const& scales,
                     nvinfer1::Dims const& zeros) const;

    std::vector<nvinfer1::PluginField> mSerializedFields;
    nvinfer1::PluginFieldCollection mSerializedCollection{};
};

class AwqMatMulCreator : public nvinfer1::IPluginCreatorV3One {
public:
    AwqMatMulCreator();

    char const* getPluginName() const noexcept override { return kAwqMatMulName; }
    char const* getPluginVersion() const noexcept override { return kAwqMatMulVersion; }
    char const* getPluginNamespace() const noexcept override { return kAwqMatMulNamespace; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

}  // namespace awq_edge
