// The op entry point: picks the decode GEMV or the prefill GEMM by the number of rows.
#include "launch_checks.cuh"

extern "C" int awq_w4a16_matmul(const __half* x, const int32_t* qweight, const __half* scales, const __half* zeros,
                                __half* y, int M, int N, int K, int group_size, cudaStream_t stream) {
    // Up to 8 rows the GEMV's weight reads dominate. Up to 32, the GEMV in chunks of 8 rows (each
    // chunk reads the weights again): on the H100 two M = 8 GEMVs (on CUDA cores) took 30 us at
    // 4096x4096 where the GEMM, whose 64-row tiles are mostly empty there, took 45
    // (benchmarks/README.md; gemv.py measures M = 16 and 32). From 2 rows the GEMV runs on tensor
    // cores (one mma per dequantized word for all rows) where K % 32 == 0. Above 32 rows, the GEMM
    // reuses each dequantized weight tile for 64 rows.
    if (M >= 1 && M <= AWQ_W4A16_GEMV_CHUNKED_MAX_ROWS) {
        for (int m0 = 0; m0 < M; m0 += AWQ_W4A16_GEMV_MAX_ROWS) {
            const int rows = M - m0 < AWQ_W4A16_GEMV_MAX_ROWS ? M - m0 : AWQ_W4A16_GEMV_MAX_ROWS;
            // 2 rows or more: on tensor cores where the rows allow its 128-bit loads
            const auto gemv = rows >= 2 && awq_edge::rows_allow_128bit_loads(K) ? awq_w4a16_gemv_mma : awq_w4a16_gemv;
            const int status = gemv(x + static_cast<size_t>(m0) * K, qweight, scales, zeros,
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
