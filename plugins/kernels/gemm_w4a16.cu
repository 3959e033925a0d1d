// Prefill GEMM: Y[M, N] = X[M, K] @ W_hat^T for any M, on tensor cores.
//
// Block tile 64 (M) x 64 (N) x 64 (K), 4 warps in a 2 x 2 grid, each warp owning a
// 32 x 32 piece of Y as 2 x 4 mma.sync.m16n8k16 tiles with fp32 accumulators.
// Per K step the block:
//   1. has already loaded the NEXT tile from global memory into registers (X as 128-bit
//      loads; weights as one 128-bit load of 4 words per thread, two threads per weight
//      row = 32 contiguous bytes, one full memory sector);
//   2. computes on the CURRENT tile in shared memory (X tile [m][k], dequantized weight
//      tile [n][k], which is exactly the "col" B operand of mma.row.col);
//   3. stores the next tile into shared memory, dequantizing the weights on the way.
// Rows are padded to 72 halves so the fragment loads of a warp hit 32 different banks.
//
// Split K (gridDim.z > 1, the cuda backend's choice when the output has too few 64 x 64 tiles to
// fill the GPU: a 64-row chunk of a 4096-wide linear is 64 tiles for 132 SMs): block (x, y, z)
// takes the z-th of gridDim.z even shares of the K tiles, writes its fp32 accumulators to
// `partials` (each thread its own 32, in fragment order: the same thread of every split holds
// the same output elements), and the last block of the output tile to finish (a counter per
// tile, reset by that block) sums the splits in order and writes Y, as one block would have.
//
// Edges: rows m >= M, rows n >= N and columns k >= K are filled with zeros in shared
// memory, so any M, any N % 8 == 0 and any K % 8 == 0 work. A thread's 4 words are 32
// k values starting at a multiple of 32, so they share one group (G is a multiple of 32);
// when K % 32 != 0 the rows are not 16-byte aligned and words are read one at a time,
// each with its own group and bounds check.
#include "dequant.cuh"
#include "launch_checks.cuh"
#include "mma.cuh"
#include "pdl.cuh"

