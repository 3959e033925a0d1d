// The op entry point: picks the decode GEMV or the prefill GEMM by the number of rows.
#include "launch_checks.cuh"

extern "C" int awq_w4a16_matmul(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                                __half* y, int M, int N, int K, int group_size, cudaStream_t stream) {
    // Up to 32 rows the GEMV's weight reads dominate (the GEMM's 64-row tiles would be mostly
    // empty). From 2 rows, where K % 32 == 0, the GEMV on tensor cores takes them all in one pass
    // (one mma per dequantized word for 8 rows of x, the weights read once); otherwise the
    // CUDA-core GEMV 8 rows at a time (each chunk reads the weights again). Above 32 rows, the
    // GEMM reuses each dequantized weight tile for 64 rows.
    if (M >= 2 && M <= AWQ_W4A16_GEMV_CHUNKED_MAX_ROWS && awq_edge::rows_allow_128bit_loads(K)) {
        return awq_w4a16_gemv_mma(x, qweight, scales, zeros, y, M, N, K, group_size, stream);
    }
    if (M >= 1 && M <= AWQ_W4A16_GEMV_CHUNKED_MAX_ROWS) {
        for (int m0 = 0; m0 < M; m0 += AWQ_W4A16_GEMV_MAX_ROWS) {
            const int rows = M - m0 < AWQ_W4A16_GEMV_MAX_ROWS ? M - m0 : AWQ_W4A16_GEMV_MAX_ROWS;
            const int status = awq_w4a16_gemv(x + static_cast<size_t>(m0) * K, qweight, scales, zeros,
                                              y + static_cast<size_t>(m0) * N, rows, N, K, group_size, stream);
            if (status != AWQ_W4A16_OK) return status;
        }
        return AWQ_W4A16_OK;
    }
    return awq_w4a16_gemm(x, qweight, scales, zeros, y, M, N, K, group_size, stream);
}

extern "C" const char* awq_w4a16_status_string(int status) {
    if (status == AWQ_W4A16_OK) return "ok";
    if (status == AWQ_W4A16_INVALID_ARGUMENT) {
        return "invalid argument (need M >= 1, N and K multiples of 8, group_size 32/64/128, "
               "x and qweight 16-byte aligned, y 4-byte aligned)";
    }
    return cudaGetErrorString(static_cast<cudaError_t>(status));
}
