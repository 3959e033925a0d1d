// Just enough of CUDA to run the kernels' own source on the CPU, for CI (no GPU): each thread of
// a block is a fiber, __syncthreads a barrier of the block, and each warp collective (the
// shuffles, ballot, match, mma.sync) an exchange through a barrier of the warp's 32 threads.
// Blocks run one after another, so a kernel's `__shared__` variables are statics. A cp.async
// copy (async_copy.cuh) lands only at its thread's wait for it, the latest the GPU allows. What it
// checks is the kernels' logic (indices, synchronization, what the collectives return, the
// fragment layouts of mma.sync), not their speed or anything the GPU's memory does differently.
//
// That order is one of many a GPU may run. `schedule.adversarial` (cpu_schedule, launch.cpp) runs
// another at every point where the GPU is free to differ: a block's warps one at a time, each as
// far as it goes before the next (to a __syncthreads: warps drift apart as they may on a GPU,
// where the round robin keeps them in step at every shuffle and mma), from the last warp and lane
// in one round and from the first in the next (a thread reading what another writes without a
// barrier between reads the other value, one way or the other), blocks in reverse order, each
// cp.async copy landed at its issue (the earliest), and, for a launch given stale memory
// (cpu_stale_memory: what a programmatic dependent launch may still see, pdl.cuh), each block run
// up to its wait_for_previous_kernel() on that memory, and a block's writes hidden from the other
// blocks until it fences (HiddenWrites). A kernel free of races gives the same bits
// either way (tests/test_kernels_on_cpu.py compares them). A misaligned access, an index past a
// local array and the like, which an x86 runs and a GPU may not, end the launch at the kernel's
// line (-fsanitize checks, launch.cpp's handlers; the cached loads below check alignment).
//
// Neither runs blocks that wait on each other (the persistent decode step's tasks, a grid
// barrier): there one block takes every task in order, and a grid barrier stalls. A third,
// `schedule.concurrent`, runs up to kMaxResident blocks side by side, as a GPU's SMs do: a few
// rounds of each block's threads in turn (each thread to its next barrier; the count drawn, so
// that blocks drift apart), and a thread that polls another block's count (grid_sync.cuh
// poll_until) waits while the others run; so a task that reads what the op before it has not
// finished reads it unfinished. Each resident block keeps its own copy of the kernel's
// `__shared__` statics (their addresses: cpu_shared_memory), swapped in when it runs.
//
// Included before each kernel file (g++ -include; tests/test_kernels_on_cpu.py builds them),
// whose kernels a generated line AWQ_EMULATE(name) each registers; `cpu_launch` (launch.cpp)
// runs one by name with the driver API's arguments (an array of pointers to the values).
#pragma once

#include <algorithm>
#include <atomic>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
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
#define AWQ_EDGE_CPU_EMULATION 1

inline void __trap() { std::abort(); }  // a broken launch contract: stop, as the GPU would

// Undefined behaviour at a kernel's line (launch.cpp): the launch stops and fails, saying where.
extern "C" [[noreturn]] void cpu_undefined(const char* file, unsigned line, unsigned column, const char* what);

