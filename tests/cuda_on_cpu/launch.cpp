// The entry point of the emulated kernels (emulate.h): run one by name, as cuLaunchKernel would.
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace {

bool in_kernel = false;  // a launch is running
sigjmp_buf fault_exit;
char fault_message[512] = "";
struct sigaction previous_segv_action;
// kernel -> the addresses and sizes of its file's __shared__ statics (cpu_shared_memory)
std::map<std::string, std::vector<std::pair<unsigned char*, size_t>>> shared_of;

// A kernel's access outside memory (EmulatedDriver's buffers end at a page no access may touch):
// the launch returns 3 with fault_message saying where. (A fault anywhere else goes to whoever
// handled the signal before: Python's faulthandler.)
void on_segmentation_fault(int signal, siginfo_t* info, void*) {
    if (in_kernel && cuda_on_cpu::note_page_written(info->si_addr)) return;  // (HiddenWrites; the write runs again)
    if (!in_kernel) {
        sigaction(SIGSEGV, &previous_segv_action, nullptr);  // (the access runs again, and faults to it)
        return;
    }
    std::snprintf(fault_message, sizeof fault_message,
                  "block (%u, %u, %u), thread %u: an access at %p outside every buffer (just before or past one?)",
                  blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, info->si_addr);
    siglongjmp(fault_exit, signal);
}

// Undefined behaviour in a kernel. The kernels are built with g++'s -fsanitize checks that stand
// for what fails on a GPU (native_helpers.build_emulated_kernels): a misaligned access (a float4,
// uint4 or half2 at an address not a multiple of its size: "misaligned address" on a GPU, fine on
// an x86), an index past a local array (the unrolled fragment arrays), a signed overflow or a shift
// past the bits (which nvcc may optimize on as g++ may), a float converted to an int it does not
// fit (a GPU saturates, an x86 does not). Each check calls one of the handlers below, which stand
// in for libubsan's: the launch returns 3 with fault_message saying which line of which kernel.
struct SourceLocation {
    const char* file;
    uint32_t line, column;
};
struct TypeDescriptor {
    uint16_t kind, info;
    char name[1];
};
struct Check {  // how every check's data begins
    SourceLocation at;
    const TypeDescriptor* type;
};
struct AccessCheck {
    SourceLocation at;
    const TypeDescriptor* type;
    unsigned char log_alignment, kind;
};

[[noreturn]] void undefined(const Check* check, const char* what) {
    char described[160];
    std::snprintf(described, sizeof described, "%s (%s)", what, check->type->name);
    cpu_undefined(check->at.file, check->at.line, check->at.column, described);
}

}  // namespace

extern "C" void cpu_undefined(const char* file, unsigned line, unsigned column, const char* what) {
    std::snprintf(fault_message, sizeof fault_message, "block (%u, %u, %u), thread %u: %s:%u:%u: %s", blockIdx.x,
                  blockIdx.y, blockIdx.z, threadIdx.x, file, line, column, what);
    if (!in_kernel) {
        std::fprintf(stderr, "%s\n", fault_message);
        std::abort();
    }
    siglongjmp(fault_exit, 1);
}

extern "C" {
void __ubsan_handle_type_mismatch_v1_abort(const AccessCheck* check, uintptr_t pointer) {
    const bool aligned = (pointer & ((uintptr_t{1} << check->log_alignment) - 1)) == 0;
    undefined(reinterpret_cast<const Check*>(check),
              pointer == 0 ? "an access through a null pointer"
              : !aligned   ? "a misaligned access (the GPU faults: misaligned address)"
                           : "an access to an object too small for its type");
}
void __ubsan_handle_out_of_bounds_abort(const Check* check, uintptr_t) { undefined(check, "an index out of bounds"); }
void __ubsan_handle_add_overflow_abort(const Check* check, uintptr_t, uintptr_t) {
    undefined(check, "a signed overflow in an addition");
}
void __ubsan_handle_sub_overflow_abort(const Check* check, uintptr_t, uintptr_t) {
    undefined(check, "a signed overflow in a subtraction");
}
void __ubsan_handle_mul_overflow_abort(const Check* check, uintptr_t, uintptr_t) {
    undefined(check, "a signed overflow in a multiplication");
}
void __ubsan_handle_negate_overflow_abort(const Check* check, uintptr_t) {
    undefined(check, "a signed overflow in a negation");
}
void __ubsan_handle_divrem_overflow_abort(const Check* check, uintptr_t, uintptr_t) {
    undefined(check, "an integer division by zero or overflow");
}
void __ubsan_handle_shift_out_of_bounds_abort(const Check* check, uintptr_t, uintptr_t) {
    undefined(check, "a shift by a negative count or past the bits");
}
void __ubsan_handle_load_invalid_value_abort(const Check* check, uintptr_t) {
    undefined(check, "a bool or enum load of a value it cannot hold");
}
void __ubsan_handle_float_cast_overflow_abort(const Check* check, uintptr_t) {
    undefined(check, "a float converted to an integer type it does not fit");
}
}

