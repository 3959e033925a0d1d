/* gemv_q4: one activation row times a 4-bit MatMulNBits weight (layout and maths: cpu_ops.h).

   A row is walked in steps of 64 (AVX-512), 32 (AVX2) or 16 (Arm) bytes. A step's int8 x uint4
   products are summed in int32 lanes, one SIMD path per ISA chosen at compile time (the library
   is built with -march=native on the machine that runs it):
     x86 AVX512-VNNI + AVX512BW    vpdpbusd on 64 bytes (128 weights) per step
     x86 AVX-VNNI / AVX512-VNNI    vpdpbusd on 32 bytes
     x86 AVX2                      vpmaddubsw + vpmaddwd on 32 bytes
     Arm dotprod (Armv8.2+)        sdot on 16 bytes
     anything else                 plain C
   then scaled by their block's s * sx into float lanes (lane i holds bytes 4i..4i+3, so one
   block per lane group), summed across lanes once per row. The zero point's share,
   s * sx * z * sum(x8) per block, is summed apart in scalar. Every path computes the same
   integers; the numpy twin is cpu_native.gemv_q4_reference. */
#include <math.h>
#include <string.h>

#include "cpu_ops.h"

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define STEP64 1
#endif

/* Software prefetch distance in bytes. Rows are read in order (a thread's rows are contiguous),
   so fetching 2 KiB ahead keeps more of DRAM's latency in flight than the hardware prefetcher
   alone (measured faster on the 2-core AMD VM than none or 4 KiB; benchmarks/cpu_native_gemv.py
   compares the result with ORT). Past the row it fetches the next one, which the thread reads next. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2048
#endif

/* Row byte j holds k = 2j (low nibble) and 2j + 1 (high): their activations' places in x8. */
static inline int evens_at(int j) { return 2 * (j & ~63) + (j & 63); }
static inline const int8_t *evens_for(const int8_t *x8, int j) { return x8 + evens_at(j); }
#define ODDS 64 /* odds_for(j) = evens_for(j) + ODDS */

/* Written for the vectorizer (it runs on one thread between two linears, 1-2 us at most): the
   block's max |x| as the max of the non-negative floats' bit patterns (an integer max, which
   vectorizes where fmaxf does not), rintf rounding (half to even, as lrintf), and each 128-k
   chunk's evens and odds written as two contiguous runs. */
void quantize_act_q8(const float *x, int K, int G, int8_t *x8, float *x_scale, int32_t *x_sum) {
  const int blocks = (K + G - 1) / G, bytes = Q8_ACT_BYTES(K, G);
  memset(x8, 0, (size_t)bytes);
  for (int blk = 0; blk < blocks; blk++) {
    const int start = blk * G, len = K - start < G ? K - start : G;
    uint32_t amax_bits = 0;
    for (int i = 0; i < len; i++) {
      uint32_t b;
      memcpy(&b, x + start + i, 4);
      b &= 0x7fffffffu;
      amax_bits = b > amax_bits ? b : amax_bits;
    }
    float amax;
    memcpy(&amax, &amax_bits, 4);
    const float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
    int32_t sum = 0;
    for (int k = start; k < start + len;) { /* one 128-k chunk's share of the block at a time */
      const int end = (k / 128 + 1) * 128 < start + len ? (k / 128 + 1) * 128 : start + len, pairs = (end - k) / 2;
      int8_t *evens = x8 + evens_at(k / 2), *odds = evens + ODDS;
      const float *xk = x + k;
      for (int i = 0; i < pairs; i++) {
        const int a = (int)rintf(xk[2 * i] * inv), b = (int)rintf(xk[2 * i + 1] * inv); /* |v| <= 127 */
        evens[i] = (int8_t)a;
        odds[i] = (int8_t)b;
        sum += a + b;
      }
      if ((end - k) & 1) { /* an odd K's last value */
        const int a = (int)rintf(xk[2 * pairs] * inv);
        evens[pairs] = (int8_t)a;
        sum += a;
      }
      k = end;
    }
    x_scale[blk] = scale;
    x_sum[blk] = sum;
  }
}

/* The products of one row in plain C, bytes [from, row_bytes): the reference path, and the
   tail a SIMD loop leaves. */
static inline __attribute__((always_inline)) float row_tail(const uint8_t *row, const float *s, const int8_t *x8,
                                                            const float *x_scale, int G, int from, int row_bytes) {
  float acc = 0.f;
  for (int j = from; j < row_bytes; j++) {
    const int blk = 2 * j / G;
    const int8_t *x = evens_for(x8, j);
    acc += s[blk] * x_scale[blk] * (float)((int32_t)(row[j] & 15) * x[0] + (int32_t)(row[j] >> 4) * x[ODDS]);
  }
  return acc;
}