namespace cuda_on_cpu {

constexpr int kWarp = 32;
constexpr int kSlotBytes = 64;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 128 << 10;

// A block's threads are fibers on one OS thread, each run until it waits at a barrier or returns:
// a switch costs no system wakeup, and every run is the same interleaving. A fiber's stack is made
// with makecontext and entered once with setcontext; every switch after is _setjmp/_longjmp, which
// leave the signal mask alone (swapcontext saves and sets it: two system calls a switch, most of
// the emulation's time). (Built with _FORTIFY_SOURCE off: its longjmp check refuses another stack.)
struct Meeting {  // a barrier whose party is the threads still running the block
    int party = 0, arrived = 0;
    uint64_t phase = 0;
};

struct Fiber {
    ucontext_t context;  // its first entry
    jmp_buf resume;      // where it waits
    bool started = false;
    std::unique_ptr<char[]> stack{new char[kStackBytes]};
    const Meeting* waiting = nullptr;  // the meeting it waits at, and that meeting's phase then
    uint64_t phase = 0;
    bool done = false;
    bool polling = false;  // it waits for another block's count (runnable: it polls again when run)
};

// A thread's cp.async copies not yet landed (async_copy.cuh): each holds its bytes from when it
// was issued, and lands (is written to shared memory) only at the thread's wait_copies, so a
// kernel that reads a stage before waiting for it reads stale data, here as it might on a GPU.
struct PendingCopy {
    void* to;
    unsigned char bytes[16];
    int size;
};

struct CopyQueue {
    std::vector<std::vector<PendingCopy>> committed;  // oldest first
    std::vector<PendingCopy> open;                    // issued since the last commit
};

struct Warp {
    Meeting meet;
    unsigned char slot[kWarp][kSlotBytes];
};

struct Schedule {
    bool adversarial = false;
    bool concurrent = false;  // (not with adversarial: its hidden writes and stale memory assume one block at a time)
};

constexpr int kMaxResident = 8;  // blocks side by side in the concurrent schedule

// Bytes an earlier kernel wrote that a programmatic dependent launch may still see before its
// wait_for_previous_kernel(): each block starts on `before`, and the bytes of then (`now`) are put
// back once its threads all wait (or, if some wait at a __syncthreads instead, once none can run).
struct StaleBytes {
    unsigned char* at;
    std::vector<unsigned char> before, now;
};

// What one block wrote that the grid's other blocks may not see yet (the adversarial schedule):
// on a GPU a block's writes reach another block for certain only after a __threadfence() of the
// writer's (or at the kernel's end), an atomic's at once; a merge that skips the fence may read
// the partials as they were. While a block runs, the buffers' pages are read-only: the first write
// to one faults, and launch.cpp's handler keeps the page as the other blocks see it (`seen`) and
// makes it writable. A fence (here any thread's: the adversarial schedule runs one thread at a
// time between barriers) makes the pages written so far seen as they are. At the block's end each
// byte written since its last fence, but not by an atomic, is put back as seen and kept in
// `later`, written when the kernel ends. (What a reader's missing fence could
// still let it see from its L1 is not modelled: the merges read partials with __ldcg, from L2.)
struct HiddenWrites {
    bool on = false;                                           // for this launch
    std::vector<std::pair<unsigned char*, size_t>> buffers;    // page-aligned ranges
    std::map<unsigned char*, std::vector<unsigned char>> seen; // page -> what the other blocks see
    std::vector<unsigned char*> written;                       // pages written since the last fence
    std::vector<std::pair<unsigned char*, size_t>> atomics;    // the words this block's atomics wrote
    std::vector<std::pair<unsigned char*, std::vector<unsigned char>>> later;
};

// A block resident now: its threads, its barrier, its warps' and its copies; and, while another
// block runs (the concurrent schedule), its __shared__ variables.
struct Block {
    std::vector<Fiber> fibers;
    std::vector<CopyQueue> copies;
    std::vector<Warp> warps = std::vector<Warp>(kMaxThreads / kWarp);
    Meeting meeting;
    uint3 index{0, 0, 0};
    unsigned left = 0;     // threads still running
    bool backwards = true; // the adversarial schedule's direction this round
    std::vector<unsigned char> shared;  // its __shared__ bytes while another block's are in place (empty: none yet)
};

inline jmp_buf scheduler;
inline std::vector<Block> resident(kMaxResident);
inline Block* block = &resident[0];                      // the block running now
inline Block* shared_owner = nullptr;                    // whose __shared__ bytes are in place
inline std::vector<std::pair<unsigned char*, size_t>> shared_memory;  // the running kernel's __shared__ statics
inline bool waits_in_vain = false;  // for this launch: every thread left waits, none can end another's wait
inline unsigned long long polls_not_ready = 0;  // over all launches (a test's proof that tasks waited)
inline const std::function<void()>* running_kernel = nullptr;
inline Schedule schedule;
inline std::vector<StaleBytes> stale;  // for the next launch only
inline HiddenWrites hidden;            // its buffers for the next launch only
inline size_t first_block = 0;         // for the next launch only: the blocks before it not run
inline Meeting previous_kernel;        // the threads waiting in wait_for_previous_kernel()
inline bool previous_done = true;      // this block's stale bytes put back
inline uint3 grid_dim{1, 1, 1}, block_dim{1, 1, 1}, block_index{0, 0, 0}, thread_index{0, 0, 0};

inline size_t page_bytes() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

inline unsigned char* page_start(const void* address) {  // of the page holding address
    const auto a = reinterpret_cast<uintptr_t>(address);
    return reinterpret_cast<unsigned char*>(a - a % page_bytes());
}

inline bool written_since_fence(const unsigned char* page) {
    return std::find(hidden.written.begin(), hidden.written.end(), page) != hidden.written.end();
}

inline void protect_buffers(int protection) {
    for (auto [at, size] : hidden.buffers) mprotect(at, size, protection);
}

// launch.cpp's fault handler: a block's first write to a page since the last fence (true), or
// an access outside the buffers (false).
inline bool note_page_written(const void* address) {
    const auto* a = static_cast<const unsigned char*>(address);
    if (!hidden.on) return false;
    for (auto [at, size] : hidden.buffers) {
        if (a < at || a >= at + size) continue;
        unsigned char* page = page_start(a);
        if (written_since_fence(page)) return false;
        if (!hidden.seen.count(page)) hidden.seen[page].assign(page, page + page_bytes());
        hidden.written.push_back(page);
        mprotect(page, page_bytes(), PROT_READ | PROT_WRITE);
        return true;
    }
    return false;
}

inline void fence_writes() {  // __threadfence(): what the block wrote, seen
    for (unsigned char* page : hidden.written) {
        std::memcpy(hidden.seen[page].data(), page, page_bytes());
        mprotect(page, page_bytes(), PROT_READ);
    }
    hidden.written.clear();
}

inline void note_atomic(void* address, size_t size) {
    if (hidden.on) hidden.atomics.push_back({static_cast<unsigned char*>(address), size});
}

inline void hide_unfenced_writes() {  // at a block's end
    const auto atomic = [](const unsigned char* byte) {
        for (auto [at, size] : hidden.atomics) {
            if (byte >= at && byte < at + size) return true;
        }
        return false;
    };
    for (unsigned char* page : hidden.written) {
        const std::vector<unsigned char>& seen = hidden.seen[page];
        for (size_t i = 0; i < page_bytes();) {
            size_t end = i;
            while (end < page_bytes() && page[end] != seen[end] && !atomic(page + end)) ++end;
            if (end == i) {
                ++i;
                continue;
            }
            hidden.later.push_back({page + i, {page + i, page + end}});
            std::memcpy(page + i, seen.data() + i, end - i);
            i = end;
        }
        mprotect(page, page_bytes(), PROT_READ);
    }
    hidden.written.clear();
    hidden.seen.clear();
    hidden.atomics.clear();
}

// Bytes the emulation itself puts in place while a block runs (the stale memory's swaps below):
// not the block's writes, so seen by every block as they are.
inline void put_bytes(unsigned char* at, const unsigned char* from, size_t size) {
    if (!hidden.on || size == 0) {
        std::memcpy(at, from, size);
        return;
    }
    const size_t page = page_bytes();
    unsigned char* first = page_start(at);
    const size_t span = page_start(at + size - 1) + page - first;
    mprotect(first, span, PROT_READ | PROT_WRITE);
    std::memcpy(at, from, size);
    for (unsigned char* p = first; p < first + span; p += page) {
        const auto kept = hidden.seen.find(p);
        if (kept != hidden.seen.end()) {
            const size_t begin = std::max(p, at) - p, end = std::min(p + page, at + size) - p;
            std::memcpy(kept->second.data() + begin, p + begin, end - begin);
        }
        if (!written_since_fence(p)) mprotect(p, page, PROT_READ);
    }
}

// At a launch's end, or a failed one's (launch.cpp): every hidden write lands, and what was set
// for that launch only (its stale memory, its buffers, its first block) is dropped.
inline void end_launch() {
    if (hidden.on) {
        protect_buffers(PROT_READ | PROT_WRITE);
        for (const auto& [at, bytes] : hidden.later) std::memcpy(at, bytes.data(), bytes.size());
    }
    hidden = HiddenWrites{};
    stale.clear();
    first_block = 0;
}

inline int lane() { return static_cast<int>(thread_index.x) % kWarp; }
inline Warp& warp() { return block->warps[thread_index.x / kWarp]; }
inline Fiber& current() { return block->fibers[thread_index.x]; }

inline void release(Meeting& m) {
    m.arrived = 0;
    ++m.phase;
}

inline void wait(Meeting& m) {
    if (++m.arrived == m.party) {
        release(m);
        return;
    }
    Fiber& self = current();
    self.waiting = &m;
    self.phase = m.phase;
    if (_setjmp(self.resume) == 0) _longjmp(scheduler, 1);
}

inline void leave(Meeting& m) {  // an exited GPU thread no longer counts for __syncthreads
    if (--m.party > 0 && m.arrived == m.party) release(m);
}

inline void finish_previous_kernel() {
    if (previous_done) return;
    for (auto& s : stale) put_bytes(s.at, s.now.data(), s.now.size());
    previous_done = true;
    release(previous_kernel);
}

inline void start_on_stale_bytes() {
    previous_done = stale.empty();
    previous_kernel = Meeting{block->meeting.party};
    for (auto& s : stale) {
        std::memcpy(s.now.data(), s.at, s.now.size());
        put_bytes(s.at, s.before.data(), s.before.size());
    }
}

inline void wait_for_previous() {
    if (previous_done) return;
    Meeting& m = previous_kernel;
    if (m.arrived + 1 == m.party) {
        finish_previous_kernel();
        return;
    }
    wait(m);
}

inline void fiber_main() {
    (*running_kernel)();
    current().done = true;
    leave(warp().meet);
    leave(block->meeting);
    if (!previous_done && --previous_kernel.party > 0 && previous_kernel.arrived == previous_kernel.party) {
        finish_previous_kernel();
    }
    _longjmp(scheduler, 1);  // (never returns: its stack is made anew for the next block)
}

// Every lane's value, to every lane (then what each collective makes of them).
template <typename T>
std::vector<T> gather(const T& value) {
    static_assert(sizeof(T) <= kSlotBytes && std::is_trivially_copyable_v<T>, "a warp slot holds 64 bytes");
    Warp& w = warp();
    std::memcpy(w.slot[lane()], &value, sizeof(T));
    wait(w.meet);
    std::vector<T> all(kWarp);
    for (int i = 0; i < kWarp; ++i) std::memcpy(&all[i], w.slot[i], sizeof(T));
    wait(w.meet);  // the slots are rewritten by the next collective
    return all;
}

// Block b running, its __shared__ bytes in place: in the concurrent schedule the block whose bytes
// were in place keeps them aside, and b's kept ones come back (a block that has none yet starts on
// what is there, as one block after another does).
inline void switch_to(Block& b) {
    block = &b;
    block_index = b.index;
    if (shared_owner == &b) return;
    if (shared_owner != nullptr) {
        auto& kept = shared_owner->shared;
        kept.clear();
        for (auto [at, size] : shared_memory) kept.insert(kept.end(), at, at + size);
    }
    if (!b.shared.empty()) {
        const unsigned char* from = b.shared.data();
        for (auto [at, size] : shared_memory) {
            std::memcpy(at, from, size);
            from += size;
        }
    }
    shared_owner = &b;
}

// Block `index` of the grid into the free slot b, its threads fibers not yet started.
inline void start_block(Block& b, size_t index, dim3 grid, unsigned threads) {
    b.index = {static_cast<unsigned>(index % grid.x), static_cast<unsigned>(index / grid.x % grid.y),
               static_cast<unsigned>(index / grid.x / grid.y)};
    b.meeting = Meeting{static_cast<int>(threads)};
    for (unsigned w = 0; w * kWarp < threads; ++w) {
        b.warps[w].meet = Meeting{static_cast<int>(std::min<unsigned>(kWarp, threads - w * kWarp))};
    }
    if (b.fibers.size() < threads) b.fibers.resize(threads);  // (no fiber of a free slot's is running)
    b.copies.assign(threads, CopyQueue{});
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = b.fibers[t];
        f.waiting = nullptr;
        f.done = f.started = f.polling = false;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.get();
        f.context.uc_stack.ss_size = kStackBytes;
        f.context.uc_link = nullptr;
        makecontext(&f.context, fiber_main, 0);
    }
    b.left = threads;
    b.backwards = true;
    b.shared.clear();
    switch_to(b);
    start_on_stale_bytes();
}

