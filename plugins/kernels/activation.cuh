// The MLP's activation, shared by the act kernel (decoder_ops.cu, prefill) and the decode GEMV's
// act epilogue (gemv_w4a16.cu), so both compute the same value: act(g) * u in fp32 from the
// fp16-rounded g and u, or act(g) alone in an MLP without a gate (kUngated set in the kind: Arcee's).
// Twin: awq_edge/reference_backend.py twin_act. And the soft-cap of attention scores and final
// logits (Gemma's), wherever a kernel applies one.
#pragma once

#include <math.h>

namespace awq_edge {

// awq_edge/cuda_backend.py ACT_KINDS, act_code; kUngated is a flag added to the others
enum ActKind { kSilu = 0, kGeluTanh = 1, kRelu2 = 2, kUngated = 4 };

__device__ __forceinline__ float activation(float g, int kind) {
    switch (kind & ~kUngated) {
        case kSilu: return g / (1.f + expf(-g));
        case kRelu2: return fmaxf(g, 0.f) * fmaxf(g, 0.f);
        default: return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    }
}

__device__ __forceinline__ float gated_act(float g, float u, int kind) { return activation(g, kind) * u; }

// cap * tanh(x / cap), or x when cap <= 0 (no soft-cap).
__device__ __forceinline__ float soft_cap(float x, float cap) { return cap > 0.f ? cap * tanhf(x / cap) : x; }

}  // namespace awq_edge
