// Attention over a KV cache written in place (the contract is in attention.h).
//
// Two launches per call (awq_rope_store and awq_attend_d{D}, the names the cuda backend uses):
//   rope_store  one block per new token: rotates q (into q_rot) and k (HF rotate_half, fp32
//               math), writes k and v into their cache rows.
//   attend      one block of 4 warps per (query head, new token). Each warp walks every 4th
//               visible key with an online softmax (running max, sum and V-weighted sum, all
//               fp32); the four partial results are merged at the end. A lane owns D/64 half2
//               pairs of dims, so a warp reads a K or V row as 128-byte contiguous pieces.
// Decode (S = 1) runs H blocks that each read their KV head's rows once. Splitting a long
// context over several blocks per head (flash-decoding) is the next step if attention shows
// up in decode profiles; nothing here has been timed on a GPU yet.
#include <math.h>
#include <stdint.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention.h"

namespace {

constexpr int kWarps = 4;
constexpr int kRopeThreads = 256;

__device__ __forceinline__ bool step_fits(int64_t past, int S, int capacity, int max_positions) {
    return past >= 0 && past + S <= capacity && past + S <= max_positions;
}

// q_stride / kv_stride: elements from one token's q (k, v) to the next's (H * D and Hkv * D when
// they are separate tensors; the qkv width when they are columns of one fused projection).
// A step that does not fit is flagged here, once (attend only writes its NaN).
__device__ __forceinline__ void rope_store(const __half* __restrict__ q, const __half* __restrict__ k,
                                           const __half* __restrict__ v, __half* __restrict__ k_cache,
                                           __half* __restrict__ v_cache, const int64_t* __restrict__ past_ptr,
                                           const __half* __restrict__ cos, const __half* __restrict__ sin,
                                           __half* __restrict__ q_rot, int S, int H, int Hkv, int D, int capacity,
                                           int max_positions, int q_stride, int kv_stride, int* status) {
    const int64_t past = *past_ptr;
    if (!step_fits(past, S, capacity, max_positions)) {
        if (status && blockIdx.x == 0 && threadIdx.x == 0) atomicOr(status, AWQ_ATTENTION_OVER_CAPACITY);
        return;
    }
    const int s = blockIdx.x;
    const int half_d = D / 2;
    const int64_t pos = past + s;
    const __half* cos_row = cos + pos * half_d;
    const __half* sin_row = sin + pos * half_d;
    // (head, i) over the first half of every q head, then every k head
    for (int idx = threadIdx.x; idx < (H + Hkv) * half_d; idx += blockDim.x) {
        const int head = idx / half_d, i = idx % half_d;
        const bool is_q = head < H;
        const __half* src = is_q ? q + static_cast<size_t>(s) * q_stride + static_cast<size_t>(head) * D
                                 : k + static_cast<size_t>(s) * kv_stride + static_cast<size_t>(head - H) * D;
        __half* dst = is_q ? q_rot + (static_cast<size_t>(s) * H + head) * D
                           : k_cache + (static_cast<size_t>(head - H) * capacity + pos) * D;
        const float x1 = __half2float(src[i]), x2 = __half2float(src[i + half_d]);
        const float c = __half2float(cos_row[i]), sn = __half2float(sin_row[i]);
        dst[i] = __float2half(x1 * c - x2 * sn);
        dst[i + half_d] = __float2half(x2 * c + x1 * sn);
    }
    for (int idx = threadIdx.x; idx < Hkv * D; idx += blockDim.x) {
        const int head = idx / D, d = idx % D;
        v_cache[(static_cast<size_t>(head) * capacity + pos) * D + d] =
            v[static_cast<size_t>(s) * kv_stride + static_cast<size_t>(head) * D + d];
    }
}

template <int kPairsPerLane>  // D = 64 * kPairsPerLane
__device__ __forceinline__ void attend(const __half* __restrict__ q_rot, const __half* __restrict__ k_cache, const __half* __restrict__ v_cache,
       const int64_t* __restrict__ past_ptr, __half* __restrict__ out, int S, int H, int Hkv, int capacity,
       int max_positions, int window, float scale, float softcap) {
    constexpr int D = 64 * kPairsPerLane;
    __shared__ float warp_max[kWarps];
    __shared__ float warp_sum[kWarps];
    __shared__ float2 warp_acc[kWarps][D / 2];

    const int h = blockIdx.x, s = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __half* y = out + (static_cast<size_t>(s) * H + h) * D;
    const int64_t past = *past_ptr;
    if (!step_fits(past, S, capacity, max_positions)) {
        for (int d = threadIdx.x; d < D; d += blockDim.x) y[d] = __float2half(NAN);
        return;
    }
    const int kv_head = h / (H / Hkv);
    const int64_t pos = past + s;
    const int64_t first = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;

    const __half2* q2 = reinterpret_cast<const __half2*>(q_rot + (static_cast<size_t>(s) * H + h) * D);
    const __half2* k_rows = reinterpret_cast<const __half2*>(k_cache + static_cast<size_t>(kv_head) * capacity * D);
    const __half2* v_rows = reinterpret_cast<const __half2*>(v_cache + static_cast<size_t>(kv_head) * capacity * D);
    float2 qf[kPairsPerLane], acc[kPairsPerLane];
#pragma unroll
    for (int i = 0; i < kPairsPerLane; ++i) {
        qf[i] = __half22float2(q2[lane + 32 * i]);
        acc[i] = make_float2(0.f, 0.f);
    }
    float running_max = -INFINITY, running_sum = 0.f;
    for (int64_t j = first + warp; j <= pos; j += kWarps) {
        const __half2* k_row = k_rows + j * (D / 2);
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < kPairsPerLane; ++i) {
            const float2 kf = __half22float2(k_row[lane + 32 * i]);
            dot += qf[i].x * kf.x + qf[i].y * kf.y;
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        float score = dot * scale;
        if (softcap > 0.f) score = softcap * tanhf(score / softcap);
        const float new_max = fmaxf(running_max, score);
        const float rescale = __expf(running_max - new_max);  // 0 on the first key
        const float p = __expf(score - new_max);
        running_sum = running_sum * rescale + p;
        const __half2* v_row = v_rows + j * (D / 2);
#pragma unroll
        for (int i = 0; i < kPairsPerLane; ++i) {
            const float2 vf = __half22float2(v_row[lane + 32 * i]);
            acc[i].x = acc[i].x * rescale + p * vf.x;
            acc[i].y = acc[i].y * rescale + p * vf.y;
        }
        running_max = new_max;
    }

    // Merge the warps' softmax states (a warp that saw no key has max -inf and weight 0).
    if (lane == 0) {
        warp_max[warp] = running_max;
        warp_sum[warp] = running_sum;
    }
#pragma unroll
    for (int i = 0; i < kPairsPerLane; ++i) warp_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float block_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) block_max = fmaxf(block_max, warp_max[w]);
    float weight[kWarps], total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
        weight[w] = __expf(warp_max[w] - block_max);
        total += warp_sum[w] * weight[w];
    }
    const float inv_total = 1.f / total;
    for (int pair = threadIdx.x; pair < D / 2; pair += blockDim.x) {
        float2 sum = make_float2(0.f, 0.f);
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            sum.x += warp_acc[w][pair].x * weight[w];
            sum.y += warp_acc[w][pair].y * weight[w];
        }
        reinterpret_cast<__half2*>(y)[pair] = __floats2half2_rn(sum.x * inv_total, sum.y * inv_total);
    }
}

