// The gated activation of the MLP, shared by the act kernel (decoder_ops.cu, prefill) and the
// decode GEMV's act epilogue (gemv_w4a16.cu), so both compute the same value: act(g) * u in fp32
// from the fp16-rounded g and u. Twin: awq_edge/reference_backend.py twin_act. And the soft-cap
// of attention scores and final logits (Gemma's), wherever a kernel applies one.
#pragma once

#include <math.h>

namespace awq_edge {

enum ActKind { kSilu = 0, kGeluTanh = 1 };  // awq_edge/cuda_backend.py ACT_KINDS

__device__ __forceinline__ float gated_act(float g, float u, int kind) {
    const float act = kind == kSilu ? g / (1.f + expf(-g))
                                    : 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    return act * u;
}

// cap * tanh(x / cap), or x when cap <= 0 (no soft-cap).
__device__ __forceinline__ float soft_cap(float x, float cap) { return cap > 0.f ? cap * tanhf(x / cap) : x; }

}  // namespace awq_edge
