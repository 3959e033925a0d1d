// The small ops of the native decoder step (awq_edge/decoder.py lists the step; the numpy twin
// of each kernel is in awq_edge/reference_backend.py, twin_<op>).
//
// Activations are fp16 rows; every kernel computes in fp32 and rounds once when it stores.
// All are launched through the CUDA driver API from this file's cubin (awq_edge/cuda_backend.py),
// so they have C names, and the launch shape is in each comment: one block per row unless said.
// Nothing here has run on a GPU yet (the tests in tests/test_cuda_backend_gpu.py do, when one is lent).
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "activation.cuh"
#include "pdl.cuh"
#include "row_ops.cuh"

namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;

}  // namespace

// out[s, :] = table[ids[s], :] * scale. Grid: S blocks. An id outside the vocabulary gives a NaN row.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_embed(const int32_t* __restrict__ ids, const __half* __restrict__ table, __half* __restrict__ out, int hidden,
          int vocab, float scale) {
    awq_edge::begin_after_previous_kernel();
    awq_edge::embed_row(ids[blockIdx.x], table, out + static_cast<size_t>(blockIdx.x) * hidden, hidden, vocab, scale);
}

// out[r] = norm(x[first_row + r]) for the grid's rows (x may be out: Gemma's sandwich norms run in
// place). weight is float32 with the family's offset folded in (Gemma: 1 + w).
extern "C" __global__ void __launch_bounds__(kThreads)
awq_rms_norm(const __half* x, const float* __restrict__ weight, __half* out, int hidden, float eps, int first_row) {
    awq_edge::begin_after_previous_kernel();
    __shared__ float partial[kWarps];
    const int row = first_row + blockIdx.x;
    awq_edge::rms_norm_row(x + static_cast<size_t>(row) * hidden, weight,
                           out + static_cast<size_t>(blockIdx.x) * hidden, hidden, eps, partial);
}

// The residual add fused into the next norm: residual[row] += x[row] (rounded to fp16), then
// out[r] = norm(residual[row]), row = first_row + r. The final norm runs on the last row only.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_add_rms_norm(const __half* __restrict__ x, __half* __restrict__ residual, const float* __restrict__ weight,
                 __half* __restrict__ out, int hidden, float eps, int first_row) {
    awq_edge::begin_after_previous_kernel();
    __shared__ float partial[kWarps];
    const size_t row = static_cast<size_t>(first_row + blockIdx.x) * hidden;
    awq_edge::add_rms_norm_row(x + row, residual + row, weight, out + static_cast<size_t>(blockIdx.x) * hidden, hidden,
                               eps, partial);
}

// Per-head RMSNorm in place (Qwen3 and Gemma3's q/k norms): the heads of row r start at
// x[r * row_stride + offset], head_dim values each. Grid: (heads, rows).
extern "C" __global__ void __launch_bounds__(kThreads)
awq_head_rms_norm(__half* x, int row_stride, int offset, int head_dim, const float* __restrict__ weight, float eps) {
    awq_edge::begin_after_previous_kernel();
    __shared__ float partial[kWarps];
    __half* head = x + static_cast<size_t>(blockIdx.y) * row_stride + offset + static_cast<size_t>(blockIdx.x) * head_dim;
    awq_edge::rms_norm_row(head, weight, head, head_dim, eps, partial);
}

// y[r, :] += bias (Qwen2's q/k/v bias, after the fp16 GEMV output). Grid: rows.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_bias_add(__half* __restrict__ y, const __half* __restrict__ bias, int n) {
    awq_edge::begin_after_previous_kernel();
    __half* row = y + static_cast<size_t>(blockIdx.x) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = __float2half(__half2float(row[i]) + __half2float(bias[i]));
}

