// One tensor-core instruction shared by the GEMM and the few-row GEMV: mma.sync m16n8k16, fp16
// inputs, fp32 accumulation. Fragment layouts (PTX ISA), g = lane / 4, t = lane % 4:
//   A (16 x 16, row-major): a[0] = (row g, cols 2t, 2t+1), a[1] = (row g + 8, same cols),
//                           a[2] = (row g, cols 2t+8, 2t+9), a[3] = (row g + 8, cols 2t+8, 2t+9)
//   B (16 x 8, "col"):      b[0] = (k 2t, 2t+1 of column g), b[1] = (k 2t+8, 2t+9 of column g)
//   C (16 x 8, fp32):       acc[0], acc[1] = (row g, cols 2t, 2t+1), acc[2], acc[3] = row g + 8
// Each 32-bit register is a half2, the lower column (or k) in its low half.
#pragma once

#include <cstdint>

namespace awq_edge {

// acc += a * b.
__device__ __forceinline__ void mma_16816(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(AWQ_EDGE_CPU_EMULATION)  // tests/cuda_on_cpu: the warp's fragments exchanged on the CPU
    emulated_mma_16816(acc, a, b);
#else
    __trap();  // built only for sm_80 and newer (see CMakeLists.txt)
#endif
}

}  // namespace awq_edge
