// Decode GEMV: Y[M, N] = X[M, K] @ W_hat^T for M = 1..8, weights dequantized in registers.
//
// Batch-1 decode reads every weight once per token, so this kernel is a memory copy with
// arithmetic on the side. Work split: one warp per output row n. Lane l reads words
// l, l+32, ... of the row in chunks of 4 words (one 128-bit load = 32 k values), so a
// warp reads 512 contiguous bytes per step: fully coalesced. Weights are loaded with
// the streaming cache hint (used once); X is small and shared by all warps, so it is
// read through the read-only cache.
//
// A 128-bit chunk starts at a multiple of 32 and G is a multiple of 32, so the whole
// chunk lies in one group: one scale and one zero per load. Rows of K % 32 != 0 are not
// 16-byte aligned; for those the kernel reads one word (8 k values) at a time instead.
// The last group may be short (K = 576 at G = 128): the group index is k / G either way.
//
// Arithmetic: the 8 products of one word are summed in a half2 (hmul2 + 3 hfma2), then
// added to an fp32 accumulator per row; a warp shuffle reduction finishes the dot product.
#include "dequant.cuh"
#include "launch_checks.cuh"

namespace awq_edge {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;  // 4 output rows per block of 128 threads

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

template <int kWords>
__device__ __forceinline__ void load_weight_words(const uint32_t* src, uint32_t (&words)[kWords]) {
    if constexpr (kWords == 4) {
        const uint4 v = __ldcs(reinterpret_cast<const uint4*>(src));  // one 128-bit streaming load
        words[0] = v.x; words[1] = v.y; words[2] = v.z; words[3] = v.w;
    } else {
        words[0] = __ldcs(src);
    }
}

template <int kRows, int kGroupSize, int kWordsPerLoad>
__global__ void __launch_bounds__(kWarpSize * kWarpsPerBlock)
gemv_w4a16_kernel(const half* __restrict__ x, const uint32_t* __restrict__ qweight,
                  const half* __restrict__ scales, const half* __restrict__ zeros, half* __restrict__ y,
                  int N, int K) {
    const int lane = threadIdx.x % kWarpSize;
    const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
    if (n >= N) return;  // whole warps leave together: the shuffles below stay full-warp

    const int words_per_row = K / kValuesPerWord;
    const int groups = num_groups(K, kGroupSize);
    const uint32_t* w_row = qweight + static_cast<size_t>(n) * words_per_row;
    const half* scale_row = scales + static_cast<size_t>(n) * groups;
    const half* zero_row = zeros + static_cast<size_t>(n) * groups;

    float acc[kRows];
#pragma unroll
    for (int m = 0; m < kRows; ++m) acc[m] = 0.0f;

    const int loads_per_row = words_per_row / kWordsPerLoad;
#pragma unroll 2
    for (int chunk = lane; chunk < loads_per_row; chunk += kWarpSize) {
        uint32_t words[kWordsPerLoad];
        load_weight_words<kWordsPerLoad>(w_row + chunk * kWordsPerLoad, words);
        const int k0 = chunk * kWordsPerLoad * kValuesPerWord;
        const int g = group_of(k0, kGroupSize);
        const GroupParams params = make_group_params(scale_row[g], zero_row[g]);
#pragma unroll
        for (int i = 0; i < kWordsPerLoad; ++i) {
            half2 w[4];
            dequant_word(words[i], params, w);
            const int k = k0 + i * kValuesPerWord;
#pragma unroll
            for (int m = 0; m < kRows; ++m) {
                // K % 8 == 0, so X[m, k..k+7] is 16-byte aligned.
                const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + k));
                acc[m] += dot8(w, xv);
            }
        }
    }

#pragma unroll
    for (int m = 0; m < kRows; ++m) {
        float v = acc[m];
#pragma unroll
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
        if (lane == 0) y[static_cast<size_t>(m) * N + n] = __float2half_rn(v);
    }
}

template <int kRows, int kGroupSize>
void launch_for_rows_and_group(const half* x, const uint32_t* qweight, const half* scales, const half* zeros,
                               half* y, int N, int K, cudaStream_t stream) {
    const dim3 block(kWarpSize * kWarpsPerBlock);
    const dim3 grid((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
    if (rows_allow_128bit_loads(K)) {
        gemv_w4a16_kernel<kRows, kGroupSize, 4><<<grid, block, 0, stream>>>(x, qweight, scales, zeros, y, N, K);
    } else {
        gemv_w4a16_kernel<kRows, kGroupSize, 1><<<grid, block, 0, stream>>>(x, qweight, scales, zeros, y, N, K);
    }
}

template <int kRows>
void launch_for_rows(const half* x, const uint32_t* qweight, const half* scales, const half* zeros, half* y,
                     int N, int K, int group_size, cudaStream_t stream) {
    switch (group_size) {
        case 32: launch_for_rows_and_group<kRows, 32>(x, qweight, scales, zeros, y, N, K, stream); break;
        case 64: launch_for_rows_and_group<kRows, 64>(x, qweight, scales, zeros, y, N, K, stream); break;
        default: launch_for_rows_and_group<kRows, 128>(x, qweight, scales, zeros, y, N, K, stream); break;
    }
}

}  // namespace
}  // namespace awq_edge

extern "C" int awq_w4a16_gemv(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                              __half* y, int M, int N, int K, int group_size, cudaStream_t stream) {
    using namespace awq_edge;
    if (!valid_matmul_args(x, qweight, scales, zeros, y, M, N, K, group_size) || M > AWQ_W4A16_GEMV_MAX_ROWS) {
        return AWQ_W4A16_INVALID_ARGUMENT;
    }
    const auto* w = reinterpret_cast<const uint32_t*>(qweight);
    switch (M) {
        case 1: launch_for_rows<1>(x, w, scales, zeros, y, N, K, group_size, stream); break;
        case 2: launch_for_rows<2>(x, w, scales, zeros, y, N, K, group_size, stream); break;
        case 3: launch_for_rows<3>(x, w, scales, zeros, y, N, K, group_size, stream); break;
        case 4: launch_for_rows<4>(x, w, scales, zeros, y, N, K, group_size, stream); break;
        case 5: launch_for_rows<5>(x, w, scales, zeros, y, N, K, group_size, stream); break;
        case 6: launch_for_rows<6>(x, w, scales, zeros, y, N, K, group_size, stream); break;
        case 7: launch_for_rows<7>(x, w, scales, zeros, y, N, K, group_size, stream); break;
        default: launch_for_rows<8>(x, w, scales, zeros, y, N, K, group_size, stream); break;
    }
    return launch_status();
}
