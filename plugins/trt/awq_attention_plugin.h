// TensorRT IPluginV3 for the op AwqAttention (contract: plugins/README.md): RoPE, the KV
// cache written in place, and attention, in one node per layer. The work is awq_attention()
// from plugins/kernels/attention.cu.
//
// In place: the caches are plugin INPUTS bound by the runtime to its own buffers of
// max_context rows; enqueue writes the new rows into them (through a const_cast). Nothing
// else in the graph reads a layer's cache, and supportsFormatCombination accepts exactly the
// network inputs' type and format (fp16, linear), so TensorRT passes the bound buffers
// through without a reformat copy. (TensorRT's aliased-I/O preview feature may insert copies,
// which is what in-place writing avoids.)
#pragma once

#include <string>
#include <vector>

#include <NvInferRuntime.h>

#include "plugin_common.h"

namespace awq_edge {

constexpr char const* kAwqAttentionName = "AwqAttention";
constexpr char const* kAwqAttentionVersion = "1";
constexpr char const* kAwqAttentionNamespace = "";

struct AwqAttentionParams {
    int32_t num_heads = 0;
    int32_t kv_heads = 0;
    int32_t head_dim = 0;
    int32_t window = 0;   // 0: full causal; W: a query sees the W keys ending at itself
    float scale = 0.f;    // applied to q.k
    float softcap = 0.f;  // 0: none

    std::string problem() const;  // empty when valid
};

class AwqAttentionPlugin : public PluginBase<AwqAttentionPlugin, AwqAttentionParams> {
public:
    using PluginBase::PluginBase;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return kAwqAttentionName; }
    char const* getPluginVersion() const noexcept override { return kAwqAttentionVersion; }
    char const* getPluginNamespace() const noexcept override { return kAwqAttentionNamespace; }

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
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    bool shapesMatch(nvinfer1::Dims const* in) const;

    std::vector<nvinfer1::PluginField> mSerializedFields;
    nvinfer1::PluginFieldCollection mSerializedCollection{};
};

class AwqAttentionCreator : public nvinfer1::IPluginCreatorV3One {
public:
    AwqAttentionCreator();

    char const* getPluginName() const noexcept override { return kAwqAttentionName; }
    char const* getPluginVersion() const noexcept override { return kAwqAttentionVersion; }
    char const* getPluginNamespace() const noexcept override { return kAwqAttentionNamespace; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

}  // namespace awq_edge