// Thread t of the running block, until it waits or returns. Whether it got anywhere: false if it
// could not run (done, or at a barrier not yet met), or if it only polled again a count that was
// not ready (emulated_wait_in_vain).
inline bool run_fiber(unsigned t) {
    Fiber& f = block->fibers[t];
    if (f.done || (f.waiting != nullptr && f.waiting->phase == f.phase)) return false;
    f.waiting = nullptr;
    const bool was_polling = f.polling;
    f.polling = false;
    thread_index = {t, 0, 0};
    if (_setjmp(scheduler) == 0) {
        if (!f.started) {
            f.started = true;
            setcontext(&f.context);
        }
        _longjmp(f.resume, 1);
    }
    if (f.done) --block->left;
    return !(was_polling && f.polling);
}

// One round of the running block's threads, each run until it waits; whether any got anywhere.
inline bool run_round(unsigned threads) {
    bool ran = false;
    if (!schedule.adversarial) {  // round robin over the fibers that can run
        for (unsigned t = 0; t < threads; ++t) ran |= run_fiber(t);
        return ran;
    }
    // a warp at a time, each as far as it goes (to a __syncthreads): from the last warp and lane in
    // one round, from the first in the next, so that of two warps racing between barriers each
    // runs ahead of the other in turn
    const bool backwards = block->backwards;
    block->backwards = !backwards;
    const unsigned warp_count = (threads + kWarp - 1) / kWarp;
    for (unsigned n = 0; n < warp_count; ++n) {
        const unsigned w = backwards ? warp_count - 1 - n : n;
        const unsigned first = w * kWarp, lanes = std::min(threads - first, static_cast<unsigned>(kWarp));
        for (bool again = true; again;) {
            again = false;
            for (unsigned l = 0; l < lanes; ++l) again |= run_fiber(first + (backwards ? lanes - 1 - l : l));
            ran |= again;
        }
    }
    return ran;
}

