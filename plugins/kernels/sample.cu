// Token choice on the GPU for batch-1 decode (the rule and the ABI are in sample.h).
//
// One block of 1024 threads. Nothing is sorted: every cut is a threshold logit, found
// exactly on the float's order-preserving bit pattern (its "key"):
//   top-k:          radix select, four passes of 8-bit digits with integer counts;
//   top-p, draw:    bisection over keys (at most 32 halvings) on the mass at or above them.
// When the top-k set fits in shared memory (the usual top_k = 50) it is first compacted
// there in id order, so the bisections do not stream the vocabulary again. Every reduction
// has a fixed shape, so the same inputs give the same token on every run.
#include <math.h>
#include <stdint.h>

#include <cuda_runtime.h>

#include "pdl.cuh"
#include "sample.h"
#include "select.cuh"

namespace {

using namespace awq_edge;

constexpr int kThreads = 1024;                 // 32 warps: a block reduction ends in one warp
constexpr uint32_t kSharedCandidates = 2048;   // top-k sets up to this size live in shared memory

// Sum of prob[i] over the i whose logit key is >= t.
__device__ float mass_at_least(const float* logit, const float* prob, int n, uint32_t t, float* partial) {
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += kThreads) {
        if (order_key(logit[i]) >= t) s += prob[i];
    }
    return block_reduce(s, SumOp(), partial);
}

