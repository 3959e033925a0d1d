// A barrier across a whole grid, for persistent kernels that run a decode step's phases one
// after another in one launch. Every block of the grid must be resident at once: launch with
// cuLaunchCooperativeKernel (the driver refuses a grid that cannot be), at most the occupancy's
// blocks an SM. The pattern is cooperative groups' grid sync: the block meets at __syncthreads,
// its first thread fences (so the block's writes come before its arrival) and adds itself to a
// counter; the last to arrive resets the counter and moves the generation on, the others wait
// for that. After the barrier every block sees every write made before it.
#pragma once

#include <stdint.h>

namespace awq_edge {

struct GridBarrier {       // zeroed once; the kernel leaves `arrived` at 0 after each barrier
    unsigned arrived;      // blocks at the current barrier
    unsigned generation;   // barriers passed (wraps)
    unsigned stalled;      // set when a block gave up waiting: the grid was not all resident
    unsigned unused;
};

// How long a wait polls before it gives up: a wrong launch fails, never hangs. On the GPU a second
// by its clock (%globaltimer: a poll's cost, an L2 round trip and a sleep, varies by GPU and load,
// so a count of polls would be ~1 s on one and ~10 on another); in the CPU emulation until no
// thread of the launch can run (tests/cuda_on_cpu/emulate.h emulated_wait_in_vain).
constexpr unsigned long long kGridSyncMaxWaitNs = 1000000000ull;

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
#ifdef AWQ_EDGE_CPU_EMULATION
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#else
    unsigned value;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(p) : "memory");
    return value;
#endif
}

// Thread 0's wait for another block's counter: polls *p (acquire) until ready(value), for at most
// kGridSyncMaxWaitNs (then sets *stalled and goes on). The caller fences after it, so the block's
// reads after its next __syncthreads see what was written before *p moved.
template <typename Ready>
__device__ __forceinline__ void poll_until(const unsigned* p, Ready ready, unsigned* stalled) {
#ifdef AWQ_EDGE_CPU_EMULATION
    while (!ready(load_acquire(p))) {
        if (emulated_wait_in_vain()) {
            atomicExch(stalled, 1u);
            break;
        }
    }
#else
    unsigned long long started = 0;
    for (unsigned polls = 0; !ready(load_acquire(p)); ++polls) {
        if (polls % 64 == 0) {  // (the clock now and then: a read of it costs more than a poll)
            unsigned long long now;
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
            if (polls == 0) {
                started = now;
            } else if (now - started > kGridSyncMaxWaitNs) {
                atomicExch(stalled, 1u);
                break;
            }
        }
        __nanosleep(32);
    }
#endif
}

// A persistent step's tasks as a queue (persistent_step.cu's skeleton, decode_step.cu's real
// step): tasks (phase or op, tile) in order, taken by whichever block is free; a task waits only
// for the tasks before it, by running blocks, so any grid makes progress without a cooperative
// launch (and the CPU emulation, whose blocks run one after another, takes them all in turn).
// `next` only grows: a launch's tasks start at `base`, and each block ends on one task past the
// last, so the task that ends the step moves `base` on by the tasks and the grid, and zeroes the
// counts for the next launch (nothing reads them after: a block that starts late finds no task
// left). Zeroed once.
struct StepQueue {
    unsigned long long next;  // tasks handed out, over all launches
    unsigned long long base;  // `next` at this launch's first task
    unsigned finished;        // this launch's last-phase tiles done
    unsigned stalled;         // set when a task gave up waiting
};

// The block's next task of this launch, to every thread (its first thread takes it; `task` is a
// __shared__ slot): outside [0, the launch's tasks) when none is left (< 0: a block that started
// after its launch's last task ended).
__device__ __forceinline__ long long take_task(StepQueue* queue, long long& task) {
    if (threadIdx.x == 0) {
        const unsigned long long base = *reinterpret_cast<volatile unsigned long long*>(&queue->base);
        task = static_cast<long long>(atomicAdd(&queue->next, 1ull) - base);
    }
    __syncthreads();
    return task;
}

// Thread 0's count of a task of phase p (of `phases`) done, its block's writes made: the task that
// ends the last phase (of `last_tiles` tasks) ends the launch, zeroing the counts and moving `base`
// past the launch's `tasks` and the grid's one-past-the-end takes. Returns whether it ended it.
__device__ __forceinline__ bool count_task(StepQueue* queue, unsigned* done, int p, int phases, unsigned last_tiles,
                                           long long tasks) {
    __threadfence();
    atomicAdd(&done[p], 1u);
    if (p != phases - 1 || atomicAdd(&queue->finished, 1u) + 1u != last_tiles) return false;
    for (int i = 0; i < phases; ++i) done[i] = 0;  // (nothing reads them after: ready for the next launch)
    queue->finished = 0;
    queue->base += static_cast<unsigned long long>(tasks) + gridDim.x;
    return true;
}

__device__ __forceinline__ void grid_sync(GridBarrier* barrier) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned blocks = gridDim.x * gridDim.y * gridDim.z;
        const unsigned generation = load_acquire(&barrier->generation);  // (read before arriving)
        __threadfence();
        if (atomicAdd(&barrier->arrived, 1u) == blocks - 1) {
            atomicExch(&barrier->arrived, 0u);
            __threadfence();
            atomicAdd(&barrier->generation, 1u);
        } else {
            poll_until(&barrier->generation, [&](unsigned now) { return now != generation; }, &barrier->stalled);
        }
        __threadfence();
    }
    __syncthreads();
}

}  // namespace awq_edge
