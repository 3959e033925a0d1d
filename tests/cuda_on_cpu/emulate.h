// Just enough of CUDA to run a block-level kernel's own source on the CPU, for CI (no GPU):
// each thread of a block is an OS thread, __syncthreads a barrier of the block, and each warp
// intrinsic an exchange through a barrier of the warp's 32 threads. Blocks run one after
// another, so a kernel's `__shared__` variables are plain statics. What it checks is the
// kernel's logic (indices, synchronization, the warp collectives' results), not its speed or
// anything about memory the GPU would do differently; tests/test_kernels_on_cpu.py uses it,
// included before the kernel's .cu (g++ -include).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include <cuda_fp16.h>
#include <cuda_runtime.h>  // (first: the kernels' own includes of it then add nothing)
#include <vector_functions.h>
#include <vector_types.h>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace cuda_on_cpu {

constexpr int kWarp = 32;

struct Warp {
    std::barrier<> meet{kWarp};
    uint64_t slot[kWarp];
};

struct Block {
    explicit Block(int threads) : meet(threads), warps(threads / kWarp) {}
    std::barrier<> meet;
    std::vector<Warp> warps;
};

inline Block* block = nullptr;
inline uint3 grid_dim{1, 1, 1}, block_dim{1, 1, 1};
inline thread_local uint3 thread_index{0, 0, 0};
inline uint3 block_index{0, 0, 0};

inline int lane() { return static_cast<int>(thread_index.x) % kWarp; }
inline Warp& warp() { return block->warps[thread_index.x / kWarp]; }

// Every lane's value, to every lane (then what each intrinsic makes of them).
template <typename T>
std::vector<T> gather(T value) {
    static_assert(sizeof(T) <= 8, "a warp slot holds 8 bytes");
    Warp& w = warp();
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    w.slot[lane()] = bits;
    w.meet.arrive_and_wait();
    std::vector<T> all(kWarp);
    for (int i = 0; i < kWarp; ++i) std::memcpy(&all[i], &w.slot[i], sizeof(T));
    w.meet.arrive_and_wait();  // the slots are rewritten by the next intrinsic
    return all;
}

// Runs kernel() for every block of the grid, blockDim.x threads at a time (1-D launches).
inline void launch(unsigned grid, unsigned threads, const std::function<void()>& kernel) {
    grid_dim = {grid, 1, 1};
    block_dim = {threads, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        Block here(static_cast<int>(threads));
        block = &here;
        block_index = {b, 0, 0};
        std::vector<std::thread> team;
        team.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
            team.emplace_back([t, &kernel] {
                thread_index = {t, 0, 0};
                kernel();
            });
        }
        for (auto& thread : team) thread.join();
        block = nullptr;
    }
}

}  // namespace cuda_on_cpu

#define threadIdx (cuda_on_cpu::thread_index)
#define blockIdx (cuda_on_cpu::block_index)
#define blockDim (cuda_on_cpu::block_dim)
#define gridDim (cuda_on_cpu::grid_dim)

inline void __syncthreads() { cuda_on_cpu::block->meet.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) { return cuda_on_cpu::gather(v)[cuda_on_cpu::lane() ^ mask]; }

template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
    const int from = cuda_on_cpu::lane() - static_cast<int>(delta);
    const auto all = cuda_on_cpu::gather(v);
    return from >= 0 ? all[from] : v;
}

inline unsigned __ballot_sync(unsigned, int predicate) {
    const auto all = cuda_on_cpu::gather(static_cast<unsigned>(predicate != 0));
    unsigned bits = 0;
    for (int i = 0; i < cuda_on_cpu::kWarp; ++i) bits |= static_cast<unsigned>(all[i]) << i;
    return bits;
}

inline unsigned __match_any_sync(unsigned, unsigned value) {
    const auto all = cuda_on_cpu::gather(value);
    unsigned bits = 0;
    for (int i = 0; i < cuda_on_cpu::kWarp; ++i) bits |= static_cast<unsigned>(all[i] == value) << i;
    return bits;
}

inline unsigned atomicAdd(unsigned* address, unsigned value) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

template <typename T>
T __ldg(const T* p) { return *p; }

using std::isnan;
using std::min;
