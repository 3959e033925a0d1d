#include "awq_attention_plugin.h"

#include <cmath>
#include <cstring>

#include "attention.h"
#include "plugin_common.h"

using namespace nvinfer1;

namespace awq_edge {
namespace {

enum InputIndex : int32_t {
    kQ = 0,           // fp16 [1, S, H * D]
    kK = 1,           // fp16 [1, S, Hkv * D]
    kV = 2,           // fp16 [1, S, Hkv * D]
    kKeyCache = 3,    // fp16 [1, Hkv, capacity, D], written in place
    kValueCache = 4,  // fp16 [1, Hkv, capacity, D], written in place
    kPast = 5,        // int64 [1]
    kCos = 6,         // fp16 [max_positions, D / 2]
    kSin = 7,         // fp16 [max_positions, D / 2]
    kNbInputs = 8
};

void logAttentionError(std::string const& message) noexcept { logError("AwqAttention: " + message); }

}  // namespace

std::string AwqAttentionParams::problem() const {
    if (num_heads <= 0 || kv_heads <= 0 || num_heads % kv_heads != 0) {
        return "num_heads must be a positive multiple of kv_heads, got " + std::to_string(num_heads) + " and " +
               std::to_string(kv_heads);
    }
    if (head_dim != 64 && head_dim != 128 && head_dim != 256) {
        return "head_dim must be 64, 128 or 256, got " + std::to_string(head_dim);
    }
    if (window < 0) return "window must be >= 0 (0 = none), got " + std::to_string(window);
    if (!std::isfinite(scale) || scale <= 0.f) return "scale must be a positive number";
    if (!std::isfinite(softcap) || softcap < 0.f) return "softcap must be >= 0 (0 = none)";
    return {};
}

// ---------------------------------------------------------------- plugin

int32_t AwqAttentionPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                               int32_t nbInputs) const noexcept {
    if (nbOutputs != 1 || nbInputs != kNbInputs || inputTypes[kQ] != DataType::kHALF) return -1;
    outputTypes[0] = DataType::kHALF;
    return 0;
}

int32_t AwqAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                                            int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                                            IExprBuilder& /*exprBuilder*/) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1 || inputs[kQ].nbDims != 3) return -1;
    outputs[0] = inputs[kQ];  // [1, S, H * D]
    return 0;
}

bool AwqAttentionPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut,
                                                   int32_t nbInputs, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1 || pos < 0 || pos > kNbInputs) return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    return desc.type == (pos == kPast ? DataType::kINT64 : DataType::kHALF);
}

bool AwqAttentionPlugin::shapesMatch(Dims const* in) const {
    int64_t const H = mParams.num_heads, Hkv = mParams.kv_heads, D = mParams.head_dim;
    Dims const &q = in[kQ], &k = in[kK], &v = in[kV], &kc = in[kKeyCache], &vc = in[kValueCache];
    bool ok = q.nbDims == 3 && dimIs(q.d[2], H * D) && k.nbDims == 3 && dimIs(k.d[2], Hkv * D) && v.nbDims == 3 &&
              dimIs(v.d[2], Hkv * D) && in[kPast].nbDims == 1 && dimIs(in[kPast].d[0], 1) &&
              in[kCos].nbDims == 2 && dimIs(in[kCos].d[1], D / 2) && in[kSin].nbDims == 2 &&
              dimIs(in[kSin].d[1], D / 2);
    for (Dims const* cache : {&kc, &vc}) {
        ok = ok && cache->nbDims == 4 && dimIs(cache->d[0], 1) && dimIs(cache->d[1], Hkv) && dimIs(cache->d[3], D);
    }
    if (!ok) {
        logAttentionError("input shapes do not match num_heads=" + std::to_string(H) + " kv_heads=" +
                          std::to_string(Hkv) + " head_dim=" + std::to_string(D) +
                          " (need q [1, S, H*D], k and v [1, S, Hkv*D], caches [1, Hkv, capacity, D], past_length "
                          "[1], cos and sin [positions, D/2])");
    }
    return ok;
}

int32_t AwqAttentionPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                            DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1) return -1;
    Dims dims[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i) dims[i] = in[i].desc.dims;
    return shapesMatch(dims) ? 0 : -1;
}

size_t AwqAttentionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t /*nbInputs*/,
                                            DynamicPluginTensorDesc const* /*outputs*/,
                                            int32_t /*nbOutputs*/) const noexcept {
    // The rotated queries: [S, H, D] fp16 at the largest S of the profile.
    int64_t const maxTokens = inputs[kQ].max.d[1];
    return static_cast<size_t>(maxTokens > 0 ? maxTokens : 0) * mParams.num_heads * mParams.head_dim * 2;
}