// out[r, j] = act(gate_up[r, 2j]) * gate_up[r, 2j + 1] (gate and up rows interleaved at packing);
// kind: 0 = SiLU, 1 = GELU (tanh approximation). Grid: rows. The decode GEMV fuses this (act epilogue).
extern "C" __global__ void __launch_bounds__(kThreads)
awq_gated_act(const __half* __restrict__ gate_up, __half* __restrict__ out, int inter, int kind) {
    awq_edge::begin_after_previous_kernel();
    awq_edge::gated_act_row(gate_up + 2 * static_cast<size_t>(blockIdx.x) * inter,
                            out + static_cast<size_t>(blockIdx.x) * inter, inter, kind);
}

// h[r, :] += y[r, :], rounded to fp16: the residual add of a prefill step, which the decode GEMV
// fuses into its epilogue. Grid: rows.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_residual_add(__half* __restrict__ h, const __half* __restrict__ y, int n) {
    awq_edge::begin_after_previous_kernel();
    const size_t row = static_cast<size_t>(blockIdx.x) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) h[row + i] = __float2half(__half2float(h[row + i]) + __half2float(y[row + i]));
}

// The lm_head: logits[v] = table[v, :] . x in fp32, then softcap * tanh(l / softcap) when
// softcap > 0. Two tables: fp16 rows (awq_lm_head), or int8 rows with an fp16 scale per 32 values
// (awq_lm_head_q8, the cuda engine's default: half the bytes; q int8 [vocab, hidden], scales fp16
// [vocab, ceil(hidden / 32)]). The head is a third of a small model's reads a token, so it is
// laid out like the decode GEMV: a warp takes kHeadRowsPerWarp rows, and each lane loads its chunk
// of all of them before using any (16 bytes a row; 8 for int8 rows when hidden % 16 != 0),
// reusing its x values for every row. (The GEMV as a warp per row, each lane with at most two
// 16-byte loads in flight, reached 45-55% of copy on the H100: benchmarks/README.md.) hidden % 8
// == 0 (the backend checks). Grid: ceil(vocab / 32) blocks of 256 threads.
constexpr int kHeadRowsPerWarp = 4;

template <bool kInt8, int kBytes>  // fp16 rows: 16 bytes = 8 values; int8 rows: kBytes values, one scale
__device__ __forceinline__ void head_rows(const __half* __restrict__ x, const void* __restrict__ table,
                                          const __half* __restrict__ scales, int v0, int vocab, int hidden,
                                          float (&sum)[kHeadRowsPerWarp]) {
    using Load = typename std::conditional<kBytes == 16, uint4, uint2>::type;
    constexpr int kValues = kInt8 ? kBytes : kBytes / 2;  // values a load
    const int lane = threadIdx.x & 31, row_bytes = hidden * (kInt8 ? 1 : 2), blocks = (hidden + 31) / 32;
    int row[kHeadRowsPerWarp];  // the warp's rows; past the vocabulary, row v0 again (never written)
#pragma unroll
    for (int r = 0; r < kHeadRowsPerWarp; ++r) row[r] = v0 + r < vocab ? v0 + r : v0;
    for (int c = lane; c < hidden / kValues; c += 32) {
        Load bits[kHeadRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kHeadRowsPerWarp; ++r) {  // every row's load first: kHeadRowsPerWarp in flight
            bits[r] = __ldcs(reinterpret_cast<const Load*>(static_cast<const char*>(table) +
                                                           static_cast<size_t>(row[r]) * row_bytes) + c);
        }
        float xf[kValues];
#pragma unroll
        for (int i = 0; i < kValues / 8; ++i) {
            const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x) + c * (kValues / 8) + i);
            const __half2* x2 = reinterpret_cast<const __half2*>(&xv);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 f = __half22float2(x2[j]);
                xf[8 * i + 2 * j] = f.x;
                xf[8 * i + 2 * j + 1] = f.y;
            }
        }
