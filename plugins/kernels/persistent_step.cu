// The floor of a persistent decode step (issue 19: for models under about 1B, one launch a token
// may beat ~5 launches a layer). A skeleton of a step, measured by benchmarks/persistent_step.py:
// its phases (per decoder layer q/k/v, attention, o_proj, gate/up, down) run in one launch with a
// grid barrier (grid_sync.cuh) between them, each doing what bounds a small model's phase: every
// block reads the whole input vector (the previous phase's output, as each GEMV block reads all
// of x), its share of the phase's bytes (a linear's packed weights, scales and zeros, or the K
// and V rows attention reads), reduces them, and writes its share of the phase's output vector.
// Nothing else (at these sizes the real arithmetic is small). Launched once per phase
// (first_phase, phases = 1) it is its own launch-per-op comparator, with the backend's
// overlapped launches on sm_90 (pdl.cuh: a phase's own bytes are loaded before its wait).
//
// What it computes (benchmarks/persistent_step.py skeleton_twin, uint32 sums that wrap): phase p
// reads vectors[p % 2][0, vector_words[p]) and the uint4 words [phase_start[p], phase_start[p + 1])
// of `bytes`, word i going to block ((i - phase_start[p]) / 256) % blocks, which sums the input
// vector and its words' x ^ y ^ z ^ w into s; output word j of vectors[(p + 1) % 2] (j <
// vector_words[p + 1], blocks taking ceil(n / blocks) words each in order) = mix(s of its block +
// j), MurmurHash3's finalizer (a plain s + j would not do: summed over a vector of 2^k words, a
// change in s is multiplied by 2^k, and after a few phases vanishes mod 2^32).
// block_sums receives each block's s of the last phase run.
#include <stdint.h>

#include <cuda_runtime.h>

#include "grid_sync.cuh"
#include "pdl.cuh"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ uint32_t mix(uint32_t x) {
    x ^= x >> 16;
    x *= 0x85ebca6bu;
    x ^= x >> 13;
    x *= 0xc2b2ae35u;
    return x ^ (x >> 16);
}

__device__ uint32_t block_sum(uint32_t v, uint32_t* partial) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    __syncthreads();  // the previous phase's reduction may still be reading `partial`
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    v = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) v += partial[w];
    return v;
}

}  // namespace

// One phase's share for one block or tile: `tile` of `tiles` (the rule in the header), its sum s
// returned to every thread after its output words are written. wait() runs between the phase's
// own bytes and the input vector (they do not depend on the phase before; the vector does).
template <typename Wait>
__device__ uint32_t skeleton_phase(const uint4* __restrict__ bytes, const long long* __restrict__ phase_start,
                                   const int* __restrict__ vector_words, int p, unsigned tile, unsigned tiles,
                                   uint32_t* vectors, int vector_stride, uint32_t* partial, Wait wait) {
    const uint32_t* in = vectors + static_cast<size_t>(p % 2) * vector_stride;
    uint32_t* out = vectors + static_cast<size_t>((p + 1) % 2) * vector_stride;
    uint32_t s = 0;
    const long long end = phase_start[p + 1];
    for (long long i = phase_start[p] + static_cast<long long>(tile) * kThreads + threadIdx.x; i < end;
         i += static_cast<long long>(tiles) * kThreads) {
        const uint4 w = bytes[i];
        s += w.x ^ w.y ^ w.z ^ w.w;
    }
    wait();
    const int n_in = vector_words[p];
    for (int i = threadIdx.x; i < n_in; i += kThreads) s += in[i];
    s = block_sum(s, partial);
    const int n_out = vector_words[p + 1];
    const int per_tile = (n_out + static_cast<int>(tiles) - 1) / static_cast<int>(tiles);
    const int first = static_cast<int>(tile) * per_tile;
    const int last = first + per_tile < n_out ? first + per_tile : n_out;
    for (int j = first + threadIdx.x; j < last; j += kThreads) out[j] = mix(s + static_cast<uint32_t>(j));
    return s;
}

extern "C" __global__ void __launch_bounds__(kThreads)
awq_step_skeleton(const uint4* __restrict__ bytes, const long long* __restrict__ phase_start,
                  const int* __restrict__ vector_words, int first_phase, int phases, uint32_t* vectors,
                  int vector_stride, awq_edge::GridBarrier* barrier, uint32_t* __restrict__ block_sums) {
    __shared__ uint32_t partial[kThreads / 32];
    awq_edge::let_next_kernel_start();
    for (int p = first_phase; p < first_phase + phases; ++p) {
        // (a launch per phase, on sm_90: its wait for the launch before, pdl.cuh)
        const uint32_t s = skeleton_phase(bytes, phase_start, vector_words, p, blockIdx.x, gridDim.x, vectors,
                                          vector_stride, partial, [] { awq_edge::wait_for_previous_kernel(); });
        if (threadIdx.x == 0) block_sums[blockIdx.x] = s;
        if (p + 1 < first_phase + phases) awq_edge::grid_sync(barrier);
    }
}

// The same step as a queue of tasks (phase, tile), `tiles` a phase, taken in order by whichever
// block is free (grid_sync.cuh StepQueue): a task loads its tile's bytes, then waits until the
// phase before has all its tiles done (done[p], a count a phase), then reads the vector. The
// queue and done (P counts) are zeroed once. decode_step.cu runs a real step this way.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_step_skeleton_queue(const uint4* __restrict__ bytes, const long long* __restrict__ phase_start,
                        const int* __restrict__ vector_words, int phases, int tiles, uint32_t* vectors,
                        int vector_stride, awq_edge::StepQueue* queue, unsigned* done,
                        uint32_t* __restrict__ tile_sums) {
    __shared__ uint32_t partial[kThreads / 32];
    __shared__ long long task;
    const long long total = static_cast<long long>(phases) * tiles;
    for (;;) {
        const long long t = awq_edge::take_task(queue, task);
        if (t < 0 || t >= total) break;
        const int p = static_cast<int>(t / tiles);
        const unsigned tile = static_cast<unsigned>(t % tiles);
        const uint32_t s = skeleton_phase(bytes, phase_start, vector_words, p, tile, tiles, vectors, vector_stride,
                                          partial, [&] {
            if (p > 0 && threadIdx.x == 0) {  // (a stall is a bug, not a slow block: fail, never hang)
                awq_edge::poll_until(&done[p - 1], [&](unsigned n) { return n >= static_cast<unsigned>(tiles); },
                                     &queue->stalled);
                __threadfence();  // (as grid_sync: the block's reads after it see the writes)
            }
            __syncthreads();
        });
        __syncthreads();  // the tile's words are written (and `task` read) by every thread
        if (threadIdx.x == 0) {
            if (p == phases - 1) tile_sums[tile] = s;
            awq_edge::count_task(queue, done, p, phases, static_cast<unsigned>(tiles), total);
        }
    }
}
