// cp.async (sm_80 and newer): a copy from global to shared memory that runs on while the thread
// goes on, the loads of the GEMM's multistage pipeline. The copies a thread issues between two
// commit_copies() are one group; wait_copies<N>() returns once all but the newest N of the
// thread's groups have landed (a __syncthreads after it makes every thread's copies visible to
// the block). A copy with `valid` false reads nothing and writes zeros (src-size 0): a tile's
// edges past M, N or K.
#pragma once

#include <cstdint>

namespace awq_edge {

// 16 bytes, both addresses 16-byte aligned; through L2 only (.cg): the block reuses it from shared memory.
__device__ __forceinline__ void copy_async_16(void* shared, const void* global, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const auto to = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(global), "r"(valid ? 16 : 0)
                 : "memory");
#elif defined(AWQ_EDGE_CPU_EMULATION)  // tests/cuda_on_cpu: landed at the thread's wait_copies
    emulated_copy_async(shared, global, 16, valid);
#else
    __trap();  // built only for sm_80 and newer (see CMakeLists.txt)
#endif
}

// 4 bytes, both addresses 4-byte aligned (rows of packed words when K % 32 != 0).
__device__ __forceinline__ void copy_async_4(void* shared, const void* global, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const auto to = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(to), "l"(global), "r"(valid ? 4 : 0)
                 : "memory");
#elif defined(AWQ_EDGE_CPU_EMULATION)
    emulated_copy_async(shared, global, 4, valid);
#else
    __trap();
#endif
}

__device__ __forceinline__ void commit_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(AWQ_EDGE_CPU_EMULATION)
    emulated_commit_copies();
#endif
}

template <int kNewestPending>
__device__ __forceinline__ void wait_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kNewestPending) : "memory");
#elif defined(AWQ_EDGE_CPU_EMULATION)
    emulated_wait_copies(kNewestPending);
#endif
}

}  // namespace awq_edge
