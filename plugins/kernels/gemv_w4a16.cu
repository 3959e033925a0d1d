// Decode GEMV: Y[M, N] = X[M, K] @ W_hat^T for M = 1..8, weights dequantized in registers.
//
// Batch-1 decode reads every weight once per token, so this kernel is a memory copy with
// arithmetic on the side; what bounds it is how many weight bytes are in flight. Work split:
// one block of 128 threads per kRowsPerBlock output rows. The threads stride over the row's
// 128-bit chunks (32 k values each; a block reads 2 KiB of a row per step, coalesced), and
// each thread issues the loads of all the block's rows before using any: kRowsPerBlock
// independent 16-byte loads in flight per thread. Each thread reads its X values once per
// chunk and reuses them for every row. Weights are loaded with the streaming cache hint
// (used once); X is small and shared by all blocks, so it goes through the read-only cache.
// Partial sums: a warp shuffle, then shared memory across the block's 4 warps.
//
// A 128-bit chunk starts at a multiple of 32 and G is a multiple of 32, so the whole
// chunk lies in one group: one scale and one zero per load. Rows of K % 32 != 0 are not
// 16-byte aligned; for those the kernel reads one word (8 k values) at a time instead.
// The last group may be short (K = 576 at G = 128): the group index is k / G either way.
// N is a multiple of 8 (valid_matmul_args), hence of kRowsPerBlock: every block's rows exist.
//
// Arithmetic: the 8 products of one word are summed in a half2 (hmul2 + 3 hfma2), then
// added to an fp32 accumulator; the block reduction finishes the dot product in fp32.
//
// Fusions (decode, M = 1; awq_edge/decoder.py linear_op says what each computes, its twin is
// reference_backend.run's "linear"): the prologue RMSNorms x on the fly (each block sums the
// squares of the K values of x itself, then scales each 8-value load of x: norm(h) never goes
// through memory); the epilogue adds a bias (if any), then stores, or applies the gated
// activation to the block's gate/up row pairs (rows interleaved at packing, so a block of 4 rows
// makes 2 outputs; without a gate, to each row), or adds the result into the residual stream y, or (q/k/v)
// applies RoPE and writes q into q_rot and k and v into their cache rows, as awq_rope_store does.
// For RoPE a block takes rows (2j, 2j + 1, 2j + D/2, 2j + 1 + D/2) of a q or k head instead of 4
// adjacent ones, so it holds both halves of its two rotation pairs (the weights need no other
// layout: rows are read one by one anyway). Every value is rounded to fp16 where the unfused
// kernels round it, so fused and unfused steps agree.
#include "activation.cuh"
#include "dequant.cuh"
#include "launch_checks.cuh"
#include "mma.cuh"
#include "pdl.cuh"

namespace awq_edge {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpSize * kWarpsPerBlock;
constexpr int kRowsPerBlock = 4;  // output rows per block: loads in flight per thread, and X reuse
static_assert(8 % kRowsPerBlock == 0, "N is only known to be a multiple of 8");

// Sum of the 8 products of one dequantized word with 8 activations, as fp32.
__device__ __forceinline__ float dot8(const half2 w[4], uint4 x_bits) {
    const half2* x = reinterpret_cast<const half2*>(&x_bits);
    half2 sum = __hmul2(w[0], x[0]);
    sum = __hfma2(w[1], x[1], sum);
    sum = __hfma2(w[2], x[2], sum);
    sum = __hfma2(w[3], x[3], sum);
    const float2 f = __half22float2(sum);
    return f.x + f.y;
}

// What a decode GEMV does around the product.
enum class Epilogue { kStore, kAct, kResidual, kRope, kLogits };

// kRope's arguments: those of awq_rope_store (attention.h) for one token at position *past.
struct RopeArgs {
    const half* cos = nullptr;  // [max_positions, D/2]
    const half* sin = nullptr;
    half* q_rot = nullptr;      // [H, D]
    half* k_cache = nullptr;    // [Hkv, capacity, D]
    half* v_cache = nullptr;
    const int64_t* past = nullptr;
    int* status = nullptr;      // AWQ_ATTENTION_OVER_CAPACITY is ORed in when the token does not fit
    int heads = 0, kv_heads = 0, head_dim = 0, capacity = 0, max_positions = 0;
};

struct Fusion {
    const float* norm_weight = nullptr;  // prologue: RMSNorm weight [K], float32 (the family offset folded in)
    float eps = 0.f;
    const half* bias = nullptr;          // added to the fp16 result (every epilogue but kLogits), or none
    int act_kind = kSilu;                // kAct: ActKind
    RopeArgs rope;                       // kRope
    const char* next_weights = nullptr;  // the next linear's weights: their first next_bytes are sent
    int next_bytes = 0;                  // toward L2 as the blocks finish (GPUs without pdl.cuh's overlap)
    float* logits = nullptr;             // kLogits: float32 [vocab], soft-capped when softcap > 0
    int vocab = 0;                       //   (rows past the vocabulary pad N to a multiple of 8: not written)
    float softcap = 0.f;
};

// An int4 head's Fusion: fp32 logits for v < vocab, soft-capped when softcap > 0.
__device__ __forceinline__ Fusion logits_fusion(float* logits, int vocab, float softcap) {
    Fusion fusion;
    fusion.logits = logits;
    fusion.vocab = vocab;
    fusion.softcap = softcap;
    return fusion;
}

// For RoPE, output row r of slice j (of R rows, D/R slices a head) of a q/k/v head: in a q/k head
// rows R/2 j .. R/2 j + R/2 - 1 and the same + D/2, rotation pairs (r, r + R/2) (R = 4: rows 2j,
// 2j + 1, 2j + D/2, 2j + 1 + D/2); in a v head the R adjacent rows.
template <int kBlockRows>
__device__ __forceinline__ int rope_row(int head, int j, int r, const RopeArgs& rope) {
    constexpr int kHalf = kBlockRows / 2;
    const int D = rope.head_dim;
    if (head < rope.heads + rope.kv_heads) return head * D + kHalf * j + r % kHalf + (r / kHalf) * (D / 2);
    return head * D + kBlockRows * j + r;
}

// The output rows of block b of R rows: R adjacent ones, or for RoPE slice b % (D/R) of head
// b / (D/R) (rope_row).
template <Epilogue kEpilogue, int kBlockRows = kRowsPerBlock>
__device__ __forceinline__ int row_of_block(int b, int r, const RopeArgs& rope) {
    if constexpr (kEpilogue == Epilogue::kRope) {
        const int slices = rope.head_dim / kBlockRows;
        if (b < (rope.heads + rope.kv_heads) * slices) return rope_row<kBlockRows>(b / slices, b % slices, r, rope);
    }
    return b * kBlockRows + r;  // (a v head's slices: rope_row's adjacent rows)
}

// rsqrt(mean(x^2) + eps) of one row of K fp16 values, on every thread of a block of kWarps warps.
template <int kWarps = kWarpsPerBlock>
__device__ __forceinline__ float row_inv_rms(const half* __restrict__ x, int K, float eps) {
    __shared__ float partial[kWarps];
    float sum = 0.f;
    for (int c = threadIdx.x; c < K / kValuesPerWord; c += kWarps * kWarpSize) {
        const uint4 bits = load_activation(reinterpret_cast<const uint4*>(x) + c);
        const half2* h = reinterpret_cast<const half2*>(&bits);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 f = __half22float2(h[i]);
            sum += f.x * f.x + f.y * f.y;
        }
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (threadIdx.x % kWarpSize == 0) partial[threadIdx.x / kWarpSize] = sum;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += partial[w];
    return rsqrtf(total / static_cast<float>(K) + eps);
}

// 8 values of x normed: x * inv_rms * weight, rounded to fp16 (as awq_norm stores them).
__device__ __forceinline__ uint4 normed8(uint4 bits, const float* __restrict__ weight, float inv_rms) {
    const float4 w0 = __ldg(reinterpret_cast<const float4*>(weight));
    const float4 w1 = __ldg(reinterpret_cast<const float4*>(weight) + 1);
    const float w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
    half2* h = reinterpret_cast<half2*>(&bits);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
        h[i] = __floats2half2_rn(f.x * inv_rms * w[2 * i], f.y * inv_rms * w[2 * i + 1]);
    }
    return bits;
}

