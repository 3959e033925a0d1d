// A mixture of experts' layer (awq_edge/decoder.py's moe op; the numpy twins are
// awq_edge/reference_backend.py twin_moe_route and twin_moe): per row of the step, the router
// chooses top_k experts, each runs as a gated MLP, and their outputs are summed weighted.
// The experts run through the one-row GEMV body (gemv_w4a16.cu), a block per (4 rows of the
// expert's output, slot, row of the step), each block reading its expert's id from device memory:
// no host round trip, so a decode step with experts is still one CUDA graph. A layer's experts
// are stacked by rows in the engine (gate/up: E x 2W rows, gate and up interleaved as every
// gate_up linear's; down: E x hidden rows), so expert e is rows e * N .. of its stack.
//
//   awq_moe_route            grid (rows), 256 threads: x (the normed input, fp16) against the
//                            router's rows (float32; gpt-oss's bias added), the logits' softmax (or
//                            LFM2-MoE's sigmoids), the top_k of those plus the expert biases (LFM2-MoE's,
//                            ERNIE 4.5's) by a scan in warp 0 (ties: the lower expert; none left that
//                            compares: expert c, as the CPU decode's moe), their probabilities as
//                            weights (renormalized with normalize) times scale.
//                            -> ids int32 [rows, top_k], weights float32 [rows, top_k]
//   awq_moe_gemv_act_g{G}_w{W}    grid (2W / 4, top_k, rows), 128 threads: act(gate) * up of x's row
//                            through the slot's expert's gate/up rows -> act fp16 [rows, top_k, W]
//   awq_moe_gemv_store_g{G}_w{W}  grid (N / 4, top_k, rows): the slot's act through its expert's
//                            down rows -> y fp16 [rows, top_k, hidden]; or (gpt-oss) x's row through
//                            its gate/up rows -> gate_up fp16 [rows, top_k, 2W], for awq_moe_swiglu
//                            (each expert's biases, gpt-oss's, added to its rows: the GEMV's bias)
//   awq_moe_swiglu           grid (rows x top_k), 256 threads: gpt-oss's clamped SwiGLU of each
//                            slot's gate/up, (clamp(up, +-limit) + 1) g sigmoid(alpha g), g = min(gate,
//                            limit) -> act fp16 [rows, top_k, W]
//   awq_moe_combine          grid (rows), 256 threads: out = sum over slots of weight * y, plus the
//                            shared expert's output (Qwen2-MoE's times sigmoid(shared_gate . x)), fp16
// W = 4: 16-byte weight loads (K % 32 == 0), else 4-byte ones, as the GEMV's. Checked on the CPU
// emulation only (tests/test_kernels_on_cpu.py); not yet on a GPU.
#include <math.h>
#include <stdint.h>

#define AWQ_EDGE_BODIES_ONLY
#include "gemv_w4a16.cu"
#undef AWQ_EDGE_BODIES_ONLY
#include "row_ops.cuh"

namespace awq_edge {
namespace {

constexpr int kMoeThreads = 256;  // the route and combine kernels' blocks: 8 warps
constexpr int kMoeWarps = kMoeThreads / 32;
static_assert(kMoeWarps <= kRowOpsMaxWarps, "block_sum's partial sums: a float a warp");
constexpr int kMaxExperts = 1024;  // export/spec.py MAX_EXPERTS: the router's scores in shared memory

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// The slot's expert's GEMV: rows e * N .. e * N + N - 1 of the stacked weights, x at row * x_row +
// slot * x_slot (elements), y at (row * top_k + slot) * its width (N, or N / 2 after the act).
template <int kGroupSize, int kWordsPerLoad, Epilogue kEpilogue>
__device__ __forceinline__ void expert_gemv(const half* __restrict__ x, int x_row, int x_slot,
                                            const int32_t* __restrict__ ids, int top_k, int experts,
                                            const uint32_t* __restrict__ qweight, const half* __restrict__ scales,
                                            const half* __restrict__ zeros, const half* __restrict__ bias,
                                            half* __restrict__ y, int N, int K, int act_kind) {
    wait_for_previous_kernel();  // (the ids: the route kernel's)
    const int slot = blockIdx.y, row = blockIdx.z;
    int e = ids[row * top_k + slot];
    e = e < 0 ? 0 : e >= experts ? experts - 1 : e;  // (the route writes 0..experts - 1: a bound, not a case)
    const size_t rows = static_cast<size_t>(e) * N;
    Fusion fusion;
    fusion.act_kind = act_kind;
    fusion.bias = bias != nullptr ? bias + rows : nullptr;  // (the expert's own: gpt-oss's)
    const int width = kEpilogue == Epilogue::kAct ? N / 2 : N;
    gemv_w4a16<1, kGroupSize, kWordsPerLoad, false, kEpilogue>(
        x + static_cast<size_t>(row) * x_row + static_cast<size_t>(slot) * x_slot,
        qweight + rows * (K / kValuesPerWord), scales + rows * num_groups(K, kGroupSize),
        zeros + rows * num_groups(K, kGroupSize), y + (static_cast<size_t>(row) * top_k + slot) * width, N, K, fusion,
        blockIdx.x);
}

}  // namespace
}  // namespace awq_edge

