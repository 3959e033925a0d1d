// Host-side layout check: dequantizes plugin-layout weights with the SAME helpers the
// kernels use (kernels/dequant.cuh, host path) so tests/test_plugin_layout.py can compare
// the result with awq_edge.packing.dequantize(). Built with g++, needs no GPU.
//
//   dequant_host_check IN OUT
// IN:  int32 N, K, G, then qweight int32 [N, K/8], scales fp16 [N, ceil(K/G)], zeros fp16 [N, ceil(K/G)]
// OUT: fp16 [N, K], w_hat = (q - z) * s rounded once to fp16
#include <cstdio>
#include <vector>

#include "dequant.cuh"

using awq_edge::GroupParams;

template <typename T>
static bool read_array(std::FILE* f, std::vector<T>& out, size_t count) {
    out.resize(count);
    return std::fread(out.data(), sizeof(T), count, f) == count;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
        return 2;
    }
    std::FILE* in = std::fopen(argv[1], "rb");
    if (!in) { std::perror(argv[1]); return 1; }
    int32_t dims[3];
    if (std::fread(dims, sizeof(int32_t), 3, in) != 3) { std::fprintf(stderr, "short header\n"); return 1; }
    const int N = dims[0], K = dims[1], G = dims[2];
    if (N <= 0 || K <= 0 || K % 8 != 0 || G <= 0 || G % 8 != 0) { std::fprintf(stderr, "bad N/K/G\n"); return 1; }
    const int words_per_row = K / awq_edge::kValuesPerWord;
    const int groups = awq_edge::num_groups(K, G);

    std::vector<uint32_t> qweight;
    std::vector<__half> scales, zeros;
    if (!read_array(in, qweight, size_t(N) * words_per_row) || !read_array(in, scales, size_t(N) * groups) ||
        !read_array(in, zeros, size_t(N) * groups)) {
        std::fprintf(stderr, "short input\n");
        return 1;
    }
    std::fclose(in);

    std::vector<__half> w_hat(size_t(N) * K);
    for (int n = 0; n < N; ++n) {
        for (int j = 0; j < words_per_row; ++j) {
            const int k0 = j * awq_edge::kValuesPerWord;
            const int g = awq_edge::group_of(k0, G);
            const GroupParams p = awq_edge::make_group_params(scales[size_t(n) * groups + g], zeros[size_t(n) * groups + g]);
            __half2 pairs[4];
            awq_edge::dequant_word(qweight[size_t(n) * words_per_row + j], p, pairs);
            for (int i = 0; i < 4; ++i) {  // pair i = columns k0 + 2i, k0 + 2i + 1
                w_hat[size_t(n) * K + k0 + 2 * i] = __low2half(pairs[i]);
                w_hat[size_t(n) * K + k0 + 2 * i + 1] = __high2half(pairs[i]);
            }
        }
    }

    std::FILE* out = std::fopen(argv[2], "wb");
    if (!out) { std::perror(argv[2]); return 1; }
    const bool ok = std::fwrite(w_hat.data(), sizeof(__half), w_hat.size(), out) == w_hat.size();
    std::fclose(out);
    return ok ? 0 : 1;
}