// kernel() for every block of the grid (1-D blocks of at most 1024 threads): one block at a time
// (blocks in reverse in the adversarial schedule), or, in the concurrent one, up to kMaxResident
// side by side, a few rounds of each in turn, the next block started as one ends.
inline void launch(dim3 grid, unsigned threads, const std::function<void()>& kernel) {
    if (threads == 0 || threads > kMaxThreads) throw std::runtime_error("a block of 1..1024 threads");
    if (schedule.concurrent && (schedule.adversarial || !stale.empty() || !hidden.buffers.empty())) {
        throw std::runtime_error("the concurrent schedule is not adversarial (one block at a time)");
    }
    grid_dim = {grid.x, grid.y, grid.z};
    block_dim = {threads, 1, 1};
    running_kernel = &kernel;
    const bool reversed = schedule.adversarial;
    hidden.on = reversed && !hidden.buffers.empty();
    if (hidden.on) protect_buffers(PROT_READ);
    const size_t blocks = static_cast<size_t>(grid.x) * grid.y * grid.z, first = std::min(first_block, blocks);
    const size_t slots = schedule.concurrent ? kMaxResident : 1;
    std::vector<Block*> running;  // in the order their rounds run
    uint64_t skew = 0x9E3779B97F4A7C15ull;  // (xorshift: every launch draws the same)
    shared_owner = nullptr;
    waits_in_vain = false;
    for (size_t started = 0;;) {
        while (running.size() < slots && started < blocks - first) {
            Block* b = &resident[0];
            while (std::find(running.begin(), running.end(), b) != running.end()) ++b;
            start_block(*b, reversed ? blocks - 1 - started : first + started, grid, threads);
            running.push_back(b);
            ++started;
        }
        if (running.empty()) break;
        bool ran = false;
        for (size_t r = 0; r < running.size();) {
            switch_to(*running[r]);
            // (concurrent: 1 to 4 rounds, drawn, so that blocks drift apart as SMs' do, not in lockstep)
            skew ^= skew << 13, skew ^= skew >> 7, skew ^= skew << 17;
            for (uint64_t n = slots > 1 ? 1 + skew % 4 : 1; n > 0 && block->left > 0; --n) ran |= run_round(threads);
            if (block->left > 0) {
                ++r;
                continue;
            }
            finish_previous_kernel();
            if (hidden.on) hide_unfenced_writes();
            running.erase(running.begin() + static_cast<std::ptrdiff_t>(r));
            ran = true;
        }
        if (ran) continue;
        // Every thread left waits. For the previous kernel: on a GPU it ends (the others wait at a
        // barrier, and would not wait for these). For another block's count: in vain, as none can
        // move it; such a wait gives up (grid_sync.cuh), flagged.
        const auto polling = [threads](const Block* b) {
            return std::any_of(b->fibers.begin(), b->fibers.begin() + threads,
                               [](const Fiber& f) { return !f.done && f.polling; });
        };
        if (previous_kernel.arrived > 0 && !previous_done) {
            finish_previous_kernel();
        } else if (!waits_in_vain && std::any_of(running.begin(), running.end(), polling)) {
            waits_in_vain = true;
        } else {
            throw std::runtime_error("every thread of the block waits: a barrier not all reach");
        }
    }
    end_launch();
}

