// Prefill GEMM: Y[M, N] = X[M, K] @ W_hat^T for any M, on tensor cores.
//
// Block tile 64 (M) x 128 (N), 8 warps in a 2 x 4 grid, each warp owning a 32 x 32 piece of Y as
// 2 x 4 mma.sync.m16n8k16 tiles with fp32 accumulators. K goes in steps of 32 through kStages
// buffers in shared memory, filled by cp.async (async_copy.cuh) kStages - 1 steps ahead of the
// products: three steps' loads are in flight while the tensor cores work on the fourth. A step's
// buffer holds X's 64 x 32 halves and the weights' 128 rows x 4 packed words as they lie in
// memory: each warp dequantizes the words it multiplies into registers, so the weights cross
// shared memory as 4-bit words, never as fp16. (Until 2026-12-04: 64 x 64 tiles of 4 warps, one
// step of lookahead through registers, the weights stored dequantized, every fragment loaded 32
// bits at a time; 0.23-0.34x cuBLAS fp16 from M = 128 on the H200, run 3.)
//
// The k order inside a step is free as long as A and B agree (the tensor-core GEMV's trick): lane
// (g, t) of a warp (g = lane / 4, t = lane % 4) takes word t of weight row g, the 8 k values
// 8t..8t+7, and 16 bytes of X rows g and g + 8 at the same k, and uses the first 4 as its
// fragments' k (2t, 2t+1, 2t+8, 2t+9) of one mma and the last 4 of the other. A step is then per
// lane one 128-bit shared load of X per 8 rows of a 16-row tile and one 32-bit load per 8-row
// tile of weights, each without bank conflicts (a quarter warp reads 128 consecutive bytes),
// where mma's own k order would take a 32-bit load per fragment register.
//
// Split K (gridDim.z > 1, the cuda backend's choice when the output has too few tiles to fill the
// GPU: a 64-row chunk of a 4096-wide linear is 32 tiles for an H200's 132 SMs): block (x, y, z)
// takes the z-th of gridDim.z even shares of the K steps, writes its fp32 accumulators to
// `partials` (each thread its own 32, in fragment order: the same thread of every split holds the
// same output elements), and the last block of the output tile to finish (a counter per tile,
// reset by that block) sums the splits in order and writes Y, as one block would have.
//
// Edges: the copies of rows m >= M, rows n >= N and columns k >= K write zeros (the scale and
// zero of a row n >= N are 0 too, so its weights dequantize to 0), so any M, any N % 8 == 0 and
// any K % 8 == 0 work. G is a multiple of 32, so a step's k share one group. When K % 32 != 0 the
// weight rows are not 16-byte aligned and their words are copied one at a time.
#include "async_copy.cuh"
#include "dequant.cuh"
#include "launch_checks.cuh"
#include "mma.cuh"
#include "pdl.cuh"