extern "C" __global__ void __launch_bounds__(awq_edge::kMoeThreads)
awq_moe_route(const __half* __restrict__ x, const float* __restrict__ router, const float* __restrict__ router_bias,
              const float* __restrict__ expert_bias, int32_t* __restrict__ ids, float* __restrict__ weights,
              int experts, int hidden, int top_k, int normalize, int sigmoid, float scale) {
    using namespace awq_edge;
    begin_after_previous_kernel();
    __shared__ float probs[kMaxExperts];
    __shared__ float scores[kMaxExperts];
    const __half* x_row = x + static_cast<size_t>(blockIdx.x) * hidden;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int e = warp; e < experts; e += kMoeWarps) {  // a warp an expert's logit
        const float* w = router + static_cast<size_t>(e) * hidden;
        float dot = 0.f;
        for (int i = lane; i < hidden; i += 32) dot += __half2float(x_row[i]) * w[i];
        dot = warp_sum(dot);
        if (lane == 0) probs[e] = dot + (router_bias ? router_bias[e] : 0.f);
    }
    __syncthreads();
    if (warp != 0) return;
    float largest = -INFINITY, total = 0.f;
    for (int e = lane; e < experts; e += 32) largest = fmaxf(largest, probs[e]);
    largest = warp_max(largest);
    for (int e = lane; e < experts; e += 32) {
        probs[e] = sigmoid ? 1.f / (1.f + expf(-probs[e])) : expf(probs[e] - largest);
        total += probs[e];
    }
    total = warp_sum(total);
    for (int e = lane; e < experts; e += 32) {
        if (!sigmoid) probs[e] /= total;
        scores[e] = probs[e] + (expert_bias ? expert_bias[e] : 0.f);
    }
    __syncwarp();
    int32_t* chosen = ids + static_cast<size_t>(blockIdx.x) * top_k;
    float* chosen_weights = weights + static_cast<size_t>(blockIdx.x) * top_k;
    float picked = 0.f;
    for (int c = 0; c < top_k; ++c) {
        // this lane's best: of its experts (lane, + 32, ...) not taken (-inf) the highest, the lower on a tie
        int best = -1;
        float best_score = -INFINITY;
        for (int e = lane; e < experts; e += 32) {
            const float score = scores[e];
            if (score > -INFINITY && (best < 0 || score > best_score)) {
                best = e;
                best_score = score;
            }
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            const int other = __shfl_xor_sync(0xffffffffu, best, offset);
            const float other_score = __shfl_xor_sync(0xffffffffu, best_score, offset);
            if (other >= 0 && (best < 0 || other_score > best_score || (other_score == best_score && other < best))) {
                best = other;
                best_score = other_score;
            }
        }
        best = best < 0 ? c : best;  // (every score NaN or taken: a broken router; any expert, in bounds)
        picked += probs[best];
        if (lane == 0) {
            chosen[c] = best;
            chosen_weights[c] = probs[best];
        }
        __syncwarp();
        if (lane == 0) scores[best] = -INFINITY;
        __syncwarp();
    }
    for (int c = lane; c < top_k; c += 32) {
        chosen_weights[c] = (normalize ? chosen_weights[c] / picked : chosen_weights[c]) * scale;
    }
}