bool aligned4(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 3u) == 0; }

}  // namespace

// The kernels, with C names so that the CUDA driver API finds them in this file's cubin
// (awq_edge/cuda_backend.py) as the launcher below does: awq_rope_store, grid S blocks of 256
// threads, q/k/v rows of any stride (the cuda backend passes the fused qkv buffer's), status
// may be null;
// awq_attend_d{64,128,256}, grid (H, S) blocks of 128 threads.
extern "C" __global__ void __launch_bounds__(kRopeThreads)
awq_rope_store(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
               __half* __restrict__ k_cache, __half* __restrict__ v_cache, const int64_t* __restrict__ past_ptr,
               const __half* __restrict__ cos, const __half* __restrict__ sin, __half* __restrict__ q_rot, int S,
               int H, int Hkv, int D, int capacity, int max_positions, int q_stride, int kv_stride,
               int* __restrict__ status) {
    rope_store(q, k, v, k_cache, v_cache, past_ptr, cos, sin, q_rot, S, H, Hkv, D, capacity, max_positions, q_stride,
               kv_stride, status);
}

#define AWQ_ATTEND_ENTRY(D)                                                                                         \
    extern "C" __global__ void __launch_bounds__(kWarps * 32)                                                       \
        awq_attend_d##D(const __half* __restrict__ q_rot, const __half* __restrict__ k_cache,                       \
                        const __half* __restrict__ v_cache, const int64_t* __restrict__ past_ptr,                   \
                        __half* __restrict__ out, int S, int H, int Hkv, int capacity, int max_positions,          \
                        int window, float scale, float softcap) {                                                   \
        attend<D / 64>(q_rot, k_cache, v_cache, past_ptr, out, S, H, Hkv, capacity, max_positions, window, scale,   \
                       softcap);                                                                                    \
    }
AWQ_ATTEND_ENTRY(64)
AWQ_ATTEND_ENTRY(128)
AWQ_ATTEND_ENTRY(256)

extern "C" int awq_attention(const __half* q, const __half* k, const __half* v, __half* k_cache, __half* v_cache,
                             const int64_t* past, const __half* cos, const __half* sin, __half* q_rot, __half* out,
                             int S, int H, int Hkv, int D, int capacity, int max_positions, int window, float scale,
                             float softcap, int* status, cudaStream_t stream) {
    const bool valid = q && k && v && k_cache && v_cache && past && cos && sin && q_rot && out && S >= 1 &&
                       S <= 65535 && H >= 1 && Hkv >= 1 && H % Hkv == 0 && (D == 64 || D == 128 || D == 256) &&
                       capacity >= S && max_positions >= S && window >= 0 && isfinite(scale) &&
                       softcap >= 0.f && isfinite(softcap) && aligned4(q) && aligned4(k) && aligned4(v) &&
                       aligned4(k_cache) && aligned4(v_cache) && aligned4(q_rot) && aligned4(out);
    if (!valid) return AWQ_ATTENTION_INVALID_ARGUMENT;
    awq_rope_store<<<S, kRopeThreads, 0, stream>>>(q, k, v, k_cache, v_cache, past, cos, sin, q_rot, S, H, Hkv, D,
                                                   capacity, max_positions, H * D, Hkv * D, status);
    auto attend_kernel = D == 64 ? awq_attend_d64 : D == 128 ? awq_attend_d128 : awq_attend_d256;
    attend_kernel<<<dim3(H, S), kWarps * 32, 0, stream>>>(q_rot, k_cache, v_cache, past, out, S, H, Hkv, capacity,
                                                         max_positions, window, scale, softcap);
    return static_cast<int>(cudaGetLastError());
}
