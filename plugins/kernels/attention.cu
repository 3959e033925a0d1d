// Attention over a KV cache written in place (the contract is in attention.h).
//
// Two launches per call of awq_attention (awq_rope_store, then attend or attend_mma by S, as the
// cuda backend chooses; the names it launches):
//   rope_store  one block per new token: rotates q (into q_rot) and k (HF rotate_half, fp32
//               math), writes k and v into their cache rows.
//   attend      one block of 128 threads per (query head, new token), walking the visible keys
//               in tiles of 128: each thread scores one key of the tile (its loads independent of
//               the others'), the block keeps an online softmax (running max and sum, fp32), and
//               each thread accumulates the V-weighted sum of one pair of dims over a share of
//               the tile's keys, rescaled when the max moves.
//   attend_mma    (prefill chunks of 16 rows or more) one block of 4 warps per (query head, 64
//               new tokens): each K/V tile read into shared memory once for the 64 tokens,
//               scores and P V on tensor cores (flash-attention 2's loop).
//   attend_block  (benchmarks/cuda_attention.py's comparison; the backend's D = 256 kernel until
//               attend_mma took that size, not yet timed on a GPU) one block per (query head, 16
//               tokens) on CUDA cores: each K/V tile read once for the 16, each token's 8 lanes
//               score and sum it.
// Decode uses attend_split (flash-decoding) instead, the same tile work spread over blocks:
//   attend_split  grid (H, splits), 128 threads: block (h, c) takes keys c*128 .. c*128+127 of
//               head h (those visible), keeps its softmax state (max, sum, V-weighted sum) in
//               `partials`; the last block of the head to finish (a counter per head) merges the
//               splits and writes out. splits = ceil(capacity / 128) is fixed when the decode
//               graph is captured; the blocks with no visible key (past the position, before the
//               window) return at once, and the counts and the merge cover the others only.
//               A block issues all its K and V loads first (SplitLoads): one DRAM latency a split.
// Timed on the H200 (2026-12-04): benchmarks/cuda_attention.py (prefill), cuda_layer.py (decode).
#include <math.h>
#include <stdint.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "activation.cuh"
#include "attention.h"
#include "mma.cuh"
#include "pdl.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kRopeThreads = 256;

__device__ __forceinline__ bool step_fits(int64_t past, int S, int capacity, int max_positions) {
    return past >= 0 && past + S <= capacity && past + S <= max_positions;
}

// The first key a token at position pos sees: pos - window + 1 with a sliding window, else 0.
__device__ __forceinline__ int64_t first_key(int64_t pos, int window) {
    return (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
}

// A head's sink (gpt-oss's, Granite SWA's self_attn.sinks: a logit in its softmax's denominator
// only, no value) as the term it adds to a sum of scores exponentiated against `max`; 0 without
// sinks (null). A sink far above max makes the sum inf and the output 0, as the softmax all but does.
__device__ __forceinline__ float sink_term(const float* __restrict__ sinks, int h, float max) {
    return sinks ? __expf(sinks[h] - max) : 0.f;
}

// q_stride / kv_stride: elements from one token's q (k, v) to the next's (H * D and Hkv * D when
// they are separate tensors; the qkv width when they are columns of one fused projection).
// A step that does not fit is flagged here, once (attend only writes its NaN). s: the step's row
// this block rotates and stores (its kernel's blockIdx.x). No tables (cos null): q and k are
// rotated already (awq_rope_in_place, before Hunyuan's q/k norms), copied as they are.
__device__ __forceinline__ void rope_store(const __half* __restrict__ q, const __half* __restrict__ k,
                                           const __half* __restrict__ v, __half* __restrict__ k_cache,
                                           __half* __restrict__ v_cache, const int64_t* __restrict__ past_ptr,
                                           const __half* __restrict__ cos, const __half* __restrict__ sin,
                                           __half* __restrict__ q_rot, int S, int H, int Hkv, int D, int capacity,
                                           int max_positions, int q_stride, int kv_stride, int* status, int s) {
    const int64_t past = *past_ptr;
    if (!step_fits(past, S, capacity, max_positions)) {
        if (status && s == 0 && threadIdx.x == 0) atomicOr(status, AWQ_ATTENTION_OVER_CAPACITY);
        return;
    }
    const int half_d = D / 2;
    const int64_t pos = past + s;
    const __half* cos_row = cos ? cos + pos * half_d : nullptr;
    const __half* sin_row = sin ? sin + pos * half_d : nullptr;
    // (head, i) over the first half of every q head, then every k head
    for (int idx = threadIdx.x; idx < (H + Hkv) * half_d; idx += blockDim.x) {
        const int head = idx / half_d, i = idx % half_d;
        const bool is_q = head < H;
        const __half* src = is_q ? q + static_cast<size_t>(s) * q_stride + static_cast<size_t>(head) * D
                                 : k + static_cast<size_t>(s) * kv_stride + static_cast<size_t>(head - H) * D;
        __half* dst = is_q ? q_rot + (static_cast<size_t>(s) * H + head) * D
                           : k_cache + (static_cast<size_t>(head - H) * capacity + pos) * D;
        const float x1 = __half2float(src[i]), x2 = __half2float(src[i + half_d]);
        const float c = cos_row ? __half2float(cos_row[i]) : 1.f, sn = sin_row ? __half2float(sin_row[i]) : 0.f;
        dst[i] = __float2half(x1 * c - x2 * sn);
        dst[i + half_d] = __float2half(x2 * c + x1 * sn);
    }
    for (int idx = threadIdx.x; idx < Hkv * D; idx += blockDim.x) {
        const int head = idx / D, d = idx % D;
        v_cache[(static_cast<size_t>(head) * capacity + pos) * D + d] =
            v[static_cast<size_t>(s) * kv_stride + static_cast<size_t>(head) * D + d];
    }
}

// The first `heads` heads of q/k/v row s (q's, then k's) rotated in place at position past + s
// (HF rotate_half, fp32 math, as rope_store); a position past the tables is left for rope_store
// to flag.
__device__ __forceinline__ void rope_in_place(__half* __restrict__ qkv, const int64_t* __restrict__ past_ptr,
                                              const __half* __restrict__ cos, const __half* __restrict__ sin,
                                              int heads, int D, int stride, int max_positions, int s) {
    const int64_t pos = *past_ptr + s;
    if (pos < 0 || pos >= max_positions) return;
    const int half_d = D / 2;
    __half* row = qkv + static_cast<size_t>(s) * stride;
    for (int idx = threadIdx.x; idx < heads * half_d; idx += blockDim.x) {
        const int i = idx % half_d;
        __half* x = row + static_cast<size_t>(idx / half_d) * D + i;
        const float x1 = __half2float(x[0]), x2 = __half2float(x[half_d]);
        const float c = __half2float(cos[pos * half_d + i]), sn = __half2float(sin[pos * half_d + i]);
        x[0] = __float2half(x1 * c - x2 * sn);
        x[half_d] = __float2half(x2 * c + x1 * sn);
    }
}

constexpr int kTileKeys = 128;  // keys per tile: one per thread in the score pass
constexpr int kTileThreads = kTileKeys;
static_assert(kTileThreads == kWarps * 32, "attend's block is the tile");

// max / sum of v over a block of kTileThreads; every thread gets it. `scratch`: kTileThreads / 32 floats.
template <bool kMax>
__device__ __forceinline__ float tile_reduce(float v, float* scratch) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = kMax ? fmaxf(v, other) : v + other;
    }
    __syncthreads();  // an earlier call may still be reading `scratch`
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    float total = scratch[0];
#pragma unroll
    for (int w = 1; w < kTileThreads / 32; ++w) total = kMax ? fmaxf(total, scratch[w]) : total + scratch[w];
    return total;
}

