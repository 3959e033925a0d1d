// The layers that keep a recurrent state (awq_edge/export/spec.py DeltaNet says what they compute): Qwen3.5's
// gated delta nets and Granite 4.0-H's Mamba-2 mixers. Their numpy twins are awq_edge/reference_backend.py
// twin_delta_conv, twin_delta_rule, twin_mamba_rule and twin_group_norm. A layer a step, each kernel over the
// step's rows in order: the causal convolution of q, k and v (x, B and C; a thread a channel), then the rule (a
// block a value head), and a Mamba-2's gated norm by group (a block a row's group). Their states stay float32 in
// global memory, updated in place: the convolution's inputs of the kernel - 1 tokens before [kernel - 1, C]
// (oldest first) and S [Hv, Dk, Dv].
// Nothing here has run on a GPU yet (tests/test_cuda_backend_gpu.py runs it when one is lent).
#include <math.h>
#include <stdint.h>

#include <cuda_fp16.h>

#include "pdl.cuh"
#include "row_ops.cuh"

namespace {

constexpr int kConvThreads = 256;
constexpr int kRuleThreads = 256;  // a block's threads: at least Dk and Dv (the backend checks both <= this)

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

}  // namespace

// qkvz [rows, stride] fp16: its first `channels` columns (q, k, v) replaced in place by silu of their
// causal depthwise convolution, tap j of weight [channels, kernel] (float32) reading the token
// kernel - 1 - j back, plus bias [channels] (float32; null: none); state float32 [kernel - 1, channels], the
// inputs before the step, moved on past its rows. Grid: ceil(channels / 256) blocks of 256 threads.
extern "C" __global__ void __launch_bounds__(kConvThreads)
awq_delta_conv(__half* qkvz, int stride, float* __restrict__ state, const float* __restrict__ weight,
               const float* __restrict__ bias, int rows, int channels, int kernel) {
    awq_edge::begin_after_previous_kernel();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const float* w = weight + static_cast<size_t>(c) * kernel;
    for (int r = 0; r < rows; ++r) {
        __half* cell = qkvz + static_cast<size_t>(r) * stride + c;
        const float x = __half2float(*cell);
        float acc = bias ? bias[c] : 0.f;
        for (int j = 0; j < kernel - 1; ++j) acc += w[j] * state[static_cast<size_t>(j) * channels + c];
        acc += w[kernel - 1] * x;
        for (int j = 0; j + 1 < kernel - 1; ++j) {
            state[static_cast<size_t>(j) * channels + c] = state[static_cast<size_t>(j + 1) * channels + c];
        }
        state[static_cast<size_t>(kernel - 2) * channels + c] = x;
        *cell = __float2half(acc * sigmoid(acc));
    }
}