// Polls of another block's count that found it not ready, over all launches so far.
extern "C" unsigned long long cpu_polls_not_ready() { return cuda_on_cpu::polls_not_ready; }

// What the last launch that returned 3 touched.
extern "C" const char* cpu_fault() { return fault_message; }

extern "C" int cpu_launch(const char* name, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned threads,
                          void** args) {
    const auto found = cuda_on_cpu::kernels().find(name);
    if (found == cuda_on_cpu::kernels().end()) {
        std::fprintf(stderr, "no emulated kernel %s\n", name);
        return 1;
    }
    const auto shared = shared_of.find(name);
    if (cuda_on_cpu::schedule.concurrent && shared == shared_of.end()) {
        std::fprintf(stderr, "%s: its __shared__ statics are not known (cpu_shared_memory)\n", name);
        return 1;
    }
    cuda_on_cpu::shared_memory = shared != shared_of.end() ? shared->second : decltype(shared->second){};
    struct sigaction action = {};
    action.sa_sigaction = on_segmentation_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous_segv_action);
    in_kernel = true;
    // A fault or undefined behaviour jumps here (the block's fibers are left as they were: the
    // next launch makes new ones).
    if (sigsetjmp(fault_exit, 1) != 0) {
        in_kernel = false;
        sigaction(SIGSEGV, &previous_segv_action, nullptr);
        cuda_on_cpu::end_launch();
        return 3;
    }
    int status = 0;
    try {
        found->second(dim3(grid_x, grid_y, grid_z), threads, args);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: %s\n", name, e.what());
        status = 2;
    }
    in_kernel = false;
    sigaction(SIGSEGV, &previous_segv_action, nullptr);
    return status;
}

// The order the next launches run in (emulate.h, Schedule): 0 the plain one, 1 the adversarial
// one, 2 the concurrent one.
extern "C" void cpu_schedule(int schedule) {
    cuda_on_cpu::schedule.adversarial = schedule == 1;
    cuda_on_cpu::schedule.concurrent = schedule == 2;
}

// Where kernel's __shared__ statics are (those of its .cu file: `count` ranges at[i], size[i]
// bytes), which each block resident in the concurrent schedule keeps a copy of.
extern "C" void cpu_shared_memory(const char* kernel, int count, void** at, const size_t* size) {
    auto& ranges = shared_of[kernel];
    ranges.clear();
    for (int i = 0; i < count; ++i) ranges.push_back({static_cast<unsigned char*>(at[i]), size[i]});
}

// For the next launch only: run the grid's blocks from this (linear) index on, the ones before
// not at all (a test of a huge grid's last blocks: each block of these kernels stands alone).
extern "C" void cpu_first_block(unsigned long long first) { cuda_on_cpu::first_block = first; }

// For the next launch only: the buffers whose writes one block may hide from the others until a
// fence (emulate.h, HiddenWrites; the adversarial schedule only): `count` ranges (at[i], size[i]
// bytes), each widened to whole pages (EmulatedDriver's buffers each have pages of their own).
extern "C" void cpu_buffers(int count, void** at, const size_t* size) {
    cuda_on_cpu::hidden = cuda_on_cpu::HiddenWrites{};
    for (int i = 0; i < count; ++i) {
        unsigned char* first = cuda_on_cpu::page_start(at[i]);
        unsigned char* last = cuda_on_cpu::page_start(static_cast<unsigned char*>(at[i]) + size[i] - 1);
        cuda_on_cpu::hidden.buffers.push_back({first, static_cast<size_t>(last - first) + cuda_on_cpu::page_bytes()});
    }
}

// For the next launch only: `count` ranges (at[i], size[i] bytes) that its blocks see as
// before[i] until they wait for the previous kernel (emulate.h, StaleBytes).
extern "C" void cpu_stale_memory(int count, void** at, const size_t* size, void** before) {
    cuda_on_cpu::stale.clear();
    for (int i = 0; i < count; ++i) {
        auto* from = static_cast<unsigned char*>(before[i]);
        cuda_on_cpu::stale.push_back({static_cast<unsigned char*>(at[i]), {from, from + size[i]},
                                      std::vector<unsigned char>(size[i])});
    }
}