// scale * q.k of a key row whose 16-byte chunk c is chunk(c) (q in shared memory as float),
// soft-capped when softcap > 0; kUnroll chunks' loads in flight together.
template <int D, int kUnroll, typename Chunk>
__device__ __forceinline__ float score_chunks(const float* q_s, Chunk chunk, float scale, float softcap) {
    float dot = 0.f;
#pragma unroll kUnroll
    for (int c = 0; c < D / 8; ++c) {
        const uint4 bits = chunk(c);
        const __half2* k2 = reinterpret_cast<const __half2*>(&bits);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 kf = __half22float2(k2[i]);
            dot += q_s[8 * c + 2 * i] * kf.x + q_s[8 * c + 2 * i + 1] * kf.y;
        }
    }
    return awq_edge::soft_cap(dot * scale, softcap);
}

// score_chunks of key row j.
template <int D>
__device__ __forceinline__ float score_key(const float* q_s, const __half* __restrict__ k_rows, int64_t j, float scale,
                                           float softcap) {
    const uint4* k_row = reinterpret_cast<const uint4*>(k_rows + j * D);
    constexpr int kUnroll = D / 8 <= 16 ? D / 8 : 8;  // the row's loads in flight together (D = 256: half)
    return score_chunks<D, kUnroll>(q_s, [&](int c) { return k_row[c]; }, scale, softcap);
}

// acc += sum over this thread's share of the tile's n keys (from row `begin`) of p_s[t] * V[t] at
// its 8 dims: thread = (group, chunk of 8 dims), the groups taking every kGroups-th key, one
// 16-byte load a key. The walk is bound by load latency (a key's load, then its products), so
// kValueLoads keys' loads are issued before their products: at D = 128 a thread walks 16 keys of a
// full tile in 4 rounds (one 4-byte load a key, 64 rounds, before 2026-12-04: the H200 took 15.5 us
// per Llama-2-7B layer at 512 keys, benchmarks/cuda_layer.py).
constexpr int kValueLoads = 4;

__device__ __forceinline__ void add_scaled8(float (&acc)[8], float p, uint4 bits) {
    const __half2* v2 = reinterpret_cast<const __half2*>(&bits);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 vf = __half22float2(v2[i]);
        acc[2 * i] += p * vf.x;
        acc[2 * i + 1] += p * vf.y;
    }
}

// D = 96 (Phi-3's heads): 12 chunks, so 10 groups of 120 threads; the 8 past them keep acc at 0
// (D = 80, EXAONE 3.5 2.4B's: 10 chunks, 12 groups of 120 threads).
template <int D>
__device__ __forceinline__ void accumulate_values(float (&acc)[8], const float* p_s, const __half* __restrict__ v_rows,
                                                  int64_t begin, int n) {
    constexpr int kChunks = D / 8, kGroups = kTileThreads / kChunks;
    const int chunk = threadIdx.x % kChunks, group = threadIdx.x / kChunks;
    if (kTileThreads % kChunks != 0 && group >= kGroups) return;
    const uint4* v = reinterpret_cast<const uint4*>(v_rows + begin * D) + chunk;
    int t = group;
    for (; t + (kValueLoads - 1) * kGroups < n; t += kValueLoads * kGroups) {
        uint4 bits[kValueLoads];
#pragma unroll
        for (int u = 0; u < kValueLoads; ++u) bits[u] = v[static_cast<size_t>(t + u * kGroups) * kChunks];
#pragma unroll
        for (int u = 0; u < kValueLoads; ++u) add_scaled8(acc, p_s[t + u * kGroups], bits[u]);
    }
    for (; t < n; t += kGroups) add_scaled8(acc, p_s[t], v[static_cast<size_t>(t) * kChunks]);
}

// Each pair of dims' sum over the groups (threads < D / 2 get theirs: dims 2q, 2q + 1).
// acc_s: shared [kTileThreads][8], [group][chunk][8] flattened (thread = group * kChunks + chunk;
// the threads past kGroups groups, at D = 96, write slots no one reads).
template <int D>
__device__ __forceinline__ float2 sum_over_groups(const float (&acc)[8], float* acc_s) {
    constexpr int kChunks = D / 8, kGroups = kTileThreads / kChunks;
    __syncthreads();  // acc_s may still be read by an earlier use
#pragma unroll
    for (int i = 0; i < 8; ++i) acc_s[threadIdx.x * 8 + i] = acc[i];
    __syncthreads();
    static_assert(D / 2 <= kTileThreads, "a pair of dims a thread");
    float2 sum = make_float2(0.f, 0.f);
    const int q = threadIdx.x;
    if (q < D / 2) {
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
            const float* at = acc_s + (g * kChunks + 2 * q / 8) * 8 + 2 * q % 8;
            sum.x += at[0];
            sum.y += at[1];
        }
    }
    return sum;
}