// The RoPE epilogue of one block (value(t): the fp16 result of its row(t)): q rows rotated into
// q_rot, k rows rotated into the cache row of the position, v rows copied there; awq_rope_store's
// arithmetic (fp32 from the fp16 inputs and tables, one rounding). flag_here: the block (or the
// persistent step's task) of block 0, which flags a position past the cache.
template <int kBlockRows, typename Row, typename Value>
__device__ __forceinline__ void rope_epilogue(const RopeArgs& a, Row row, Value value, bool flag_here) {
    constexpr int kHalf = kBlockRows / 2;
    const int64_t pos = *a.past;
    if (pos < 0 || pos + 1 > a.capacity || pos + 1 > a.max_positions) {  // attend writes the NaN
        if (a.status != nullptr && flag_here && threadIdx.x == 0) atomicOr(a.status, 1);  // OVER_CAPACITY
        return;
    }
    const int D = a.head_dim, half_d = D / 2;
    const int head = row(0) / D;
    if (head < a.heads + a.kv_heads) {
        if (threadIdx.x < kHalf) {  // pair (row(t), row(t + R/2)) = dims (i, i + D/2)
            const int t = threadIdx.x, i = row(t) % D;
            const float x1 = __half2float(value(t)), x2 = __half2float(value(t + kHalf));
            const float c = __half2float(a.cos[pos * half_d + i]), sn = __half2float(a.sin[pos * half_d + i]);
            half* dst = head < a.heads ? a.q_rot + static_cast<size_t>(head) * D
                                       : a.k_cache + (static_cast<size_t>(head - a.heads) * a.capacity + pos) * D;
            dst[i] = __float2half(x1 * c - x2 * sn);
            dst[i + half_d] = __float2half(x2 * c + x1 * sn);
        }
    } else if (threadIdx.x < kBlockRows) {
        const int v = row(threadIdx.x) - (a.heads + a.kv_heads) * D;
        a.v_cache[(static_cast<size_t>(v / D) * a.capacity + pos) * D + v % D] = value(threadIdx.x);
    }
}

// Without overlapped launches (sm_87/sm_89), DRAM idles from the tail of a GEMV until the next
// GEMV's first loads return: each block, as it finishes, sends its share of the next linear's
// first bytes toward L2 (issue-and-forget prefetches).
template <int kBlockThreads>
__device__ __forceinline__ void prefetch_next_weights(const Fusion& fusion) {
    if (fusion.next_bytes > 0) {
        const int lines = (fusion.next_bytes + 127) / 128;
        const int per_block = (lines + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
        for (int l = threadIdx.x; l < per_block; l += kBlockThreads) {
            const int line = static_cast<int>(blockIdx.x) * per_block + l;
            if (line < lines) prefetch_l2(fusion.next_weights + static_cast<size_t>(line) * 128);
        }
    }
}

// What a one-row GEMV block does with its kBlockRows dot products (sum(t): the fp32 dot product of
// row(t)), each + the bias if any: stores them, applies the gated activation to its gate/up row
// pairs (rows interleaved at packing, so R rows make R/2 outputs), adds them into the residual stream y,
// writes fp32 logits, or applies RoPE and writes q and the KV-cache rows. Rows past N (a last
// block of 16 when N % 16 == 8) are not written. first_block: block 0's (RoPE's over-capacity flag).
template <Epilogue kEpilogue, int kBlockRows, typename Row, typename Sum>
__device__ __forceinline__ void one_row_epilogue(const Fusion& fusion, half* __restrict__ y, int N, Row row, Sum sum,
                                                 bool first_block) {
    auto result = [&](int t) { return __float2half_rn(sum(t)); };
    // + the bias, rounded again: as awq_bias_add does to the stored result
    auto biased = [&](int t) {
        const half v = result(t);
        return fusion.bias ? __float2half_rn(__half2float(v) + __half2float(fusion.bias[row(t)])) : v;
    };
    const int t = threadIdx.x;
    if constexpr (kEpilogue == Epilogue::kAct) {
        if (fusion.act_kind & kUngated) {  // y is act [N]: each row's own (no gate)
            if (t < kBlockRows && row(t) < N) {
                y[row(t)] = __float2half_rn(activation(__half2float(biased(t)), fusion.act_kind));
            }
        } else if (t < kBlockRows / 2 && row(2 * t) < N) {  // y is act [N / 2]: rows 2j and 2j + 1 are gate j and up j
            const float act = gated_act(__half2float(biased(2 * t)), __half2float(biased(2 * t + 1)), fusion.act_kind);
            y[row(0) / 2 + t] = __float2half_rn(act);
        }
    } else if constexpr (kEpilogue == Epilogue::kRope) {
        rope_epilogue<kBlockRows>(fusion.rope, row, biased, first_block);
    } else if constexpr (kEpilogue == Epilogue::kLogits) {  // the fp32 sum, not rounded to fp16
        if (t < kBlockRows && row(t) < N && row(t) < fusion.vocab) fusion.logits[row(t)] = soft_cap(sum(t), fusion.softcap);
    } else if (t < kBlockRows && row(t) < N) {
        if constexpr (kEpilogue == Epilogue::kResidual) {
            y[row(t)] = __float2half_rn(__half2float(y[row(t)]) + __half2float(biased(t)));
        } else {
            y[row(t)] = biased(t);
        }
    }
}

template <int kWords>
__device__ __forceinline__ void load_weight_words(const uint32_t* src, uint32_t (&words)[kWords]) {
    if constexpr (kWords == 4) {
        const uint4 v = __ldcs(reinterpret_cast<const uint4*>(src));  // one 128-bit streaming load
        words[0] = v.x; words[1] = v.y; words[2] = v.z; words[3] = v.w;
    } else {
        words[0] = __ldcs(src);
    }
}

// Block `block` of the grid's N / 4 (its kernel's blockIdx.x). (decode_step.cu's step_gemv_rows
// is this body for the persistent step's tasks.)
template <int kRows, int kGroupSize, int kWordsPerLoad, bool kNorm = false, Epilogue kEpilogue = Epilogue::kStore>
__device__ __forceinline__ void gemv_w4a16(const half* __restrict__ x, const uint32_t* __restrict__ qweight,
                                           const half* __restrict__ scales, const half* __restrict__ zeros,
                                           half* __restrict__ y, int N, int K, Fusion fusion, int block) {
    static_assert(kRows == 1 || (!kNorm && kEpilogue == Epilogue::kStore), "fusions are for decode (M = 1)");
    static_assert(kRowsPerBlock % 2 == 0, "the act epilogue pairs a block's rows");
    // (a function, not an array: an array indexed by thread would live in local memory)
    const auto row = [&](int r) { return row_of_block<kEpilogue>(block, r, fusion.rope); };
    const int words_per_row = K / kValuesPerWord;
    const int groups = num_groups(K, kGroupSize);
    const int loads_per_row = words_per_row / kWordsPerLoad;
    // The weights are no earlier kernel's output: in decode (M = 1) all of a thread's chunks (each
    // round's: K = 11008 takes 3) start on their way to L2 before the wait (pdl.cuh), overlapping
    // the previous kernel's tail, and the rounds after the first then wait on L2, not DRAM. (Only
    // the first chunk of a 4-byte-load row. Not for M > 1: the C ABI's launches do not overlap,
    // and at M = 4 the pointers made ptxas spill.)
    int rows[kRowsPerBlock];  // row(r) once (RoPE's divides), for the loops below (constant indices: registers)
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r) rows[r] = row(r);
    let_next_kernel_start();
    if constexpr (kRows == 1) {
        const int prefetch_end = kWordsPerLoad == 4 ? loads_per_row : min(loads_per_row, kThreads);
#pragma unroll 1
        for (int chunk = threadIdx.x; chunk < prefetch_end; chunk += kThreads) {
#pragma unroll
            for (int r = 0; r < kRowsPerBlock; ++r) {
                prefetch_l2(qweight + static_cast<size_t>(rows[r]) * words_per_row + chunk * kWordsPerLoad);
            }
        }
    }
    wait_for_previous_kernel();
    float inv_rms = 0.f;
    if constexpr (kNorm) inv_rms = row_inv_rms(x, K, fusion.eps);

    float acc[kRowsPerBlock][kRows];
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r)
#pragma unroll
        for (int m = 0; m < kRows; ++m) acc[r][m] = 0.0f;

    for (int chunk = threadIdx.x; chunk < loads_per_row; chunk += kThreads) {
        const int k0 = chunk * kWordsPerLoad * kValuesPerWord;
        const int g = group_of(k0, kGroupSize);
        uint32_t words[kRowsPerBlock][kWordsPerLoad];
        GroupParams params[kRowsPerBlock];
#pragma unroll
        for (int r = 0; r < kRowsPerBlock; ++r) {
            const size_t n = static_cast<size_t>(rows[r]);
            load_weight_words<kWordsPerLoad>(qweight + n * words_per_row + chunk * kWordsPerLoad, words[r]);
            params[r] = make_group_params(scales[n * groups + g], zeros[n * groups + g]);
        }
#pragma unroll
        for (int i = 0; i < kWordsPerLoad; ++i) {
            const int k = k0 + i * kValuesPerWord;
            uint4 xv[kRows];
#pragma unroll
            for (int m = 0; m < kRows; ++m) {
                // K % 8 == 0, so X[m, k..k+7] is 16-byte aligned.
                xv[m] = load_activation(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + k));
            }
            if constexpr (kNorm) xv[0] = normed8(xv[0], fusion.norm_weight + k, inv_rms);
#pragma unroll
            for (int r = 0; r < kRowsPerBlock; ++r) {
                half2 w[4];
                dequant_word(words[r][i], params[r], w);
#pragma unroll
                for (int m = 0; m < kRows; ++m) acc[r][m] += dot8(w, xv[m]);
            }
        }
    }

    prefetch_next_weights<kThreads>(fusion);

    __shared__ float warp_sums[kWarpsPerBlock][kRowsPerBlock * kRows];
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r) {
#pragma unroll
        for (int m = 0; m < kRows; ++m) {
            float v = acc[r][m];
#pragma unroll
            for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
            if (lane == 0) warp_sums[warp][r * kRows + m] = v;
        }
    }
    __syncthreads();
    // The block's dot products in fp32, and rounded to fp16 as a plain GEMV stores them.
    auto block_sum = [&](int t) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarpsPerBlock; ++w) v += warp_sums[w][t];
        return v;
    };
    if constexpr (kRows == 1) {
        one_row_epilogue<kEpilogue, kRowsPerBlock>(fusion, y, N, row, block_sum, block == 0);
    } else {
        for (int t = threadIdx.x; t < kRowsPerBlock * kRows; t += kThreads) {
            const int r = t / kRows, m = t % kRows;
            y[static_cast<size_t>(m) * N + row(r)] = __float2half_rn(block_sum(t));
        }
    }
}