namespace awq_edge {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 128;
constexpr int kStepK = 32;                  // k values a pipeline step
constexpr int kStages = 4;                  // buffers: kStages - 1 steps copied ahead of the products
constexpr int kThreads = 256;
constexpr int kWarpTileM = 32;              // each warp: 32 x 32 of the output
constexpr int kWarpTileN = 32;
constexpr int kWarpsN = kTileN / kWarpTileN;  // 4 (and 2 along M)
constexpr int kMmaTilesM = kWarpTileM / 16;  // 2 m16 tiles per warp
constexpr int kMmaTilesN = kWarpTileN / 8;   // 4 n8 tiles per warp
constexpr int kWordsPerStep = kStepK / kValuesPerWord;      // 4 words of a weight row a step
constexpr int kAccPerThread = kMmaTilesM * kMmaTilesN * 4;  // a thread's fp32 accumulators: 32
static_assert(kTileM * kStepK / 8 == kThreads, "a step of X is one 16-byte copy a thread");
static_assert(kTileN * kWordsPerStep % kThreads == 0, "a step of weights is whole words a thread");

struct Stage {  // one pipeline step's buffer: 6 KiB
    half x[kTileM][kStepK];                // rows of 64 bytes
    uint32_t w[kTileN][kWordsPerStep];     // the packed words, as in memory
};

// X's 64 rows x 32 columns of step k0: a 16-byte copy a thread (K % 8 == 0: in K or out whole).
__device__ __forceinline__ void copy_x(Stage& s, const half* __restrict__ x, int M, int K, int m_block, int k0) {
    const int row = threadIdx.x / (kStepK / 8), col = threadIdx.x % (kStepK / 8) * 8;
    const bool valid = m_block + row < M && k0 + col < K;
    copy_async_16(&s.x[row][col], valid ? x + static_cast<size_t>(m_block + row) * K + k0 + col : x, valid);
}

// The weights' 128 rows x 4 words of step k0 (inside K): a row's 16 bytes a thread when K % 32 == 0.
template <bool kVectorWeights>
__device__ __forceinline__ void copy_weights(Stage& s, const uint32_t* __restrict__ qweight, int N, int K,
                                             int n_block, int k0) {
    const int words_per_row = K / kValuesPerWord;
    if constexpr (kVectorWeights) {
        if (threadIdx.x < kTileN) {
            const int n = n_block + threadIdx.x;
            const bool valid = n < N;
            copy_async_16(s.w[threadIdx.x],
                          valid ? qweight + static_cast<size_t>(n) * words_per_row + k0 / kValuesPerWord : qweight,
                          valid);
        }
    } else {
#pragma unroll
        for (int i = 0; i < kTileN * kWordsPerStep / kThreads; ++i) {
            const int idx = threadIdx.x + i * kThreads;
            const int row = idx / kWordsPerStep, word = k0 / kValuesPerWord + idx % kWordsPerStep;
            const bool valid = n_block + row < N && word < words_per_row;
            copy_async_4(&s.w[row][idx % kWordsPerStep],
                         valid ? qweight + static_cast<size_t>(n_block + row) * words_per_row + word : qweight, valid);
        }
    }
}

// The scale and zero of a warp's weight rows at step k0: lane (g, t) loads those of row g of its
// 8-row tile t, as a half2; lane (g, nt) of its group of 4 has those of tile nt (row_group). A
// warp's load of scales touches its 8 rows' sectors whatever the lanes ask: 2 loads a lane a step
// instead of 8 (a scale and a zero of each tile) are a quarter of the L1 work.
static_assert(kMmaTilesN == 4, "a tile's scale and zero for each of a group's 4 lanes");

template <int kGroupSize>
__device__ __forceinline__ uint32_t load_row_groups(const half* __restrict__ scales, const half* __restrict__ zeros,
                                                    int N, int K, int first_row, int t, int k0) {
    const int n = first_row + t * 8;
    const size_t at = static_cast<size_t>(n) * num_groups(K, kGroupSize) + group_of(k0, kGroupSize);
    const half none = __float2half(0.0f);
    return bit_cast<uint32_t>(__halves2half2(n < N ? __ldg(scales + at) : none, n < N ? __ldg(zeros + at) : none));
}

// Tile nt's row g: its group's dequantization parameters, from the lane that loaded them.
__device__ __forceinline__ GroupParams row_group(uint32_t groups, int lane, int nt) {
    const half2 scale_zero = bit_cast<half2>(__shfl_sync(0xffffffffu, groups, (lane & ~3) + nt));
    return make_group_params(__low2half(scale_zero), __high2half(scale_zero));
}

// One step's products: acc[mt][nt] += X tile mt x W_hat tile nt over the step's 32 k.
__device__ __forceinline__ void multiply_step(const Stage& s, uint32_t groups,
                                              float (&acc)[kMmaTilesM][kMmaTilesN][4], int warp_m, int warp_n, int g,
                                              int t) {
    const int lane = 4 * g + t;
    uint32_t a[kMmaTilesM][2][4];  // [m16 tile][the step's first or second mma][fragment register]
#pragma unroll
    for (int mt = 0; mt < kMmaTilesM; ++mt) {
        const int r = warp_m + mt * 16 + g;
        const uint4 top = *reinterpret_cast<const uint4*>(&s.x[r][8 * t]);  // k 8t..8t+7 of row g
        const uint4 bottom = *reinterpret_cast<const uint4*>(&s.x[r + 8][8 * t]);
        a[mt][0][0] = top.x, a[mt][0][1] = bottom.x, a[mt][0][2] = top.y, a[mt][0][3] = bottom.y;
        a[mt][1][0] = top.z, a[mt][1][1] = bottom.z, a[mt][1][2] = top.w, a[mt][1][3] = bottom.w;
    }
#pragma unroll
    for (int nt = 0; nt < kMmaTilesN; ++nt) {
        half2 w[4];  // (k0, k1) .. (k6, k7) of the lane's word
        dequant_word(s.w[warp_n + nt * 8 + g][t], row_group(groups, lane, nt), w);
#pragma unroll
        for (int half_step = 0; half_step < 2; ++half_step) {
            const uint32_t b[2] = {bit_cast<uint32_t>(w[2 * half_step]), bit_cast<uint32_t>(w[2 * half_step + 1])};
#pragma unroll
            for (int mt = 0; mt < kMmaTilesM; ++mt) mma_16816(acc[mt][nt], a[mt][half_step], b);
        }
    }
}

// With split K: this thread's accumulators into the block's share of `partials`; false for all
// but the output tile's last block, which returns with the sum over the splits in acc.
__device__ __forceinline__ bool gather_splits(float (&acc)[kMmaTilesM][kMmaTilesN][4], float* __restrict__ partials,
                                              int* __restrict__ counters) {
    __shared__ bool last;
    const int tiles = gridDim.x * gridDim.y, tile = blockIdx.y * gridDim.x + blockIdx.x;
    float* flat = &acc[0][0][0];
    const auto at = [&](int split) {
        return reinterpret_cast<float4*>(partials + ((static_cast<size_t>(split) * tiles + tile) * kThreads + threadIdx.x)
                                                        * kAccPerThread);
    };
    float4* mine = at(blockIdx.z);
#pragma unroll
    for (int i = 0; i < kAccPerThread / 4; ++i) mine[i] = make_float4(flat[4 * i], flat[4 * i + 1], flat[4 * i + 2], flat[4 * i + 3]);
    __threadfence();  // the partials before the count (as awq_attend_split's merge)
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counters + tile, 1) == static_cast<int>(gridDim.z) - 1;
    __syncthreads();
    if (!last) return false;
    __threadfence();
#pragma unroll
    for (int i = 0; i < kAccPerThread; ++i) flat[i] = 0.f;
    for (int split = 0; split < static_cast<int>(gridDim.z); ++split) {  // in order: the same sums every run
        const float4* part = at(split);
#pragma unroll
        for (int i = 0; i < kAccPerThread / 4; ++i) {
            const float4 v = __ldcg(part + i);
            flat[4 * i] += v.x;
            flat[4 * i + 1] += v.y;
            flat[4 * i + 2] += v.z;
            flat[4 * i + 3] += v.w;
        }
    }
    if (threadIdx.x == 0) counters[tile] = 0;  // ready for the next launch
    return true;
}