namespace awq_edge {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 64;
constexpr int kThreads = 128;
constexpr int kSmemRow = kTileK + 8;        // padded row length in halves (avoids bank conflicts)
constexpr int kWarpTileM = 32;              // each warp: 32 x 32 of the output
constexpr int kWarpTileN = 32;
constexpr int kMmaTilesM = kWarpTileM / 16;  // 2 m16 tiles per warp
constexpr int kMmaTilesN = kWarpTileN / 8;   // 4 n8 tiles per warp
constexpr int kXLoadsPerThread = kTileM * kTileK / 8 / kThreads;  // 8 halves per 128-bit load -> 4
constexpr int kWordsPerThread = 4;           // 64 rows x 8 words / 128 threads
constexpr int kAccPerThread = kMmaTilesM * kMmaTilesN * 4;  // a thread's fp32 accumulators: 32

// The slice of the next K tile that one thread carries from global memory to shared memory.
struct TileLoad {
    uint4 x[kXLoadsPerThread];
    uint32_t words[kWordsPerThread];
    half scale[kWordsPerThread];
    half zero[kWordsPerThread];
    bool word_valid[kWordsPerThread];
};

template <int kGroupSize, bool kVectorWeights>
__device__ __forceinline__ void load_tile(TileLoad& t, const half* __restrict__ x, const uint32_t* __restrict__ qweight,
                                          const half* __restrict__ scales, const half* __restrict__ zeros,
                                          int M, int N, int K, int m_block, int n_block, int k_tile) {
    const int tid = threadIdx.x;
    // X: 64 rows x 8 loads of 8 halves; load i of this thread covers row r, columns c..c+7.
#pragma unroll
    for (int i = 0; i < kXLoadsPerThread; ++i) {
        const int idx = tid + i * kThreads;
        const int row = m_block + idx / (kTileK / 8);
        const int col = k_tile + (idx % (kTileK / 8)) * 8;
        t.x[i] = (row < M && col < K) ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(row) * K + col))
                                      : make_uint4(0, 0, 0, 0);
    }
    // Weights: two threads per row n, each 4 words = 32 k values.
    const int n = n_block + tid / 2;
    const int words_per_row = K / kValuesPerWord;
    const int first_word = k_tile / kValuesPerWord + (tid % 2) * kWordsPerThread;
    const int groups = num_groups(K, kGroupSize);
    const uint32_t* w_row = qweight + static_cast<size_t>(n) * words_per_row;
    if constexpr (kVectorWeights) {
        // K % 32 == 0: the 4 words are all inside K or all outside, and share one group.
        const bool valid = n < N && first_word < words_per_row;
        uint4 v = make_uint4(0, 0, 0, 0);
        half s = __float2half(0.0f), z = __float2half(0.0f);
        if (valid) {
            v = __ldcs(reinterpret_cast<const uint4*>(w_row + first_word));
            const int g = group_of(first_word * kValuesPerWord, kGroupSize);
            s = scales[static_cast<size_t>(n) * groups + g];
            z = zeros[static_cast<size_t>(n) * groups + g];
        }
        t.words[0] = v.x; t.words[1] = v.y; t.words[2] = v.z; t.words[3] = v.w;
#pragma unroll
        for (int i = 0; i < kWordsPerThread; ++i) { t.scale[i] = s; t.zero[i] = z; t.word_valid[i] = valid; }
    } else {
#pragma unroll
        for (int i = 0; i < kWordsPerThread; ++i) {
            const int word = first_word + i;
            t.word_valid[i] = n < N && word < words_per_row;
            t.words[i] = 0;
            t.scale[i] = t.zero[i] = __float2half(0.0f);
            if (t.word_valid[i]) {
                const int g = group_of(word * kValuesPerWord, kGroupSize);
                t.words[i] = __ldcs(w_row + word);
                t.scale[i] = scales[static_cast<size_t>(n) * groups + g];
                t.zero[i] = zeros[static_cast<size_t>(n) * groups + g];
            }
        }
    }
}

__device__ __forceinline__ void store_tile(const TileLoad& t, half (*x_tile)[kSmemRow], half (*w_tile)[kSmemRow]) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < kXLoadsPerThread; ++i) {
        const int idx = tid + i * kThreads;
        *reinterpret_cast<uint4*>(&x_tile[idx / (kTileK / 8)][(idx % (kTileK / 8)) * 8]) = t.x[i];
    }
    const int row = tid / 2;
    const int col = (tid % 2) * kWordsPerThread * kValuesPerWord;