// The GEMV of M = 2..32 rows on tensor cores (prefill's short chunks; K % 32 == 0). The CUDA-core
// GEMV above spends ~22 instructions per weight byte at M = 8: for each row of x it repeats the
// products of every dequantized word. Here one mma.m16n8k16 multiplies a 16-row x 16-k tile of
// dequantized weights (A) by the same 16 k of 8 rows of x (B, rows past M are zeros), so a word
// is dequantized once and its products with 8 rows are one instruction's share; kXTiles B tiles
// (up to 8, 16 or 32 rows of x) share each A, so the weights are read once for all the rows.
//
// A block of 4 warps owns kTiles x 16 output rows (tile j: n0 + 16j + g and n0 + 16j + g + 8 for
// fragment group g = lane / 4); the warps split K into windows of 128 k, each lane t = lane % 4 of
// a group taking 32 k (four words, one 128-bit load per row) of the window. The k order inside an
// mma is ours to choose, as long as A and B agree: lane t's A columns (2t, 2t+1 | 2t+8, 2t+9) and
// B rows (the same) hold the pairs of its own words, so each lane dequantizes only what it loaded
// (dequant_word's half2 pairs are the fragment registers) and loads the matching 8 x values of its
// rows of x (g, g + 8, ... for each B tile) as 16 bytes, once for all the block's tiles. A warp
// loads two windows before using any (one at 32 rows of x: registers), and up to 8 rows of x the
// next step's while it multiplies this one's (load_mma_weights, load_mma_x); the warps' partial tiles
// are summed in shared memory. x is read from L2 once per block: at one tile (awq_gemv_mma_g*)
// that is twice the block's weight bytes at M = 8, at two (awq_gemv_mma32_g*, half the blocks)
// once; benchmarks/gemv.py times both. Up to 32 rows in one pass (awq_gemv_mma_x16_g*, _x32_g*)
// read as much x as 8 rows at a time did, and the weights once instead of up to 4 times.
constexpr int kMmaRowsPerBlock = 16;
constexpr int kMmaWindowK = 128;       // k a warp step covers: 4 lanes x 32
constexpr int kMmaWindowsPerStep = 2;  // windows a warp loads before computing

__device__ __forceinline__ uint32_t word_at(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Weight row n's 32-k chunk `chunk` (K % 32 == 0): the 16 bytes (4 packed words) a tensor-core
// GEMV lane takes of a window.
__device__ __forceinline__ const uint4* weight_chunk(const uint32_t* __restrict__ qweight, int K, size_t n, int chunk) {
    return reinterpret_cast<const uint4*>(qweight + n * (K / kValuesPerWord)) + chunk;
}

// That chunk, streamed, and (kGroups) its group's scale and zero: all zeros when !ok (past K or N).
template <int kGroupSize, bool kGroups>
__device__ __forceinline__ uint4 load_weight_chunk(const uint32_t* __restrict__ qweight,
                                                   const half* __restrict__ scales, const half* __restrict__ zeros,
                                                   int K, int n, int chunk, bool ok, half& scale, half& zero) {
    const size_t row = static_cast<size_t>(ok ? n : 0);
    const uint4 words = ok ? __ldcs(weight_chunk(qweight, K, row, chunk)) : make_uint4(0u, 0u, 0u, 0u);
    if constexpr (kGroups) {
        const size_t at = row * num_groups(K, kGroupSize) + group_of(chunk * 32, kGroupSize);
        scale = ok ? scales[at] : __float2half(0.f);
        zero = ok ? zeros[at] : __float2half(0.f);
    }
    return words;
}

// When a group covers whole 128-k windows (G % 128 == 0) the 4 lanes of a window's row (t = 0..3,
// 32 k each) need the same scale and zero. For a pair of windows, lane t loads one of the 4 (window
// t & 1, the scale or, from t = 2, the zero) for two rows, as a half2, and the lanes swap them
// where they use them (window_groups). A warp's load of scales touches all its rows' sectors
// whatever the lanes ask (16 rows: 16 sectors, where the CUDA-core GEMV's lanes walk one row and
// share one), so 2 such loads a lane instead of 8 are a quarter of the L1 work, and 1 register a
// pair of windows instead of 8. window_ok: the caller's window + (t & 1) is its to load. (The
// decode GEMV, gemv_tc, does this; in gemv_mma it took ptxas from ~100 registers to ~140 at
// G = 128, 3 blocks an SM instead of 5, so there each lane loads its own.)
template <int kGroupSize>
__device__ __forceinline__ uint32_t load_window_groups(const half* __restrict__ scales, const half* __restrict__ zeros,
                                                       int N, int K, int window, bool window_ok, int t,
                                                       const int (&rows)[2]) {
    static_assert(kGroupSize % kMmaWindowK == 0, "a window in one group");
    const int first_k = (window + (t & 1)) * kMmaWindowK;  // (a window inside K from its first chunk)
    const half* table = t < 2 ? scales : zeros;
    half mine[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const bool ok = window_ok && first_k < K && rows[h] < N;
        const size_t at = static_cast<size_t>(ok ? rows[h] : 0) * num_groups(K, kGroupSize) + group_of(first_k, kGroupSize);
        mine[h] = ok ? table[at] : __float2half(0.f);
    }
    return bit_cast<uint32_t>(__halves2half2(mine[0], mine[1]));
}

// Window s (0 or 1) of the pair: both rows' scale and zero, from the lanes of this lane's group
// of 4 that loaded them. A lane whose chunk is past K gets its window's real ones: its weights and
// its x are zeros, so its products add 0.
__device__ __forceinline__ void window_groups(uint32_t loaded, int lane, int s, half (&scale)[2], half (&zero)[2]) {
    const int first = lane & ~3;  // lane t = 0 of the group
    const half2 sc = bit_cast<half2>(__shfl_sync(0xffffffffu, loaded, first + s));
    const half2 z = bit_cast<half2>(__shfl_sync(0xffffffffu, loaded, first + 2 + s));
    scale[0] = __low2half(sc), scale[1] = __high2half(sc);
    zero[0] = __low2half(z), zero[1] = __high2half(z);
}

// One warp step of gemv_mma: for each of its windows the lane's 16 bytes of each of its weight
// rows and their scale and zero, and the matching 8 k of x's rows (zeros past K, N or M).
template <int kTiles, int kWindows>
struct MmaWeights {
    uint4 words[kWindows][2 * kTiles];  // rows n0 + 16 (r / 2) + g + 8 (r % 2)
    half scale[kWindows][2 * kTiles], zero[kWindows][2 * kTiles];
};

template <int kXTiles, int kWindows>
struct MmaX {
    uint4 rows[kWindows][kXTiles][4];  // x[8 xt + g, 32 chunk + 8i ..]: B tile xt's column g
};

template <int kGroupSize, int kTiles, int kWindows>
__device__ __forceinline__ MmaWeights<kTiles, kWindows> load_mma_weights(
    const uint32_t* __restrict__ qweight, const half* __restrict__ scales, const half* __restrict__ zeros, int N,
    int K, int n0, int w0, int g, int t) {
    MmaWeights<kTiles, kWindows> w;
#pragma unroll
    for (int s = 0; s < kWindows; ++s) {
        const int chunk = (w0 + s) * 4 + t;  // this lane's 32 k: chunk * 32 ..
        const bool k_ok = chunk * 32 < K;    // (K % 32 == 0: the whole chunk, or none of it)
#pragma unroll
        for (int r = 0; r < 2 * kTiles; ++r) {
            const int n = n0 + 16 * (r / 2) + g + 8 * (r % 2);
            w.words[s][r] = load_weight_chunk<kGroupSize, true>(qweight, scales, zeros, K, n, chunk, k_ok && n < N,
                                                                w.scale[s][r], w.zero[s][r]);
        }
    }
    return w;
}

template <int kXTiles, int kWindows>
__device__ __forceinline__ MmaX<kXTiles, kWindows> load_mma_x(const half* __restrict__ x, int M, int K, int w0, int g,
                                                              int t) {
    MmaX<kXTiles, kWindows> v;
#pragma unroll
    for (int s = 0; s < kWindows; ++s) {
        const int chunk = (w0 + s) * 4 + t;
        const bool k_ok = chunk * 32 < K;
#pragma unroll
        for (int xt = 0; xt < kXTiles; ++xt) {
            const int m = 8 * xt + g;
            const uint4* x_row = reinterpret_cast<const uint4*>(x + static_cast<size_t>(m < M ? m : 0) * K);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                v.rows[s][xt][i] = k_ok && m < M ? __ldg(x_row + 4 * chunk + i) : make_uint4(0u, 0u, 0u, 0u);
            }
        }
    }
    return v;
}

