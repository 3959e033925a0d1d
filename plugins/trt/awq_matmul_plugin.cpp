#include "awq_matmul_plugin.h"

#include <cstring>

#include "plugin_common.h"
#include "w4a16.h"

using namespace nvinfer1;

namespace awq_edge {
namespace {

enum InputIndex : int32_t { kX = 0, kQWeight = 1, kScales = 2, kZeros = 3, kNbInputs = 4 };

}  // namespace

std::string AwqMatMulParams::problem() const {
    if (K <= 0 || K % 8 != 0) return "K must be a positive multiple of 8, got " + std::to_string(K);
    if (N <= 0 || N % 8 != 0) return "N must be a positive multiple of 8, got " + std::to_string(N);
    if (group_size != 32 && group_size != 64 && group_size != 128) {
        return "group_size must be 32, 64 or 128, got " + std::to_string(group_size);
    }
    return {};
}

// ---------------------------------------------------------------- plugin

int32_t AwqMatMulPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                            int32_t nbInputs) const noexcept {
    if (nbOutputs != 1 || nbInputs != kNbInputs || inputTypes[kX] != DataType::kHALF) return -1;
    outputTypes[0] = DataType::kHALF;
    return 0;
}

int32_t AwqMatMulPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                                         int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                                         IExprBuilder& exprBuilder) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1) return -1;
    DimsExprs const& x = inputs[kX];
    if (x.nbDims < 2 || x.nbDims > 3) {
        logError("AwqMatMulW4A16: X must have rank 2 or 3");
        return -1;
    }
    outputs[0] = x;  // Y = X with the last dimension K replaced by N
    outputs[0].d[x.nbDims - 1] = exprBuilder.constant(mParams.N);
    return 0;
}

bool AwqMatMulPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                                int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1 || pos < 0 || pos >= kNbInputs + 1) return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    // X, scales, zeros and Y are fp16; qweight is int32.
    return desc.type == (pos == kQWeight ? DataType::kINT32 : DataType::kHALF);
}

bool AwqMatMulPlugin::shapesMatch(Dims const& x, Dims const& qweight, Dims const& scales, Dims const& zeros) const {
    int64_t const N = mParams.N, K = mParams.K, groups = mParams.groups();
    bool const ok = x.nbDims >= 2 && x.nbDims <= 3 && dimIs(x.d[x.nbDims - 1], K) &&  //
                    qweight.nbDims == 2 && dimIs(qweight.d[0], N) && dimIs(qweight.d[1], K / 8) &&
                    scales.nbDims == 2 && dimIs(scales.d[0], N) && dimIs(scales.d[1], groups) &&
                    zeros.nbDims == 2 && dimIs(zeros.d[0], N) && dimIs(zeros.d[1], groups);
    if (!ok) {
        logError("AwqMatMulW4A16: input shapes do not match K=" + std::to_string(K) + " N=" + std::to_string(N) +
                 " group_size=" + std::to_string(mParams.group_size) +
                 " (need X [..., K], qweight [N, K/8], scales and zeros [N, ceil(K/G)])");
    }
    return ok;
}

int32_t AwqMatMulPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                         DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1) return -1;
    return shapesMatch(in[kX].desc.dims, in[kQWeight].desc.dims, in[kScales].desc.dims, in[kZeros].desc.dims) ? 0 : -1;
}

int32_t AwqMatMulPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/,
                                       int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1) return -1;
    return shapesMatch(in[kX].dims, in[kQWeight].dims, in[kScales].dims, in[kZeros].dims) ? 0 : -1;
}

int32_t AwqMatMulPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                                 void const* const* inputs, void* const* outputs, void* /*workspace*/,
                                 cudaStream_t stream) noexcept {
    Dims const& x = inputDesc[kX].dims;
    int64_t rows = 1;  // all leading dimensions of X (batch x sequence) are rows of the matmul
    for (int32_t i = 0; i < x.nbDims - 1; ++i) rows *= x.d[i];
    if (rows == 0) return 0;
    int const status = awq_w4a16_matmul(
        static_cast<__half const*>(inputs[kX]), static_cast<int32_t const*>(inputs[kQWeight]),
        static_cast<__half const*>(inputs[kScales]), static_cast<__half const*>(inputs[kZeros]),
        static_cast<__half*>(outputs[0]), static_cast<int>(rows), mParams.N, mParams.K, mParams.group_size, stream);
    if (status != AWQ_W4A16_OK) {
        logError(std::string("AwqMatMulW4A16: ") + awq_w4a16_status_string(status));
        return -1;
    }
    return 0;
}

PluginFieldCollection const* AwqMatMulPlugin::getFieldsToSerialize() noexcept {
    // Pointers into mParams: valid as long as this plugin lives, which TensorRT guarantees.
    mSerializedFields = {PluginField("K", &mParams.K, PluginFieldType::kINT32, 1),
                         PluginField("N", &mParams.N, PluginFieldType::kINT32, 1),
                         PluginField("group_size", &mParams.group_size, PluginFieldType::kINT32, 1)};
    mSerializedCollection.nbFields = static_cast<int32_t>(mSerializedFields.size());
    mSerializedCollection.fields = mSerializedFields.data();
    return &mSerializedCollection;
}

// ---------------------------------------------------------------- creator

AwqMatMulCreator::AwqMatMulCreator() {
    mFields = {PluginField("K", nullptr, PluginFieldType::kINT32, 1),
               PluginField("N", nullptr, PluginFieldType::kINT32, 1),
               PluginField("group_size", nullptr, PluginFieldType::kINT32, 1)};
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginV3* AwqMatMulCreator::createPlugin(char const* /*name*/, PluginFieldCollection const* fc,
                                          TensorRTPhase /*phase*/) noexcept {
    return createFromFields<AwqMatMulPlugin, AwqMatMulParams>(
        kAwqMatMulName, fc, [](PluginField const& field, AwqMatMulParams& params) {
            int32_t* target = std::strcmp(field.name, "K") == 0            ? &params.K
                              : std::strcmp(field.name, "N") == 0          ? &params.N
                              : std::strcmp(field.name, "group_size") == 0 ? &params.group_size
                                                                           : nullptr;
            return target == nullptr || readIntField(field, *target);
        });
}

}  // namespace awq_edge