#if defined(__AVX2__)
static inline __m256i dot32(const uint8_t *b, const int8_t *x) {
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i w = _mm256_loadu_si256((const __m256i *)b);
  const __m256i lo = _mm256_and_si256(w, low4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
  const __m256i xe = _mm256_loadu_si256((const __m256i *)x), xo = _mm256_loadu_si256((const __m256i *)(x + ODDS));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_add_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xe),  /* two chains, not one */
                          _mm256_dpbusd_epi32(_mm256_setzero_si256(), hi, xo));
#elif defined(__AVXVNNI__)
  return _mm256_add_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, xe),
                          _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), hi, xo));
#else  /* u8 * s8 pairs to int16 (2 * 15 * 127 fits), then pairs of int16 to int32 */
  const __m256i ones = _mm256_set1_epi16(1);
  return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, xe), ones),
                          _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xo), ones));
#endif
}

/* s * sx of the 8 lanes of the 32 bytes at row byte j (lane i: bytes j + 4i .. j + 4i + 3). */
static inline __m256 scale32(const float *s, const float *x_scale, int G, int j) {
  if (G >= 64) {
    const int blk = 2 * j / G;
    return _mm256_set1_ps(s[blk] * x_scale[blk]);
  }
  float lanes[8];
  for (int i = 0; i < 8; i++) {
    const int blk = (2 * j + 8 * i) / G;
    lanes[i] = s[blk] * x_scale[blk];
  }
  return _mm256_loadu_ps(lanes);
}

static inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

#ifdef STEP64
/* s * sx of the 16 lanes of the 64 bytes at row byte j (blocks of G = 128 or more: one; 64: two; 32: four). */
static inline __m512 scale64(const float *s, const float *x_scale, int G, int j) {
  if (G >= 128) {
    const int blk = 2 * j / G;
    return _mm512_set1_ps(s[blk] * x_scale[blk]);
  }
  const int first = 2 * j / G;
  __m128 a = G == 64 ? _mm_castpd_ps(_mm_load_sd((const double *)(s + first)))
                     : _mm_loadu_ps(s + first);  /* G = 32: four blocks (G = 16 does not get here) */
  __m128 b = G == 64 ? _mm_castpd_ps(_mm_load_sd((const double *)(x_scale + first))) : _mm_loadu_ps(x_scale + first);
  const __m512i lanes = G == 64 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_mul_ps(a, b)));
}
#endif

static inline __attribute__((always_inline)) float row_dot(const uint8_t *row, const float *s, const int8_t *x8,
                                                           const float *x_scale, int G, int row_bytes) {
  int j = 0;
  float total = 0.f;
#ifdef STEP64
  if (G >= 32) {
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512 acc = _mm512_setzero_ps();
    for (; j + 64 <= row_bytes; j += 64) {
      __builtin_prefetch(row + j + PREFETCH_AHEAD);
      const __m512i w = _mm512_loadu_si512(row + j);
      const __m512i lo = _mm512_and_si512(w, low4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
      const int8_t *x = evens_for(x8, j);
      const __m512i dot = _mm512_add_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(x)),
                                           _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, _mm512_loadu_si512(x + ODDS)));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale64(s, x_scale, G, j), acc);
    }
    total = _mm512_reduce_add_ps(acc);
  }
#endif
  __m256 acc = _mm256_setzero_ps();
  for (; j + 32 <= row_bytes; j += 32) {
    __builtin_prefetch(row + j + PREFETCH_AHEAD);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(row + j, evens_for(x8, j))), scale32(s, x_scale, G, j), acc);
  }
  return total + hsum(acc) + row_tail(row, s, x8, x_scale, G, j, row_bytes);
}

#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
static inline __attribute__((always_inline)) float row_dot(const uint8_t *row, const float *s, const int8_t *x8,
                                                           const float *x_scale, int G, int row_bytes) {
  const uint8x16_t low4 = vdupq_n_u8(15);
  float32x4_t acc = vdupq_n_f32(0.f);
  int j = 0;
  for (; j + 16 <= row_bytes && (G >= 32); j += 16) {  /* 16 bytes = 32 weights: one block when G >= 32 */
    __builtin_prefetch(row + j + PREFETCH_AHEAD);
    const uint8x16_t w = vld1q_u8(row + j);
    const int8_t *x = evens_for(x8, j);
    int32x4_t dot = vdotq_s32(vdupq_n_s32(0), vreinterpretq_s8_u8(vandq_u8(w, low4)), vld1q_s8(x));
    dot = vdotq_s32(dot, vreinterpretq_s8_u8(vshrq_n_u8(w, 4)), vld1q_s8(x + ODDS));
    const int blk = 2 * j / G;
    acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dot), s[blk] * x_scale[blk]);
  }
  return vaddvq_f32(acc) + row_tail(row, s, x8, x_scale, G, j, row_bytes);
}

