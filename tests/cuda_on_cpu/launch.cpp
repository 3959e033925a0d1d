// The entry point of the emulated kernels (emulate.h): run one by name, as cuLaunchKernel would.
#include <csignal>
#include <cstdio>
#include <exception>
#include <unistd.h>

namespace {

const char* running_name = "";
struct sigaction previous_segv_action;

// A kernel's access outside memory (EmulatedDriver's buffers end at a page no access may touch):
// say where, then hand the signal to whoever handled it before (Python's faulthandler: the stack).
void on_segmentation_fault(int, siginfo_t* info, void*) {
    char line[320];
    const int n = std::snprintf(line, sizeof line,
                                "\nemulated kernel %s, block (%u, %u, %u), thread %u: an access at %p outside "
                                "every buffer (past the end of one?)\n",
                                running_name, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, info->si_addr);
    if (n > 0) (void)!write(2, line, static_cast<size_t>(n));
    sigaction(SIGSEGV, &previous_segv_action, nullptr);  // (the access runs again, and faults to it)
}

}  // namespace

extern "C" int cpu_launch(const char* name, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned threads,
                          void** args) {
    const auto found = cuda_on_cpu::kernels().find(name);
    if (found == cuda_on_cpu::kernels().end()) {
        std::fprintf(stderr, "no emulated kernel %s\n", name);
        return 1;
    }
    static const bool handled = [] {
        struct sigaction action = {};
        action.sa_sigaction = on_segmentation_fault;
        action.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&action.sa_mask);
        return sigaction(SIGSEGV, &action, &previous_segv_action) == 0;
    }();
    (void)handled;
    running_name = found->first.c_str();
    try {
        found->second(dim3(grid_x, grid_y, grid_z), threads, args);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: %s\n", name, e.what());
        return 2;
    }
    return 0;
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