template <int D>
__device__ __forceinline__ void attend(const __half* __restrict__ q_rot, const __half* __restrict__ k_cache,
                                       const __half* __restrict__ v_cache, const int64_t* __restrict__ past_ptr,
                                       __half* __restrict__ out, int S, int H, int Hkv, int capacity, int max_positions,
                                       int window, float scale, float softcap, const float* __restrict__ sinks) {
    __shared__ float q_s[D];
    __shared__ float p_s[kTileKeys];
    __shared__ float scratch[kTileThreads / 32];
    __shared__ float acc_s[kTileThreads * 8];

    const int h = blockIdx.x, s = blockIdx.y;
    __half* y = out + (static_cast<size_t>(s) * H + h) * D;
    const int64_t past = *past_ptr;
    if (!step_fits(past, S, capacity, max_positions)) {
        for (int d = threadIdx.x; d < D; d += blockDim.x) y[d] = __float2half(NAN);
        return;
    }
    const int kv_head = h / (H / Hkv);
    const int64_t pos = past + s;
    const int64_t first = first_key(pos, window);
    const __half* k_rows = k_cache + static_cast<size_t>(kv_head) * capacity * D;
    const __half* v_rows = v_cache + static_cast<size_t>(kv_head) * capacity * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) q_s[d] = __half2float(q_rot[(static_cast<size_t>(s) * H + h) * D + d]);
    __syncthreads();

    float running_max = -INFINITY, running_sum = 0.f;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t begin = first; begin <= pos; begin += kTileKeys) {
        const int n = static_cast<int>(pos + 1 - begin < kTileKeys ? pos + 1 - begin : kTileKeys);
        const bool mine = static_cast<int>(threadIdx.x) < n;
        const float score = mine ? score_key<D>(q_s, k_rows, begin + threadIdx.x, scale, softcap) : -INFINITY;
        const float new_max = fmaxf(running_max, tile_reduce<true>(score, scratch));  // finite: the tile has a key
        const float rescale = __expf(running_max - new_max);  // 0 on the first tile
        const float p = mine ? __expf(score - new_max) : 0.f;
        p_s[threadIdx.x] = p;
        running_sum = running_sum * rescale + tile_reduce<false>(p, scratch);  // (its barriers publish p_s)
        running_max = new_max;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] *= rescale;
        accumulate_values<D>(acc, p_s, v_rows, begin, n);
        __syncthreads();  // p_s is rewritten by the next tile
    }
    running_sum += sink_term(sinks, h, running_max);
    const float2 sum = sum_over_groups<D>(acc, acc_s);
    if (threadIdx.x < D / 2) {
        reinterpret_cast<__half2*>(y)[threadIdx.x] = __floats2half2_rn(sum.x / running_sum, sum.y / running_sum);
    }
}

// Keys begin .. begin + n - 1 of a head's K and V rows into shared tiles of kKeys rows (any row
// stride, 16-byte aligned), 16 bytes a thread a step. Rows past n are zeros, not stale values: a
// masked key's weight is 0, and 0 times a stale NaN would not be.
template <int D, int kKeys, int kKRow, int kVRow>
__device__ __forceinline__ void load_kv_tile(const __half* __restrict__ k_rows, const __half* __restrict__ v_rows,
                                             int64_t begin, int n, __half (*k_s)[kKRow], __half (*v_s)[kVRow]) {
    for (int c = threadIdx.x; c < kKeys * D / 8; c += blockDim.x) {
        const int j = c / (D / 8), d = (c % (D / 8)) * 8;
        uint4 k_bits = make_uint4(0u, 0u, 0u, 0u), v_bits = k_bits;
        if (j < n) {
            k_bits = *reinterpret_cast<const uint4*>(k_rows + (begin + j) * D + d);
            v_bits = *reinterpret_cast<const uint4*>(v_rows + (begin + j) * D + d);
        }
        *reinterpret_cast<uint4*>(&k_s[j][d]) = k_bits;
        *reinterpret_cast<uint4*>(&v_s[j][d]) = v_bits;
    }
}

// Prefill attention over a block of query tokens (flash-attention's loop order, on CUDA cores):
// awq_attend saves nothing across tokens, so a chunk of S tokens reads each visible K/V row S
// times; here a block takes kBlockQueries tokens of one query head and each K/V tile is read
// from memory once for all of them (into shared memory), then every thread works on its
// token. Thread = (token, lane of 8): in the score pass a lane takes keys lane, lane + 8, ... of
// the tile, in the value pass pairs of dims lane, lane + 8, ...; a token's softmax state (max,
// sum) lives in its 8 lanes (consecutive lanes of one warp: shuffles), and its V-weighted sum is
// rescaled when the max moves, as in awq_attend. Tiles hold 4096 / D keys (8 KiB of K and of V).
constexpr int kBlockQueries = 16;                             // tokens per block
constexpr int kLanesPerQuery = kTileThreads / kBlockQueries;  // 8
static_assert(kLanesPerQuery == 8, "a token's lanes are 8 consecutive lanes of one warp");

// A step that does not fit the cache: the block's rows t0 .. t0 + tokens - 1 (those < S) of head h
// are NaN, never stale values (rope_store raised the flag the host reads).
template <int D>
__device__ __forceinline__ void write_nan_rows(__half* __restrict__ out, int t0, int tokens, int S, int H, int h) {
    for (int i = threadIdx.x; i < tokens * D; i += blockDim.x) {
        if (t0 + i / D < S) out[(static_cast<size_t>(t0 + i / D) * H + h) * D + i % D] = __float2half(NAN);
    }
}

template <int D>
struct BlockTile {
    static constexpr int kKeys = 4096 / D;                         // 64, 32, 16 keys a tile
    static constexpr int kKeysPerLane = kKeys / kLanesPerQuery;    // 8, 4, 2
    static constexpr int kPairsPerLane = D / 2 / kLanesPerQuery;   // 4, 8, 16
    static constexpr int kKRow = D + 8;  // K rows padded by 16 bytes: a token's 8 lanes read 8 rows from distinct banks
};