// The largest key t in [lo, hi] with mass_at_least(t) >= target, given that it holds at lo.
// The mass only changes at element keys, so t is always some element's key.
__device__ uint32_t highest_threshold(const float* logit, const float* prob, int n, uint32_t lo, uint32_t hi,
                                      float target, float* partial) {
    while (lo < hi) {
        const uint32_t mid = lo + static_cast<uint32_t>((static_cast<uint64_t>(hi) - lo + 1) >> 1);
        if (mass_at_least(logit, prob, n, mid, partial) >= target) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

__device__ __forceinline__ void sample(const float* __restrict__ logits, int vocab, const int32_t* __restrict__ seen,
                                       int n_seen, float penalty, float temperature, int top_k, float top_p,
                                       float uniform, float* __restrict__ work, int32_t* __restrict__ token) {
    __shared__ float partial_f[32];
    __shared__ uint32_t partial_u[32];
    __shared__ unsigned long long partial_u64[32];
    __shared__ SelectScratch scratch;
    __shared__ uint32_t warp_offset[32];
    __shared__ uint32_t tile_total;
    __shared__ float cand_logit[kSharedCandidates];
    __shared__ float cand_prob[kSharedCandidates];
    __shared__ int32_t cand_id[kSharedCandidates];

    const int tid = threadIdx.x;
    float* logit = work;          // [vocab] logits after the repetition penalty
    float* prob = work + vocab;   // [vocab] exp((logit - max) / T) of the top-k candidates, else 0

    // 1. repetition penalty, computed from the input logit so a repeated id is penalised once.
    // A NaN logit counts as -inf: its order key would be above +inf's and win the argmax.
    for (int i = tid; i < vocab; i += kThreads) logit[i] = isnan(logits[i]) ? -INFINITY : logits[i];
    __syncthreads();
    if (penalty != 1.f) {
        for (int j = tid; j < n_seen; j += kThreads) {
            const int id = seen[j];
            if (id >= 0 && id < vocab) {
                const float x = logits[id];
                logit[id] = isnan(x) ? -INFINITY : x > 0.f ? x / penalty : x * penalty;
            }
        }
        __syncthreads();
    }

    // 2. argmax, lowest id on ties: the key in the high half, the complemented id in the low half
    unsigned long long best = 0;
    for (int i = tid; i < vocab; i += kThreads) {
        const unsigned long long packed =
            (static_cast<unsigned long long>(order_key(logit[i])) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
        best = best > packed ? best : packed;
    }
    best = block_reduce(best, MaxOp(), partial_u64);
    if (static_cast<uint32_t>(best >> 32) == order_key(-INFINITY)) {  // nothing above -inf: no token
        if (tid == 0) *token = -1;  // the host raises sampling.NO_USABLE_LOGITS
        return;
    }
    if (temperature <= 0.f) {
        if (tid == 0) *token = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(best & 0xffffffffu));
        return;
    }
    const uint32_t top_key = static_cast<uint32_t>(best >> 32);
    const float top_logit = key_to_float(top_key);

    // 3. top-k: the key of the k-th largest logit (select.cuh)
    uint32_t kth = 0;  // 0: every id is a candidate
    if (top_k > 0 && top_k < vocab) {
        kth = kth_largest_key(vocab, [&](int i) { return order_key(logit[i]); }, static_cast<uint32_t>(top_k),
                              scratch).x;
    }

    // 4. unnormalised probabilities of the candidates
    const float inv_t = 1.f / temperature;
    uint32_t count = 0;
    for (int i = tid; i < vocab; i += kThreads) {
        const bool keep = order_key(logit[i]) >= kth;
        prob[i] = keep ? expf((logit[i] - top_logit) * inv_t) : 0.f;
        count += keep ? 1u : 0u;
    }
    count = block_reduce(count, SumOp(), partial_u);

    // 5. few candidates: compact them into shared memory in id order (ballot + warp scan)
    const float* c_logit = logit;
    const float* c_prob = prob;
    bool compacted = false;
    int n = vocab;
    if (count <= kSharedCandidates) {
        const int lane = tid & 31, warp = tid >> 5;
        uint32_t base = 0;
        for (int tile = 0; tile < vocab; tile += kThreads) {
            const int i = tile + tid;
            const bool keep = i < vocab && order_key(logit[i]) >= kth;
            const uint32_t ballot = __ballot_sync(0xffffffffu, keep);
            if (lane == 0) warp_offset[warp] = __popc(ballot);
            __syncthreads();
            if (warp == 0) {  // exclusive scan of the 32 warp counts
                const uint32_t own = warp_offset[lane];
                uint32_t inclusive = own;
#pragma unroll
                for (int offset = 1; offset < 32; offset <<= 1) {
                    const uint32_t up = __shfl_up_sync(0xffffffffu, inclusive, offset);
                    if (lane >= offset) inclusive += up;
                }
                warp_offset[lane] = inclusive - own;
                if (lane == 31) tile_total = inclusive;
            }
            __syncthreads();
            if (keep) {
                const uint32_t at = base + warp_offset[warp] + __popc(ballot & ((1u << lane) - 1u));
                cand_logit[at] = logit[i];
                cand_prob[at] = prob[i];
                cand_id[at] = i;
            }
            base += tile_total;
            __syncthreads();  // warp_offset and tile_total are rewritten by the next tile
        }
        c_logit = cand_logit;
        c_prob = cand_prob;
        compacted = true;
        n = static_cast<int>(count);
    }

    // 6. top-p: the highest threshold whose head still holds top_p of the candidates' mass
    const float total = mass_at_least(c_logit, c_prob, n, kth, partial_f);
    uint32_t cut = kth;
    float kept = total;
    if (top_p < 1.f) {
        cut = highest_threshold(c_logit, c_prob, n, kth, top_key, top_p * total, partial_f);
        kept = mass_at_least(c_logit, c_prob, n, cut, partial_f);
    }

    // 7. the draw: the highest threshold whose head holds uniform * kept, and its lowest id
    const uint32_t drawn = highest_threshold(c_logit, c_prob, n, cut, top_key, uniform * kept, partial_f);
    uint32_t id = 0xffffffffu;
    for (int j = tid; j < n; j += kThreads) {
        if (order_key(c_logit[j]) == drawn) {
            const uint32_t candidate = compacted ? static_cast<uint32_t>(cand_id[j]) : static_cast<uint32_t>(j);
            id = candidate < id ? candidate : id;
        }
    }
    id = block_reduce(id, MinOp(), partial_u);
    if (tid == 0) *token = static_cast<int32_t>(id);
}

__global__ void __launch_bounds__(kThreads)
sample_kernel(const float* __restrict__ logits, int vocab, const int32_t* __restrict__ seen, int n_seen,
              float penalty, float temperature, int top_k, float top_p, float uniform, float* __restrict__ work,
              int32_t* __restrict__ token) {
    sample(logits, vocab, seen, n_seen, penalty, temperature, top_k, top_p, uniform, work, token);
}

}  // namespace

// The decode step's sampler, for a step captured once in a CUDA graph and replayed per token
// (awq_edge/cuda_backend.py, one block of 1024 threads): what changes from token to token is
// read from the device. The host writes `uniform` (its seeded draw) before each replay; the
// history of ids for the repetition penalty lives on the device (`seen`, `n_seen`), and the
// chosen token is appended to it (while it has room), so nothing but the token crosses back.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_sample_step(const float* __restrict__ logits, int vocab, int32_t* __restrict__ seen, int32_t* __restrict__ n_seen,
                int seen_capacity, float penalty, float temperature, int top_k, float top_p,
                const float* __restrict__ uniform, float* __restrict__ work, int32_t* __restrict__ token) {
    awq_edge::begin_after_previous_kernel();
    const int count = *n_seen;
    sample(logits, vocab, seen, count, penalty, temperature, top_k, top_p, *uniform, work, token);
    if (threadIdx.x == 0) {  // the thread that wrote the token
        const bool append = *token >= 0 && count < seen_capacity;
        if (append) seen[count] = *token;
        *n_seen = append ? count + 1 : count;
    }
}

#if defined(__CUDACC__)  // the C launchers (tests/cuda_on_cpu compiles the kernels alone with g++)
extern "C" int awq_sample_token(const float* logits, int vocab, const int32_t* seen, int n_seen,
                                float repetition_penalty, float temperature, int top_k, float top_p, float uniform,
                                float* work, int32_t* token, cudaStream_t stream) {
    const bool valid = logits != nullptr && work != nullptr && token != nullptr && vocab >= 1 && top_k >= 0 &&
                       top_p > 0.f && top_p <= 1.f && uniform >= 0.f && uniform < 1.f &&
                       repetition_penalty > 0.f && isfinite(repetition_penalty) && temperature >= 0.f &&
                       isfinite(temperature) && n_seen >= 0 && (n_seen == 0 || seen != nullptr);
    if (!valid) return AWQ_SAMPLE_INVALID_ARGUMENT;
    sample_kernel<<<1, kThreads, 0, stream>>>(logits, vocab, seen, n_seen, repetition_penalty, temperature, top_k,
                                              top_p, uniform, work, token);
    return static_cast<int>(cudaGetLastError());
}
#endif  // __CUDACC__
