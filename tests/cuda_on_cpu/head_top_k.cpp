// plugins/kernels/head_top_k.cu's kernels on the CPU (emulate.h), for tests/test_kernels_on_cpu.py.
#include "head_top_k.cu"

extern "C" void cpu_head_candidates(const float* logits, int vocab, int slice, int top_k, uint32_t* keys,
                                    int32_t* ids, int slices, int threads) {
    cuda_on_cpu::launch(slices, threads, [&] { awq_head_candidates(logits, vocab, slice, top_k, keys, ids); });
}

extern "C" void cpu_head_rescore(const uint32_t* keys, const int32_t* ids, int candidates, int top_k, const half* x,
                                 const half* table, int hidden, float softcap, float* logits, int blocks,
                                 int threads) {
    cuda_on_cpu::launch(blocks, threads, [&] {
        awq_head_rescore(keys, ids, candidates, top_k, x, table, hidden, softcap, logits);
    });
}