template <int D>
__device__ __forceinline__ void attend_block(const __half* __restrict__ q_rot, const __half* __restrict__ k_cache,
                                             const __half* __restrict__ v_cache, const int64_t* __restrict__ past_ptr,
                                             __half* __restrict__ out, int S, int H, int Hkv, int capacity,
                                             int max_positions, int window, float scale, float softcap,
                                             const float* __restrict__ sinks) {
    using T = BlockTile<D>;
    __shared__ __align__(16) float q_s[kBlockQueries][D];
    __shared__ __align__(16) __half k_s[T::kKeys][T::kKRow];
    __shared__ __align__(16) __half v_s[T::kKeys][D];
    __shared__ float p_s[kBlockQueries][T::kKeys + 1];  // + 1: the 4 tokens of a warp read distinct banks

    const int h = blockIdx.x, t0 = blockIdx.y * kBlockQueries;
    const int token = threadIdx.x / kLanesPerQuery, lane = threadIdx.x % kLanesPerQuery;
    const int s = t0 + token;  // this thread's token; past S it only helps load the tiles
    const int64_t past = *past_ptr;
    if (!step_fits(past, S, capacity, max_positions)) {
        write_nan_rows<D>(out, t0, kBlockQueries, S, H, h);
        return;
    }
    const int kv_head = h / (H / Hkv);
    const int64_t pos = past + s;
    const int64_t first = first_key(pos, window);  // this token's first key
    const int64_t block_first = first_key(past + t0, window);  // its first token's
    const int64_t block_last = past + (t0 + kBlockQueries < S ? t0 + kBlockQueries : S) - 1;
    const __half* k_rows = k_cache + static_cast<size_t>(kv_head) * capacity * D;
    const __half* v_rows = v_cache + static_cast<size_t>(kv_head) * capacity * D;
    for (int i = threadIdx.x; i < kBlockQueries * D; i += blockDim.x) {
        const int t = i / D;
        q_s[t][i % D] = t0 + t < S ? __half2float(q_rot[(static_cast<size_t>(t0 + t) * H + h) * D + i % D]) : 0.f;
    }

    float running_max = -INFINITY, running_sum = 0.f;
    float2 acc[T::kPairsPerLane];
#pragma unroll
    for (int i = 0; i < T::kPairsPerLane; ++i) acc[i] = make_float2(0.f, 0.f);
    for (int64_t begin = block_first; begin <= block_last; begin += T::kKeys) {
        const int n = static_cast<int>(block_last + 1 - begin < T::kKeys ? block_last + 1 - begin : T::kKeys);
        __syncthreads();  // the previous tile is no longer read (the first time: q_s is written)
        load_kv_tile<D, T::kKeys>(k_rows, v_rows, begin, n, k_s, v_s);
        __syncthreads();

        float score[T::kKeysPerLane];
#pragma unroll
        for (int i = 0; i < T::kKeysPerLane; ++i) score[i] = 0.f;
        for (int d = 0; d < D; d += 8) {
            const float4 qa = *reinterpret_cast<const float4*>(&q_s[token][d]);
            const float4 qb = *reinterpret_cast<const float4*>(&q_s[token][d + 4]);
#pragma unroll
            for (int i = 0; i < T::kKeysPerLane; ++i) {
                const uint4 bits = *reinterpret_cast<const uint4*>(&k_s[lane + i * kLanesPerQuery][d]);
                const __half2* k2 = reinterpret_cast<const __half2*>(&bits);
                const float2 k0 = __half22float2(k2[0]), k1 = __half22float2(k2[1]);
                const float2 k2f = __half22float2(k2[2]), k3 = __half22float2(k2[3]);
                score[i] += qa.x * k0.x + qa.y * k0.y + qa.z * k1.x + qa.w * k1.y +
                            qb.x * k2f.x + qb.y * k2f.y + qb.z * k3.x + qb.w * k3.y;
            }
        }
        float tile_max = -INFINITY;
#pragma unroll
        for (int i = 0; i < T::kKeysPerLane; ++i) {
            const int64_t j = begin + lane + i * kLanesPerQuery;
            const float scaled = score[i] * scale;
            const float capped = awq_edge::soft_cap(scaled, softcap);
            score[i] = (s < S && j >= first && j <= pos) ? capped : -INFINITY;  // (j <= pos: j is a loaded row)
            tile_max = fmaxf(tile_max, score[i]);
        }
#pragma unroll
        for (int offset = kLanesPerQuery / 2; offset > 0; offset >>= 1) {
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
        }
        const float new_max = fmaxf(running_max, tile_max);  // -inf while the token has seen no key
        const float rescale = new_max == -INFINITY ? 1.f : __expf(running_max - new_max);
        float tile_sum = 0.f;
#pragma unroll
        for (int i = 0; i < T::kKeysPerLane; ++i) {
            const float p = score[i] == -INFINITY ? 0.f : __expf(score[i] - new_max);
            p_s[token][lane + i * kLanesPerQuery] = p;
            tile_sum += p;
        }
#pragma unroll
        for (int offset = kLanesPerQuery / 2; offset > 0; offset >>= 1) {
            tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, offset);
        }
        running_sum = running_sum * rescale + tile_sum;
        running_max = new_max;
        __syncwarp();  // the token's p_s row, written by its 8 lanes (of this warp)
#pragma unroll
        for (int i = 0; i < T::kPairsPerLane; ++i) {
            acc[i].x *= rescale;
            acc[i].y *= rescale;
        }
        for (int j = 0; j < n; ++j) {
            const float p = p_s[token][j];
            const __half2* v2 = reinterpret_cast<const __half2*>(&v_s[j][0]);
#pragma unroll
            for (int i = 0; i < T::kPairsPerLane; ++i) {
                const float2 vf = __half22float2(v2[lane + i * kLanesPerQuery]);
                acc[i].x += p * vf.x;
                acc[i].y += p * vf.y;
            }
        }
    }
    if (s < S) {
        __half2* y = reinterpret_cast<__half2*>(out + (static_cast<size_t>(s) * H + h) * D);
        const float total = running_sum + sink_term(sinks, h, running_max);  // (a token's max: finite, it sees a key)
#pragma unroll
        for (int i = 0; i < T::kPairsPerLane; ++i) {
            y[lane + i * kLanesPerQuery] = __floats2half2_rn(acc[i].x / total, acc[i].y / total);
        }
    }
}

// Prefill attention on tensor cores (flash-attention 2's loop, head_dim 64, 128 and 256): a block
// of 4 warps per (query head, 64 tokens), a warp per 16 tokens. Per tile of 64 keys (32 at D =
// 256, where a thread's q and output fragments take 192 registers; 254 in all, no spills) (K and V in
// shared memory, rows padded by 16 bytes so the fragment loads hit distinct banks) a warp
// computes its 16 x 64 scores as mma.m16n8k16 (A = its q rows, kept in registers; B = K rows),
// keeps an online softmax per token on the score fragments (a row's values live in the 4 lanes
// of a fragment group: shuffles), and multiplies P (the score fragments, rounded to fp16, are
// already the A fragments of P V) by V into fp32 output fragments. plugins/kernels/mma.cuh has
// the fragment layouts. Each thread's running sum covers its own columns; the 4 lanes add theirs
// at the end.
constexpr int kMmaQueries = 64;  // tokens per block: 16 per warp
// keys per tile: 64, or 32 at D = 256 (registers: a thread's output fragments are D / 2 floats)
template <int D>
constexpr int kMmaKeys = D == 256 ? 32 : 64;