// The rule of value head blockIdx.x over the step's rows in order. qkvz [rows, stride] fp16: q and k
// (k_heads x k_dim each), v (v_heads x v_dim) after awq_delta_conv, then z from column conv_dim; x
// [rows, hidden] fp16, the normed input that b and a (float32 [v_heads, hidden]) read; dt_bias and rate
// (-exp(A_log)) float32 [v_heads]; norm float32 [v_dim]; state float32 [v_heads, k_dim, v_dim]; out
// [rows, v_heads x v_dim] fp16. Per row: q and k of the head's key head L2-normed (q / sqrt(k_dim)),
// decay = exp(rate softplus(a . x + dt_bias)), beta = sigmoid(b . x), then thread j < v_dim holds
// column j of S: S = decay S; S += k (beta (v - S^T k))^T; o = S^T q, normed over the head (RMS, eps)
// times norm and silu(z). Grid: v_heads blocks of 256 threads.
extern "C" __global__ void __launch_bounds__(kRuleThreads)
awq_delta_rule(const __half* __restrict__ qkvz, int stride, const __half* __restrict__ x, __half* __restrict__ out,
               float* __restrict__ state, const float* __restrict__ b, const float* __restrict__ a,
               const float* __restrict__ dt_bias, const float* __restrict__ rate, const float* __restrict__ norm,
               int rows, int hidden, int k_heads, int v_heads, int k_dim, int v_dim, float eps) {
    awq_edge::begin_after_previous_kernel();
    __shared__ float q[kRuleThreads], k[kRuleThreads], partial[awq_edge::kRowOpsMaxWarps];
    const int h = blockIdx.x, j = threadIdx.x;
    const int key_dim = k_heads * k_dim, conv_dim = 2 * key_dim + v_heads * v_dim;
    const int first = (h / (v_heads / k_heads)) * k_dim;  // the key head's first column of q (and of k after it)
    float* s = state + static_cast<size_t>(h) * k_dim * v_dim;
    for (int r = 0; r < rows; ++r) {
        const __half* row = qkvz + static_cast<size_t>(r) * stride;
        const __half* xr = x + static_cast<size_t>(r) * hidden;
        // (the previous row's reads of q and k ended before its last block_sum's barrier)
        float qq = 0.f, kk = 0.f;
        if (j < k_dim) {
            q[j] = __half2float(row[first + j]);
            k[j] = __half2float(row[key_dim + first + j]);
            qq = q[j] * q[j];
            kk = k[j] * k[j];
        }
        const float q_scale = rsqrtf(awq_edge::block_sum(qq, partial) + 1e-6f) * rsqrtf(static_cast<float>(k_dim));
        const float k_scale = rsqrtf(awq_edge::block_sum(kk, partial) + 1e-6f);
        float xb = 0.f, xa = 0.f;
        for (int i = j; i < hidden; i += blockDim.x) {
            const float xi = __half2float(xr[i]);
            xb += xi * b[static_cast<size_t>(h) * hidden + i];
            xa += xi * a[static_cast<size_t>(h) * hidden + i];
        }
        const float beta = sigmoid(awq_edge::block_sum(xb, partial));
        const float pre = awq_edge::block_sum(xa, partial) + dt_bias[h];
        const float decay = expf(rate[h] * (pre > 20.f ? pre : log1pf(expf(pre))));  // (softplus as torch's)
        float o = 0.f;
        if (j < v_dim) {
            float remembered = 0.f;  // (S decayed)^T k, column j
            for (int i = 0; i < k_dim; ++i) {
                remembered += s[static_cast<size_t>(i) * v_dim + j] * decay * k[i] * k_scale;
            }
            const float delta = (__half2float(row[2 * key_dim + h * v_dim + j]) - remembered) * beta;
            for (int i = 0; i < k_dim; ++i) {
                const float updated = s[static_cast<size_t>(i) * v_dim + j] * decay + k[i] * k_scale * delta;
                s[static_cast<size_t>(i) * v_dim + j] = updated;
                o += updated * q[i] * q_scale;
            }
        }
        const float inv = rsqrtf(awq_edge::block_sum(o * o, partial) / static_cast<float>(v_dim) + eps);
        if (j < v_dim) {
            const float z = __half2float(row[conv_dim + h * v_dim + j]);
            out[static_cast<size_t>(r) * v_heads * v_dim + h * v_dim + j] = __float2half(o * inv * norm[j] * z *
                                                                                         sigmoid(z));
        }
    }
}