template <int kGroupSize, int kTiles, int kXTiles = 1>
__device__ __forceinline__ void gemv_mma(const half* __restrict__ x, const uint32_t* __restrict__ qweight,
                                         const half* __restrict__ scales, const half* __restrict__ zeros,
                                         half* __restrict__ y, int M, int N, int K) {
    constexpr int kRows = kTiles * kMmaRowsPerBlock;
    constexpr int kXRows = 8 * kXTiles;  // rows of x a block takes (M <= kXRows)
    constexpr int kWindows = kXTiles > 2 ? 1 : kMmaWindowsPerStep;
    constexpr int kStride = kWarpsPerBlock * kWindows;  // windows from one step of a warp to its next
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int g = lane / 4, t = lane % 4;
    const int n0 = blockIdx.x * kRows;
    const int windows = (K + kMmaWindowK - 1) / kMmaWindowK;
    const auto load_weights = [&](int w0) {  // (past K: zeros, and no memory read)
        return load_mma_weights<kGroupSize, kTiles, kWindows>(qweight, scales, zeros, N, K, n0, w0, g, t);
    };
    const auto load_x = [&](int w0) { return load_mma_x<kXTiles, kWindows>(x, M, K, w0, g, t); };

    // Each step's weights are loaded a step ahead of its products: two steps' bytes in flight a
    // lane (until 2026-12-04 one: at K = 11008 a warp's 11 steps were 11 DRAM round trips in a row,
    // and M = 8 took 1.6x the M = 1 GEMV on the H200, run 3). Its x (from L2) too, with one B tile
    // (up to 8 rows of x); with more (x16, x32) a second step's x would take ~180 registers a
    // thread, a third of the blocks an SM: fewer bytes in flight, not more. There it is loaded as
    // its products begin. The first weights go before the wait for the previous kernel (pdl.cuh):
    // no kernel writes them.
    constexpr bool kXAhead = kXTiles == 1;
    let_next_kernel_start();
    MmaWeights<kTiles, kWindows> weights = load_weights(warp * kWindows), next_weights;
    wait_for_previous_kernel();
    MmaX<kXTiles, kWindows> xs, next_xs;
    if constexpr (kXAhead) xs = load_x(warp * kWindows);
    float acc[kTiles][kXTiles][4] = {};
    for (int w0 = warp * kWindows; w0 < windows; w0 += kStride) {
        next_weights = load_weights(w0 + kStride);
        if constexpr (kXAhead) {
            next_xs = load_x(w0 + kStride);
        } else {
            xs = load_x(w0);
        }
#pragma unroll
        for (int s = 0; s < kWindows; ++s) {
            GroupParams params[2 * kTiles];
#pragma unroll
            for (int r = 0; r < 2 * kTiles; ++r) params[r] = make_group_params(weights.scale[s][r], weights.zero[s][r]);
#pragma unroll
            for (int i = 0; i < 4; ++i) {        // word i of each row: k 8i .. 8i + 7 of the chunk
#pragma unroll
                for (int j = 0; j < kTiles; ++j) {
                    half2 low[4], high[4];       // rows g, g + 8 of tile j: pairs (k 8i+0,1) (2,3) (4,5) (6,7)
                    dequant_word(word_at(weights.words[s][2 * j], i), params[2 * j], low);
                    dequant_word(word_at(weights.words[s][2 * j + 1], i), params[2 * j + 1], high);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {  // k 8i + 4h .. + 3: A cols (2t, 2t+1) = pair 2h, (2t+8, 2t+9) = 2h + 1
                        const uint32_t a[4] = {bit_cast<uint32_t>(low[2 * h]), bit_cast<uint32_t>(high[2 * h]),
                                               bit_cast<uint32_t>(low[2 * h + 1]), bit_cast<uint32_t>(high[2 * h + 1])};
#pragma unroll
                        for (int xt = 0; xt < kXTiles; ++xt) {
                            const uint32_t b[2] = {word_at(xs.rows[s][xt][i], 2 * h),
                                                   word_at(xs.rows[s][xt][i], 2 * h + 1)};
                            mma_16816(acc[j][xt], a, b);
                        }
                    }
                }
            }
        }
        weights = next_weights;
        if constexpr (kXAhead) xs = next_xs;
    }

    __shared__ float tiles[kWarpsPerBlock][kRows][kXRows];  // each warp's C: [row][row of x]
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
#pragma unroll
        for (int xt = 0; xt < kXTiles; ++xt) {
            tiles[warp][16 * j + g][8 * xt + 2 * t] = acc[j][xt][0];
            tiles[warp][16 * j + g][8 * xt + 2 * t + 1] = acc[j][xt][1];
            tiles[warp][16 * j + g + 8][8 * xt + 2 * t] = acc[j][xt][2];
            tiles[warp][16 * j + g + 8][8 * xt + 2 * t + 1] = acc[j][xt][3];
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kRows * kXRows; e += kThreads) {
        const int r = e / kXRows, m = e % kXRows;
        if (m < M && n0 + r < N) {
            float sum = 0.f;
#pragma unroll
            for (int w = 0; w < kWarpsPerBlock; ++w) sum += tiles[w][r][m];
            y[static_cast<size_t>(m) * N + n0 + r] = __float2half_rn(sum);
        }
    }
}

// The decode GEMV on tensor cores (M = 1, K % 32 == 0, K <= kTcMaxK): the same products and
// fusions as gemv_w4a16<1> above in about half its instructions per weight byte (that kernel
// spends ~23 per 4-byte word: dequantize, scale, 4 fp16 FMAs, 2 conversions, 2 fp32 adds). On the
// H200 (2026-12-04 run 3, benchmarks/README.md) this one, on its persistent grid, streamed plain
// GEMVs slower (41-44% of copy against 53-60% at 7B shapes) but ran the normed q/k/v and gate/up
// 1.7-2x faster (x normed once a block of the 264, not once per 4 rows), which is where
// cuda_backend's "auto" uses it. The deeper load ring and the L2 prefetch came after that run.
//
// Here a word costs a shift, 4 lop3, 4 half2 ops and one mma: the mma multiplies the centered
// levels q - z (exact in fp16) by x with exact products and fp32 sums, so neither the scale nor a
// conversion is applied per value. When the group covers a whole 128-k window (G % 128 == 0), the
// window's sum is scaled once per row in fp32: s * sum((q - z) x), zeros exact. For G = 32 and 64
// the 4 lanes of an mma span several groups, so A is the dequantized (q - z) * s as in gemv_mma.
//
// Work split: a block of 8 warps owns 16 output rows (one mma tile: lane (g, t) holds rows g and
// g + 8) and splits K evenly over its warps in 128-k windows (lane t: 32 k, one 16-byte load per
// row); at K = 11008 no warp does a third round that others skip. Each warp's loads run two steps
// of kTcWindowsPerStep windows ahead of its products (2 x 2 x 2 x 16 bytes a lane in flight, the
// first two steps issued before the wait for the previous kernel, pdl.cuh: weights are no
// kernel's output), and kTcPrefetchSteps steps further ahead it sends the same bytes toward L2. x (normed, for the
// norm variants: once per block instead of once per value) sits in shared memory, and every lane
// feeds it to B's column g, so all 8 columns of C hold the same dot products. Row sums are
// reduced across the warps in shared memory, then one_row_epilogue as above. A grid of fewer
// blocks than tiles makes each block take several tiles in turn (a persistent grid: x staged and
// normed once a block, and its loads running on from one tile into the next); the results are
// the same either way, and benchmarks/gemv.py times both.
constexpr int kTcRows = kMmaRowsPerBlock;  // 16
constexpr int kTcWarps = 8;
constexpr int kTcThreads = kTcWarps * kWarpSize;
constexpr int kTcWindowsPerStep = 2;
constexpr int kTcPrefetchSteps = 4;  // how far ahead of its loads a lane sends its weights toward L2
constexpr int kTcMaxK = 16384;             // x in static shared memory: 32 KiB (wider K: gemv_w4a16)
constexpr int kTcBlocksPerSm = 2;          // its persistent grid; launch bounds hold it to 128 registers a thread

