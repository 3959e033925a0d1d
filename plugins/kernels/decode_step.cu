// A decode step in one launch (issue 19: a small model's layer is launch- and latency-bound, ~5
// launches a layer; cuda_backend's decode choice "persistent_step").
//
// The step's ops (awq_edge/decoder.py decode_ops: all of them, but an int4 head, whose candidate
// search and re-scoring stay launches of their own; the position's advance is one too) are a
// table of StepOp, each cut into `tasks` tiles, and the tiles of all ops one queue (grid_sync.cuh
// StepQueue): a block takes the next task, runs the op's own body for that tile (the device
// functions the per-op kernels run: gemv_w4a16.cu's one-row GEMV on CUDA cores, attention.cu's
// split decode attention and rope_store, row_ops.cuh's norms, embedding and activation,
// lm_head.cuh's head), and counts it done. Where the op's kernel would wait for the kernel
// before it (pdl.cuh), the task waits until every task of the op before it is done (`done`, a count
// an op; the weights and older keys are loaded before that wait, as the kernels load them before
// theirs). A task waits only on tasks taken before it, so any grid makes progress, and the CPU
// emulation runs it too (blocks one after another, or side by side). A wait that never ends is a
// bug: it gives up after ~a second and sets AWQ_STEP_STALLED in status, which the host reports.
//
// The ops, kinds and argument slots: awq_edge/cuda_backend.py step_ops writes them (and
// tests/test_native_engine.py checks the kinds' order); the case of each kind below reads them in
// the same order.
#define AWQ_EDGE_ONE_KERNEL  // activations another block wrote: loaded from L2 (pdl.cuh load_activation)
#define AWQ_EDGE_BODIES_ONLY
#include "attention.cu"
#include "gemv_w4a16.cu"
#undef AWQ_EDGE_BODIES_ONLY

#include "grid_sync.cuh"
#include "lm_head.cuh"
#include "row_ops.cuh"

#define AWQ_STEP_STALLED 2 /* a bit of *status, beside attention.h's AWQ_ATTENTION_OVER_CAPACITY */

