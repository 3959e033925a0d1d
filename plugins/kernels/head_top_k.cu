// An int4 lm_head's exact re-scoring (the cuda engine's --lm-head int4; awq_edge/decoder.py):
// the 4-bit head (awq_gemv_logits_*) writes approximate logits, then its top kTopK are
// recomputed from the fp16 table, so greedy decoding, top-k and top-p see exact values for
// every candidate that can win, as the CPU engine's graph does (docs/export.md). Two launches:
//
//   awq_head_candidates  a block per slice of the vocabulary (at most kCapacity logits) keeps its
//                        top_k keys and ids, in id order (select.cuh: radix select, then a scan);
//   awq_head_rescore     every block picks the top_k of all slices' candidates the same way (at
//                        most kCapacity, so slices * top_k <= kCapacity: decoder.head_slices), then
//                        recomputes kRowsPerBlock of them: logits[id] = table[id] . x in fp32.
//
// Ties go to the lowest ids (a slice's candidates are in id order, and the slices in order), so
// the chosen set is reference_backend.twin_head_top_k's. NaN logits rank lowest.
#include <stdint.h>

#include <cuda_fp16.h>

#include "activation.cuh"
#include "pdl.cuh"
#include "select.cuh"

namespace {

using namespace awq_edge;

constexpr int kThreads = 1024;
constexpr int kTopK = 64;              // at most (decoder.HEAD_TOP_K)
constexpr int kCapacity = 8192;        // keys a block selects among (decoder.HEAD_SELECT_CAPACITY)
constexpr int kRowsPerBlock = 8;       // re-scored rows a block: 4 warps a row
constexpr int kWarpsPerRow = kThreads / 32 / kRowsPerBlock;

}  // namespace

// Grid: slices blocks of 1024 threads; slice = the logits a block takes (<= kCapacity), the last
// block fewer. Block b writes top_k (key, id) pairs at b * top_k; a slice shorter than top_k pads
// them with key 0 and id -1.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_head_candidates(const float* __restrict__ logits, int vocab, int slice, int top_k,
                    uint32_t* __restrict__ candidate_keys, int32_t* __restrict__ candidate_ids) {
    __shared__ uint32_t keys[kCapacity];
    __shared__ SelectScratch scratch;
    begin_after_previous_kernel();
    const int start = static_cast<int>(blockIdx.x) * slice, n = min(slice, vocab - start);
    uint32_t* out_keys = candidate_keys + static_cast<size_t>(blockIdx.x) * top_k;
    int32_t* out_ids = candidate_ids + static_cast<size_t>(blockIdx.x) * top_k;
    for (int i = threadIdx.x; i < n; i += kThreads) keys[i] = order_key_nan_lowest(logits[start + i]);
    const int k = min(top_k, n);
    for (int r = k + static_cast<int>(threadIdx.x); r < top_k; r += kThreads) {
        out_keys[r] = 0u;
        out_ids[r] = -1;
    }
    __syncthreads();
    const auto key_at = [&](int i) { return keys[i]; };
    const uint2 kth = kth_largest_key(n, key_at, static_cast<uint32_t>(k), scratch);
    emit_top_k(n, key_at, kth, [&](uint32_t rank, int i) {
        out_keys[rank] = keys[i];
        out_ids[rank] = start + i;
    }, scratch);
}

// Grid: ceil(top_k / 8) blocks of 1024 threads. candidates = slices * top_k (<= kCapacity);
// x: the final normed row, fp16 [hidden] (hidden % 8 == 0); table: the fp16 head [vocab, hidden]
// (the embedding when tied); logits[id] of the top_k are overwritten with their exact values.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_head_rescore(const uint32_t* __restrict__ candidate_keys, const int32_t* __restrict__ candidate_ids,
                 int candidates, int top_k, const half* __restrict__ x, const half* __restrict__ table, int hidden,
                 float softcap, float* __restrict__ logits) {
    __shared__ uint32_t keys[kCapacity];
    __shared__ int32_t chosen[kTopK];
    __shared__ float partial[kThreads / 32];
    __shared__ SelectScratch scratch;
    begin_after_previous_kernel();
    for (int i = threadIdx.x; i < candidates; i += kThreads) keys[i] = candidate_keys[i];
    __syncthreads();
    const auto key_at = [&](int i) { return keys[i]; };
    const uint2 kth = kth_largest_key(candidates, key_at, static_cast<uint32_t>(top_k), scratch);
    emit_top_k(candidates, key_at, kth, [&](uint32_t rank, int i) { chosen[rank] = candidate_ids[i]; }, scratch);
    __syncthreads();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = static_cast<int>(blockIdx.x) * kRowsPerBlock + warp / kWarpsPerRow, part = warp % kWarpsPerRow;
    const int id = r < top_k ? chosen[r] : -1;  // -1: a padding candidate (a vocabulary under top_k)
    float sum = 0.f;
    if (id >= 0) {
        const uint4* row = reinterpret_cast<const uint4*>(table + static_cast<size_t>(id) * hidden);
        const uint4* xs = reinterpret_cast<const uint4*>(x);
        for (int c = part * 32 + lane; c < hidden / 8; c += kWarpsPerRow * 32) {
            const uint4 wv = __ldg(row + c), xv = __ldg(xs + c);
            const half2* w2 = reinterpret_cast<const half2*>(&wv);
            const half2* x2 = reinterpret_cast<const half2*>(&xv);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 wf = __half22float2(w2[j]), xf = __half22float2(x2[j]);
                sum += wf.x * xf.x + wf.y * xf.y;
            }
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) partial[warp] = sum;
    __syncthreads();
    if (part == 0 && lane == 0 && id >= 0) {
        float total = 0.f;
#pragma unroll
        for (int p = 0; p < kWarpsPerRow; ++p) total += partial[warp + p];
        logits[id] = soft_cap(total, softcap);
    }
}
