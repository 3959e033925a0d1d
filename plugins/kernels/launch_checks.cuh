// Argument checks shared by the extern "C" launchers (see w4a16.h for the rules).
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "w4a16.h"

namespace awq_edge {

inline bool is_aligned(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

inline bool valid_matmul_args(const void* x, const void* qweight, const void* scales, const void* zeros, const void* y,
                              int M, int N, int K, int group_size) {
    if (!x || !qweight || !scales || !zeros || !y) return false;
    if (M < 1 || N < 8 || N % 8 != 0 || K < 8 || K % 8 != 0) return false;
    if (group_size != 32 && group_size != 64 && group_size != 128) return false;
    // x rows are read 8 halves (16 bytes) at a time; y is written as half2 by the GEMM.
    return is_aligned(x, 16) && is_aligned(qweight, 16) && is_aligned(y, 4) && is_aligned(scales, 2) &&
           is_aligned(zeros, 2);
}

// Whether each output row of qweight can be read 4 words (128 bits) at a time:
// a row is K/8 words, so rows stay 16-byte aligned when K % 32 == 0.
inline bool rows_allow_128bit_loads(int K) { return K % 32 == 0; }

inline int launch_status() {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? AWQ_W4A16_OK : static_cast<int>(err);
}

}  // namespace awq_edge