// One warp step's loads: for each of its windows the lane's 16 bytes of rows g and g + 8, and
// those rows' scale and zero of the window's group (zero weights, zero scale and zero past K or N):
// each lane's own at G = 32, 64, shared by a window's lanes at G % 128 == 0 (load_window_groups).
struct TcStep {
    uint4 words[kTcWindowsPerStep][2];
    half scale[kTcWindowsPerStep][2], zero[kTcWindowsPerStep][2];  // G = 32, 64
    uint32_t shared_groups;                                          // G % 128 == 0
};

template <int kGroupSize>
__device__ __forceinline__ TcStep load_tc_step(const uint32_t* __restrict__ qweight, const half* __restrict__ scales,
                                               const half* __restrict__ zeros, int N, int K, int window, int end,
                                               int t, const int (&rows)[2]) {
    static_assert(kTcWindowsPerStep == 2, "shared_groups: a window and a table for each of a group's 4 lanes");
    TcStep step;
#pragma unroll
    for (int s = 0; s < kTcWindowsPerStep; ++s) {
        const int chunk = (window + s) * 4 + t;  // this lane's 32 k: chunk * 32 ..
        const bool k_ok = window + s < end && chunk * 32 < K;
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // (G % 128 == 0: the groups below, shared)
            step.words[s][h] = load_weight_chunk<kGroupSize, kGroupSize % kMmaWindowK != 0>(
                qweight, scales, zeros, K, rows[h], chunk, k_ok && rows[h] < N, step.scale[s][h], step.zero[s][h]);
        }
    }
    if constexpr (kGroupSize % kMmaWindowK == 0) {
        step.shared_groups = load_window_groups<kGroupSize>(scales, zeros, N, K, window, window + (t & 1) < end, t, rows);
    }
    return step;
}

// The scale and zero of rows g and g + 8 for each window of a step.
template <int kGroupSize>
__device__ __forceinline__ void tc_groups(const TcStep& step, int lane, half (&scale)[kTcWindowsPerStep][2],
                                          half (&zero)[kTcWindowsPerStep][2]) {
#pragma unroll
    for (int s = 0; s < kTcWindowsPerStep; ++s) {
        if constexpr (kGroupSize % kMmaWindowK == 0) {
            window_groups(step.shared_groups, lane, s, scale[s], zero[s]);
        } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) scale[s][h] = step.scale[s][h], zero[s][h] = step.zero[s][h];
        }
    }
}

// load_tc_step's weight bytes sent toward L2 (prefetch: nothing waits for them, no registers).
__device__ __forceinline__ void prefetch_tc_step(const uint32_t* __restrict__ qweight, int N, int K, int window,
                                                 int end, int t, const int (&rows)[2]) {
#pragma unroll
    for (int s = 0; s < kTcWindowsPerStep; ++s) {
        const int chunk = (window + s) * 4 + t;
        if (window + s >= end || chunk * 32 >= K) continue;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (rows[h] < N) prefetch_l2(weight_chunk(qweight, K, rows[h], chunk));
        }
    }
}

// Where a warp of gemv_tc is in its walk: a tile (16 output rows) and a window (its step's first).
// A block takes tiles blockIdx.x, + gridDim.x, ... For RoPE the tile is also kept as (q/k/v head,
// 16-row slice j of it), advanced without a division: row_of_block divides by the slices a head
// has, which at a step a tile (K = 4096) cost about as much as the step's dequantization.
template <Epilogue kEpilogue>
struct TcCursor {
    int tile, window, head = 0, j = 0;
    __device__ __forceinline__ TcCursor(int first_tile, int first_window, const RopeArgs& rope)
        : tile(first_tile), window(first_window) {
        if constexpr (kEpilogue == Epilogue::kRope) {
            const int slices = rope.head_dim / kTcRows;
            head = first_tile / slices;
            j = first_tile % slices;
        }
    }
    // Output row r of the tile: row_of_block<kEpilogue, 16>(tile, r, rope).
    __device__ __forceinline__ int row(int r, const RopeArgs& rope) const {
        if constexpr (kEpilogue == Epilogue::kRope) return rope_row<kTcRows>(head, j, r, rope);
        return tile * kTcRows + r;
    }
    // The block's next tile (gridDim.x = stride_heads heads and stride_j slices further).
    __device__ __forceinline__ void next_tile(int stride_heads, int stride_j, const RopeArgs& rope) {
        tile += static_cast<int>(gridDim.x);
        if constexpr (kEpilogue == Epilogue::kRope) {
            head += stride_heads;
            j += stride_j;
            if (j >= rope.head_dim / kTcRows) {
                j -= rope.head_dim / kTcRows;
                ++head;
            }
        }
    }
};

template <int kGroupSize, bool kNorm, Epilogue kEpilogue>
__device__ __forceinline__ void gemv_tc(const half* __restrict__ x, const uint32_t* __restrict__ qweight,
                                        const half* __restrict__ scales, const half* __restrict__ zeros,
                                        half* __restrict__ y, int N, int K, const Fusion& fusion) {
    constexpr bool kScaleAfter = kGroupSize % kMmaWindowK == 0;
    if (K > kTcMaxK || K % 32 != 0) __trap();  // the launcher's contract (cuda_backend.py checks it)
    __shared__ uint4 x_shared[kTcMaxK / kValuesPerWord];
    __shared__ float row_sums[kTcWarps][kTcRows];
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, g = lane / 4, t = lane % 4;
    const int tiles = (N + kTcRows - 1) / kTcRows;
    const int windows = (K + kMmaWindowK - 1) / kMmaWindowK;
    const int begin = warp * windows / kTcWarps, end = (warp + 1) * windows / kTcWarps;

    // A block takes tiles blockIdx.x, + gridDim.x, ...: one each when the grid is a block a tile,
    // several when it is fewer (a persistent grid). Three cursors walk the steps in that order,
    // across tiles too: the products', the loads' two steps ahead (three steps in registers), and
    // kTcPrefetchSteps further ahead the prefetches' (each lane sends the bytes it will load toward
    // L2; no registers: the loads then wait on L2, not DRAM). Past the last tile: nothing.
    int stride_heads = 0, stride_j = 0;
    if constexpr (kEpilogue == Epilogue::kRope) {
        stride_heads = static_cast<int>(gridDim.x) / (fusion.rope.head_dim / kTcRows);
        stride_j = static_cast<int>(gridDim.x) % (fusion.rope.head_dim / kTcRows);
    }
    const auto advance = [&](TcCursor<kEpilogue>& at) {
        at.window += kTcWindowsPerStep;
        if (at.window >= end) {
            at.window = begin;
            at.next_tile(stride_heads, stride_j, fusion.rope);
        }
    };
    TcCursor<kEpilogue> loading(blockIdx.x, begin, fusion.rope);
    const auto load_next = [&]() {
        const int rows[2] = {loading.row(g, fusion.rope), loading.row(g + 8, fusion.rope)};
        const TcStep loaded = load_tc_step<kGroupSize>(qweight, scales, zeros, N, K, loading.window,
                                                       loading.tile < tiles ? end : loading.window, t, rows);
        advance(loading);
        return loaded;
    };
    TcCursor<kEpilogue> fetching = loading;
    const auto prefetch_next = [&]() {
        if constexpr (kTcPrefetchSteps == 0) return;  // (0: no prefetch at all, for comparison)
        if (fetching.tile < tiles) {
            const int rows[2] = {fetching.row(g, fusion.rope), fetching.row(g + 8, fusion.rope)};
            prefetch_tc_step(qweight, N, K, fetching.window, end, t, rows);
        }
        advance(fetching);
    };

    let_next_kernel_start();
    TcStep step = load_next();
    TcStep next = load_next();
    advance(fetching);  // (steps 0 and 1: loaded)
    advance(fetching);
#pragma unroll 1
    for (int i = 0; i < kTcPrefetchSteps; ++i) prefetch_next();
    wait_for_previous_kernel();
    float inv_rms = 0.f;
    if constexpr (kNorm) inv_rms = row_inv_rms<kTcWarps>(x, K, fusion.eps);
    for (int c = threadIdx.x; c < K / kValuesPerWord; c += kTcThreads) {
        const uint4 bits = load_activation(reinterpret_cast<const uint4*>(x) + c);
        if constexpr (kNorm) {
            x_shared[c] = normed8(bits, fusion.norm_weight + c * kValuesPerWord, inv_rms);
        } else {
            x_shared[c] = bits;
        }
    }
    __syncthreads();

    for (TcCursor<kEpilogue> tile(blockIdx.x, begin, fusion.rope); tile.tile < tiles;
         tile.next_tile(stride_heads, stride_j, fusion.rope)) {
        // Four independent accumulators (window s of the step, half h of a word's pairs): mma.sync
        // adds into its C, so one accumulator would chain every mma of a warp behind the one before;
        // with the words' loop outermost, consecutive mmas go to different accumulators.
        float sums[2] = {0.f, 0.f};  // rows g, g + 8 (kScaleAfter: scaled window by window)
        float acc[kTcWindowsPerStep][2][4] = {};
        for (int window = begin; window < end; window += kTcWindowsPerStep) {
            const TcStep after = load_next();  // two steps ahead of the products
            prefetch_next();                   // and kTcPrefetchSteps more toward L2
            half scale[kTcWindowsPerStep][2], zero[kTcWindowsPerStep][2];
            tc_groups<kGroupSize>(step, lane, scale, zero);
            GroupParams params[kTcWindowsPerStep][2];
#pragma unroll
            for (int s = 0; s < kTcWindowsPerStep; ++s) {
#pragma unroll
                for (int h = 0; h < 2; ++h) params[s][h] = make_group_params(scale[s][h], zero[s][h]);
            }
            if constexpr (kScaleAfter) {
#pragma unroll
                for (int s = 0; s < kTcWindowsPerStep; ++s)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int c = 0; c < 4; ++c) acc[s][h][c] = 0.f;
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // word i of each row: k 8i .. 8i + 7 of each window's chunk
#pragma unroll
                for (int s = 0; s < kTcWindowsPerStep; ++s) {  // (a window past `end` has zero levels: adds 0)
                    const int chunk = (window + s) * 4 + t;
                    const uint4 xv = chunk * 32 < K ? x_shared[4 * chunk + i] : make_uint4(0u, 0u, 0u, 0u);
                    half2 low[4], high[4];  // rows g, g + 8: pairs (k 8i+0,1) (2,3) (4,5) (6,7)
                    if constexpr (kScaleAfter) {
                        centered_levels(word_at(step.words[s][0], i), params[s][0], low);
                        centered_levels(word_at(step.words[s][1], i), params[s][1], high);
                    } else {
                        dequant_word(word_at(step.words[s][0], i), params[s][0], low);
                        dequant_word(word_at(step.words[s][1], i), params[s][1], high);
                    }
#pragma unroll
                    for (int h = 0; h < 2; ++h) {  // A cols (2t, 2t+1) = pair 2h, (2t+8, 2t+9) = pair 2h + 1
                        const uint32_t a[4] = {bit_cast<uint32_t>(low[2 * h]), bit_cast<uint32_t>(high[2 * h]),
                                               bit_cast<uint32_t>(low[2 * h + 1]), bit_cast<uint32_t>(high[2 * h + 1])};
                        const uint32_t b[2] = {word_at(xv, 2 * h), word_at(xv, 2 * h + 1)};
                        mma_16816(acc[s][h], a, b);
                    }
                }
            }
            if constexpr (kScaleAfter) {  // a window lies in one group: s * sum((q - z) x) per row
#pragma unroll
                for (int s = 0; s < kTcWindowsPerStep; ++s) {
                    sums[0] += __half2float(scale[s][0]) * (acc[s][0][0] + acc[s][1][0]);
                    sums[1] += __half2float(scale[s][1]) * (acc[s][0][2] + acc[s][1][2]);
                }
            }
            step = next;
            next = after;
        }
        if constexpr (!kScaleAfter) {
#pragma unroll
            for (int s = 0; s < kTcWindowsPerStep; ++s) {
                sums[0] += acc[s][0][0] + acc[s][1][0];
                sums[1] += acc[s][0][2] + acc[s][1][2];
            }
        }

        if (t == 0) {  // C's columns are all equal: lane (g, 0) holds rows g and g + 8
            row_sums[warp][g] = sums[0];
            row_sums[warp][g + 8] = sums[1];
        }
        __syncthreads();
        const auto row = [&](int r) { return tile.row(r, fusion.rope); };
        const auto block_sum = [&](int r) {
            float v = 0.0f;
#pragma unroll
            for (int w = 0; w < kTcWarps; ++w) v += row_sums[w][r];
            return v;
        };
        one_row_epilogue<kEpilogue, kTcRows>(fusion, y, N, row, block_sum, blockIdx.x == 0);
        __syncthreads();  // row_sums is the next tile's
    }
    prefetch_next_weights<kTcThreads>(fusion);
}