template <int kGroupSize, bool kVectorWeights>
__device__ __forceinline__ void gemm_w4a16(const half* __restrict__ x, const uint32_t* __restrict__ qweight,
                                           const half* __restrict__ scales, const half* __restrict__ zeros,
                                           half* __restrict__ y, int M, int N, int K, float* __restrict__ partials,
                                           int* __restrict__ counters) {
    __shared__ __align__(16) Stage stages[kStages];

    const int m_block = blockIdx.y * kTileM;
    const int n_block = blockIdx.x * kTileN;
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int warp_m = (warp / kWarpsN) * kWarpTileM;
    const int warp_n = (warp % kWarpsN) * kWarpTileN;
    const int g = lane / 4;  // mma fragment row (A, C) / column (B)
    const int t = lane % 4;

    // this block's K steps: the blockIdx.z-th of gridDim.z even shares (all of them without a split)
    const int k_steps = (K + kStepK - 1) / kStepK;
    const int first = static_cast<int>(blockIdx.z) * k_steps / static_cast<int>(gridDim.z);
    const int steps = (static_cast<int>(blockIdx.z) + 1) * k_steps / static_cast<int>(gridDim.z) - first;
    const auto k_of = [&](int step) { return (first + step) * kStepK; };

    // The first steps' weights and scales: nothing an earlier kernel writes, so before waiting for it.
    // (Their copies join the first step's group: waiting for it waits for them, which is early, not late.)
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < steps) copy_weights<kVectorWeights>(stages[s], qweight, N, K, n_block, k_of(s));
    }
    uint32_t groups = load_row_groups<kGroupSize>(scales, zeros, N, K, n_block + warp_n + g, t, k_of(0));
    wait_for_previous_kernel();
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < steps) copy_x(stages[s], x, M, K, m_block, k_of(s));
        commit_copies();  // a group a step, empty past the end: the count wait_copies relies on
    }

    float acc[kMmaTilesM][kMmaTilesN][4] = {};
    for (int i = 0; i < steps; ++i) {
        wait_copies<kStages - 2>();  // this thread's copies of step i have landed
        __syncthreads();             // everyone's have, and every warp is done with step i - 1's buffer
        const int ahead = i + kStages - 1;  // into that buffer
        if (ahead < steps) {
            copy_weights<kVectorWeights>(stages[ahead % kStages], qweight, N, K, n_block, k_of(ahead));
            copy_x(stages[ahead % kStages], x, M, K, m_block, k_of(ahead));
        }
        commit_copies();
        const uint32_t next =
            i + 1 < steps ? load_row_groups<kGroupSize>(scales, zeros, N, K, n_block + warp_n + g, t, k_of(i + 1)) : groups;
        multiply_step(stages[i % kStages], groups, acc, warp_m, warp_n, g, t);
        groups = next;
    }

    if (gridDim.z > 1 && !gather_splits(acc, partials, counters)) return;
    // C fragment: regs 0,1 = row g, columns 2t, 2t+1; regs 2,3 = row g + 8.
