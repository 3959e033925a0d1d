// The entry point of the emulated kernels (emulate.h): run one by name, as cuLaunchKernel would.
#include <csetjmp>
#include <csignal>
#include <cstdio>
#include <exception>

namespace {

bool in_kernel = false;  // a launch is running
sigjmp_buf fault_exit;
char fault_message[320] = "";
struct sigaction previous_segv_action;

// A kernel's access outside memory (EmulatedDriver's buffers end at a page no access may touch):
// the launch returns 3 with fault_message saying where. (A fault anywhere else goes to whoever
// handled the signal before: Python's faulthandler.)
void on_segmentation_fault(int signal, siginfo_t* info, void*) {
    if (!in_kernel) {
        sigaction(SIGSEGV, &previous_segv_action, nullptr);  // (the access runs again, and faults to it)
        return;
    }
    std::snprintf(fault_message, sizeof fault_message,
                  "block (%u, %u, %u), thread %u: an access at %p outside every buffer (just before or past one?)",
                  blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, info->si_addr);
    siglongjmp(fault_exit, signal);
}

}  // namespace

// What the last launch that returned 3 touched.
extern "C" const char* cpu_fault() { return fault_message; }

extern "C" int cpu_launch(const char* name, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned threads,
                          void** args) {
    const auto found = cuda_on_cpu::kernels().find(name);
    if (found == cuda_on_cpu::kernels().end()) {
        std::fprintf(stderr, "no emulated kernel %s\n", name);
        return 1;
    }
    struct sigaction action = {};
    action.sa_sigaction = on_segmentation_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous_segv_action);
    in_kernel = true;
    if (sigsetjmp(fault_exit, 1) != 0) {  // (the block's fibers are left as they were: the next launch makes new ones)
        in_kernel = false;
        sigaction(SIGSEGV, &previous_segv_action, nullptr);
        cuda_on_cpu::stale.clear();
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

// The order the next launches run in (emulate.h, Schedule): 0 the plain one, 1 the adversarial one.
extern "C" void cpu_schedule(int adversarial) { cuda_on_cpu::schedule.adversarial = adversarial != 0; }

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