#pragma unroll
    for (int i = 0; i < kWordsPerThread; ++i) {
        half2 w[4];
        if (t.word_valid[i]) {
            dequant_word(t.words[i], make_group_params(t.scale[i], t.zero[i]), w);
        } else {
            w[0] = w[1] = w[2] = w[3] = __float2half2_rn(0.0f);  // outside the matrix: contributes nothing
        }
        *reinterpret_cast<uint4*>(&w_tile[row][col + i * kValuesPerWord]) = bit_cast<uint4>(w);
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
    __shared__ __align__(16) half x_tile[kTileM][kSmemRow];
    __shared__ __align__(16) half w_tile[kTileN][kSmemRow];

    const int m_block = blockIdx.y * kTileM;
    const int n_block = blockIdx.x * kTileN;
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int warp_m = (warp / 2) * kWarpTileM;
    const int warp_n = (warp % 2) * kWarpTileN;
    const int group_id = lane / 4;  // mma fragment row (A, C) / column (B)
    const int lane_in_group = lane % 4;

    float acc[kMmaTilesM][kMmaTilesN][4] = {};

    // this block's K tiles: the blockIdx.z-th of gridDim.z even shares (all of them without a split)
    const int k_tiles = (K + kTileK - 1) / kTileK;
    const int k_begin = static_cast<int>(blockIdx.z) * k_tiles / static_cast<int>(gridDim.z) * kTileK;
    const int k_end_tile = (static_cast<int>(blockIdx.z) + 1) * k_tiles / static_cast<int>(gridDim.z) * kTileK;
    const int k_end = k_end_tile < K ? k_end_tile : K;
    TileLoad next;
    load_tile<kGroupSize, kVectorWeights>(next, x, qweight, scales, zeros, M, N, K, m_block, n_block, k_begin);
    for (int k_tile = k_begin; k_tile < k_end; k_tile += kTileK) {
        __syncthreads();  // everyone is done reading the previous tile
        store_tile(next, x_tile, w_tile);
        __syncthreads();
        if (k_tile + kTileK < k_end) {
            load_tile<kGroupSize, kVectorWeights>(next, x, qweight, scales, zeros, M, N, K, m_block, n_block,
                                                  k_tile + kTileK);
        }
#pragma unroll
        for (int kk = 0; kk < kTileK; kk += 16) {
            // Fragment layouts of mma.m16n8k16 (PTX ISA): A regs = rows (g, g+8) x cols (2t, 2t+8);
            // B regs = k (2t, 2t+8) of column g.
            uint32_t a[kMmaTilesM][4];
#pragma unroll
            for (int mt = 0; mt < kMmaTilesM; ++mt) {
                const int r = warp_m + mt * 16 + group_id;
                const int c = kk + lane_in_group * 2;
                a[mt][0] = *reinterpret_cast<const uint32_t*>(&x_tile[r][c]);
                a[mt][1] = *reinterpret_cast<const uint32_t*>(&x_tile[r + 8][c]);
                a[mt][2] = *reinterpret_cast<const uint32_t*>(&x_tile[r][c + 8]);
                a[mt][3] = *reinterpret_cast<const uint32_t*>(&x_tile[r + 8][c + 8]);
            }
#pragma unroll
            for (int nt = 0; nt < kMmaTilesN; ++nt) {
                const int n = warp_n + nt * 8 + group_id;
                const int c = kk + lane_in_group * 2;
                const uint32_t b[2] = {*reinterpret_cast<const uint32_t*>(&w_tile[n][c]),
                                       *reinterpret_cast<const uint32_t*>(&w_tile[n][c + 8])};
#pragma unroll
                for (int mt = 0; mt < kMmaTilesM; ++mt) mma_16816(acc[mt][nt], a[mt], b);
            }
        }
    }

    if (gridDim.z > 1 && !gather_splits(acc, partials, counters)) return;
    // C fragment: regs 0,1 = row g, columns 2t, 2t+1; regs 2,3 = row g + 8.
#pragma unroll
    for (int mt = 0; mt < kMmaTilesM; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kMmaTilesN; ++nt) {
            const int col = n_block + warp_n + nt * 8 + lane_in_group * 2;
            if (col >= N) continue;  // N % 8 == 0, so col + 1 < N whenever col < N
#pragma unroll
            for (int half_row = 0; half_row < 2; ++half_row) {
                const int row = m_block + warp_m + mt * 16 + group_id + half_row * 8;
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
// awq_gemm_g{G}_v{1: K % 32 == 0, 128-bit weight loads; 0: one word at a time},
// grid (ceil(N / 64), ceil(M / 64), splits of K) blocks of 128 threads; with splits > 1,
// partials: float32 [splits, tiles, 128, 32] and counters: int32 [tiles], zero between launches
// (tiles = grid.x * grid.y); unused (may be null) with one split.
#define AWQ_GEMM_ENTRY(G, V)                                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                               \
        awq_gemm_g##G##_v##V(const half* __restrict__ x, const uint32_t* __restrict__ qweight,                      \
                             const half* __restrict__ scales, const half* __restrict__ zeros, half* __restrict__ y, \
                             int M, int N, int K, float* __restrict__ partials, int* __restrict__ counters) {       \
        awq_edge::begin_after_previous_kernel();                                                                    \
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
    if (grid.y > 65535 || splits < 1 || splits > 64 || splits > (K + kTileK - 1) / kTileK ||
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