__device__ __forceinline__ uint32_t half2_bits(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t halves_bits(__half lo, __half hi) {
    return static_cast<uint32_t>(__half_as_ushort(lo)) | (static_cast<uint32_t>(__half_as_ushort(hi)) << 16);
}

template <int D>
__device__ __forceinline__ void attend_mma(const __half* __restrict__ q_rot, const __half* __restrict__ k_cache,
                                           const __half* __restrict__ v_cache, const int64_t* __restrict__ past_ptr,
                                           __half* __restrict__ out, int S, int H, int Hkv, int capacity,
                                           int max_positions, int window, float scale, float softcap,
                                           const float* __restrict__ sinks) {
    static_assert(D == 64 || D == 80 || D == 96 || D == 128 || D == 256, "the head sizes the kernels take");
    constexpr int kRow = D + 8;  // padded shared rows (halves)
    __shared__ __align__(16) __half k_s[kMmaKeys<D>][kRow];
    __shared__ __align__(16) __half v_s[kMmaKeys<D>][kRow];

    const int h = blockIdx.x, t0 = blockIdx.y * kMmaQueries;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int64_t past = *past_ptr;
    if (!step_fits(past, S, capacity, max_positions)) {
        write_nan_rows<D>(out, t0, kMmaQueries, S, H, h);
        return;
    }
    const int kv_head = h / (H / Hkv);
    const __half* k_rows = k_cache + static_cast<size_t>(kv_head) * capacity * D;
    const __half* v_rows = v_cache + static_cast<size_t>(kv_head) * capacity * D;
    // this thread's two tokens (fragment rows g and g + 8 of its warp's 16) and their first keys
    int token[2];
    int64_t pos[2], first[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        token[r] = t0 + warp * 16 + g + 8 * r;
        pos[r] = past + token[r];
        first[r] = first_key(pos[r], window);
    }
    const int64_t block_first = first_key(past + t0, window);  // its first token's
    const int64_t block_last = past + (t0 + kMmaQueries < S ? t0 + kMmaQueries : S) - 1;

    // q as A fragments: [k step][a0..a3], tokens past S are zeros
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // a0 (g, 2t), a1 (g + 8, 2t), a2 (g, 2t + 8), a3 (g + 8, 2t + 8)
            const int r = i & 1, d = 16 * ks + 2 * t + 8 * (i >> 1);
            qa[ks][i] = token[r] < S ? *reinterpret_cast<const uint32_t*>(
                                           q_rot + (static_cast<size_t>(token[r]) * H + h) * D + d)
                                     : 0u;
        }
    }
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float running_max[2] = {-INFINITY, -INFINITY}, running_sum[2] = {0.f, 0.f};

    for (int64_t begin = block_first; begin <= block_last; begin += kMmaKeys<D>) {
        const int n = static_cast<int>(block_last + 1 - begin < kMmaKeys<D> ? block_last + 1 - begin : kMmaKeys<D>);
        __syncthreads();  // the previous tile is no longer read
        load_kv_tile<D, kMmaKeys<D>>(k_rows, v_rows, begin, n, k_s, v_s);
        __syncthreads();

        // scores: 8 fragments of 8 keys; s[nt][0, 1] = row g, keys 8nt + 2t (+1); [2, 3] = row g + 8
        float s[kMmaKeys<D> / 8][4];
#pragma unroll
        for (int nt = 0; nt < kMmaKeys<D> / 8; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                const uint32_t b[2] = {*reinterpret_cast<const uint32_t*>(&k_s[8 * nt + g][16 * ks + 2 * t]),
                                       *reinterpret_cast<const uint32_t*>(&k_s[8 * nt + g][16 * ks + 8 + 2 * t])};
                awq_edge::mma_16816(s[nt], qa[ks], b);
            }
        }
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < kMmaKeys<D> / 8; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1;
                const int64_t key = begin + 8 * nt + 2 * t + (i & 1);
                const float scaled = s[nt][i] * scale;
                const float capped = awq_edge::soft_cap(scaled, softcap);
                s[nt][i] = (token[r] < S && key >= first[r] && key <= pos[r]) ? capped : -INFINITY;
                tile_max[r] = fmaxf(tile_max[r], s[nt][i]);
            }
        }
        float rescale[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
            const float new_max = fmaxf(running_max[r], tile_max[r]);  // -inf while the token has seen no key
            rescale[r] = new_max == -INFINITY ? 1.f : __expf(running_max[r] - new_max);
            running_max[r] = new_max;
            running_sum[r] *= rescale[r];
        }
#pragma unroll
        for (int nt = 0; nt < kMmaKeys<D> / 8; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1;
                s[nt][i] = s[nt][i] == -INFINITY ? 0.f : __expf(s[nt][i] - running_max[r]);
                running_sum[r] += s[nt][i];
            }
        }
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
            o[dn][0] *= rescale[0];
            o[dn][1] *= rescale[0];
            o[dn][2] *= rescale[1];
            o[dn][3] *= rescale[1];
        }
        // O += P V, 16 keys a step: P's A fragment is two score fragments (keys 16kk + 2t, + 8 + 2t)