#else
static inline __attribute__((always_inline)) float row_dot(const uint8_t *row, const float *s, const int8_t *x8,
                                                           const float *x_scale, int G, int row_bytes) {
  return row_tail(row, s, x8, x_scale, G, 0, row_bytes);
}
#endif

/* sum over blocks of s * sx * z * sum(x8): the zero point's share, (q - z) without touching q.
   Vectorized on x86 (16 or 8 blocks a step): for G = 32 there are as many blocks as steps. */
static inline __attribute__((always_inline)) float zero_share(const float *s, const uint8_t *zp, const float *x_scale,
                                                              const int32_t *x_sum, int blocks) {
  float share = 0.f;
  int blk = 0;
#if defined(__AVX2__)
  const __m128i low4 = _mm_set1_epi8(15);
  __m256 acc = _mm256_setzero_ps();
  for (; blk + 8 <= blocks; blk += 8) {  /* 4 bytes of zero points = 8 blocks */
    int32_t packed;
    memcpy(&packed, zp + blk / 2, 4);
    const __m128i b = _mm_cvtsi32_si128(packed);
    const __m128i z = _mm_unpacklo_epi8(_mm_and_si128(b, low4), _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    const __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z));
    const __m256 xs = _mm256_mul_ps(_mm256_loadu_ps(x_scale + blk),
                                    _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(x_sum + blk))));
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + blk), zf), xs, acc);
  }
  share = hsum(acc);
#endif
  for (; blk < blocks; blk++)
    share += s[blk] * x_scale[blk] * (float)(((zp[blk / 2] >> (4 * (blk % 2))) & 15) * x_sum[blk]);
  return share;
}

void gemv_q4_rows(const uint8_t *B, const float *scales, const uint8_t *zero_points, int N, int K, int G,
                  const int8_t *x8, const float *x_scale, const int32_t *x_sum, float *y) {
  const int blocks = (K + G - 1) / G, zp_bytes = (blocks + 1) / 2, row_bytes = blocks * G / 2;
#pragma omp for schedule(static)
  for (int n = 0; n < N; n++) {
    const uint8_t *row = B + (size_t)n * row_bytes, *zp = zero_points + (size_t)n * zp_bytes;
    const float *s = scales + (size_t)n * blocks;
    const float share = zero_share(s, zp, x_scale, x_sum, blocks);
    /* the usual block sizes as constants: divisions become shifts */
    const float dot = G == 128 ? row_dot(row, s, x8, x_scale, 128, row_bytes)
                    : G == 64  ? row_dot(row, s, x8, x_scale, 64, row_bytes)
                    : G == 32  ? row_dot(row, s, x8, x_scale, 32, row_bytes)
                               : row_dot(row, s, x8, x_scale, G, row_bytes);
    y[n] = dot - share;
  }
}

void gemv_q4(const uint8_t *B, const float *scales, const uint8_t *zero_points, int N, int K, int G,
             const int8_t *x8, const float *x_scale, const int32_t *x_sum, float *y) {
#pragma omp parallel
  gemv_q4_rows(B, scales, zero_points, N, K, G, x8, x_scale, x_sum, y);
}

void gemv_q4_chain(int count, const uint8_t *const *B, const float *const *scales, const uint8_t *const *zero_points,
                   const int *N, const int *K, const int *G, const float *x, float *y, int8_t *x8, float *x_scale,
                   int32_t *x_sum) {
#pragma omp parallel
  for (int i = 0; i < count; i++) {
#pragma omp single
    quantize_act_q8(x, K[i], G[i], x8, x_scale, x_sum);
    gemv_q4_rows(B[i], scales[i], zero_points[i], N[i], K[i], G[i], x8, x_scale, x_sum, y);
  }
}

const char *cpu_kernels_simd(void) {
#if defined(__AVX2__) && defined(STEP64)
  return "avx512-vnni";
#elif defined(__AVX2__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512vl-vnni (256-bit)";
#elif defined(__AVX2__) && defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
  return "neon-dotprod";
#else
  return "scalar";
#endif
}