// Kernels by name, each called with the driver API's argument array (pointers to the values).
using Launcher = std::function<void(dim3, unsigned, void**)>;

inline std::map<std::string, Launcher>& kernels() {
    static std::map<std::string, Launcher> registry;
    return registry;
}

template <typename... A, size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <typename... A>
bool add(const char* name, void (*kernel)(A...)) {
    kernels()[name] = [kernel](dim3 grid, unsigned threads, void** args) {
        launch(grid, threads, [&] { call(kernel, args, std::index_sequence_for<A...>{}); });
    };
    return true;
}

}  // namespace cuda_on_cpu

#define AWQ_EMULATE(name) static const bool awq_emulated_##name = cuda_on_cpu::add(#name, name);

#define threadIdx (cuda_on_cpu::thread_index)
#define blockIdx (cuda_on_cpu::block_index)
#define blockDim (cuda_on_cpu::block_dim)
#define gridDim (cuda_on_cpu::grid_dim)

inline void __syncthreads() { cuda_on_cpu::wait(cuda_on_cpu::block->meeting); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_on_cpu::wait(cuda_on_cpu::warp().meet); }
inline void __threadfence() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (cuda_on_cpu::hidden.on) cuda_on_cpu::fence_writes();
}

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) { return cuda_on_cpu::gather(v)[cuda_on_cpu::lane() ^ mask]; }