// The GEMV's ceiling (benchmarks/gemv.py): the same grid, the same loads of the same bytes
// (the weights with the streaming hint, each row's scale and zero per chunk) and the same
// output rows, but no arithmetic. The loaded bits are xor-ed together so no load can be
// dropped. What the GEMV takes beyond this kernel's time is its arithmetic and reduction;
// what this kernel takes beyond bytes / bandwidth is the launch and the access pattern.
template <int kWordsPerLoad>
__global__ void __launch_bounds__(kThreads)
read_only_kernel(const uint32_t* __restrict__ qweight, const half* __restrict__ scales,
                 const half* __restrict__ zeros, half* __restrict__ y, int K, int group_size) {
    const int n0 = blockIdx.x * kRowsPerBlock;
    const int words_per_row = K / kValuesPerWord;
    const int groups = num_groups(K, group_size);
    const int loads_per_row = words_per_row / kWordsPerLoad;
    uint32_t bits = 0;
    for (int chunk = threadIdx.x; chunk < loads_per_row; chunk += kThreads) {
        const int g = group_of(chunk * kWordsPerLoad * kValuesPerWord, group_size);
        uint32_t words[kRowsPerBlock][kWordsPerLoad];
#pragma unroll
        for (int r = 0; r < kRowsPerBlock; ++r) {
            const size_t n = static_cast<size_t>(n0 + r);
            load_weight_words<kWordsPerLoad>(qweight + n * words_per_row + chunk * kWordsPerLoad, words[r]);
            bits ^= static_cast<uint32_t>(__half_as_ushort(scales[n * groups + g])) ^
                    (static_cast<uint32_t>(__half_as_ushort(zeros[n * groups + g])) << 16);
        }
#pragma unroll
        for (int r = 0; r < kRowsPerBlock; ++r)
#pragma unroll
            for (int i = 0; i < kWordsPerLoad; ++i) bits ^= words[r][i];
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) bits ^= __shfl_xor_sync(0xffffffffu, bits, offset);
    __shared__ uint32_t warp_bits[kWarpsPerBlock];
    if (threadIdx.x % kWarpSize == 0) warp_bits[threadIdx.x / kWarpSize] = bits;
    __syncthreads();
    if (threadIdx.x < kRowsPerBlock) {
        uint32_t b = 0;
#pragma unroll
        for (int w = 0; w < kWarpsPerBlock; ++w) b ^= warp_bits[w];
        y[n0 + threadIdx.x] = __ushort_as_half(static_cast<unsigned short>((b ^ (b >> 16)) & 0xffffu));
    }
}

}  // namespace
}  // namespace awq_edge

#ifndef AWQ_EDGE_BODIES_ONLY  // (decode_step.cu includes the bodies above and runs them in its own kernel)
// The plain GEMV of M = 1..8 rows, by name: awq_gemv_rows{M}_g{G}_w{W}(x, qweight, scales, zeros,
// y, N, K), y[M, N] = x[M, K] W^T, grid N / 4 blocks of 128 threads (W as below). The C launcher
// awq_w4a16_gemv and the cuda backend's short prefill chunks where K % 32 != 0 (8 rows at a time) launch these.
#define AWQ_GEMV_ROWS_ENTRY(M, G, W)                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                             \
        awq_gemv_rows##M##_g##G##_w##W(const half* __restrict__ x, const uint32_t* __restrict__ qweight,          \
                                       const half* __restrict__ scales, const half* __restrict__ zeros,           \
                                       half* __restrict__ y, int N, int K) {                                      \
        awq_edge::gemv_w4a16<M, G, W>(x, qweight, scales, zeros, y, N, K, awq_edge::Fusion{}, blockIdx.x);        \
    }
#define AWQ_GEMV_ROWS_ENTRIES(M)                                                                                  \
    AWQ_GEMV_ROWS_ENTRY(M, 32, 1) AWQ_GEMV_ROWS_ENTRY(M, 32, 4) AWQ_GEMV_ROWS_ENTRY(M, 64, 1)                     \
    AWQ_GEMV_ROWS_ENTRY(M, 64, 4) AWQ_GEMV_ROWS_ENTRY(M, 128, 1) AWQ_GEMV_ROWS_ENTRY(M, 128, 4)
AWQ_GEMV_ROWS_ENTRIES(1)
AWQ_GEMV_ROWS_ENTRIES(2)
AWQ_GEMV_ROWS_ENTRIES(3)
AWQ_GEMV_ROWS_ENTRIES(4)
AWQ_GEMV_ROWS_ENTRIES(5)
AWQ_GEMV_ROWS_ENTRIES(6)
AWQ_GEMV_ROWS_ENTRIES(7)
AWQ_GEMV_ROWS_ENTRIES(8)