#pragma unroll
        for (int kk = 0; kk < kMmaKeys<D> / 16; ++kk) {
            const uint32_t a[4] = {half2_bits(s[2 * kk][0], s[2 * kk][1]), half2_bits(s[2 * kk][2], s[2 * kk][3]),
                                   half2_bits(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   half2_bits(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const int key = 16 * kk + 2 * t;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                const int d = 8 * dn + g;
                const uint32_t b[2] = {halves_bits(v_s[key][d], v_s[key + 1][d]),
                                       halves_bits(v_s[key + 8][d], v_s[key + 9][d])};
                awq_edge::mma_16816(o[dn], a, b);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the row's sum over its 4 lanes
        running_sum[r] += __shfl_xor_sync(0xffffffffu, running_sum[r], 1);
        running_sum[r] += __shfl_xor_sync(0xffffffffu, running_sum[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (token[r] >= S) continue;
        __half* y = out + (static_cast<size_t>(token[r]) * H + h) * D;
        const float total = running_sum[r] + sink_term(sinks, h, running_max[r]);
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
            *reinterpret_cast<__half2*>(y + 8 * dn + 2 * t) =
                __floats2half2_rn(o[dn][2 * r] / total, o[dn][2 * r + 1] / total);
        }
    }
}

constexpr int kSplitKeys = kTileKeys;  // keys per attend_split block: one tile
constexpr int kSplitThreads = kTileThreads;

// A split's K and V rows are all its block reads, so the block issues them at once, before any
// arithmetic: each thread its key's row (the first kEarly 16-byte chunks of it) and its share of
// the value walk (accumulate_values' order: keys group, group + kGroups, ...; zeros past n), held
// in registers until the softmax needs them. One DRAM latency a split instead of one for q, one
// for the K row, then four for the values (12.9 us per Llama-2-7B layer at 512 keys on the H200,
// 2026-12-04 run 3, where the bytes take 2).
template <int D>
struct SplitLoads {
    static constexpr int kChunks = D / 8, kGroups = kSplitThreads / kChunks;
    // D = 96: 10 groups of 12 threads, the last 8 threads idle; a group's keys group, + 10, ... < 128
    // (D = 80: 12 groups of 10 threads, the last 8 idle)
    static constexpr bool kRagged = kSplitThreads % kChunks != 0;
    static constexpr int kKeysPerThread = (kSplitKeys + kGroups - 1) / kGroups;         // 8, 11, 13, 16, 32
    static constexpr int kEarlyK = kChunks < 16 ? kChunks : 16;                         // D = 256: half the row
    static constexpr int kEarlyV = kKeysPerThread < 16 ? kKeysPerThread : 16;           // D = 256: half the walk
    uint4 k[kEarlyK];
    uint4 v[kEarlyV];
};

template <int D>
__device__ __forceinline__ void load_split(SplitLoads<D>& loads, const __half* __restrict__ k_rows,
                                           const __half* __restrict__ v_rows, int64_t begin, int n) {
    using L = SplitLoads<D>;
    const bool mine = static_cast<int>(threadIdx.x) < n;
    const uint4* k_row = reinterpret_cast<const uint4*>(k_rows + (begin + (mine ? threadIdx.x : 0)) * D);
#pragma unroll
    for (int c = 0; c < L::kEarlyK; ++c) loads.k[c] = mine ? k_row[c] : make_uint4(0u, 0u, 0u, 0u);
    const int chunk = threadIdx.x % L::kChunks, group = threadIdx.x / L::kChunks;
    if (L::kRagged && group >= L::kGroups) return;
    const uint4* v = reinterpret_cast<const uint4*>(v_rows + begin * D) + chunk;
#pragma unroll
    for (int u = 0; u < L::kEarlyV; ++u) {
        const int t = group + u * L::kGroups;
        loads.v[u] = t < n ? v[static_cast<size_t>(t) * L::kChunks] : make_uint4(0u, 0u, 0u, 0u);
    }
}

// load_split's loads of the one key t of the split (the position's: see attend_split).
template <int D>
__device__ __forceinline__ void load_split_key(SplitLoads<D>& loads, const __half* __restrict__ k_rows,
                                               const __half* __restrict__ v_rows, int64_t begin, int t) {
    using L = SplitLoads<D>;
    if (static_cast<int>(threadIdx.x) == t) {
        const uint4* k_row = reinterpret_cast<const uint4*>(k_rows + (begin + t) * D);
#pragma unroll
        for (int c = 0; c < L::kEarlyK; ++c) loads.k[c] = k_row[c];
    }
    const int chunk = threadIdx.x % L::kChunks, group = threadIdx.x / L::kChunks;
    if (L::kRagged && group >= L::kGroups) return;
    const uint4* v = reinterpret_cast<const uint4*>(v_rows + begin * D) + chunk;
#pragma unroll
    for (int u = 0; u < L::kEarlyV; ++u) {
        if (group + u * L::kGroups == t) loads.v[u] = v[static_cast<size_t>(t) * L::kChunks];
    }
}

// score_key on the loaded row (the chunks past kEarlyK loaded here; fully unrolled: registers).
template <int D>
__device__ __forceinline__ float score_loaded_key(const float* q_s, const SplitLoads<D>& loads,
                                                  const __half* __restrict__ k_rows, int64_t j, float scale,
                                                  float softcap) {
    const uint4* k_row = reinterpret_cast<const uint4*>(k_rows + j * D);
    return score_chunks<D, D / 8>(
        q_s, [&](int c) { return c < SplitLoads<D>::kEarlyK ? loads.k[c] : k_row[c]; }, scale, softcap);
}

// accumulate_values on the loaded chunks (p_s is 0 past n, and so are their bits), then the rest.
template <int D>
__device__ __forceinline__ void accumulate_loaded_values(float (&acc)[8], const float* p_s, const SplitLoads<D>& loads,
                                                         const __half* __restrict__ v_rows, int64_t begin, int n) {
    using L = SplitLoads<D>;
    const int chunk = threadIdx.x % L::kChunks, group = threadIdx.x / L::kChunks;
    if (L::kRagged && group >= L::kGroups) return;
#pragma unroll
    for (int u = 0; u < L::kEarlyV; ++u) {
        const int t = group + u * L::kGroups;
        if (!L::kRagged || t < kSplitKeys) add_scaled8(acc, p_s[t], loads.v[u]);  // (D = 96: the last may be past)
    }
    const uint4* v = reinterpret_cast<const uint4*>(v_rows + begin * D) + chunk;
    for (int t = group + L::kEarlyV * L::kGroups; t < n; t += L::kGroups) {
        add_scaled8(acc, p_s[t], v[static_cast<size_t>(t) * L::kChunks]);
    }
}

// One decode query head h over split `split` of its keys (of `splits`: the kernel's blockIdx.x,
// blockIdx.y and gridDim.y), then (in the head's last block) the merge; wait(): its wait for the
// previous kernel. partials: float32 [H, splits, 2 + D] (max, sum, V-weighted sum); counters:
// int32 [H], zero between steps (the merging block resets its head's).
template <int D, typename Wait = awq_edge::AfterPreviousKernel>
__device__ __forceinline__ void attend_split(const __half* __restrict__ q_rot, const __half* __restrict__ k_cache,
                                             const __half* __restrict__ v_cache, const int64_t* __restrict__ past_ptr,
                                             __half* __restrict__ out, float* __restrict__ partials,
                                             int* __restrict__ counters, int H, int Hkv, int capacity,
                                             int max_positions, int window, float scale, float softcap,
                                             const float* __restrict__ sinks, int h, int split, int splits,
                                             Wait wait = Wait{}) {
    __shared__ float q_s[D];
    __shared__ float p_s[kSplitKeys];
    __shared__ float scratch[kSplitThreads / 32];
    __shared__ float acc_s[kSplitThreads * 8];
    __shared__ bool merge_here;

    // Before the wait for the previous kernel (pdl.cuh) this kernel reads the position and the K/V
    // rows of the keys before it, which only earlier decode steps write (their last kernel
    // advances the position; their q/k/v GEMV writes their key): the cuda backend launches a
    // decode step as one CUDA graph, and a graph launch starts once everything before it on the
    // stream is done, so those reads see them finished. The position's own key, which this step's
    // q/k/v GEMV (or rope_store) writes, and q are read after the wait, and so is anything written.
    // Its loads then overlap the q/k/v GEMV's tail instead of following it.
    __half* y = out + static_cast<size_t>(h) * D;
    const int64_t pos = *past_ptr;
    if (!step_fits(pos, 1, capacity, max_positions)) {
        wait();
        for (int d = threadIdx.x; d < D; d += blockDim.x) y[d] = __float2half(NAN);
        return;
    }
    const int kv_head = h / (H / Hkv);
    const int64_t first = first_key(pos, window);
    // The splits with visible keys: from first's to pos's. The grid has a split for every 128 keys of
    // the cache (fixed when the decode graph is captured); the others return here, without a count
    // or a partial (until 2026-12-04 they wrote an empty one, counted, and the merge read them all:
    // 64 splits a head for an 8192-token cache, early in a chat with a few of them in use).
    const int first_split = static_cast<int>(first / kSplitKeys), last_split = static_cast<int>(pos / kSplitKeys);
    if (split < first_split || split > last_split) return;
    const int64_t lo = static_cast<int64_t>(split) * kSplitKeys;
    const int64_t begin = first > lo ? first : lo;
    const int64_t end = pos + 1 < lo + kSplitKeys ? pos + 1 : lo + kSplitKeys;  // keys [begin, end): at least one
    const __half* k_rows = k_cache + static_cast<size_t>(kv_head) * capacity * D;
    const __half* v_rows = v_cache + static_cast<size_t>(kv_head) * capacity * D;

    float* part = partials + (static_cast<size_t>(h) * splits + split) * (2 + D);
    const int n = static_cast<int>(end - begin);
    const int older = pos - begin < n ? static_cast<int>(pos - begin) : n;  // keys before the position's
    SplitLoads<D> loads;
    load_split<D>(loads, k_rows, v_rows, begin, older);
    wait();
    if (older < n) load_split_key<D>(loads, k_rows, v_rows, begin, older);  // the position's key (the last)
    for (int d = threadIdx.x; d < D; d += blockDim.x) q_s[d] = __half2float(q_rot[static_cast<size_t>(h) * D + d]);
    __syncthreads();
    const bool mine = static_cast<int>(threadIdx.x) < n;
    const float score = mine ? score_loaded_key<D>(q_s, loads, k_rows, begin + threadIdx.x, scale, softcap) : -INFINITY;
    const float block_max = tile_reduce<true>(score, scratch);
    const float p = mine ? __expf(score - block_max) : 0.f;
    p_s[threadIdx.x] = p;
    const float block_sum = tile_reduce<false>(p, scratch);  // (its barriers publish p_s)
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    accumulate_loaded_values<D>(acc, p_s, loads, v_rows, begin, n);
    const float2 sum = sum_over_groups<D>(acc, acc_s);
    if (threadIdx.x < D / 2) {
        part[2 + 2 * threadIdx.x] = sum.x;
        part[3 + 2 * threadIdx.x] = sum.y;
    }
    if (threadIdx.x == 0) {
        part[0] = block_max;
        part[1] = block_sum;
    }

    // The last of the head's blocks to get here merges (the fences order the partials before the count).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) merge_here = atomicAdd(counters + h, 1) == last_split - first_split;
    __syncthreads();
    if (!merge_here) return;
    __threadfence();
    // One pass over the splits, the online softmax's merge (the running max m, and the sum and each
    // pair of dims rescaled when it moves): each split's loads are independent of the sums, so the
    // unrolled loop issues several splits' at once (three passes waited on L2 three times).
    // Thread q < D / 2 merges dims 2q, 2q + 1. Every split merged has a visible key, so a finite
    // max (a score of -inf only from a -inf logit, whose split then adds nothing).
    const float* head = partials + static_cast<size_t>(h) * splits * (2 + D);
    const int q = threadIdx.x;
    float m = -INFINITY, total = 0.f;
    float2 merged = make_float2(0.f, 0.f);
#pragma unroll 4
    for (int c = first_split; c <= last_split; ++c) {
        const float* part = head + c * (2 + D);
        const float mc = __ldcg(part), sc = __ldcg(part + 1);
        const float2 vc = q < D / 2 ? make_float2(__ldcg(part + 2 + 2 * q), __ldcg(part + 3 + 2 * q)) : merged;
        if (mc > -INFINITY) {
            const float new_m = fmaxf(m, mc);
            const float old_weight = __expf(m - new_m), weight = __expf(mc - new_m);  // (m = -inf: 0)
            total = total * old_weight + sc * weight;
            merged.x = merged.x * old_weight + vc.x * weight;
            merged.y = merged.y * old_weight + vc.y * weight;
            m = new_m;
        }
    }
    total += sink_term(sinks, h, m);
    if (q < D / 2) reinterpret_cast<__half2*>(y)[q] = __floats2half2_rn(merged.x / total, merged.y / total);
    if (threadIdx.x == 0) counters[h] = 0;  // ready for the next step
}

bool aligned4(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 3u) == 0; }

}  // namespace

#ifndef AWQ_EDGE_BODIES_ONLY  // (decode_step.cu includes the bodies above and runs them in its own kernel)
// The kernels, with C names so that the CUDA driver API finds them in this file's cubin
// (awq_edge/cuda_backend.py) as the launcher below does: awq_rope_store, grid S blocks of 256
// threads, q/k/v rows of any stride (the cuda backend passes the fused qkv buffer's), status
// may be null; the attend kernels below.
extern "C" __global__ void __launch_bounds__(kRopeThreads)
awq_rope_store(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
               __half* __restrict__ k_cache, __half* __restrict__ v_cache, const int64_t* __restrict__ past_ptr,
               const __half* __restrict__ cos, const __half* __restrict__ sin, __half* __restrict__ q_rot, int S,
               int H, int Hkv, int D, int capacity, int max_positions, int q_stride, int kv_stride,
               int* __restrict__ status) {
    awq_edge::begin_after_previous_kernel();
    rope_store(q, k, v, k_cache, v_cache, past_ptr, cos, sin, q_rot, S, H, Hkv, D, capacity, max_positions, q_stride,
               kv_stride, status, blockIdx.x);
}

// awq_rope_in_place: grid S blocks of 256 threads over the q/k/v rows (stride: the row's width).
extern "C" __global__ void __launch_bounds__(kRopeThreads)
awq_rope_in_place(__half* __restrict__ qkv, const int64_t* __restrict__ past_ptr, const __half* __restrict__ cos,
                  const __half* __restrict__ sin, int heads, int D, int stride, int max_positions) {
    awq_edge::begin_after_previous_kernel();
    rope_in_place(qkv, past_ptr, cos, sin, heads, D, stride, max_positions, blockIdx.x);
}

// The prefill attention kernels, all with awq_attend's arguments and 128 threads a block:
//   awq_attend_d{64,80,96,128,256}   grid (H, S): a block per token (chunks of fewer than 16 rows)
//   awq_attend_block_d{64,128,256}   grid (H, ceil(S / 16)): 16 tokens a block on CUDA cores
//   awq_attend_mma_d{64,80,96,...}   grid (H, ceil(S / 64)): 64 tokens a block on tensor cores
// (__launch_bounds__(128, 1): without the 1, ptxas picked register targets that spilled.)
#define AWQ_ATTEND_ROWS_ENTRY(NAME, BODY, D)                                                                        \
    extern "C" __global__ void __launch_bounds__(kTileThreads, 1)                                                   \
        NAME(const __half* __restrict__ q_rot, const __half* __restrict__ k_cache,                                  \
             const __half* __restrict__ v_cache, const int64_t* __restrict__ past_ptr, __half* __restrict__ out,    \
             int S, int H, int Hkv, int capacity, int max_positions, int window, float scale, float softcap,       \
             const float* __restrict__ sinks) {                                                                     \
        awq_edge::begin_after_previous_kernel();                                                                    \
        BODY<D>(q_rot, k_cache, v_cache, past_ptr, out, S, H, Hkv, capacity, max_positions, window, scale, softcap, \
                sinks);                                                                                             \
    }
AWQ_ATTEND_ROWS_ENTRY(awq_attend_d64, attend, 64)
AWQ_ATTEND_ROWS_ENTRY(awq_attend_d80, attend, 80)
AWQ_ATTEND_ROWS_ENTRY(awq_attend_d96, attend, 96)
AWQ_ATTEND_ROWS_ENTRY(awq_attend_d128, attend, 128)
AWQ_ATTEND_ROWS_ENTRY(awq_attend_d256, attend, 256)
AWQ_ATTEND_ROWS_ENTRY(awq_attend_block_d64, attend_block, 64)
AWQ_ATTEND_ROWS_ENTRY(awq_attend_block_d128, attend_block, 128)
AWQ_ATTEND_ROWS_ENTRY(awq_attend_block_d256, attend_block, 256)
AWQ_ATTEND_ROWS_ENTRY(awq_attend_mma_d64, attend_mma, 64)
AWQ_ATTEND_ROWS_ENTRY(awq_attend_mma_d80, attend_mma, 80)
AWQ_ATTEND_ROWS_ENTRY(awq_attend_mma_d96, attend_mma, 96)
AWQ_ATTEND_ROWS_ENTRY(awq_attend_mma_d128, attend_mma, 128)
AWQ_ATTEND_ROWS_ENTRY(awq_attend_mma_d256, attend_mma, 256)

// awq_attend_split_d{64,80,96,128,256}: decode (S = 1), grid (H, ceil(capacity / 128)) blocks of 128
// threads; partials float32 [H, grid.y, 2 + D], counters int32 [H] zeroed once at allocation.
#define AWQ_ATTEND_SPLIT_ENTRY(D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(kSplitThreads, 1) /* without the 1, ptxas spilled at 32 regs */ \
        awq_attend_split_d##D(const __half* __restrict__ q_rot, const __half* __restrict__ k_cache,                 \
                              const __half* __restrict__ v_cache, const int64_t* __restrict__ past_ptr,             \
                              __half* __restrict__ out, float* __restrict__ partials, int* __restrict__ counters,   \
                              int H, int Hkv, int capacity, int max_positions, int window, float scale,             \
                              float softcap, const float* __restrict__ sinks) {                                     \
        awq_edge::let_next_kernel_start(); /* and the wait inside, after the older keys' loads */                  \
        attend_split<D>(q_rot, k_cache, v_cache, past_ptr, out, partials, counters, H, Hkv, capacity,              \
                        max_positions, window, scale, softcap, sinks, blockIdx.x, blockIdx.y, gridDim.y);           \
    }
