// The MLP's activation, shared by the act kernel (decoder_ops.cu, prefill) and the decode GEMV's
// act epilogue (gemv_w4a16.cu), so both compute the same value: act(g) * u in fp32 from the
// fp16-rounded g and u, or act(g) alone in an MLP without a gate (kUngated set in the kind: Arcee's).
// Twin: awq_edge/reference_backend.py twin_act. And the soft-cap of attention scores and final
// logits (Gemma's), wherever a kernel applies one.
#pragma once

#include <math.h>

namespace awq_edge {

// awq_edge/cuda_backend.py ACT_KINDS, act_code; kUngated is a flag added to the others
enum ActKind { kSilu = 0, kGeluTanh = 1, kRelu2 = 2, kXielu = 3, kGelu = 4, kRelu = 5, kUngated = 8 };

// params: kXielu's (a_p, a_n, beta, eps), the layer's (export.spec.xielu_constants); the others take none.
__device__ __forceinline__ float activation(float g, int kind, const float* params = nullptr) {
    switch (kind & ~kUngated) {
        case kSilu: return g / (1.f + expf(-g));
        case kRelu2: return fmaxf(g, 0.f) * fmaxf(g, 0.f);
        case kRelu: return fmaxf(g, 0.f);
        case kGelu: return 0.5f * g * (1.f + erff(g * 0.7071067811865476f));  // exact (GPT-NeoX's)
        case kXielu:  // Apertus: g > 0: a_p g^2 + beta g; else (e^min(g, eps) - 1 - g) a_n + beta g (as the graph)
            return g > 0.f ? params[0] * g * g + params[2] * g
                           : (expf(fminf(g, params[3])) - 1.f - g) * params[1] + params[2] * g;
        default: return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    }
}

__device__ __forceinline__ float gated_act(float g, float u, int kind) { return activation(g, kind) * u; }

// cap * tanh(x / cap), or x when cap <= 0 (no soft-cap).
__device__ __forceinline__ float soft_cap(float x, float cap) { return cap > 0.f ? cap * tanhf(x / cap) : x; }

}  // namespace awq_edge