int32_t AwqAttentionPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs,
                                          PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1) return -1;
    Dims dims[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i) dims[i] = in[i].dims;
    return shapesMatch(dims) ? 0 : -1;
}

int32_t AwqAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                                    void const* const* inputs, void* const* outputs, void* workspace,
                                    cudaStream_t stream) noexcept {
    int const tokens = static_cast<int>(inputDesc[kQ].dims.d[1]);
    if (tokens == 0) return 0;
    int const capacity = static_cast<int>(inputDesc[kKeyCache].dims.d[2]);
    int const maxPositions = static_cast<int>(inputDesc[kCos].dims.d[0]);
    // The caches are written in place: see the header for why this is safe.
    int const status = awq_attention(
        static_cast<__half const*>(inputs[kQ]), static_cast<__half const*>(inputs[kK]),
        static_cast<__half const*>(inputs[kV]), const_cast<__half*>(static_cast<__half const*>(inputs[kKeyCache])),
        const_cast<__half*>(static_cast<__half const*>(inputs[kValueCache])),
        static_cast<int64_t const*>(inputs[kPast]), static_cast<__half const*>(inputs[kCos]),
        static_cast<__half const*>(inputs[kSin]), static_cast<__half*>(workspace), static_cast<__half*>(outputs[0]),
        tokens, mParams.num_heads, mParams.kv_heads, mParams.head_dim, capacity, maxPositions, mParams.window,
        mParams.scale, mParams.softcap, /*status=*/nullptr, stream);  // no output for it in the graph: the host's
                                                                      // position check (decoder.step_ids) and the NaN remain
    if (status != 0) {
        logAttentionError(status == AWQ_ATTENTION_INVALID_ARGUMENT
                              ? "invalid arguments for awq_attention (see plugins/kernels/attention.h)"
                              : cudaGetErrorString(static_cast<cudaError_t>(status)));
        return -1;
    }
    return 0;
}

PluginFieldCollection const* AwqAttentionPlugin::getFieldsToSerialize() noexcept {
    mSerializedFields = {PluginField("num_heads", &mParams.num_heads, PluginFieldType::kINT32, 1),
                         PluginField("kv_heads", &mParams.kv_heads, PluginFieldType::kINT32, 1),
                         PluginField("head_dim", &mParams.head_dim, PluginFieldType::kINT32, 1),
                         PluginField("window", &mParams.window, PluginFieldType::kINT32, 1),
                         PluginField("scale", &mParams.scale, PluginFieldType::kFLOAT32, 1),
                         PluginField("softcap", &mParams.softcap, PluginFieldType::kFLOAT32, 1)};
    mSerializedCollection.nbFields = static_cast<int32_t>(mSerializedFields.size());
    mSerializedCollection.fields = mSerializedFields.data();
    return &mSerializedCollection;
}

// ---------------------------------------------------------------- creator

AwqAttentionCreator::AwqAttentionCreator() {
    mFields = {PluginField("num_heads", nullptr, PluginFieldType::kINT32, 1),
               PluginField("kv_heads", nullptr, PluginFieldType::kINT32, 1),
               PluginField("head_dim", nullptr, PluginFieldType::kINT32, 1),
               PluginField("window", nullptr, PluginFieldType::kINT32, 1),
               PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1),
               PluginField("softcap", nullptr, PluginFieldType::kFLOAT32, 1)};
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginV3* AwqAttentionCreator::createPlugin(char const* /*name*/, PluginFieldCollection const* fc,
                                             TensorRTPhase /*phase*/) noexcept {
    return createFromFields<AwqAttentionPlugin, AwqAttentionParams>(
        kAwqAttentionName, fc, [](PluginField const& field, AwqAttentionParams& params) {
            int32_t* intTarget = std::strcmp(field.name, "num_heads") == 0  ? &params.num_heads
                                 : std::strcmp(field.name, "kv_heads") == 0 ? &params.kv_heads
                                 : std::strcmp(field.name, "head_dim") == 0 ? &params.head_dim
                                 : std::strcmp(field.name, "window") == 0   ? &params.window
                                                                            : nullptr;
            float* floatTarget = std::strcmp(field.name, "scale") == 0     ? &params.scale
                                 : std::strcmp(field.name, "softcap") == 0 ? &params.softcap
                                                                           : nullptr;
            return intTarget != nullptr     ? readIntField(field, *intTarget)
                   : floatTarget != nullptr ? readFloatField(field, *floatTarget)
                                            : true;  // plugin_version / plugin_namespace
        });
}

}  // namespace awq_edge