// awq_gemv_mma_g{G}(x, qweight, scales, zeros, y, M, N, K): M = 2..8 (1 works too), K % 32 == 0,
// grid ceil(N / 16) blocks of 128 threads; the tensor-core GEMV above. awq_gemv_mma_x16_g{G} and
// awq_gemv_mma_x32_g{G}: the same for M up to 16 and 32 in one pass. awq_gemv_mma32_g{G}: M <= 8
// with 32 rows a block (grid ceil(N / 32)), x read half as often.
#define AWQ_GEMV_MMA_ENTRY(NAME, G, TILES, XTILES)                                                                \
    extern "C" __global__ void __launch_bounds__(128)                                                             \
        NAME##_g##G(const half* __restrict__ x, const uint32_t* __restrict__ qweight,                             \
                    const half* __restrict__ scales, const half* __restrict__ zeros, half* __restrict__ y, int M, \
                    int N, int K) {                                                                               \
        awq_edge::gemv_mma<G, TILES, XTILES>(x, qweight, scales, zeros, y, M, N, K);                              \
    }
#define AWQ_GEMV_MMA_ENTRIES(NAME, TILES, XTILES)                                                                 \
    AWQ_GEMV_MMA_ENTRY(NAME, 32, TILES, XTILES) AWQ_GEMV_MMA_ENTRY(NAME, 64, TILES, XTILES)                       \
    AWQ_GEMV_MMA_ENTRY(NAME, 128, TILES, XTILES)
AWQ_GEMV_MMA_ENTRIES(awq_gemv_mma, 1, 1)
AWQ_GEMV_MMA_ENTRIES(awq_gemv_mma_x16, 1, 2)
AWQ_GEMV_MMA_ENTRIES(awq_gemv_mma_x32, 1, 4)
AWQ_GEMV_MMA_ENTRIES(awq_gemv_mma32, 2, 1)

#if defined(__CUDACC__)  // the C launchers (tests/cuda_on_cpu compiles the kernels alone with g++)
namespace awq_edge {
namespace {

using GemvKernel = void (*)(const half*, const uint32_t*, const half*, const half*, half*, int, int);
#define AWQ_GEMV_ROWS_KERNELS(M)                                                                                  \
    {awq_gemv_rows##M##_g32_w1, awq_gemv_rows##M##_g32_w4, awq_gemv_rows##M##_g64_w1,                             \
     awq_gemv_rows##M##_g64_w4, awq_gemv_rows##M##_g128_w1, awq_gemv_rows##M##_g128_w4}
// [M - 1][group index * 2 + (K % 32 == 0)]
constexpr GemvKernel kGemvKernels[8][6] = {AWQ_GEMV_ROWS_KERNELS(1), AWQ_GEMV_ROWS_KERNELS(2), AWQ_GEMV_ROWS_KERNELS(3),
                                           AWQ_GEMV_ROWS_KERNELS(4), AWQ_GEMV_ROWS_KERNELS(5), AWQ_GEMV_ROWS_KERNELS(6),
                                           AWQ_GEMV_ROWS_KERNELS(7), AWQ_GEMV_ROWS_KERNELS(8)};

}  // namespace
}  // namespace awq_edge

extern "C" int awq_w4a16_gemv(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                              __half* y, int M, int N, int K, int group_size, cudaStream_t stream) {
    using namespace awq_edge;
    if (!valid_matmul_args(x, qweight, scales, zeros, y, M, N, K, group_size) || M > AWQ_W4A16_GEMV_MAX_ROWS) {
        return AWQ_W4A16_INVALID_ARGUMENT;
    }
    const int group = group_size == 32 ? 0 : group_size == 64 ? 1 : 2;
    const GemvKernel kernel = kGemvKernels[M - 1][2 * group + (rows_allow_128bit_loads(K) ? 1 : 0)];
    kernel<<<N / kRowsPerBlock, kThreads, 0, stream>>>(x, reinterpret_cast<const uint32_t*>(qweight), scales, zeros, y,
                                                       N, K);
    return launch_status();
}

namespace {

int launch_gemv_mma(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros, __half* y,
                    int M, int N, int K, int group_size, int tiles, cudaStream_t stream) {
    using namespace awq_edge;
    const int max_rows = tiles == 1 ? AWQ_W4A16_GEMV_CHUNKED_MAX_ROWS : AWQ_W4A16_GEMV_MAX_ROWS;
    if (!valid_matmul_args(x, qweight, scales, zeros, y, M, N, K, group_size) || M > max_rows ||
        !rows_allow_128bit_loads(K)) {
        return AWQ_W4A16_INVALID_ARGUMENT;
    }
    const int g = group_size == 32 ? 0 : group_size == 64 ? 1 : 2;
    using MmaKernel = void (*)(const half*, const uint32_t*, const half*, const half*, half*, int, int, int);
    constexpr MmaKernel kByRows[3][3] = {{awq_gemv_mma_g32, awq_gemv_mma_g64, awq_gemv_mma_g128},
                                         {awq_gemv_mma_x16_g32, awq_gemv_mma_x16_g64, awq_gemv_mma_x16_g128},
                                         {awq_gemv_mma_x32_g32, awq_gemv_mma_x32_g64, awq_gemv_mma_x32_g128}};
    const MmaKernel kernel = tiles == 2 ? (g == 0 ? awq_gemv_mma32_g32 : g == 1 ? awq_gemv_mma32_g64 : awq_gemv_mma32_g128)
                                        : kByRows[M <= 8 ? 0 : M <= 16 ? 1 : 2][g];
    const int rows = tiles * kMmaRowsPerBlock;
    kernel<<<(N + rows - 1) / rows, kThreads, 0, stream>>>(x, reinterpret_cast<const uint32_t*>(qweight), scales,
                                                           zeros, y, M, N, K);
    return launch_status();
}

}  // namespace

extern "C" int awq_w4a16_gemv_mma(const __half* x, const int32_t* qweight, const __half* scales,
                                  const __half* zeros, __half* y, int M, int N, int K, int group_size,
                                  cudaStream_t stream) {
    return launch_gemv_mma(x, qweight, scales, zeros, y, M, N, K, group_size, 1, stream);
}

extern "C" int awq_w4a16_gemv_mma32(const __half* x, const int32_t* qweight, const __half* scales,
                                    const __half* zeros, __half* y, int M, int N, int K, int group_size,
                                    cudaStream_t stream) {
    return launch_gemv_mma(x, qweight, scales, zeros, y, M, N, K, group_size, 2, stream);
}

extern "C" int awq_w4a16_read_only(const int32_t* qweight, const __half* scales, const __half* zeros, __half* y,
                                   int N, int K, int group_size, cudaStream_t stream) {
    using namespace awq_edge;
    // valid_matmul_args wants an x: qweight stands in for it (same alignment rule, never read)
    if (!valid_matmul_args(qweight, qweight, scales, zeros, y, 1, N, K, group_size)) return AWQ_W4A16_INVALID_ARGUMENT;
    const auto* w = reinterpret_cast<const uint32_t*>(qweight);
    if (rows_allow_128bit_loads(K)) {
        read_only_kernel<4><<<N / kRowsPerBlock, kThreads, 0, stream>>>(w, scales, zeros, y, K, group_size);
    } else {
        read_only_kernel<1><<<N / kRowsPerBlock, kThreads, 0, stream>>>(w, scales, zeros, y, K, group_size);
    }
    return launch_status();
}
#endif  // __CUDACC__

// Entry points for launches through the CUDA driver API (the cuda backend loads this file's
// cubin): one row (decode), grid N / 4 blocks of 128 threads, W = 4 when K % 32 == 0 (128-bit
// loads), else 1; awq_edge/cuda_backend.py launches them. All take the same arguments (those a
// variant does not use may be null or 0; next_weights/next_bytes: the L2 prefetch above, any variant):
//   awq_gemv_store_g{G}_w{W}       y = x W^T (+ bias when bias is not null)
//   awq_gemv_norm_store_g{G}_w{W}  y = norm(x) W^T (+ bias): x is h, norm_weight the layer's norm
//   awq_gemv_act_g{G}_w{W}         y[N/2] = act(gate) * up of x W^T (+ bias) (gate/up rows interleaved)
//   awq_gemv_norm_act_g{G}_w{W}    the same of norm(x) W^T
//   awq_gemv_residual_g{G}_w{W}    y += x W^T (+ bias) (y is h)
//   awq_gemv_rope_g{G}_w{W}        q/k/v = x W^T (+ bias): q rotated into q_rot, k rotated and v
//                                  written into the cache rows of position *past (y unused)
//   awq_gemv_norm_rope_g{G}_w{W}   the same of norm(x) W^T
// (The parameters of every one-row fused GEMV entry, here and on tensor cores below, and the
// Fusion they make.)
#define AWQ_GEMV_FUSED_PARAMS                                                                                       \
    const half *__restrict__ x, const uint32_t *__restrict__ qweight, const half *__restrict__ scales,              \
        const half *__restrict__ zeros, half *__restrict__ y, int N, int K, const float *__restrict__ norm_weight,  \
        float eps, const half *__restrict__ bias, int act_kind, const half *__restrict__ cos,                       \
        const half *__restrict__ sin, half *__restrict__ q_rot, half *__restrict__ k_cache,                         \
        half *__restrict__ v_cache, const int64_t *__restrict__ past, int *status, int heads, int kv_heads,         \
        int head_dim, int capacity, int max_positions, const char *next_weights, int next_bytes
#define AWQ_GEMV_FUSION                                                                                             \
    awq_edge::Fusion {                                                                                              \
        norm_weight, eps, bias, act_kind,                                                                           \
            awq_edge::RopeArgs{cos,   sin,   q_rot,    k_cache,  v_cache,  past,                                    \
                               status, heads, kv_heads, head_dim, capacity, max_positions},                         \
            next_weights, next_bytes                                                                                \
    }
#define AWQ_GEMV_ENTRY(NAME, NORM, EPILOGUE, G, W)                                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                                               \
        awq_gemv_##NAME##_g##G##_w##W(AWQ_GEMV_FUSED_PARAMS) {                                                      \
        awq_edge::gemv_w4a16<1, G, W, NORM, awq_edge::Epilogue::EPILOGUE>(x, qweight, scales, zeros, y, N, K,       \
                                                                          AWQ_GEMV_FUSION, blockIdx.x);             \
    }