// The rule of a Mamba-2 mixer's value head blockIdx.x over the step's rows in order. qkvz [rows, stride] fp16:
// x (v_heads x v_dim), B and C (k_heads x k_dim each) after awq_delta_conv, then z from column conv_dim; xn
// [rows, hidden] fp16, the normed input that a (float32 [v_heads, hidden]) reads; dt_bias, rate (-exp(A_log))
// and skip (D) float32 [v_heads]; state float32 [v_heads, k_dim, v_dim]; out [rows, v_heads x v_dim] fp16:
// (S^T C + D x) silu(z), awq_group_norm's input. Per row: dt = softplus(a . xn + dt_bias) within dt_min..dt_max,
// decay = exp(rate dt), then thread j < v_dim holds column j of S: S = decay S + B (dt x)^T; o = S^T C + D x.
// Grid: v_heads blocks of 256 threads.
extern "C" __global__ void __launch_bounds__(kRuleThreads, 1)  // (ptxas would spill, capped to 32 registers)
awq_mamba_rule(const __half* __restrict__ qkvz, int stride, const __half* __restrict__ xn, __half* __restrict__ out,
               float* __restrict__ state, const float* __restrict__ a, const float* __restrict__ dt_bias,
               const float* __restrict__ rate, const float* __restrict__ skip, int rows, int hidden, int k_heads,
               int v_heads, int k_dim, int v_dim, float dt_min, float dt_max) {
    awq_edge::begin_after_previous_kernel();
    __shared__ float bs[kRuleThreads], cs[kRuleThreads], partial[awq_edge::kRowOpsMaxWarps];
    const int h = blockIdx.x, j = threadIdx.x;
    const int key_dim = k_heads * k_dim, value_dim = v_heads * v_dim, conv_dim = 2 * key_dim + value_dim;
    const int first = value_dim + (h / (v_heads / k_heads)) * k_dim;  // the group's first column of B (C: + key_dim)
    float* s = state + static_cast<size_t>(h) * k_dim * v_dim;
    for (int r = 0; r < rows; ++r) {
        const __half* row = qkvz + static_cast<size_t>(r) * stride;
        const __half* xr = xn + static_cast<size_t>(r) * hidden;
        if (j < k_dim) {
            bs[j] = __half2float(row[first + j]);
            cs[j] = __half2float(row[key_dim + first + j]);
        }
        float xa = 0.f;
        for (int i = j; i < hidden; i += blockDim.x) xa += __half2float(xr[i]) * a[static_cast<size_t>(h) * hidden + i];
        const float pre = awq_edge::block_sum(xa, partial) + dt_bias[h];  // (its barriers publish bs and cs)
        const float dt = fminf(fmaxf(pre > 20.f ? pre : log1pf(expf(pre)), dt_min), dt_max);  // (softplus as torch's)
        const float decay = expf(rate[h] * dt);
        if (j < v_dim) {
            const float xv = __half2float(row[h * v_dim + j]), written = dt * xv;
            float o = 0.f;
            for (int i = 0; i < k_dim; ++i) {
                const float updated = s[static_cast<size_t>(i) * v_dim + j] * decay + bs[i] * written;
                s[static_cast<size_t>(i) * v_dim + j] = updated;
                o += updated * cs[i];
            }
            o += skip[h] * xv;
            const float z = __half2float(row[conv_dim + h * v_dim + j]);
            out[static_cast<size_t>(r) * value_dim + h * v_dim + j] = __float2half(o * z * sigmoid(z));
        }
        __syncthreads();  // (this row's reads of bs and cs end before the next row's writes)
    }
}

// x [rows, n] fp16 in place: each of `groups` equal parts of a row RMS-normed (eps) and times its part of weight
// (float32 [n]): a Mamba-2's gated norm, after awq_mamba_rule. Grid: (rows, groups) blocks of 256 threads.
extern "C" __global__ void __launch_bounds__(kConvThreads)
awq_group_norm(__half* x, const float* __restrict__ weight, int n, int groups, float eps) {
    awq_edge::begin_after_previous_kernel();
    __shared__ float partial[awq_edge::kRowOpsMaxWarps];
    const int width = n / groups;
    __half* part = x + static_cast<size_t>(blockIdx.x) * n + static_cast<size_t>(blockIdx.y) * width;
    awq_edge::rms_norm_row(part, weight + static_cast<size_t>(blockIdx.y) * width, part, width, eps, partial);
}
