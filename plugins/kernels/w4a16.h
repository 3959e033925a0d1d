/* awq-edge W4A16 kernels: the plain C ABI (ctypes, the TensorRT plugin, any C caller).
 *
 * Y[M, N] = X[M, K] @ W_hat[N, K]^T, fp16 in and out, with
 *   W_hat[n, k] = (q[n, k] - zeros[n, k / G]) * scales[n, k / G]
 * and the weight layout of the op contract in plugins/README.md:
 *   qweight int32 [N, K/8] (AWQ nibble order), scales and zeros fp16 [N, ceil(K/G)].
 *
 * Requirements (checked; a violation returns AWQ_W4A16_INVALID_ARGUMENT, nothing launched):
 *   M >= 1; N >= 8 and N % 8 == 0; K >= 8 and K % 8 == 0; group_size in {32, 64, 128};
 *   x and qweight 16-byte aligned, y 4-byte aligned (cudaMalloc gives 256).
 * All launches are asynchronous on `stream`; the return value reports argument errors
 * and launch errors (cudaGetLastError), not errors that happen later on the device.
 */
#ifndef AWQ_EDGE_W4A16_H
#define AWQ_EDGE_W4A16_H

#include <stdint.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    AWQ_W4A16_OK = 0,
    AWQ_W4A16_INVALID_ARGUMENT = -1
    /* a positive value is the cudaError_t of a failed launch */
};

/* Decode kernel: dequant-fused GEMV, M = 1..8 rows. */
int awq_w4a16_gemv(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                   __half* y, int M, int N, int K, int group_size, cudaStream_t stream);

/* The GEMV of M = 2..32 rows on tensor cores in one pass (mma.sync, fp32 accumulation); K % 32 == 0.
 * 16 output rows a block; _mma32: M <= 8 and 32 rows a block (x read from L2 half as often, half
 * the blocks). */
int awq_w4a16_gemv_mma(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                       __half* y, int M, int N, int K, int group_size, cudaStream_t stream);
int awq_w4a16_gemv_mma32(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                         __half* y, int M, int N, int K, int group_size, cudaStream_t stream);

/* The decode GEMV (M = 1) on tensor cores (mma.sync on the centered levels, fp32 sums); K % 32 == 0
 * and K <= 16384. The cuda backend runs it with its fusions (awq_gemv_tc_*). */
int awq_w4a16_gemv_tc(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                      __half* y, int M, int N, int K, int group_size, cudaStream_t stream);
/* The same on a persistent grid (two blocks an SM, each taking several 16-row tiles in turn). */
int awq_w4a16_gemv_tc_persistent(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                                 __half* y, int M, int N, int K, int group_size, cudaStream_t stream);

/* Prefill kernel: tensor-core GEMM (mma.sync m16n8k16, fp32 accumulation), any M >= 1. */
int awq_w4a16_gemm(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                   __half* y, int M, int N, int K, int group_size, cudaStream_t stream);
/* The same with K split over `splits` blocks per output tile of 64 rows of M x 128 of N (1..64, at
 * most ceil(K / 32), the GEMM's K steps): partials float32 [splits * ceil(M / 64) * ceil(N / 128) *
 * 8192] and counters int32 [ceil(M / 64) * ceil(N / 128)], zeroed once (each launch leaves them
 * zero); both may be null with one split. */
int awq_w4a16_gemm_split_k(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                           __half* y, int M, int N, int K, int group_size, int splits, float* partials,
                           int* counters, cudaStream_t stream);

/* The op: up to AWQ_W4A16_GEMV_CHUNKED_MAX_ROWS rows a GEMV (from 2 rows, when K % 32 == 0, the
 * tensor-core one in one pass, awq_w4a16_gemv_mma; else the CUDA-core one AWQ_W4A16_GEMV_MAX_ROWS
 * rows at a time), the GEMM above. */
#define AWQ_W4A16_GEMV_MAX_ROWS 8
#define AWQ_W4A16_GEMV_CHUNKED_MAX_ROWS 32
int awq_w4a16_matmul(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                     __half* y, int M, int N, int K, int group_size, cudaStream_t stream);

/* W_hat fp16 [N, K] (row-major) from the packed weights, exactly packing.dequantize's values rounded
 * to fp16: the first half of "dequantize, then cuBLAS fp16" prefill (benchmarks/gemv.py). */
int awq_w4a16_dequantize(const int32_t* qweight, const __half* scales, const __half* zeros, __half* w,
                         int N, int K, int group_size, cudaStream_t stream);

/* The GEMV's ceiling, for benchmarks: the decode GEMV's grid and loads of the same weight, scale and
 * zero bytes (M = 1), with no arithmetic; y gets N meaningless values. */
int awq_w4a16_read_only(const int32_t* qweight, const __half* scales, const __half* zeros, __half* y,
                        int N, int K, int group_size, cudaStream_t stream);

/* A readable message for a return value of the functions above. */
const char* awq_w4a16_status_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* AWQ_EDGE_W4A16_H */