#define AWQ_GEMV_ENTRIES(NAME, NORM, EPILOGUE)                                                                      \
    AWQ_GEMV_ENTRY(NAME, NORM, EPILOGUE, 32, 1)                                                                     \
    AWQ_GEMV_ENTRY(NAME, NORM, EPILOGUE, 32, 4)                                                                     \
    AWQ_GEMV_ENTRY(NAME, NORM, EPILOGUE, 64, 1)                                                                     \
    AWQ_GEMV_ENTRY(NAME, NORM, EPILOGUE, 64, 4)                                                                     \
    AWQ_GEMV_ENTRY(NAME, NORM, EPILOGUE, 128, 1)                                                                    \
    AWQ_GEMV_ENTRY(NAME, NORM, EPILOGUE, 128, 4)
// The fused one-row GEMVs, (name, norm prologue, epilogue): ENTRIES of each, on CUDA cores here
// and on tensor cores below.
#define AWQ_GEMV_FUSIONS(ENTRIES)                                                                                   \
    ENTRIES(store, false, kStore)                                                                                   \
    ENTRIES(norm_store, true, kStore)                                                                               \
    ENTRIES(act, false, kAct)                                                                                       \
    ENTRIES(norm_act, true, kAct)                                                                                   \
    ENTRIES(residual, false, kResidual)                                                                             \
    ENTRIES(rope, false, kRope)                                                                                     \
    ENTRIES(norm_rope, true, kRope)
AWQ_GEMV_FUSIONS(AWQ_GEMV_ENTRIES)

// An int4 lm_head (decode and the last row of prefill): awq_gemv_logits_g{G}_w{W}(x, qweight,
// scales, zeros, logits, N, K, vocab, softcap), logits[v] = x W^T in fp32 (soft-capped when
// softcap > 0) for v < vocab; N is the vocabulary padded to a multiple of 8. Grid N / 4 blocks of
// 128 threads. head_top_k.cu then re-scores its top 64 from the fp16 table.
#define AWQ_GEMV_LOGITS_ENTRY(G, W)                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                               \
        awq_gemv_logits_g##G##_w##W(const half* __restrict__ x, const uint32_t* __restrict__ qweight,               \
                                    const half* __restrict__ scales, const half* __restrict__ zeros,                \
                                    float* __restrict__ logits, int N, int K, int vocab, float softcap) {          \
        awq_edge::gemv_w4a16<1, G, W, false, awq_edge::Epilogue::kLogits>(x, qweight, scales, zeros, nullptr, N, K, \
                                                                          awq_edge::logits_fusion(logits, vocab,    \
                                                                                                  softcap),         \
                                                                          blockIdx.x);                              \
    }
AWQ_GEMV_LOGITS_ENTRY(32, 1)
AWQ_GEMV_LOGITS_ENTRY(32, 4)
AWQ_GEMV_LOGITS_ENTRY(64, 1)
AWQ_GEMV_LOGITS_ENTRY(64, 4)
AWQ_GEMV_LOGITS_ENTRY(128, 1)
AWQ_GEMV_LOGITS_ENTRY(128, 4)

// The same one-row GEMVs on tensor cores (gemv_tc: K % 32 == 0, K <= 16384; for RoPE head_dim %
// 16 == 0), with the same arguments: awq_gemv_tc_{store,norm_store,act,norm_act,residual,rope,
// norm_rope}_g{G} as above, and awq_gemv_tc_logits_g{G} with the logits entry's arguments. Blocks
// of 256 threads, a grid of 1 to ceil(N / 16) blocks (each takes every gridDim-th 16-row tile).
#define AWQ_GEMV_TC_ENTRY(NAME, NORM, EPILOGUE, G)                                                                  \
    extern "C" __global__ void __launch_bounds__(awq_edge::kTcThreads, awq_edge::kTcBlocksPerSm)                   \
        awq_gemv_tc_##NAME##_g##G(AWQ_GEMV_FUSED_PARAMS) {                                                          \
        awq_edge::gemv_tc<G, NORM, awq_edge::Epilogue::EPILOGUE>(x, qweight, scales, zeros, y, N, K, AWQ_GEMV_FUSION); \
    }
#define AWQ_GEMV_TC_ENTRIES(NAME, NORM, EPILOGUE)                                                                   \
    AWQ_GEMV_TC_ENTRY(NAME, NORM, EPILOGUE, 32)                                                                     \
    AWQ_GEMV_TC_ENTRY(NAME, NORM, EPILOGUE, 64)                                                                     \
    AWQ_GEMV_TC_ENTRY(NAME, NORM, EPILOGUE, 128)
AWQ_GEMV_FUSIONS(AWQ_GEMV_TC_ENTRIES)
#define AWQ_GEMV_TC_LOGITS_ENTRY(G)                                                                                 \
    extern "C" __global__ void __launch_bounds__(awq_edge::kTcThreads, awq_edge::kTcBlocksPerSm)                   \
        awq_gemv_tc_logits_g##G(const half* __restrict__ x, const uint32_t* __restrict__ qweight,                   \
                                const half* __restrict__ scales, const half* __restrict__ zeros,                    \
                                float* __restrict__ logits, int N, int K, int vocab, float softcap) {              \
        awq_edge::gemv_tc<G, false, awq_edge::Epilogue::kLogits>(x, qweight, scales, zeros, nullptr, N, K,         \
                                                                 awq_edge::logits_fusion(logits, vocab, softcap)); \
    }
AWQ_GEMV_TC_LOGITS_ENTRY(32)
AWQ_GEMV_TC_LOGITS_ENTRY(64)
AWQ_GEMV_TC_LOGITS_ENTRY(128)

#if defined(__CUDACC__)  // its C launchers (w4a16.h: benchmarks/gemv.py, the kernel tests)
namespace {

int launch_gemv_tc(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros, __half* y, int M,
                   int N, int K, int group_size, bool persistent, cudaStream_t stream) {
    using namespace awq_edge;
    if (!valid_matmul_args(x, qweight, scales, zeros, y, M, N, K, group_size) || M != 1 ||
        !rows_allow_128bit_loads(K) || K > kTcMaxK) {
        return AWQ_W4A16_INVALID_ARGUMENT;
    }
    const int g = group_size == 32 ? 0 : group_size == 64 ? 1 : 2;
    const auto kernel = g == 0 ? awq_gemv_tc_store_g32 : g == 1 ? awq_gemv_tc_store_g64 : awq_gemv_tc_store_g128;
    int blocks = (N + kTcRows - 1) / kTcRows;
    if (persistent) {  // kTcBlocksPerSm blocks an SM
        int device = 0, sms = 0;
        if (cudaGetDevice(&device) != cudaSuccess ||
            cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
            return launch_status();
        }
        blocks = blocks < kTcBlocksPerSm * sms ? blocks : kTcBlocksPerSm * sms;
    }
    kernel<<<blocks, kTcThreads, 0, stream>>>(x, reinterpret_cast<const uint32_t*>(qweight), scales, zeros, y, N, K,
                                              nullptr, 0.f, nullptr, 0, nullptr, nullptr, nullptr, nullptr, nullptr,
                                              nullptr, nullptr, 0, 0, 0, 0, 0, nullptr, 0);
    return launch_status();
}

}  // namespace

extern "C" int awq_w4a16_gemv_tc(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                                 __half* y, int M, int N, int K, int group_size, cudaStream_t stream) {
    return launch_gemv_tc(x, qweight, scales, zeros, y, M, N, K, group_size, false, stream);
}

extern "C" int awq_w4a16_gemv_tc_persistent(const __half* x, const int32_t* qweight, const __half* scales,
                                            const __half* zeros, __half* y, int M, int N, int K, int group_size,
                                            cudaStream_t stream) {
    return launch_gemv_tc(x, qweight, scales, zeros, y, M, N, K, group_size, true, stream);
}
#endif  // __CUDACC__
#endif  // AWQ_EDGE_BODIES_ONLY