#pragma unroll
        for (int r = 0; r < kHeadRowsPerWarp; ++r) {
            float dot = 0.f;
            if constexpr (kInt8) {
                const int8_t* w = reinterpret_cast<const int8_t*>(&bits[r]);
#pragma unroll
                for (int i = 0; i < kValues; ++i) dot += static_cast<float>(w[i]) * xf[i];
                dot *= __half2float(scales[static_cast<size_t>(row[r]) * blocks + c * kValues / 32]);
            } else {
                const __half2* w2 = reinterpret_cast<const __half2*>(&bits[r]);
#pragma unroll
                for (int i = 0; i < kValues / 2; ++i) {
                    const float2 w = __half22float2(w2[i]);
                    dot += w.x * xf[2 * i] + w.y * xf[2 * i + 1];
                }
            }
            sum[r] += dot;
        }
    }
}

// The table is no kernel's output: before the wait for the previous kernel (pdl.cuh) each lane sends
// all its 16-byte chunks of the warp's rows toward L2 (every round: at SmolLM2's 576-byte int8
// rows a second round of 4 lanes waited on DRAM again), overlapping the final norm before it.
__device__ __forceinline__ void prefetch_head_rows(const void* __restrict__ table, int v0, int vocab, int row_bytes) {
    if (row_bytes % 16 != 0) return;  // (int8 rows of hidden % 16 != 0: 8-byte aligned, left alone)
#pragma unroll
    for (int r = 0; r < kHeadRowsPerWarp; ++r) {
        if (v0 + r >= vocab) break;
        const char* row = static_cast<const char*>(table) + static_cast<size_t>(v0 + r) * row_bytes;
        for (int c = threadIdx.x & 31; c < row_bytes / 16; c += 32) awq_edge::prefetch_l2(row + 16 * c);
    }
}

// The warp's sums to logits (soft-capped); rows past the vocabulary are not written.
__device__ __forceinline__ void write_head_logits(float (&sum)[kHeadRowsPerWarp], int v0, int vocab, float softcap,
                                                  float* __restrict__ logits) {
#pragma unroll
    for (int r = 0; r < kHeadRowsPerWarp; ++r) {
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], offset);
        if ((threadIdx.x & 31) == 0 && v0 + r < vocab) {
            logits[v0 + r] = awq_edge::soft_cap(sum[r], softcap);
        }
    }
}

extern "C" __global__ void __launch_bounds__(kThreads)
awq_lm_head(const __half* __restrict__ x, const __half* __restrict__ table, float* __restrict__ logits, int vocab,
            int hidden, float softcap) {
    awq_edge::let_next_kernel_start();
    const int v0 = (blockIdx.x * kWarps + threadIdx.x / 32) * kHeadRowsPerWarp;
    prefetch_head_rows(table, v0, vocab, 2 * hidden);
    awq_edge::wait_for_previous_kernel();
    if (v0 >= vocab) return;  // (a whole warp: the shuffles see all 32 lanes)
    float sum[kHeadRowsPerWarp] = {};
    head_rows<false, 16>(x, table, nullptr, v0, vocab, hidden, sum);
    write_head_logits(sum, v0, vocab, softcap, logits);
}

extern "C" __global__ void __launch_bounds__(kThreads)
awq_lm_head_q8(const __half* __restrict__ x, const int8_t* __restrict__ q, const __half* __restrict__ scales,
               float* __restrict__ logits, int vocab, int hidden, float softcap) {
    awq_edge::let_next_kernel_start();
    const int v0 = (blockIdx.x * kWarps + threadIdx.x / 32) * kHeadRowsPerWarp;
    prefetch_head_rows(q, v0, vocab, hidden);
    awq_edge::wait_for_previous_kernel();
    if (v0 >= vocab) return;
    float sum[kHeadRowsPerWarp] = {};
    if (hidden % 16 == 0) {
        head_rows<true, 16>(x, q, scales, v0, vocab, hidden, sum);
    } else {
        head_rows<true, 8>(x, q, scales, v0, vocab, hidden, sum);
    }
    write_head_logits(sum, v0, vocab, softcap, logits);
}

// The position counter on the device: past += S after a step (the next replay reads it). Grid: 1 x 1.
extern "C" __global__ void awq_advance(int64_t* past, int S) {
    awq_edge::begin_after_previous_kernel();
    *past += S;
}