#pragma unroll
    for (int mt = 0; mt < kMmaTilesM; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kMmaTilesN; ++nt) {
            const int col = n_block + warp_n + nt * 8 + t * 2;
            if (col >= N) continue;  // N % 8 == 0, so col + 1 < N whenever col < N
#pragma unroll
            for (int half_row = 0; half_row < 2; ++half_row) {
                const int row = m_block + warp_m + mt * 16 + g + half_row * 8;
                if (row < M) {
                    *reinterpret_cast<half2*>(y + static_cast<size_t>(row) * N + col) =
                        __floats2half2_rn(acc[mt][nt][2 * half_row], acc[mt][nt][2 * half_row + 1]);
                }
            }
        }
    }
}

}  // namespace
}  // namespace awq_edge

// The kernels, one per group size and load width, with C names so that the CUDA driver API
// finds them in this file's cubin (awq_edge/cuda_backend.py) as the launcher below does:
// awq_gemm_g{G}_v{1: K % 32 == 0, 16-byte weight copies; 0: one word at a time},
// grid (ceil(N / 128), ceil(M / 64), splits of K) blocks of 256 threads; with splits > 1,
// partials: float32 [splits, tiles, 256, 32] and counters: int32 [tiles], zero between launches
// (tiles = grid.x * grid.y); unused (may be null) with one split.
#define AWQ_GEMM_ENTRY(G, V)                                                                                        \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                            \
        awq_gemm_g##G##_v##V(const half* __restrict__ x, const uint32_t* __restrict__ qweight,                      \
                             const half* __restrict__ scales, const half* __restrict__ zeros, half* __restrict__ y, \
                             int M, int N, int K, float* __restrict__ partials, int* __restrict__ counters) {       \
        awq_edge::let_next_kernel_start();                                                                          \
        awq_edge::gemm_w4a16<G, V == 1>(x, qweight, scales, zeros, y, M, N, K, partials, counters);                 \
    }
AWQ_GEMM_ENTRY(32, 0)
AWQ_GEMM_ENTRY(32, 1)
AWQ_GEMM_ENTRY(64, 0)
AWQ_GEMM_ENTRY(64, 1)
AWQ_GEMM_ENTRY(128, 0)
AWQ_GEMM_ENTRY(128, 1)

namespace awq_edge {
namespace {

// W_hat fp16 [N, K] from the packed weights: one thread per word (8 values), the kernels' own
// dequantization ((q - z) * s rounded once), so the result is packing.dequantize's rounded to
// fp16 exactly. The cuda backend's long prefill chunks run "dequantize a slab of rows, then
// cuBLAS fp16" with it (awq_edge/cuda_backend.py dequantized_matmul); benchmarks/gemv.py times
// that against our GEMM.
template <int kGroupSize>
__device__ __forceinline__ void dequantize(const uint32_t* __restrict__ qweight, const half* __restrict__ scales,
                                           const half* __restrict__ zeros, half* __restrict__ w, int N, int K) {
    const size_t word = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int words_per_row = K / kValuesPerWord;
    if (word >= static_cast<size_t>(N) * words_per_row) return;
    const size_t n = word / words_per_row;
    const int k = static_cast<int>(word % words_per_row) * kValuesPerWord;
    const size_t at = n * num_groups(K, kGroupSize) + group_of(k, kGroupSize);
    half2 out[4];
    dequant_word(__ldcs(qweight + word), make_group_params(scales[at], zeros[at]), out);
    *reinterpret_cast<uint4*>(w + n * K + k) = bit_cast<uint4>(out);
}

}  // namespace
}  // namespace awq_edge

