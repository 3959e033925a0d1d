// The bodies of the small per-row ops (decoder_ops.cu's kernels run them a block a row; the
// persistent decode step, decode_step.cu, a task a row): any block of up to 256 threads.
// Activations are fp16 rows; each computes in fp32 and rounds once when it stores.
#pragma once

#include <math.h>
#include <stdint.h>

#include <cuda_fp16.h>

#include "activation.cuh"

namespace awq_edge {

constexpr int kRowOpsMaxWarps = 8;  // `partial` below: this many floats of shared memory

// The sum of v over the block; every thread gets it. `partial`: kRowOpsMaxWarps floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* partial) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    __syncthreads();  // an earlier call may still be reading `partial`
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0.f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += partial[w];
    return total;
}

// y = x * rsqrt(mean(x^2) + eps) * weight over one row of n values (x may be y).
__device__ __forceinline__ void rms_norm_row(const __half* x, const float* __restrict__ weight, __half* y, int n,
                                             float eps, float* partial) {
    float sum_sq = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = __half2float(x[i]);
        sum_sq += v * v;
    }
    const float inv = rsqrtf(block_sum(sum_sq, partial) / static_cast<float>(n) + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = __float2half(__half2float(x[i]) * inv * weight[i]);
}

// LayerNorm: y = (x - mean(x)) * rsqrt(mean((x - mean)^2) + eps) * weight + bias over one row of n
// values (x may be y), in two passes over x (the variance of the centred values, not E[x^2] - mean^2).
__device__ __forceinline__ void layer_norm_row(const __half* x, const float* __restrict__ weight,
                                               const float* __restrict__ bias, __half* y, int n, float eps,
                                               float* partial) {
    float sum = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += __half2float(x[i]);
    const float mean = block_sum(sum, partial) / static_cast<float>(n);
    float sum_sq = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float c = __half2float(x[i]) - mean;
        sum_sq += c * c;
    }
    const float inv = rsqrtf(block_sum(sum_sq, partial) / static_cast<float>(n) + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        y[i] = __float2half((__half2float(x[i]) - mean) * inv * weight[i] + bias[i]);
    }
}

// A block's norm: LayerNorm where it has a bias (Nemotron, StableLM), else RMSNorm.
__device__ __forceinline__ void norm_row(const __half* x, const float* __restrict__ weight,
                                         const float* __restrict__ bias, __half* y, int n, float eps, float* partial) {
    if (bias != nullptr) {
        layer_norm_row(x, weight, bias, y, n, eps, partial);
    } else {
        rms_norm_row(x, weight, y, n, eps, partial);
    }
}

// residual += x (rounded to fp16), then y = norm(residual): the residual add fused into the next norm.
__device__ __forceinline__ void add_norm_row(const __half* __restrict__ x, __half* __restrict__ residual,
                                             const float* __restrict__ weight, const float* __restrict__ bias,
                                             __half* __restrict__ y, int n, float eps, float* partial) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        residual[i] = __float2half(__half2float(residual[i]) + __half2float(x[i]));
    }
    // each thread reads back the elements it wrote: no barrier needed before the norm's first pass
    norm_row(residual, weight, bias, y, n, eps, partial);
}

// y = table[id, :] * scale; an id outside the vocabulary gives a NaN row.
__device__ __forceinline__ void embed_row(int id, const __half* __restrict__ table, __half* __restrict__ y,
                                          int hidden, int vocab, float scale) {
    const bool valid = id >= 0 && id < vocab;
    const __half* row = table + static_cast<size_t>(valid ? id : 0) * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        y[i] = valid ? __float2half(__half2float(row[i]) * scale) : __float2half(NAN);
    }
}

// GPT-2's, OPT's learned positions: y += table[position] (fp16 [positions, hidden]), each sum rounded to
// fp16, y's values those this thread wrote (embed_row's stride): no barrier between.
__device__ __forceinline__ void add_position_row(__half* __restrict__ y, const __half* __restrict__ table,
                                                 int64_t position, int hidden) {
    const __half* row = table + static_cast<size_t>(position) * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        y[i] = __float2half(__half2float(y[i]) + __half2float(row[i]));
}

// The same from int8 rows with an fp16 scale per 32 values (the int8 lm_head's table, shared when
// tied): y = q[id, :] * scales[id, i / 32] * scale, in float32 before the one rounding to fp16.
__device__ __forceinline__ void embed_row_q8(int id, const int8_t* __restrict__ table, const __half* __restrict__ scales,
                                             __half* __restrict__ y, int hidden, int vocab, float scale) {
    const bool valid = id >= 0 && id < vocab;
    const size_t at = static_cast<size_t>(valid ? id : 0);
    const int8_t* row = table + at * hidden;
    const __half* row_scales = scales + at * ((hidden + 31) / 32);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float value = static_cast<float>(row[i]) * __half2float(row_scales[i / 32]) * scale;
        y[i] = valid ? __float2half(value) : __float2half(NAN);
    }
}

// y[j] = act(gate_up[2j]) * gate_up[2j + 1], j < inter (gate and up rows interleaved at packing);
// with kUngated in kind, y[j] = act(gate_up[j]) (an MLP without a gate: up's row alone). params:
// the activation's (Apertus's xIELU), or null.
__device__ __forceinline__ void act_row(const __half* __restrict__ gate_up, __half* __restrict__ y, int inter,
                                        int kind, const float* __restrict__ params) {
    if (kind & kUngated) {
        for (int j = threadIdx.x; j < inter; j += blockDim.x) {
            y[j] = __float2half(activation(__half2float(gate_up[j]), kind, params));
        }
        return;
    }
    const __half2* pairs = reinterpret_cast<const __half2*>(gate_up);
    for (int j = threadIdx.x; j < inter; j += blockDim.x) {
        const float2 gu = __half22float2(pairs[j]);
        y[j] = __float2half(gated_act(gu.x, gu.y, kind));
    }
}

}  // namespace awq_edge
