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