// awq_dequantize_g{G}(qweight, scales, zeros, w, N, K): grid ceil(N * K / 8 / 256) blocks of 256.
#define AWQ_DEQUANTIZE_ENTRY(G)                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                        \
        awq_dequantize_g##G(const uint32_t* __restrict__ qweight, const half* __restrict__ scales,            \
                            const half* __restrict__ zeros, half* __restrict__ w, int N, int K) {             \
        awq_edge::begin_after_previous_kernel(); /* w may still be read by the previous GEMM */               \
        awq_edge::dequantize<G>(qweight, scales, zeros, w, N, K);                                            \
    }
AWQ_DEQUANTIZE_ENTRY(32)
AWQ_DEQUANTIZE_ENTRY(64)
AWQ_DEQUANTIZE_ENTRY(128)

#if defined(__CUDACC__)  // the C launchers (tests/cuda_on_cpu compiles the kernels alone with g++)
namespace awq_edge {
namespace {

using GemmKernel = void (*)(const half*, const uint32_t*, const half*, const half*, half*, int, int, int, float*,
                            int*);

}  // namespace
}  // namespace awq_edge

extern "C" int awq_w4a16_gemm_split_k(const __half* x, const int32_t* qweight, const __half* scales,
                                      const __half* zeros, __half* y, int M, int N, int K, int group_size, int splits,
                                      float* partials, int* counters, cudaStream_t stream) {
    using namespace awq_edge;
    if (!valid_matmul_args(x, qweight, scales, zeros, y, M, N, K, group_size)) return AWQ_W4A16_INVALID_ARGUMENT;
    const dim3 grid((N + kTileN - 1) / kTileN, (M + kTileM - 1) / kTileM, splits);
    if (grid.y > 65535 || splits < 1 || splits > 64 || splits > (K + kStepK - 1) / kStepK ||
        (splits > 1 && (partials == nullptr || counters == nullptr))) {
        return AWQ_W4A16_INVALID_ARGUMENT;
    }
    const auto* w = reinterpret_cast<const uint32_t*>(qweight);
    const bool vector = rows_allow_128bit_loads(K);
    GemmKernel kernel = group_size == 32 ? (vector ? awq_gemm_g32_v1 : awq_gemm_g32_v0)
                      : group_size == 64 ? (vector ? awq_gemm_g64_v1 : awq_gemm_g64_v0)
                                         : (vector ? awq_gemm_g128_v1 : awq_gemm_g128_v0);
    kernel<<<grid, kThreads, 0, stream>>>(x, w, scales, zeros, y, M, N, K, partials, counters);
    return launch_status();
}

extern "C" int awq_w4a16_gemm(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                              __half* y, int M, int N, int K, int group_size, cudaStream_t stream) {
    return awq_w4a16_gemm_split_k(x, qweight, scales, zeros, y, M, N, K, group_size, 1, nullptr, nullptr, stream);
}

extern "C" int awq_w4a16_dequantize(const int32_t* qweight, const __half* scales, const __half* zeros, __half* w,
                                    int N, int K, int group_size, cudaStream_t stream) {
    using namespace awq_edge;
    // valid_matmul_args wants an x: w stands in for it (16-byte aligned, as every row start is: K % 8 == 0)
    if (!valid_matmul_args(w, qweight, scales, zeros, w, 1, N, K, group_size)) return AWQ_W4A16_INVALID_ARGUMENT;
    const auto* q = reinterpret_cast<const uint32_t*>(qweight);
    const size_t words = static_cast<size_t>(N) * (K / kValuesPerWord);
    const unsigned blocks = static_cast<unsigned>((words + 255) / 256);
    switch (group_size) {
        case 32: awq_dequantize_g32<<<blocks, 256, 0, stream>>>(q, scales, zeros, w, N, K); break;
        case 64: awq_dequantize_g64<<<blocks, 256, 0, stream>>>(q, scales, zeros, w, N, K); break;
        default: awq_dequantize_g128<<<blocks, 256, 0, stream>>>(q, scales, zeros, w, N, K); break;
    }
    return launch_status();
}
#endif  // __CUDACC__
