// The lm_head's body (decoder_ops.cu awq_lm_head, awq_lm_head_q8; the persistent decode step,
// decode_step.cu): a warp takes kHeadRowsPerWarp vocabulary rows, each lane its 16-byte chunks of
// all of them in flight before it uses any; fp16 rows, or int8 rows with an fp16 scale per 32.
#pragma once

#include <stdint.h>

#include <type_traits>

#include <cuda_fp16.h>

#include "activation.cuh"
#include "pdl.cuh"

namespace awq_edge {

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
            const uint4 xv = load_activation(reinterpret_cast<const uint4*>(x) + c * (kValues / 8) + i);
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
        for (int c = threadIdx.x & 31; c < row_bytes / 16; c += 32) prefetch_l2(row + 16 * c);
    }
}

// The warp's sums to logits (plus the head's bias where it has one, Phi's; then soft-capped); rows
// past the vocabulary are not written.
__device__ __forceinline__ void write_head_logits(float (&sum)[kHeadRowsPerWarp], int v0, int vocab, float softcap,
                                                  const float* __restrict__ bias, float* __restrict__ logits) {
#pragma unroll
    for (int r = 0; r < kHeadRowsPerWarp; ++r) {
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], offset);
        if ((threadIdx.x & 31) == 0 && v0 + r < vocab) {
            logits[v0 + r] = soft_cap(bias != nullptr ? sum[r] + bias[v0 + r] : sum[r], softcap);
        }
    }
}

// The logits of the warp's rows v0.. (v0 < vocab) of an int8 table (with its scales) or fp16 one;
// bias: float [vocab], or null.
template <bool kInt8>
__device__ __forceinline__ void lm_head_warp(const __half* __restrict__ x, const void* __restrict__ table,
                                             const __half* __restrict__ scales, int v0, int vocab, int hidden,
                                             float softcap, const float* __restrict__ bias,
                                             float* __restrict__ logits) {
    float sum[kHeadRowsPerWarp] = {};
    if constexpr (!kInt8) {
        head_rows<false, 16>(x, table, nullptr, v0, vocab, hidden, sum);
    } else if (hidden % 16 == 0) {
        head_rows<true, 16>(x, table, scales, v0, vocab, hidden, sum);
    } else {
        head_rows<true, 8>(x, table, scales, v0, vocab, hidden, sum);
    }
    write_head_logits(sum, v0, vocab, softcap, bias, logits);
}

}  // namespace awq_edge