#define AWQ_MOE_GEMV_ENTRY(NAME, EPILOGUE, G, W)                                                                    \
    extern "C" __global__ void __launch_bounds__(128)                                                               \
        awq_moe_gemv_##NAME##_g##G##_w##W(const __half* __restrict__ x, int x_row, int x_slot,                      \
                                          const int32_t* __restrict__ ids, int top_k, int experts,                  \
                                          const uint32_t* __restrict__ qweight, const __half* __restrict__ scales,  \
                                          const __half* __restrict__ zeros, const __half* __restrict__ bias,        \
                                          __half* __restrict__ y, int N, int K, int act_kind) {                     \
        awq_edge::expert_gemv<G, W, awq_edge::Epilogue::EPILOGUE>(x, x_row, x_slot, ids, top_k, experts, qweight,   \
                                                                  scales, zeros, bias, y, N, K, act_kind);          \
    }
#define AWQ_MOE_GEMV_ENTRIES(NAME, EPILOGUE)                                                                        \
    AWQ_MOE_GEMV_ENTRY(NAME, EPILOGUE, 32, 1)                                                                       \
    AWQ_MOE_GEMV_ENTRY(NAME, EPILOGUE, 32, 4)                                                                       \
    AWQ_MOE_GEMV_ENTRY(NAME, EPILOGUE, 64, 1)                                                                       \
    AWQ_MOE_GEMV_ENTRY(NAME, EPILOGUE, 64, 4)                                                                       \
    AWQ_MOE_GEMV_ENTRY(NAME, EPILOGUE, 128, 1)                                                                      \
    AWQ_MOE_GEMV_ENTRY(NAME, EPILOGUE, 128, 4)
AWQ_MOE_GEMV_ENTRIES(act, kAct)
AWQ_MOE_GEMV_ENTRIES(store, kStore)

extern "C" __global__ void __launch_bounds__(awq_edge::kMoeThreads)
awq_moe_swiglu(const __half* __restrict__ gate_up, __half* __restrict__ act, int width, float alpha, float limit) {
    awq_edge::begin_after_previous_kernel();
    const size_t slot = blockIdx.x;  // (row x top_k + slot)
    const __half* pairs = gate_up + slot * 2 * width;  // gate j at 2j, up j at 2j + 1
    for (int i = threadIdx.x; i < width; i += awq_edge::kMoeThreads) {
        const float g = fminf(__half2float(pairs[2 * i]), limit);
        const float u = fminf(fmaxf(__half2float(pairs[2 * i + 1]), -limit), limit);
        act[slot * width + i] = __float2half_rn((u + 1.f) * g / (1.f + expf(-alpha * g)));
    }
}

extern "C" __global__ void __launch_bounds__(awq_edge::kMoeThreads)
awq_moe_combine(const __half* __restrict__ y, const float* __restrict__ weights, int top_k,
                const __half* __restrict__ shared, const float* __restrict__ shared_gate, const __half* __restrict__ x,
                __half* __restrict__ out, int hidden) {
    using namespace awq_edge;
    begin_after_previous_kernel();
    __shared__ float partial[kMoeWarps];
    const size_t row = blockIdx.x;
    float gate = 1.f;
    if (shared_gate != nullptr) {  // (Qwen2-MoE's) sigmoid(shared_gate . x) for the whole row
        float dot = 0.f;
        for (int i = threadIdx.x; i < hidden; i += kMoeThreads) {
            dot += shared_gate[i] * __half2float(x[row * hidden + i]);
        }
        gate = 1.f / (1.f + expf(-block_sum(dot, partial)));
    }
    for (int i = threadIdx.x; i < hidden; i += kMoeThreads) {
        float acc = 0.f;
        for (int c = 0; c < top_k; ++c) {
            acc += weights[row * top_k + c] * __half2float(y[(row * top_k + c) * hidden + i]);
        }
        if (shared != nullptr) acc += gate * __half2float(shared[row * hidden + i]);
        out[row * hidden + i] = __float2half_rn(acc);
    }
}