template <typename T>
T __shfl_sync(unsigned, T v, int src_lane) { return cuda_on_cpu::gather(v)[src_lane % cuda_on_cpu::kWarp]; }

template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
    const int from = cuda_on_cpu::lane() - static_cast<int>(delta);
    const auto all = cuda_on_cpu::gather(v);
    return from >= 0 ? all[from] : v;
}

inline unsigned __ballot_sync(unsigned, int predicate) {
    const auto all = cuda_on_cpu::gather(static_cast<unsigned>(predicate != 0));
    unsigned bits = 0;
    for (int i = 0; i < cuda_on_cpu::kWarp; ++i) bits |= all[i] << i;
    return bits;
}

inline unsigned __match_any_sync(unsigned, unsigned value) {
    const auto all = cuda_on_cpu::gather(value);
    unsigned bits = 0;
    for (int i = 0; i < cuda_on_cpu::kWarp; ++i) bits |= static_cast<unsigned>(all[i] == value) << i;
    return bits;
}

// __hfma2 is device-only in cuda_fp16.h: in double (exact), one rounding to fp16.
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
    const auto fma = [](float x, float y, float z) { return static_cast<float>(static_cast<double>(x) * y + z); };
    return __floats2half2_rn(fma(__low2float(a), __low2float(b), __low2float(c)),
                             fma(__high2float(a), __high2float(b), __high2float(c)));
}