AWQ_ATTEND_SPLIT_ENTRY(64)
AWQ_ATTEND_SPLIT_ENTRY(80)
AWQ_ATTEND_SPLIT_ENTRY(96)
AWQ_ATTEND_SPLIT_ENTRY(128)
AWQ_ATTEND_SPLIT_ENTRY(256)

#if defined(__CUDACC__)  // the C launchers (tests/cuda_on_cpu compiles the kernels alone with g++)
extern "C" int awq_attention(const __half* q, const __half* k, const __half* v, __half* k_cache, __half* v_cache,
                             const int64_t* past, const __half* cos, const __half* sin, __half* q_rot, __half* out,
                             int S, int H, int Hkv, int D, int capacity, int max_positions, int window, float scale,
                             float softcap, int* status, cudaStream_t stream) {
    const bool valid = q && k && v && k_cache && v_cache && past && cos && sin && q_rot && out && S >= 1 &&
                       S <= 65535 && H >= 1 && Hkv >= 1 && H % Hkv == 0 &&
                       (D == 64 || D == 80 || D == 96 || D == 128 || D == 256) &&
                       capacity >= S && max_positions >= S && window >= 0 && isfinite(scale) &&
                       softcap >= 0.f && isfinite(softcap) && aligned4(q) && aligned4(k) && aligned4(v) &&
                       aligned4(k_cache) && aligned4(v_cache) && aligned4(q_rot) && aligned4(out);
    if (!valid) return AWQ_ATTENTION_INVALID_ARGUMENT;
    awq_rope_store<<<S, kRopeThreads, 0, stream>>>(q, k, v, k_cache, v_cache, past, cos, sin, q_rot, S, H, Hkv, D,
                                                   capacity, max_positions, H * D, Hkv * D, status);
    // as the cuda backend chooses: 16 rows or more in blocks of 64 tokens on tensor cores
    auto attend_kernel = D == 64    ? awq_attend_d64
                         : D == 80  ? awq_attend_d80
                         : D == 96  ? awq_attend_d96
                         : D == 128 ? awq_attend_d128
                                    : awq_attend_d256;
    dim3 grid(H, S);
    if (S >= kBlockQueries) {
        attend_kernel = D == 64    ? awq_attend_mma_d64
                        : D == 80  ? awq_attend_mma_d80
                        : D == 96  ? awq_attend_mma_d96
                        : D == 128 ? awq_attend_mma_d128
                                   : awq_attend_mma_d256;
        grid.y = (S + kMmaQueries - 1) / kMmaQueries;
    }
    attend_kernel<<<grid, kTileThreads, 0, stream>>>(q_rot, k_cache, v_cache, past, out, S, H, Hkv, capacity,
                                                     max_positions, window, scale, softcap, nullptr);  // (no sinks)
    return static_cast<int>(cudaGetLastError());
}
#endif  // __CUDACC__
#endif  // AWQ_EDGE_BODIES_ONLY
