// Shared int4 -> fp16 dequantization for the W4A16 kernels (plugins/README.md has the layout).
//
// One packed int32 word holds 8 consecutive k values of one output row. Nibble i
// (bits 4i..4i+3) holds k = AWQ_ORDER[i] with AWQ_ORDER = [0,2,4,6,1,3,5,7], so
//   nibbles 0 and 4 -> k0, k1      nibbles 1 and 5 -> k2, k3
//   nibbles 2 and 6 -> k4, k5      nibbles 3 and 7 -> k6, k7
// Masking the word with 0x000f000f keeps nibbles 0 and 4, which sit in the low bits of
// the two 16-bit halves: OR-ing in 0x6400 (fp16 1024.0, whose mantissa step is 1) makes
// each half the fp16 number 1024 + q. That is the "magic number" conversion: no integer
// to float instruction, and the pair lands in one half2 ready for half2 math.
// 0x00f000f0 keeps nibbles 1 and 5 as 1024 + 16q; shifting the word right by 8 brings
// nibbles 2/6 and 3/7 into the same places.
//
// Zero points are applied exactly: (1024 + q) - (1024 + z) and
// (1024 + 16q) / 16 - (64 + z) are both the integer q - z in -15..15, exact in fp16.
// Only the final (q - z) * scale rounds, once, to the nearest fp16, which is what
// awq_edge.packing.dequantize() gives when its float32 result is rounded to fp16.
//
// Everything here is __host__ __device__: the device path uses lop3/half2 instructions,
// the host path does the same bit manipulation with plain C++ so tests/test_plugin_layout.py
// can check the layout with g++ and no GPU. Both paths give bit-identical results.
#pragma once

#include <cstdint>
#include <cstring>
#include <cuda_fp16.h>

#if defined(__CUDACC__)
#define AWQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AWQ_HOST_DEVICE inline
#endif

namespace awq_edge {

constexpr uint32_t kLowNibblesMask = 0x000f000fu;   // nibbles 0 and 4 of a word
constexpr uint32_t kHighNibblesMask = 0x00f000f0u;  // nibbles 1 and 5 of a word
constexpr uint32_t kFp16Magic1024 = 0x64006400u;    // half2(1024.0, 1024.0)
constexpr int kValuesPerWord = 8;

// Reinterpret the bits of one trivially copyable type as another (compiles to nothing).
template <typename To, typename From>
AWQ_HOST_DEVICE To bit_cast(const From& from) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
    To to;
    memcpy(static_cast<void*>(&to), static_cast<const void*>(&from), sizeof(To));  // void*: fp16 types have user copy ops
    return to;
}

// (a & mask) | magic in one instruction on the GPU.
AWQ_HOST_DEVICE uint32_t and_or(uint32_t a, uint32_t mask, uint32_t magic) {
#if defined(__CUDA_ARCH__)
    uint32_t out;
    // lop3 truth table 0xEA = (A & B) | C with A=0xF0, B=0xCC, C=0xAA.
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(out) : "r"(a), "r"(mask), "r"(magic));
    return out;
#else
    return (a & mask) | magic;
#endif
}

// What one (output row, group) needs to dequantize its words; built once per group.
struct GroupParams {
    half2 scale;      // (s, s)
    half2 low_bias;   // (1024 + z, 1024 + z), subtracted from the 1024 + q halves
    half2 high_bias;  // (-(64 + z), -(64 + z)), added after scaling 1024 + 16q by 1/16
};

AWQ_HOST_DEVICE GroupParams make_group_params(half scale, half zero) {
    const float z = __half2float(zero);  // an integer 0..15: every value below is exact
    GroupParams p;
    p.scale = __halves2half2(scale, scale);
    p.low_bias = __float2half2_rn(1024.0f + z);
    p.high_bias = __float2half2_rn(-(64.0f + z));
    return p;
}

#if !defined(__CUDA_ARCH__)
// Host stand-ins for the three half2 operations below. Every intermediate is exact in
// float, so rounding the final product once gives the same fp16 as the device.
inline half2 host_sub(half2 a, half2 b) {
    return __floats2half2_rn(__low2float(a) - __low2float(b), __high2float(a) - __high2float(b));
}
inline half2 host_fma_sixteenth(half2 a, half2 c) {
    return __floats2half2_rn(__low2float(a) * 0.0625f + __low2float(c),
                             __high2float(a) * 0.0625f + __high2float(c));
}
inline half2 host_mul(half2 a, half2 b) {
    return __floats2half2_rn(__low2float(a) * __low2float(b), __high2float(a) * __high2float(b));
}
#endif

// One packed word -> 4 half2 of the centered levels q - z: (k0,k1) (k2,k3) (k4,k5) (k6,k7), each an
// integer in -15..15, exact in fp16 (the tensor-core GEMV multiplies these and scales the sums).
AWQ_HOST_DEVICE void centered_levels(uint32_t word, const GroupParams& p, half2 out[4]) {
    const uint32_t shifted = word >> 8;
    const half2 pair01 = bit_cast<half2>(and_or(word, kLowNibblesMask, kFp16Magic1024));
    const half2 pair23 = bit_cast<half2>(and_or(word, kHighNibblesMask, kFp16Magic1024));
    const half2 pair45 = bit_cast<half2>(and_or(shifted, kLowNibblesMask, kFp16Magic1024));
    const half2 pair67 = bit_cast<half2>(and_or(shifted, kHighNibblesMask, kFp16Magic1024));
#if defined(__CUDA_ARCH__)
    const half2 sixteenth = __float2half2_rn(0.0625f);
    out[0] = __hsub2(pair01, p.low_bias);
    out[1] = __hfma2(pair23, sixteenth, p.high_bias);
    out[2] = __hsub2(pair45, p.low_bias);
    out[3] = __hfma2(pair67, sixteenth, p.high_bias);
#else
    out[0] = host_sub(pair01, p.low_bias);
    out[1] = host_fma_sixteenth(pair23, p.high_bias);
    out[2] = host_sub(pair45, p.low_bias);
    out[3] = host_fma_sixteenth(pair67, p.high_bias);
#endif
}

// One packed word -> 4 half2: (k0,k1) (k2,k3) (k4,k5) (k6,k7), each (q - z) * s.
AWQ_HOST_DEVICE void dequant_word(uint32_t word, const GroupParams& p, half2 out[4]) {
    centered_levels(word, p, out);
    for (int i = 0; i < 4; ++i) {
#if defined(__CUDA_ARCH__)
        out[i] = __hmul2(out[i], p.scale);
#else
        out[i] = host_mul(out[i], p.scale);
#endif
    }
}

// Group of input column k (the last group may be short when G does not divide K).
AWQ_HOST_DEVICE int group_of(int k, int group_size) { return k / group_size; }

// Number of groups per output row: ceil(K / G).
AWQ_HOST_DEVICE int num_groups(int k_total, int group_size) { return (k_total + group_size - 1) / group_size; }

}  // namespace awq_edge