// (seen by every block at once: cuda_on_cpu::HiddenWrites)
template <typename T>
T atomicAdd(T* address, T value) {
    cuda_on_cpu::note_atomic(address, sizeof(T));
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicOr(T* address, T value) {
    cuda_on_cpu::note_atomic(address, sizeof(T));
    return __atomic_fetch_or(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicExch(T* address, T value) {
    cuda_on_cpu::note_atomic(address, sizeof(T));
    return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST);
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

// The cached loads: a plain load, its alignment checked here so that a misaligned one is reported
// at the kernel's line (the -fsanitize check inside would name this one).
template <typename T>
__attribute__((no_sanitize("alignment"))) T checked_load(const T* p, const std::source_location& at) {
    if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
        cpu_undefined(at.file_name(), at.line(), at.column(),
                      "a misaligned access (the GPU faults: misaligned address)");
    }
    return *p;
}
template <typename T>
T __ldg(const T* p, const std::source_location& at = std::source_location::current()) { return checked_load(p, at); }
template <typename T>
T __ldcs(const T* p, const std::source_location& at = std::source_location::current()) { return checked_load(p, at); }
template <typename T>
T __ldcg(const T* p, const std::source_location& at = std::source_location::current()) { return checked_load(p, at); }

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

using std::isnan;
using std::max;
using std::min;

namespace awq_edge {

// mma.sync.m16n8k16 (f32 += f16 x f16) over the warp's fragments, in the layouts mma.cuh gives.
inline void emulated_mma_16816(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    struct Fragments {
        uint32_t a[4], b[2];
    };
    const auto all = cuda_on_cpu::gather(Fragments{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}});
    float A[16][16], B[16][8];
    const auto halves = [](uint32_t r, float& low, float& high) {
        __half2 h;
        std::memcpy(&h, &r, 4);
        low = __low2float(h);
        high = __high2float(h);
    };
    for (int l = 0; l < cuda_on_cpu::kWarp; ++l) {
        const int g = l / 4, t = l % 4;
        halves(all[l].a[0], A[g][2 * t], A[g][2 * t + 1]);
        halves(all[l].a[1], A[g + 8][2 * t], A[g + 8][2 * t + 1]);
        halves(all[l].a[2], A[g][2 * t + 8], A[g][2 * t + 9]);
        halves(all[l].a[3], A[g + 8][2 * t + 8], A[g + 8][2 * t + 9]);
        halves(all[l].b[0], B[2 * t][g], B[2 * t + 1][g]);
        halves(all[l].b[1], B[2 * t + 8][g], B[2 * t + 9][g]);
    }
    const int g = cuda_on_cpu::lane() / 4, t = cuda_on_cpu::lane() % 4;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) sum += A[rows[i]][k] * B[k][cols[i]];
        acc[i] += sum;
    }
}

// cp.async (async_copy.cuh): queued per thread, landed in order at its wait.
inline void emulated_copy_async(void* to, const void* from, int size, bool valid) {
    cuda_on_cpu::PendingCopy copy{to, {}, size};
    if (valid) std::memcpy(copy.bytes, from, size);  // else zeros, as src-size 0 writes
    if (cuda_on_cpu::schedule.adversarial) {         // landed at once
        std::memcpy(to, copy.bytes, size);
        return;
    }
    cuda_on_cpu::block->copies[cuda_on_cpu::thread_index.x].open.push_back(copy);
}

inline void emulated_commit_copies() {
    auto& queue = cuda_on_cpu::block->copies[cuda_on_cpu::thread_index.x];
    queue.committed.push_back(std::move(queue.open));
    queue.open.clear();
}

inline void emulated_wait_copies(int newest_pending) {
    auto& queue = cuda_on_cpu::block->copies[cuda_on_cpu::thread_index.x];
    while (static_cast<int>(queue.committed.size()) > newest_pending) {
        for (const auto& copy : queue.committed.front()) std::memcpy(copy.to, copy.bytes, copy.size);
        queue.committed.erase(queue.committed.begin());
    }
}

inline void emulated_wait_for_previous_kernel() { cuda_on_cpu::wait_for_previous(); }

// A poll of another block's count that found it not ready (grid_sync.cuh poll_until): the thread
// waits while the other threads and blocks run. True once none can move it (cuda_on_cpu::launch:
// every thread left waits), so that the wait gives up, as a GPU's does after its second.
inline bool emulated_wait_in_vain() {
    cuda_on_cpu::Fiber& self = cuda_on_cpu::current();
    self.polling = true;
    ++cuda_on_cpu::polls_not_ready;
    if (_setjmp(self.resume) == 0) _longjmp(cuda_on_cpu::scheduler, 1);
    return cuda_on_cpu::waits_in_vain;
}

}  // namespace awq_edge
