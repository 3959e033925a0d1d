// The entry point of the emulated kernels (emulate.h): run one by name, as cuLaunchKernel would.
#include <cstdio>
#include <exception>

extern "C" int cpu_launch(const char* name, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned threads,
                          void** args) {
    const auto found = cuda_on_cpu::kernels().find(name);
    if (found == cuda_on_cpu::kernels().end()) {
        std::fprintf(stderr, "no emulated kernel %s\n", name);
        return 1;
    }
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
