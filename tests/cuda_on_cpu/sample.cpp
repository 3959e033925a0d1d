// plugins/kernels/sample.cu's decode-step sampler on the CPU (emulate.h), for tests/test_kernels_on_cpu.py.
#include "sample.cu"

extern "C" void cpu_sample_step(const float* logits, int vocab, int32_t* seen, int32_t* n_seen, int seen_capacity,
                                float penalty, float temperature, int top_k, float top_p, const float* uniform,
                                float* work, int32_t* token, int threads) {
    cuda_on_cpu::launch(1, threads, [&] {
        awq_sample_step(logits, vocab, seen, n_seen, seen_capacity, penalty, temperature, top_k, top_p, uniform, work,
                        token);
    });
}