namespace awq_edge {
namespace {

constexpr int kStepThreads = 128;  // the GEMV's block (kThreads) and split attention's (kSplitThreads)
static_assert(kStepThreads == kThreads && kStepThreads == kSplitThreads, "one block size for every op's body");

enum StepKind { kStepEmbed, kStepNorm, kStepAddNorm, kStepHeadNorm, kStepAct, kStepRopeStore, kStepAttend,
                kStepGemv, kStepLmHead };
constexpr int kStepArgs = 28;

struct StepOp {
    int64_t kind;     // StepKind
    int64_t tasks;    // tiles of the op: 1, a head each, or the GEMV's 4-row blocks dealt out in turn
    int64_t first;    // its first task: the ops' tasks in order
    int64_t variant;  // the GEMV's fusion, attention's head size, the embedding's and the head's bits
    int64_t arg[kStepArgs];  // pointers, int32 and float32 (the bits), in each case's order below
};

// The task's wait: thread 0 polls the op before's count (acquire) until all its tasks are done,
// then fences, so the block's reads after the barrier see their writes (grid_sync's pattern).
// Once a wait has given up (`stalled`), none waits again: the step ends fast, flagged.
struct AfterOpBefore {
    const unsigned* done;  // the op before's count, or null for the first op
    unsigned tasks;
    unsigned* stalled;
    __device__ __forceinline__ void operator()() const {
        if (done != nullptr && threadIdx.x == 0 && *reinterpret_cast<volatile unsigned*>(stalled) == 0u) {
            poll_until(done, [&](unsigned n) { return n >= tasks; }, stalled);
            __threadfence();
        }
        __syncthreads();
    }
};

// A GEMV task's 4-row blocks (tile, tile + tasks, ...), `at_once` of them at a time: the block's
// threads in groups of 128 / at_once (1, 2 or 4 groups), each group one row block, each thread its
// 16-byte chunks of K (chunk, chunk + the group's threads, ...: one a row up to K = 4096 / at_once)
// of the 4 rows. At K = 576 a row has 18 chunks: one row block at a time would keep 18 of the 128
// threads loading and wait on memory once for each of a task's blocks in turn. The body is
// gemv_w4a16.cu's one-row GEMV (its loads, dequantization, norm prologue and epilogues), with x's
// 1 / rms computed once for the task; the sums in its order (each warp's by shuffles, then the
// group's warps' in shared memory; at 1 group, all four warps' as there); each row block's
// epilogue by the whole block in turn (one_row_epilogue: its first 4 threads write).
template <int kGroupSize, bool kNorm, Epilogue kEpilogue>
__device__ __forceinline__ void step_gemv_rows(const half* __restrict__ x, const uint32_t* __restrict__ qweight,
                                               const half* __restrict__ scales, const half* __restrict__ zeros,
                                               half* __restrict__ y, int N, int K, const Fusion& fusion, int tile,
                                               int tasks, int at_once, float inv_rms) {
    constexpr int kWords = 4;
    __shared__ float warp_sums[kWarpsPerBlock][kRowsPerBlock];
    const int words_per_row = K / kValuesPerWord, loads = words_per_row / kWords, groups = num_groups(K, kGroupSize);
    const int group_threads = kStepThreads / at_once, group = static_cast<int>(threadIdx.x) / group_threads;
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, group_warps = group_threads / kWarpSize;
    for (int first = tile; first < N / kRowsPerBlock; first += at_once * tasks) {
        const int block = first + group * tasks;  // this group's row block of the batch
        float acc[kRowsPerBlock] = {};
        for (int chunk = static_cast<int>(threadIdx.x) % group_threads; block < N / kRowsPerBlock && chunk < loads;
             chunk += group_threads) {
            const int k0 = chunk * kWords * kValuesPerWord, g = group_of(k0, kGroupSize);
            uint32_t words[kRowsPerBlock][kWords];
            GroupParams params[kRowsPerBlock];
#pragma unroll
            for (int r = 0; r < kRowsPerBlock; ++r) {
                const size_t n = static_cast<size_t>(row_of_block<kEpilogue>(block, r, fusion.rope));
                load_weight_words<kWords>(qweight + n * words_per_row + chunk * kWords, words[r]);
                params[r] = make_group_params(scales[n * groups + g], zeros[n * groups + g]);
            }
#pragma unroll
            for (int i = 0; i < kWords; ++i) {
                const int k = k0 + i * kValuesPerWord;
                uint4 xv = load_activation(reinterpret_cast<const uint4*>(x + k));
                if constexpr (kNorm) xv = normed8(xv, fusion.norm_weight + k, inv_rms);
#pragma unroll
                for (int r = 0; r < kRowsPerBlock; ++r) {
                    half2 w[4];
                    dequant_word(words[r][i], params[r], w);
                    acc[r] += dot8(w, xv);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < kRowsPerBlock; ++r) {
            float v = acc[r];
#pragma unroll
            for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
            if (lane == 0) warp_sums[warp][r] = v;
        }
        __syncthreads();
        for (int p = 0; p < at_once && first + p * tasks < N / kRowsPerBlock; ++p) {
            const int b = first + p * tasks;
            const auto row = [&](int r) { return row_of_block<kEpilogue>(b, r, fusion.rope); };
            const auto sum = [&](int t) {
                float v = 0.0f;
                for (int w = p * group_warps; w < (p + 1) * group_warps; ++w) v += warp_sums[w][t];
                return v;
            };
            one_row_epilogue<kEpilogue, kRowsPerBlock>(fusion, y, N, row, sum, b == 0);
        }
        __syncthreads();  // (warp_sums, before the next batch's)
    }
}

// The GEMV's 16-byte-load body: K % 32 == 0 (cuda_backend refuses the step for an engine with another
// K: the 4-byte loads' bodies would add a third to the kernel's compile time, for no real model's shape).
template <int kGroupSize, bool kNorm, Epilogue kEpilogue>
__device__ __forceinline__ void step_gemv(const StepOp& op, int tile, AfterOpBefore wait) {
    constexpr int kWords = 4;
    const int64_t* a = op.arg;
    Fusion fusion;
    fusion.norm_weight = reinterpret_cast<const float*>(a[7]);
    fusion.eps = __int_as_float(static_cast<int>(a[8]));
    fusion.bias = reinterpret_cast<const half*>(a[9]);
    fusion.act_kind = static_cast<int>(a[10]);
    fusion.rope = RopeArgs{reinterpret_cast<const half*>(a[11]), reinterpret_cast<const half*>(a[12]),
                           reinterpret_cast<half*>(a[13]), reinterpret_cast<half*>(a[14]),
                           reinterpret_cast<half*>(a[15]), reinterpret_cast<const int64_t*>(a[16]),
                           reinterpret_cast<int*>(a[17]), static_cast<int>(a[18]), static_cast<int>(a[19]),
                           static_cast<int>(a[20]), static_cast<int>(a[21]), static_cast<int>(a[22])};
    const int N = static_cast<int>(a[5]), K = static_cast<int>(a[6]), tasks = static_cast<int>(op.tasks);
    const auto qweight = reinterpret_cast<const uint32_t*>(a[1]);
    const int words_per_row = K / kValuesPerWord, loads = words_per_row / kWords;
    // row blocks at once (cuda_backend.step_row_blocks_at_once), as many as a row's chunks allow
    const int at_once = a[23] >= 4 && loads <= kWarpSize ? 4 : a[23] >= 2 && loads <= 2 * kWarpSize ? 2 : 1;
    // All the task's weights toward L2 before its wait, as the per-op kernel's blocks all send
    // theirs before theirs (gemv_w4a16's prefetch).
    for (int block = tile; block < N / kRowsPerBlock; block += tasks) {
        for (int chunk = threadIdx.x; chunk < loads; chunk += kThreads) {
#pragma unroll
            for (int r = 0; r < kRowsPerBlock; ++r) {
                const size_t row = static_cast<size_t>(row_of_block<kEpilogue>(block, r, fusion.rope));
                prefetch_l2(qweight + row * words_per_row + chunk * kWords);
            }
        }
    }
    wait();  // (x is the op before's output)
    const auto x = reinterpret_cast<const half*>(a[0]);
    float inv_rms = 0.f;
    if constexpr (kNorm) inv_rms = row_inv_rms(x, K, fusion.eps);
    step_gemv_rows<kGroupSize, kNorm, kEpilogue>(x, qweight, reinterpret_cast<const half*>(a[2]),
                                                 reinterpret_cast<const half*>(a[3]), reinterpret_cast<half*>(a[4]),
                                                 N, K, fusion, tile, tasks, at_once, inv_rms);
}

// The GEMV's fusions in cuda_backend.GEMV_FUSIONS's order (gemv_w4a16.cu AWQ_GEMV_FUSIONS).
template <int kGroupSize>
__device__ __forceinline__ void step_gemv_fusion(const StepOp& op, int tile, AfterOpBefore wait) {
    switch (op.variant) {
        case 0: step_gemv<kGroupSize, false, Epilogue::kStore>(op, tile, wait); break;
        case 1: step_gemv<kGroupSize, true, Epilogue::kStore>(op, tile, wait); break;
        case 2: step_gemv<kGroupSize, false, Epilogue::kAct>(op, tile, wait); break;
        case 3: step_gemv<kGroupSize, true, Epilogue::kAct>(op, tile, wait); break;
        case 4: step_gemv<kGroupSize, false, Epilogue::kResidual>(op, tile, wait); break;
        case 5: step_gemv<kGroupSize, false, Epilogue::kRope>(op, tile, wait); break;
        default: step_gemv<kGroupSize, true, Epilogue::kRope>(op, tile, wait); break;
    }
}

// Head tile / per_head of the split attention, splits tile % per_head, + per_head, ... (per_head
// tasks a head: up to the grid's blocks between the heads, so a short context's empty splits cost
// no task of their own).
template <int D>
__device__ __forceinline__ void step_attend(const StepOp& op, int tile, AfterOpBefore wait) {
    const int64_t* a = op.arg;
    const int splits = static_cast<int>(a[14]), per_head = static_cast<int>(a[15]);
    for (int split = tile % per_head; split < splits; split += per_head) {
        attend_split<D>(reinterpret_cast<const half*>(a[0]), reinterpret_cast<const half*>(a[1]),
                        reinterpret_cast<const half*>(a[2]), reinterpret_cast<const int64_t*>(a[3]),
                        reinterpret_cast<half*>(a[4]), reinterpret_cast<float*>(a[5]), reinterpret_cast<int*>(a[6]),
                        static_cast<int>(a[7]), static_cast<int>(a[8]), static_cast<int>(a[9]),
                        static_cast<int>(a[10]), static_cast<int>(a[11]), __int_as_float(static_cast<int>(a[12])),
                        __int_as_float(static_cast<int>(a[13])), reinterpret_cast<const float*>(a[16]),
                        tile / per_head, split, splits, wait);
        __syncthreads();  // (its shared memory, before the next split's)
    }
}

// An fp16 or int8 lm_head (lm_head.cuh): 16-row blocks (a warp's 4 rows each) tile, + tasks, ...;
// the task's rows all sent toward L2 before its wait, as the head kernel sends its block's.
__device__ __forceinline__ void step_lm_head(const StepOp& op, int tile, AfterOpBefore wait) {
    const int64_t* a = op.arg;
    const auto x = reinterpret_cast<const half*>(a[0]);
    const void* table = reinterpret_cast<const void*>(a[1]);
    const auto scales = reinterpret_cast<const half*>(a[2]);
    const auto logits = reinterpret_cast<float*>(a[3]);
    const int vocab = static_cast<int>(a[4]), hidden = static_cast<int>(a[5]);
    const float softcap = __int_as_float(static_cast<int>(a[6]));
    const auto bias = reinterpret_cast<const float*>(a[7]);  // (Phi's head; else null)
    const bool int8 = op.variant == 8;
    constexpr int kBlockRows = kStepThreads / 32 * kHeadRowsPerWarp;
    const int blocks = (vocab + kBlockRows - 1) / kBlockRows;
    const int warp_row = static_cast<int>(threadIdx.x) / 32 * kHeadRowsPerWarp;  // the warp's first row in a block
    for (int b = tile; b < blocks; b += static_cast<int>(op.tasks)) {
        prefetch_head_rows(table, b * kBlockRows + warp_row, vocab, int8 ? hidden : 2 * hidden);
    }
    wait();
    for (int b = tile; b < blocks; b += static_cast<int>(op.tasks)) {
        const int v0 = b * kBlockRows + warp_row;
        if (v0 >= vocab) continue;  // (a whole warp: the shuffles see all 32 lanes)
        if (int8) lm_head_warp<true>(x, table, scales, v0, vocab, hidden, softcap, bias, logits);
        else lm_head_warp<false>(x, table, nullptr, v0, vocab, hidden, softcap, bias, logits);
    }
}

template <int kGroupSize>
__device__ __forceinline__ void run_task(const StepOp& op, int tile, AfterOpBefore wait, float* partial) {
    const int64_t* a = op.arg;
    const auto h = [&](int i) { return reinterpret_cast<half*>(a[i]); };
    const auto f = [&](int i) { return __int_as_float(static_cast<int>(a[i])); };
    const auto i32 = [&](int i) { return static_cast<int>(a[i]); };
    switch (op.kind) {
        case kStepEmbed:  // (ids, table, out, hidden, vocab, scale, int8 scales, positions, past): variant 8, int8 rows
            wait();
            if (op.variant == 8) {
                embed_row_q8(*reinterpret_cast<const int32_t*>(a[0]), reinterpret_cast<const int8_t*>(a[1]),
                             reinterpret_cast<const half*>(a[6]), h(2), i32(3), i32(4), f(5));
            } else {
                embed_row(*reinterpret_cast<const int32_t*>(a[0]), h(1), h(2), i32(3), i32(4), f(5));
            }
            if (a[7]) add_position_row(h(2), h(7), *reinterpret_cast<const int64_t*>(a[8]), i32(3));  // (GPT-2's)
            break;
        case kStepNorm:  // (x, weight, out, n, eps, bias: a LayerNorm's, or 0)
            wait();
            norm_row(h(0), reinterpret_cast<const float*>(a[1]), reinterpret_cast<const float*>(a[5]), h(2), i32(3),
                     f(4), partial);
            break;
        case kStepAddNorm:  // (x, residual, weight, out, n, eps, bias)
            wait();
            add_norm_row(h(0), h(1), reinterpret_cast<const float*>(a[2]), reinterpret_cast<const float*>(a[6]), h(3),
                         i32(4), f(5), partial);
            break;
        case kStepHeadNorm: {  // (x, offset, head_dim, weight, eps): head `tile`, in place
            wait();
            half* head = h(0) + a[1] + static_cast<int64_t>(tile) * a[2];
            rms_norm_row(head, reinterpret_cast<const float*>(a[3]), head, i32(2), f(4), partial);
            break;
        }
        case kStepAct:  // (gate_up, out, inter, kind, params or null)
            wait();
            act_row(h(0), h(1), i32(2), i32(3), reinterpret_cast<const float*>(a[4]));
            break;
        case kStepRopeStore:  // awq_rope_store's arguments for one row (S = 1)
            wait();
            rope_store(h(0), h(1), h(2), h(3), h(4), reinterpret_cast<const int64_t*>(a[5]), h(6), h(7), h(8), 1,
                       i32(9), i32(10), i32(11), i32(12), i32(13), i32(14), i32(15), reinterpret_cast<int*>(a[16]),
                       0);
            break;
        case kStepAttend:  // awq_attend_split's arguments but sinks, splits, the tasks a head, sinks (step_attend)
            if (op.variant == 64) step_attend<64>(op, tile, wait);
            else if (op.variant == 128) step_attend<128>(op, tile, wait);
            else step_attend<256>(op, tile, wait);
            break;
        case kStepLmHead:  // (x, table, scales or null, logits, vocab, hidden, softcap, bias or null)
            step_lm_head(op, tile, wait);
            break;
        default:  // kStepGemv: the fused one-row GEMV's arguments (AWQ_GEMV_FUSED_PARAMS, no prefetch)
            step_gemv_fusion<kGroupSize>(op, tile, wait);
    }
}

template <int kGroupSize>
__device__ __forceinline__ void decode_step(const StepOp* __restrict__ ops, int n_ops, StepQueue* queue,
                                            unsigned* done, int* status) {
    __shared__ long long task;
    __shared__ float partial[kRowOpsMaxWarps];
    let_next_kernel_start();
    // The token (the sampler's) and the position (the step before's advance) come from kernels before.
    wait_for_previous_kernel();
    const StepOp& last = ops[n_ops - 1];
    const long long total = last.first + last.tasks;
    for (;;) {
        const long long t = take_task(queue, task);
        if (t < 0 || t >= total) break;
        int lo = 0, hi = n_ops - 1;      // the op of task t: the last whose first task is <= t
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (ops[mid].first <= t) lo = mid;
            else hi = mid - 1;
        }
        const StepOp& op = ops[lo];
        const unsigned tasks_before = lo > 0 ? static_cast<unsigned>(ops[lo - 1].tasks) : 0u;
        const AfterOpBefore wait{lo > 0 ? &done[lo - 1] : nullptr, tasks_before, &queue->stalled};
        run_task<kGroupSize>(op, static_cast<int>(t - op.first), wait, partial);
        // Counted only once the op before is done (a task may return before its wait: attention's
        // splits past the position), so the last op's count means the whole step is.
        wait();
        if (threadIdx.x == 0 && count_task(queue, done, lo, n_ops, static_cast<unsigned>(last.tasks), total)) {
            if (atomicExch(&queue->stalled, 0u) != 0u) atomicOr(status, AWQ_STEP_STALLED);  // (the step's end)
        }
        __syncthreads();  // (`task` and `partial`, before the next task's)
    }
}

}  // namespace
}  // namespace awq_edge

// awq_decode_step_g{32,64,128}(ops, n_ops, queue, done, status): the step's ops (StepOp [n_ops])
// at the engine's group size; queue (StepQueue) and done (uint32 [n_ops]) zeroed once; status as
// the attention kernels'. Any grid of 128-thread blocks (cuda_backend: STEP_BLOCKS_PER_SM an SM).
#define AWQ_DECODE_STEP_ENTRY(G)                                                                                    \
    extern "C" __global__ void __launch_bounds__(awq_edge::kStepThreads)                                           \
        awq_decode_step_g##G(const awq_edge::StepOp* __restrict__ ops, int n_ops, awq_edge::StepQueue* queue,       \
                             unsigned* done, int* status) {                                                         \
        awq_edge::decode_step<G>(ops, n_ops, queue, done, status);                                                 \
    }
AWQ_DECODE_STEP_ENTRY(32)
AWQ_DECODE_STEP_ENTRY(64)
AWQ_DECODE_STEP_ENTRY(128)
