// Choosing among float values inside one block, without sorting (the sampler, sample.cu, and an
// int4 head's candidate search, head_top_k.cu). Every cut is a threshold on the float's
// order-preserving bit pattern (its "key"), found exactly with integer counts, so the same
// inputs give the same choice on every run. Blocks are whole warps (blockDim.x % 32 == 0).
#pragma once

#include <math.h>
#include <stdint.h>

namespace awq_edge {

__device__ __forceinline__ uint32_t order_key(float f) {
    // IEEE-754 bits -> an unsigned int ordered like the floats (negatives reversed).
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The same, with NaN lowest (key 0, below -inf's): a NaN never wins a place.
__device__ __forceinline__ uint32_t order_key_nan_lowest(float f) { return isnan(f) ? 0u : order_key(f); }

__device__ __forceinline__ float key_to_float(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct SumOp {
    template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    template <typename T> __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct MinOp {
    template <typename T> __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// Every thread of a block of 1024 gets the result. `partial` is 32 entries of shared memory.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* partial) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    __syncthreads();  // a previous reduction may still be reading `partial`
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    v = partial[threadIdx.x & 31];  // (so a block of 32 warps)
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// The shared memory of a selection (one per block).
struct SelectScratch {
    uint32_t histogram[256];
    uint32_t digit[2];           // the chosen digit, and how many keys are still to cover at it
    uint32_t warp_counts[2][32]; // emit_top_k: per warp, keys above the k-th and equal to it (then their scans)
    uint32_t tile_totals[2];
};

// The k-th largest of n keys (1 <= k <= n), as (key, take): take = how many keys equal to it are
// among the k largest. Radix select, one 8-bit digit at a time from the top. Lanes of a warp with
// the same digit add to its count once (logits share their high bits, so most lanes of a warp
// would otherwise queue on one shared-memory counter). The digit walk: warp 0, each lane over 8
// bins, from digit 255 down.
template <typename KeyAt>
__device__ uint2 kth_largest_key(int n, KeyAt key_at, uint32_t k, SelectScratch& s) {
    const int lane = threadIdx.x & 31;
    uint32_t prefix = 0, remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        const uint32_t high_mask = shift == 24 ? 0u : ~0u << (shift + 8);
        for (int b = threadIdx.x; b < 256; b += blockDim.x) s.histogram[b] = 0;
        __syncthreads();
        for (int base = 0; base < n; base += blockDim.x) {  // the whole block iterates: match_any sees full warps
            const int i = base + static_cast<int>(threadIdx.x);
            const uint32_t key = i < n ? key_at(i) : 0u;
            const bool counted = i < n && (key & high_mask) == prefix;
            const uint32_t d = counted ? (key >> shift) & 255u : 256u;
            const uint32_t same = __match_any_sync(0xffffffffu, d);
            if (counted && lane == __ffs(same) - 1) atomicAdd(&s.histogram[d], static_cast<uint32_t>(__popc(same)));
        }
        __syncthreads();
        if (threadIdx.x < 32) {  // lane l holds digits 255 - 8l down to 248 - 8l
            uint32_t own = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) own += s.histogram[255 - 8 * lane - j];
            uint32_t inclusive = own;
#pragma unroll
            for (int offset = 1; offset < 32; offset <<= 1) {
                const uint32_t up = __shfl_up_sync(0xffffffffu, inclusive, offset);
                if (lane >= offset) inclusive += up;
            }
            const uint32_t reached = __ballot_sync(0xffffffffu, inclusive >= remaining);
            if (lane == __ffs(reached) - 1) {  // (some lane reaches it: the counts total >= remaining)
                uint32_t above = inclusive - own;
                int d = 255 - 8 * lane;
                while (above + s.histogram[d] < remaining) above += s.histogram[d--];
                s.digit[0] = static_cast<uint32_t>(d);
                s.digit[1] = remaining - above;
            }
        }
        __syncthreads();
        prefix |= s.digit[0] << shift;
        remaining = s.digit[1];
        __syncthreads();  // s.digit is rewritten by the next pass
    }
    return make_uint2(prefix, remaining);
}

// emit(rank, i) for each of the k largest of n keys, ranks 0..k-1 in index order; of the keys
// equal to the k-th largest (kth from kth_largest_key), the first kth.y in index order. A block
// scan per tile of blockDim.x keys: a key's rank is the keys above the k-th before it, plus the
// equal ones before it (at most kth.y).
template <typename KeyAt, typename Emit>
__device__ void emit_top_k(int n, KeyAt key_at, uint2 kth, Emit emit, SelectScratch& s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const uint32_t before_lane = (1u << lane) - 1u;
    uint32_t above_base = 0, equal_base = 0;
    for (int tile = 0; tile < n; tile += blockDim.x) {
        const int i = tile + static_cast<int>(threadIdx.x);
        const uint32_t key = i < n ? key_at(i) : 0u;
        const bool above = i < n && key > kth.x, equal = i < n && key == kth.x;
        const uint32_t above_bits = __ballot_sync(0xffffffffu, above), equal_bits = __ballot_sync(0xffffffffu, equal);
        if (lane == 0) {
            s.warp_counts[0][warp] = __popc(above_bits);
            s.warp_counts[1][warp] = __popc(equal_bits);
        }
        __syncthreads();
        if (warp == 0) {  // exclusive scans of the warps' counts
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const uint32_t own = lane < warps ? s.warp_counts[c][lane] : 0u;
                uint32_t inclusive = own;
#pragma unroll
                for (int offset = 1; offset < 32; offset <<= 1) {
                    const uint32_t up = __shfl_up_sync(0xffffffffu, inclusive, offset);
                    if (lane >= offset) inclusive += up;
                }
                if (lane < warps) s.warp_counts[c][lane] = inclusive - own;
                if (lane == 31) s.tile_totals[c] = inclusive;
            }
        }
        __syncthreads();
        const uint32_t above_rank = above_base + s.warp_counts[0][warp] + __popc(above_bits & before_lane);
        const uint32_t equal_rank = equal_base + s.warp_counts[1][warp] + __popc(equal_bits & before_lane);
        if (above || (equal && equal_rank < kth.y)) emit(above_rank + min(equal_rank, kth.y), i);
        above_base += s.tile_totals[0];
        equal_base += s.tile_totals[1];
        __syncthreads();  // the counts are rewritten by the next tile
    }
}

}  // namespace awq_edge
