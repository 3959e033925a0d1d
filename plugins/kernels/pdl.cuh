// Programmatic dependent launch (sm_90 and later): a kernel launched with the attribute
// CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION may start while the kernel before it on
// the stream is still running, so its launch and ramp-up overlap that kernel's tail; a decode step
// is ~6 launches a layer, each with a fixed cost of ~2.4 us (H100) that this hides.
//
// The contract, which every kernel the cuda backend launches keeps (in this order, first thing):
//   let_next_kernel_start()     the next kernel may be scheduled now: it only runs until its own
//                               wait_for_previous_kernel(), so nothing it does can race with us;
//   (reads of data no earlier kernel writes: the weights; and in the decode attention, data
//   only earlier decode steps write: a decode step is one CUDA graph launch, which starts once
//   all earlier work on the stream is done; attention.cu attend_split)
//   wait_for_previous_kernel()  returns once the previous kernel has finished and its writes are
//                               visible; everything that reads or writes activations comes after.
//                               (PTX ISA, griddepcontrol: .wait waits until "all the memory operations
//                               from the prerequisite grids are performed and made visible to the
//                               current grid", so the read-only-cache loads after it see them too.)
// Launched without the attribute (or before sm_90), both are no-ops and the launch waits as usual.
#pragma once

namespace awq_edge {

__device__ __forceinline__ void let_next_kernel_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#elif defined(AWQ_EDGE_CPU_EMULATION)  // tests/cuda_on_cpu: what came before it may run on stale memory
    emulated_wait_for_previous_kernel();
#endif
}

// wait_for_previous_kernel as a function object: the wait an op's body takes (its kernel's; the
// persistent decode step, decode_step.cu, passes its wait for the op before it instead).
struct AfterPreviousKernel {
    __device__ __forceinline__ void operator()() const { wait_for_previous_kernel(); }
};

// Both, for a kernel that reads nothing before the previous kernel's results.
__device__ __forceinline__ void begin_after_previous_kernel() {
    let_next_kernel_start();
    wait_for_previous_kernel();
}

// An activation's bytes, which an earlier kernel wrote: through the read-only cache (__ldg). In the
// persistent decode step (decode_step.cu defines AWQ_EDGE_ONE_KERNEL before its bodies) other
// blocks of the same kernel wrote them, and that cache is not kept coherent with their writes
// (ld.global.nc is for data no thread writes while the kernel runs): from L2 there (__ldcg), where
// the writers' fences put them.
#if defined(AWQ_EDGE_CPU_EMULATION)
template <typename T>
T load_activation(const T* p, const std::source_location& at = std::source_location::current()) {
#ifdef AWQ_EDGE_ONE_KERNEL
    return __ldcg(p, at);
#else
    return __ldg(p, at);
#endif
}
#else
template <typename T>
__device__ __forceinline__ T load_activation(const T* p) {
#ifdef AWQ_EDGE_ONE_KERNEL
    return __ldcg(p);
#else
    return __ldg(p);
#endif
}
#endif

// Start moving 16 bytes at p from DRAM into L2 (the GEMV's first weights, before it waits).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

}  // namespace awq_edge
