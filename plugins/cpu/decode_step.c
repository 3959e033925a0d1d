/* decode_step: one decode token (S = 1) of the CPU engine in one call, ops as listed by Python.

   awq_edge/cpu_native.py turns awq_edge/decoder.py's op list (the one every native executor
   runs) into an array of cpu_op records over the ONNX Runtime engine's own weights, and calls
   this once per token: no graph runtime, no Python between the ops. The maths is the ORT
   graph's (export/graph.py), op for op:
     embed      h = table[id] (fp16 -> fp32) (* sqrt(hidden): Gemma)
     norm       out = x / rms(x) * w                          (RMSNormalization), or with a bias
                (x - mean) / std * w + b                      (LayerNormalization: Nemotron, StableLM)
     add_norm   residual += x; out = norm(residual)           (Skip[Simplified]LayerNormalization)
     linear     out = gemv_q4(x) (+ bias)                     (MatMulNBits, accuracy_level 4)
     head_norm  per-head RMSNorm of a slice of x, in place    (Qwen3, Gemma3 q/k norms)
     attention  RoPE (rotate_half) on q and k at `position`, k and v written into the layer's
                cache [Hkv, capacity, D] at that row (and into the step's bf16 copy of it, which
                it reads), softmax(q k^T * scale (soft-capped)) v over rows 0..position (the last
                `window` of them on sliding layers)                   (GroupQueryAttention)
     act        out = act(gate) * up of x = [gate | up]       (silu, or gelu tanh: FastGelu), or
                act(x) without a gate                       (relu^2: Arcee's; xIELU: Apertus's)
     lm_head    logits = gemv_q4(x) (+ Phi's bias, soft-capped); the top_k re-scored exactly from
                the fp16 table (the graph's TopK + Gather + Gemm)
   The linears, the attention heads and the lm_head's top-k are split over OpenMP threads; the
   rest is small. */
#include <math.h>
#include <string.h>

#include "cpu_ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static int omp_threads(void) {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

static int omp_thread(void) {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

static double wall_seconds(void) {
#ifdef _OPENMP
  return omp_get_wtime();
#else
  return 0.0;
#endif
}

void cpu_set_threads(int threads) {
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

/* fp16 -> fp32: the compiler's _Float16 (F16C on x86, a native type on Arm) where it has one. */
#ifdef __FLT16_MAX__
static inline float half_to_float(uint16_t h) {
  _Float16 f;
  memcpy(&f, &h, 2);
  return (float)f;
}
#else
static float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023;
  uint32_t bits;
  if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);  /* inf, nan */
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else { /* subnormal: renormalize */
    int e = -1;
    uint32_t m = man;
    do { e++; m <<= 1; } while (!(m & 1024));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 1023) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
#endif

/* Eight partial sums, so the compiler can use vector lanes without reordering one float sum. */
static inline float dot(const float *a, const float *b, int n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) part[j] += a[i + j] * b[i + j];
  float total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; i++) total += a[i] * b[i];
  return total;
}

/* Sixteen floats as one vector (GCC/Clang vector extensions: AVX-512, 2 x AVX, 4 x NEON). */
typedef float f32x16 __attribute__((vector_size(64)));
static inline f32x16 load16(const float *p) { f32x16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, f32x16 v) { memcpy(p, &v, sizeof v); }

/* RMSNorm, or with a bias LayerNorm (ORT's LayerNormalization: the variance of the centred values). */
static void norm(const float *x, const float *w, const float *bias, int n, float eps, float *out) {
  if (bias == NULL) {
    const float inv = 1.f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
    return;
  }
  float mean = 0.f, var = 0.f;
  for (int i = 0; i < n; i++) mean += x[i];
  mean /= (float)n;
  for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.f / sqrtf(var / (float)n + eps);
  for (int i = 0; i < n; i++) out[i] = (x[i] - mean) * inv * w[i] + bias[i];
}

/* e^x in float, branch-free so that loops of it vectorize (libm's expf does not, without
   -ffast-math): x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative
   error < 2e-7), times 2^n built in the exponent bits. The clamps are compares, not fminf (which
   GCC does not vectorize), and floorf vectorizes only under -fno-trapping-math (cpu_native.py). */
static inline float exp_approx(float x) {
  x = x < -87.f ? -87.f : x;
  x = x > 88.f ? 88.f : x;
  const float n = __builtin_floorf(x * 1.44269504f + 0.5f);
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  /* ln2 in two parts */
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const union { int32_t bits; float f; } scale = {.bits = ((int32_t)n + 127) << 23};
  return p * scale.f;
}

/* ln(y) for y >= 1 (softplus's 1 + e^x): y = f 2^e, f in [1, 2), ln f = 2 atanh(t), t = (f - 1) / (f + 1) <= 1/3,
   by its series to t^11 (relative error < 1e-7); no libm: see exp_approx. */
static inline float log_approx(float y) {
  const union { float f; int32_t bits; } in = {.f = y};
  const int e = ((in.bits >> 23) & 255) - 127;
  const union { int32_t bits; float f; } mant = {.bits = (in.bits & 0x007fffff) | 0x3f800000};
  const float t = (mant.f - 1.f) / (mant.f + 1.f), t2 = t * t;
  float p = 1.f / 11.f;
  p = p * t2 + 1.f / 9.f;
  p = p * t2 + 1.f / 7.f;
  p = p * t2 + 1.f / 5.f;
  p = p * t2 + 1.f / 3.f;
  p = p * t2 + 1.f;
  return (float)e * 0.693147181f + 2.f * t * p;
}

static inline float tanh_approx(float x) { /* 1 - 2 / (e^2x + 1): exact limits, abs error ~1e-7 */
  return 1.f - 2.f / (exp_approx(2.f * x) + 1.f);
}

/* erf(x) as Abramowitz and Stegun's 7.1.26 (absolute error < 1.5e-7, odd by construction): exact GELU's.
   No libm (erff): see exp_approx. */
static inline float erf_approx(float x) {
  const float a = x < 0.f ? -x : x, t = 1.f / (1.f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.f - p * t * exp_approx(-a * a);
  return x < 0.f ? -y : y;
}

static void rope(float *x, int heads, int D, const float *cos, const float *sin) {
  const int half = D / 2;
  for (int h = 0; h < heads; h++) {
    float *v = x + h * D;
    for (int i = 0; i < half; i++) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i] + a * sin[i];
    }
  }
}

/* ---------------------------------------------------------------- attention over the bf16 mirror

   The step reads the cache through its own copy, bf16 (a float32's top half, rounded to nearest
   even): half the bytes of ORT's float32 rows, which every token reads in full, and the widths
   that bf16 models were trained with. Keys are stored in tiles of KEY_BLOCK keys,
   [kv_heads, rows / KEY_BLOCK, D, KEY_BLOCK], so a tile's scores are one vector multiply-add per
   dimension (no horizontal sums) over 2 KiB - 8 KiB read in order; values are [kv_heads, rows, D].
   ORT's float32 cache stays the reference (its prefill reads it): the step writes both, and
   cpu_mirror_rows copies in the rows an ORT prefill wrote. */
enum { KEY_BLOCK = 32 };

/* The largest of x[0..n) (NaN never wins), and the sum in sixteen lanes: both vectorize. */
typedef int32_t i32x16 __attribute__((vector_size(64)));
static float max_of(const float *x, int n) {
  f32x16 lanes = {0.f};
  lanes -= INFINITY;
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const f32x16 v = load16(x + i);
    const i32x16 greater = v > lanes;
    lanes = (f32x16)(((i32x16)v & greater) | ((i32x16)lanes & ~greater));
  }
  float best = -INFINITY;
  for (int j = 0; j < 16; j++) best = lanes[j] > best ? lanes[j] : best;
  for (; i < n; i++) best = x[i] > best ? x[i] : best;
  return best;
}

static float sum_of(const float *x, int n) {
  f32x16 lanes = {0.f};
  int i = 0;
  for (; i + 16 <= n; i += 16) lanes += load16(x + i);
  float total = 0.f;
  for (int j = 0; j < 16; j++) total += lanes[j];
  for (; i < n; i++) total += x[i];
  return total;
}

static inline uint16_t to_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded); /* NaN stays NaN */
}

/* 16 bf16 -> 16 floats: each the 16 bits shifted to the top (integer lanes, every ISA). */
typedef uint32_t u32x16 __attribute__((vector_size(64)));
static inline f32x16 load_bf16x16(const uint16_t *p) {
  u32x16 u;
  for (int i = 0; i < 16; i++) u[i] = (uint32_t)p[i] << 16;
  f32x16 f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline size_t key_at(int rows, int g, int d, int t, int D) { /* the tiled key layout above */
  return (((size_t)g * (rows / KEY_BLOCK) + t / KEY_BLOCK) * D + d) * KEY_BLOCK + t % KEY_BLOCK;
}

static void mirror_row(const struct cpu_model *m, int layer, int g, int t, const float *k, const float *v) {
  const int D = m->head_dim, rows = m->mirror_rows;
  uint16_t *km = m->k_mirror[layer], *vm = m->v_mirror[layer] + ((size_t)g * rows + t) * D;
  for (int d = 0; d < D; d++) {
    km[key_at(rows, g, d, t, D)] = to_bf16(k[d]);
    vm[d] = to_bf16(v[d]);
  }
}

void cpu_mirror_rows(const struct cpu_model *m, int layers, int first, int count) {
  const int Hkv = m->kv_heads, D = m->head_dim, cap = m->max_context;
#pragma omp parallel for collapse(2) schedule(static)
  for (int layer = 0; layer < layers; layer++)
    for (int g = 0; g < Hkv; g++)
      for (int t = first; t < first + count; t++) {
        if (!m->k_cache[layer]) continue; /* (an LFM2 short convolution's layer: no KV) */
        const size_t at = ((size_t)g * cap + t) * D;
        mirror_row(m, layer, g, t, m->k_cache[layer] + at, m->v_cache[layer] + at);
      }
}

/* The scores of one key tile (KEY_BLOCK keys) for query heads qa and, if `two`, qb, into sa / sb.
   Eight independent sums (two heads x two 16-key halves x even / odd d) so that the
   multiply-adds overlap instead of waiting on each other; the bf16 tile is converted once for both. */
static inline __attribute__((always_inline)) void tile_scores(const uint16_t *tile, const float *qa, const float *qb,
                                                              float *sa, float *sb, const int two, const int D) {
  f32x16 a0 = {0.f}, a1 = {0.f}, a2 = {0.f}, a3 = {0.f}, b0 = {0.f}, b1 = {0.f}, b2 = {0.f}, b3 = {0.f};
  for (int d = 0; d < D; d += 2) {
    const f32x16 k0 = load_bf16x16(tile + d * KEY_BLOCK), k1 = load_bf16x16(tile + d * KEY_BLOCK + 16);
    const f32x16 k2 = load_bf16x16(tile + (d + 1) * KEY_BLOCK), k3 = load_bf16x16(tile + (d + 1) * KEY_BLOCK + 16);
    a0 += qa[d] * k0;
    a1 += qa[d] * k1;
    a2 += qa[d + 1] * k2;
    a3 += qa[d + 1] * k3;
    if (two) {
      b0 += qb[d] * k0;
      b1 += qb[d] * k1;
      b2 += qb[d + 1] * k2;
      b3 += qb[d + 1] * k3;
    }
  }
  store16(sa, a0 + a2);
  store16(sa + 16, a1 + a3);
  if (two) {
    store16(sb, b0 + b2);
    store16(sb + 16, b1 + b3);
  }
}

/* outa (and outb) [64 of D] += sum over rows t0..t1 of p[t] * V[t]: the probabilities pa / pb of
   two heads over the same value rows, eight independent sums. */
static inline __attribute__((always_inline)) void weighted_values(const uint16_t *values, int t0, int t1,
                                                                  const float *pa, const float *pb, float *outa,
                                                                  float *outb, const int two, const int D) {
  f32x16 a0 = load16(outa), a1 = load16(outa + 16), a2 = load16(outa + 32), a3 = load16(outa + 48);
  f32x16 b0 = {0.f}, b1 = {0.f}, b2 = {0.f}, b3 = {0.f};
  if (two) {
    b0 = load16(outb), b1 = load16(outb + 16), b2 = load16(outb + 32), b3 = load16(outb + 48);
  }
  for (int t = t0; t < t1; t++) {
    const uint16_t *v = values + (size_t)t * D;
    const f32x16 v0 = load_bf16x16(v), v1 = load_bf16x16(v + 16), v2 = load_bf16x16(v + 32), v3 = load_bf16x16(v + 48);
    a0 += pa[t] * v0;
    a1 += pa[t] * v1;
    a2 += pa[t] * v2;
    a3 += pa[t] * v3;
    if (two) {
      b0 += pb[t] * v0;
      b1 += pb[t] * v1;
      b2 += pb[t] * v2;
      b3 += pb[t] * v3;
    }
  }
  store16(outa, a0), store16(outa + 16, a1), store16(outa + 32, a2), store16(outa + 48, a3);
  if (two) store16(outb, b0), store16(outb + 16, b1), store16(outb + 32, b2), store16(outb + 48, b3);
}

/* weighted_values for the last `width` (16, 32 or 48) dimensions of a head whose size is not a
   multiple of 64 (80: EXAONE 3.5 2.4B; 96: Phi-3, 3.5-mini). */
static inline __attribute__((always_inline)) void weighted_values_tail(const uint16_t *values, int t0, int t1,
                                                                       const float *pa, const float *pb,
                                                                       float *outa, float *outb, const int two,
                                                                       const int D, const int width) {
  const f32x16 zero = {0.f};
  f32x16 a[3], b[3];
  for (int j = 0; j < width / 16; j++) {
    a[j] = load16(outa + 16 * j);
    b[j] = two ? load16(outb + 16 * j) : zero;
  }
  for (int t = t0; t < t1; t++)
    for (int j = 0; j < width / 16; j++) {
      const f32x16 v = load_bf16x16(values + (size_t)t * D + 16 * j);
      a[j] += pa[t] * v;
      if (two) b[j] += pb[t] * v;
    }
  for (int j = 0; j < width / 16; j++) {
    store16(outa + 16 * j, a[j]);
    if (two) store16(outb + 16 * j, b[j]);
  }
}

/* Query heads q[0..heads) of one KV head (its key tiles `keys`, value rows `values`) over rows
   first..position: scores tile by tile (heads two at a time, the tile in L1), softmax per head
   (normalized in place), then the weighted value rows in blocks, 64 dimensions at a time. */
static inline __attribute__((always_inline)) void attend_group(const float *q, int heads, const uint16_t *keys,
                                                               const uint16_t *values, int first, int position,
                                                               float scale, float softcap, const float *sinks,
                                                               float *scores, int cap, float *out, const int D) {
  for (int b = first / KEY_BLOCK; b <= position / KEY_BLOCK; b++) {
    const uint16_t *tile = keys + (size_t)b * D * KEY_BLOCK;
    const int t0 = b * KEY_BLOCK, lo = first > t0 ? first : t0;
    const int hi = position < t0 + KEY_BLOCK - 1 ? position : t0 + KEY_BLOCK - 1;
    for (int h = 0; h < heads; h += 2) {
      float s[2][KEY_BLOCK];
      const int two = h + 1 < heads;
      if (two) tile_scores(tile, q + h * D, q + (h + 1) * D, s[0], s[1], 1, D);
      else tile_scores(tile, q + h * D, NULL, s[0], NULL, 0, D);
      for (int i = 0; i <= two; i++)
        for (int t = lo; t <= hi; t++) scores[(size_t)(h + i) * cap + t] = s[i][t - t0] * scale;
    }
  }
  for (int h = 0; h < heads; h++) {
    float *score = scores + (size_t)h * cap;
    if (softcap > 0.f)
      for (int t = first; t <= position; t++) score[t] = softcap * tanh_approx(score[t] / softcap);
    /* a sink (gpt-oss's): one more logit in the denominator, no value's weight */
    float best = max_of(score + first, position + 1 - first);
    best = sinks && sinks[h] > best ? sinks[h] : best;
#pragma omp simd
    for (int t = first; t <= position; t++) score[t] = exp_approx(score[t] - best);
    const float inv = 1.f / (sum_of(score + first, position + 1 - first) + (sinks ? exp_approx(sinks[h] - best) : 0.f));
#pragma omp simd
    for (int t = first; t <= position; t++) score[t] *= inv;
    for (int i = 0; i < D; i++) out[h * D + i] = 0.f;
  }
  for (int t0 = first; t0 <= position; t0 += KEY_BLOCK) {
    const int t1 = position + 1 - t0 < KEY_BLOCK ? position + 1 : t0 + KEY_BLOCK;
    for (int h = 0; h < heads; h += 2)
      for (int c = 0; c < D; c += 64) {
        float *outa = out + h * D + c;
        const float *pa = scores + (size_t)h * cap;
        if (D - c < 64) {  /* 80, 96: the head's last 16 or 32 dimensions */
          if (h + 1 < heads) weighted_values_tail(values + c, t0, t1, pa, pa + cap, outa, outa + D, 1, D, D - c);
          else weighted_values_tail(values + c, t0, t1, pa, NULL, outa, NULL, 0, D, D - c);
        } else if (h + 1 < heads) weighted_values(values + c, t0, t1, pa, pa + cap, outa, outa + D, 1, D);
        else weighted_values(values + c, t0, t1, pa, NULL, outa, NULL, 0, D);
      }
  }
}

static void attention(const struct cpu_model *m, const struct cpu_op *op, int position) {
  const int H = m->heads, Hkv = m->kv_heads, D = m->head_dim, cap = m->max_context, rows = m->mirror_rows;
  float *q = op->x, *k = q + H * D, *v = k + Hkv * D;
  float *kc = m->k_cache[op->layer], *vc = m->v_cache[op->layer];
#pragma omp single
  {
    if (op->cos) {  /* (none: a rope op rotated q and k before their norms, Hunyuan's) */
      const float *cos = op->cos + (size_t)position * (D / 2), *sin = op->sin + (size_t)position * (D / 2);
      rope(q, H, D, cos, sin);
      rope(k, Hkv, D, cos, sin);
    }
    for (int g = 0; g < Hkv; g++) {
      memcpy(kc + ((size_t)g * cap + position) * D, k + g * D, sizeof(float) * D);
      memcpy(vc + ((size_t)g * cap + position) * D, v + g * D, sizeof(float) * D);
      mirror_row(m, op->layer, g, position, k + g * D, v + g * D);
    }
  }
  const int first = op->window > 0 && position - op->window + 1 > 0 ? position - op->window + 1 : 0;
  const int group = H / Hkv;
  /* Each thread takes a contiguous range of query heads (as `omp for schedule(static)` would) and
     runs it KV head by KV head, the heads of one group together. */
  const int threads = omp_threads(), thread = omp_thread();
  const int h_end = (int)((int64_t)H * (thread + 1) / threads);
  for (int h = (int)((int64_t)H * thread / threads); h < h_end;) {
    const int g = h / group, count = ((g + 1) * group < h_end ? (g + 1) * group : h_end) - h;
    const uint16_t *keys = m->k_mirror[op->layer] + (size_t)g * rows * D;
    const uint16_t *values = m->v_mirror[op->layer] + (size_t)g * rows * D;
    float *score = m->scores + (size_t)h * cap, *out = op->out + h * D;
    /* the head size as a constant in each (cpu_native.NATIVE_HEAD_DIMS): the loops over it unroll */
#define ATTEND_GROUP(SIZE) \
  attend_group(q + h * D, count, keys, values, first, position, op->scale, op->softcap, \
               op->sinks ? op->sinks + h : NULL, score, cap, out, SIZE)
    if (D == 64) ATTEND_GROUP(64);
    else if (D == 80) ATTEND_GROUP(80);
    else if (D == 96) ATTEND_GROUP(96);
    else if (D == 128) ATTEND_GROUP(128);
    else ATTEND_GROUP(256);
#undef ATTEND_GROUP
    h += count;
  }
#pragma omp barrier
}

/* A linear's (or lm_head's) input, in the order its levels are stored, quantized into m->x8. */
static void quantize_input(const struct cpu_model *m, const struct cpu_op *op) {
  const float *x = op->x;
  if (op->order) { /* GPTQ act-order: the columns sorted by group (cpu_native checked it is a permutation) */
    for (int i = 0; i < op->k; i++) m->x_ordered[i] = x[op->order[i]];
    x = m->x_ordered;
  }
  quantize_act_q8(x, op->k, op->group, m->x8, m->x_scale, m->x_sum);
}

/* Called by every thread of the step's parallel region (so are attention and lm_head). */
static void linear(const struct cpu_model *m, const struct cpu_op *op, int quantized) {
  if (!quantized) {
#pragma omp single
    quantize_input(m, op);
  }
  gemv_q4_rows(op->w0, op->w1, op->w2, op->n, op->k, op->group, m->x8, m->x_scale, m->x_sum, op->out);
  if (op->bias) {
#pragma omp single
    for (int i = 0; i < op->n; i++) op->out[i] += op->bias[i];
  }
}

static void act(const struct cpu_op *op) {
  const int n = op->n, kind = op->kind_arg & ~ACT_UNGATED;
  const float *gate = op->x;
  float *out = op->out;
  if (kind == ACT_SILU) {
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = gate[i] / (1.f + exp_approx(-gate[i]));
  } else if (kind == ACT_RELU2) {
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = gate[i] > 0.f ? gate[i] * gate[i] : 0.f;
  } else if (kind == ACT_RELU) {
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = gate[i] > 0.f ? gate[i] : 0.f;
  } else if (kind == ACT_XIELU) { /* Apertus: x > 0: a_p x^2 + beta x; else (e^min(x, eps) - 1 - x) a_n + beta x */
    const float a_p = op->w_norm[0], a_n = op->w_norm[1], beta = op->w_norm[2], eps = op->w_norm[3];
#pragma omp simd
    for (int i = 0; i < n; i++) {
      const float g = gate[i], m = g < eps ? g : eps;
      out[i] = g > 0.f ? a_p * g * g + beta * g : (exp_approx(m) - 1.f - g) * a_n + beta * g;
    }
  } else if (kind == ACT_GELU) { /* exact: 0.5 x (1 + erf(x / sqrt(2))) */
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = 0.5f * gate[i] * (1.f + erf_approx(gate[i] * 0.7071067811865476f));
  } else {
#pragma omp simd
    for (int i = 0; i < n; i++) {
      const float g = gate[i];
      out[i] = 0.5f * g * (1.f + tanh_approx(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    }
  }
  if (!(op->kind_arg & ACT_UNGATED)) {
    const float *up = op->x + n;
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] *= up[i];
  }
}

/* A mixture of experts (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, Granite MoE, LFM2-MoE, gpt-oss): the router's
   softmax over the experts (LFM2-MoE's: each logit's sigmoid, chosen by it plus the expert's bias; gpt-oss's logits
   biased), its top_k (the first of equal ones; a NaN never chosen over a number), each one's gate/up then
   act(gate) * up (gpt-oss's: biased, clamped SwiGLU) then down, weighted; Qwen2-MoE's shared expert added last.
   Called by every thread: the GEMVs share their rows out; the small steps run in `single`s. */
static void moe(const struct cpu_model *m, const struct cpu_op *op, int quantized) {
  const int width = op->n, K = op->k, G = op->group, top = op->top_k, experts = op->experts;
  const size_t in_blocks = (K + G - 1) / G, out_blocks = (width + G - 1) / G;
  float *gate_up = op->scratch, *act_in = gate_up + (size_t)top * 2 * width, *y = act_in + width;
  float *probs = y + K, *scores = probs + experts, *weights = scores + experts;  /* then the chosen's ids */
  int32_t *chosen = (int32_t *)(weights + top);
#pragma omp single
  {
    if (!quantized) quantize_input(m, op);
    float largest = -3.4e38f, total = 0.f;
    for (int e = 0; e < experts; e++) {
      probs[e] = dot(op->router + (size_t)e * K, op->x, K) + (op->bias ? op->bias[e] : 0.f);
      largest = probs[e] > largest ? probs[e] : largest;
    }
    for (int e = 0; e < experts; e++) {
      if (op->sigmoid) probs[e] = 1.f / (1.f + exp_approx(-probs[e]));
      else total += probs[e] = exp_approx(probs[e] - largest);
    }
    for (int e = 0; e < experts; e++) {  /* chosen by the scores: with LFM2-MoE's or ERNIE 4.5's expert biases */
      if (!op->sigmoid) probs[e] /= total;
      scores[e] = probs[e] + (op->expert_bias ? op->expert_bias[e] : 0.f);
    }
    float picked = 0.f;
    for (int c = 0; c < top; c++) {  /* top_k is small (8 of 128 at most in the families): a scan each */
      int best = -1;
      for (int e = 0; e < experts; e++)  /* (taken: -3.4e38; NaN compares false) */
        if (scores[e] > -3.4e38f && (best < 0 || scores[e] > scores[best])) best = e;
      if (best < 0) best = c;  /* (every score NaN: a broken router; any expert, in bounds) */
      chosen[c] = best;
      picked += weights[c] = probs[best];
      scores[best] = -3.4e38f;
    }
    for (int c = 0; c < top; c++) weights[c] = (op->normalize ? weights[c] / picked : weights[c]) * op->scale;
  }
  for (int c = 0; c < top; c++) {  /* every chosen expert's gate/up first: they all read x8 */
    const size_t e = chosen[c], rows = 2 * (size_t)width;
    gemv_q4_rows(op->w0 + e * rows * in_blocks * G / 2, op->w1 + e * rows * in_blocks,
                 op->w2 + e * rows * ((in_blocks + 1) / 2), 2 * width, K, G, m->x8, m->x_scale, m->x_sum,
                 gate_up + c * rows);
  }
  const float limit = op->swiglu_limit, alpha = op->swiglu_alpha;
  for (int c = 0; c < top; c++) {
    const size_t e = chosen[c];
#pragma omp single
    {
      float *pair = gate_up + (size_t)c * 2 * width;
      if (op->fc1_bias)
        for (int i = 0; i < 2 * width; i++) pair[i] += op->fc1_bias[e * 2 * width + i];
      if (limit > 0.f) {  /* gpt-oss's clamped SwiGLU (compares: no libm here) */
        for (int i = 0; i < width; i++) {
          const float g = pair[2 * i] < limit ? pair[2 * i] : limit;
          const float u = pair[2 * i + 1] < -limit ? -limit : pair[2 * i + 1] > limit ? limit : pair[2 * i + 1];
          act_in[i] = g / (1.f + exp_approx(-alpha * g)) * (u + 1.f);
        }
      } else {
        for (int i = 0; i < width; i++) act_in[i] = pair[2 * i] / (1.f + exp_approx(-pair[2 * i])) * pair[2 * i + 1];
      }
      quantize_act_q8(act_in, width, G, m->x8, m->x_scale, m->x_sum);
    }
    gemv_q4_rows(op->w3 + e * K * out_blocks * G / 2, op->w4 + e * K * out_blocks,
                 op->w5 + e * K * ((out_blocks + 1) / 2), K, width, G, m->x8, m->x_scale, m->x_sum, y);
#pragma omp single
    for (int i = 0; i < K; i++)
      op->out[i] = (c ? op->out[i] : 0.f) + weights[c] * (y[i] + (op->fc2_bias ? op->fc2_bias[e * K + i] : 0.f));
  }
  if (op->residual) {  /* Qwen2-MoE's shared expert */
#pragma omp single
    {
      const float gate = op->shared_gate ? 1.f / (1.f + exp_approx(-dot(op->shared_gate, op->x, K))) : 1.f;
      for (int i = 0; i < K; i++) op->out[i] += gate * op->residual[i];
    }
  }
}

/* Offer (id, v) to a min-heap of the k largest seen (size <= k entries): most values fail the
   first comparison. NaN never enters. */
static inline void heap_offer(int64_t *ids, float *vals, int *size, int k, int64_t id, float v) {
  if (*size == k && !(v > vals[0])) return;
  int pos;
  if (*size < k) { /* sift up */
    pos = (*size)++;
    while (pos > 0 && vals[(pos - 1) / 2] > v) { vals[pos] = vals[(pos - 1) / 2]; ids[pos] = ids[(pos - 1) / 2]; pos = (pos - 1) / 2; }
  } else { /* replace the root, sift down */
    pos = 0;
    for (;;) {
      int c = 2 * pos + 1;
      if (c >= k) break;
      if (c + 1 < k && vals[c + 1] < vals[c]) c++;
      if (!(vals[c] < v)) break;
      vals[pos] = vals[c]; ids[pos] = ids[c]; pos = c;
    }
  }
  vals[pos] = v;
  ids[pos] = id;
}

/* The top_k largest logits (any order) with their exact values from the fp16 table, into slot 0
   of top_ids / top_logits. Every thread of the region calls it: each keeps a heap of its share of
   the vocabulary in its own slot (1 + thread), one thread merges them, all re-score. */
static void top_k_exact(const struct cpu_model *m, const struct cpu_op *op) {
  float *logits = op->out;
  const int V = op->n, k = m->top_k, threads = omp_threads();
  const int parts = threads < m->top_slots ? threads : 1, part = omp_thread();
  if (op->softcap > 0.f) {
#pragma omp for schedule(static)
    for (int i = 0; i < V; i++) logits[i] = op->softcap * tanh_approx(logits[i] / op->softcap);
  }
  if (k <= 0) return;
  if (part < parts) {
    int64_t *ids = m->top_ids + (size_t)(1 + part) * k;
    float *vals = m->top_logits + (size_t)(1 + part) * k;
    int size = 0;
    for (int i = (int)((int64_t)V * part / parts); i < (int)((int64_t)V * (part + 1) / parts); i++)
      heap_offer(ids, vals, &size, k, i, logits[i]);
    for (int j = size; j < k; j++) { ids[j] = -1; vals[j] = -INFINITY; } /* empty places */
  }
#pragma omp barrier
#pragma omp single
  {
    int size = 0;
    for (int j = k; j < (1 + parts) * k; j++)
      if (m->top_ids[j] >= 0) heap_offer(m->top_ids, m->top_logits, &size, k, m->top_ids[j], m->top_logits[j]);
    for (int j = size; j < k; j++) { m->top_ids[j] = 0; m->top_logits[j] = logits[0]; } /* fewer than k real values */
  }
  const uint16_t *table = op->table;
  const int Hd = op->k;
#pragma omp for schedule(static)
  for (int j = 0; j < k; j++) {
    const uint16_t *row = table + (size_t)m->top_ids[j] * Hd;
    float s = 0.f;
    for (int i = 0; i < Hd; i++) s += half_to_float(row[i]) * op->x[i];
    if (op->bias) s += op->bias[m->top_ids[j]]; /* (Phi's head bias: linear() added it to every logit) */
    m->top_logits[j] = op->softcap > 0.f ? op->softcap * tanh_approx(s / op->softcap) : s;
  }
}

/* logits, then the top_k largest (any order) with their exact values from the fp16 table. */
static void lm_head(const struct cpu_model *m, const struct cpu_op *op, int quantized) {
  linear(m, op, quantized);
  top_k_exact(m, op);
}

/* LFM2's gated short convolution of one token at `position`: op->x holds B, C and x (n each); B * x
   goes into the layer's array (op->residual, row position + k - 1), then out = C * (the k taps over
   rows position .. position + k - 1, in order, + bias), as the graph's Mul and Add of each tap. */
static void short_conv(const struct cpu_op *op, int position) {
  const int n = op->n, k = op->k;
  float *rows = op->residual + (size_t)position * n;
  for (int j = 0; j < n; j++) rows[(size_t)(k - 1) * n + j] = op->x[j] * op->x[2 * n + j];
  for (int j = 0; j < n; j++) {
    float acc = 0.f;
    for (int t = 0; t < k; t++) acc += rows[(size_t)t * n + j] * op->w_norm[(size_t)j * k + t];
    if (op->bias) acc += op->bias[j];
    op->out[j] = op->x[n + j] * acc;
  }
}

/* LFM3's head gates: each head's head_dim values of op->out (the attention's output) times
   sigmoid(x . column h of w_norm [k, n]), x (k values) the attention's normed input: the graph's MatMul. */
static void head_gate(const struct cpu_model *m, const struct cpu_op *op) {
  for (int h = 0; h < op->n; h++) {
    float logit = 0.f;
    for (int i = 0; i < op->k; i++) logit += op->x[i] * op->w_norm[(size_t)i * op->n + h];
    const float gate = 1.f / (1.f + exp_approx(-logit));
    for (int d = 0; d < m->head_dim; d++) op->out[(size_t)h * m->head_dim + d] *= gate;
  }
}

/* A delta net's or Mamba-2's convolution of one token (struct cpu_op says the fields): one thread. */
static void delta_conv(const struct cpu_op *op) {
  const int n = op->n, k = op->k;
  for (int c = 0; c < n; c++) {
    const float x = op->x[c];
    float acc = op->bias ? op->bias[c] : 0.f;
    for (int j = 0; j < k - 1; j++) acc += op->w_norm[(size_t)c * k + j] * op->residual[(size_t)j * n + c];
    acc += op->w_norm[(size_t)c * k + k - 1] * x;
    for (int j = 0; j + 1 < k - 1; j++) op->residual[(size_t)j * n + c] = op->residual[(size_t)(j + 1) * n + c];
    op->residual[(size_t)(k - 2) * n + c] = x;
    op->x[c] = acc / (1.f + exp_approx(-acc));
  }
}

/* Qwen3.5's delta-net rule of one token, value head h: q and k of its key head L2-normed (q / sqrt(k_dim)), decay =
   exp(rate softplus(a . normed + dt_bias)), beta = sigmoid(b . normed); S = decay S; S += k (beta (v - S^T k))^T;
   o = S^T q, RMS-normed over the head, times w_norm and silu(z). Called by every thread: the heads shared out. */
static void delta_rule(const struct cpu_model *m, const struct cpu_op *op) {
  const int kh = op->k_heads, vh = op->v_heads, dk = op->k_dim, dv = op->v_dim, hidden = op->k;
  const int key_dim = kh * dk, conv_dim = 2 * key_dim + vh * dv;
#pragma omp for schedule(static)
  for (int h = 0; h < vh; h++) {
    const float *q = op->x + (h / (vh / kh)) * dk, *key = q + key_dim, *v = op->x + 2 * key_dim + h * dv;
    const float *z = op->x + conv_dim + h * dv;
    const float q_scale = 1.f / sqrtf(dot(q, q, dk) + 1e-6f) / sqrtf((float)dk);
    const float k_scale = 1.f / sqrtf(dot(key, key, dk) + 1e-6f);
    const float beta = 1.f / (1.f + exp_approx(-dot(op->delta_b + (size_t)h * hidden, op->normed, hidden)));
    const float pre = dot(op->delta_a + (size_t)h * hidden, op->normed, hidden) + op->dt_bias[h];
    const float decay = exp_approx(op->rate[h] * (pre > 20.f ? pre : log_approx(1.f + exp_approx(pre))));
    float *s = op->state + (size_t)h * dk * dv, *o = op->out + (size_t)h * dv;
    float delta[256];  /* (v_dim <= 256: decoder_spec refuses wider delta-net heads) */
    for (int j = 0; j < dv; j++) delta[j] = 0.f;  /* first (S decayed)^T k, then beta (v - that) */
    for (int i = 0; i < dk; i++) {
      const float ki = key[i] * k_scale * decay;
      for (int j = 0; j < dv; j++) delta[j] += s[(size_t)i * dv + j] * ki;
    }
    for (int j = 0; j < dv; j++) {
      delta[j] = (v[j] - delta[j]) * beta;
      o[j] = 0.f;
    }
    for (int i = 0; i < dk; i++) {  /* S updated row by row, S^T q gathered from the new rows in the same pass */
      const float ki = key[i] * k_scale, qi = q[i] * q_scale;
      float *row = s + (size_t)i * dv;
      for (int j = 0; j < dv; j++) {
        row[j] = row[j] * decay + ki * delta[j];
        o[j] += row[j] * qi;
      }
    }
    float total = 0.f;
    for (int j = 0; j < dv; j++) total += o[j] * o[j];
    const float inv = 1.f / sqrtf(total / (float)dv + m->eps);
    for (int j = 0; j < dv; j++) o[j] *= inv * op->w_norm[j] * z[j] / (1.f + exp_approx(-z[j]));
  }
}

/* A Mamba-2's rule of one token, value head h: dt = softplus(a . normed + dt_bias) within dt_min..dt_max, decay =
   exp(rate dt); S = decay S + B (dt x)^T; out = (S^T C + D x) silu(z), the group norm's input. Called by every
   thread: the heads shared out. */
static void mamba_rule(const struct cpu_op *op) {
  const int kh = op->k_heads, vh = op->v_heads, dk = op->k_dim, dv = op->v_dim, hidden = op->k;
  const int value_dim = vh * dv, key_dim = kh * dk;
#pragma omp for schedule(static)
  for (int h = 0; h < vh; h++) {
    const float *x = op->x + h * dv, *b = op->x + value_dim + (h / (vh / kh)) * dk, *c = b + key_dim;
    const float *z = op->x + 2 * key_dim + value_dim + h * dv;
    const float pre = dot(op->delta_a + (size_t)h * hidden, op->normed, hidden) + op->dt_bias[h];
    float dt = pre > 20.f ? pre : log_approx(1.f + exp_approx(pre));
    dt = dt < op->dt_min ? op->dt_min : dt > op->dt_max ? op->dt_max : dt;
    const float decay = exp_approx(op->rate[h] * dt);
    float *s = op->state + (size_t)h * dk * dv, *o = op->out + (size_t)h * dv;
    for (int j = 0; j < dv; j++) o[j] = 0.f;
    for (int i = 0; i < dk; i++) {  /* S updated row by row, S^T C gathered from the new rows in the same pass */
      const float bi = b[i], ci = c[i];
      float *row = s + (size_t)i * dv;
      for (int j = 0; j < dv; j++) {
        row[j] = row[j] * decay + bi * (dt * x[j]);
        o[j] += row[j] * ci;
      }
    }
    for (int j = 0; j < dv; j++) o[j] = (o[j] + op->skip[h] * x[j]) * z[j] / (1.f + exp_approx(-z[j]));
  }
}

/* The ops too small to share out: one thread runs each. */
static void small_op(const struct cpu_model *m, const struct cpu_op *op, int64_t token, int position) {
  switch (op->kind) {
    case OP_EMBED: {
      const uint16_t *row = (const uint16_t *)op->table + (size_t)token * op->n;
      for (int j = 0; j < op->n; j++) op->out[j] = half_to_float(row[j]) * (op->scale > 0.f ? op->scale : 1.f);
      if (op->positions)
        for (int j = 0; j < op->n; j++) op->out[j] += op->positions[(size_t)position * op->n + j];
      break;
    }
    case OP_NORM:
      norm(op->x, op->w_norm, op->bias, op->n, m->eps, op->out);
      break;
    case OP_ADD_NORM:
      for (int j = 0; j < op->n; j++) op->residual[j] += op->x[j];
      norm(op->residual, op->w_norm, op->bias, op->n, m->eps, op->out);
      break;
    case OP_ADD:  /* a post-norm block's residual add (OLMo 2) */
      for (int j = 0; j < op->n; j++) op->residual[j] += op->x[j];
      break;
    case OP_ROPE:  /* q's and k's heads (the first n of the q/k/v row) in place, before their norms (Hunyuan) */
      rope(op->x, op->n, m->head_dim, op->cos + (size_t)position * (m->head_dim / 2),
           op->sin + (size_t)position * (m->head_dim / 2));
      break;
    case OP_HEAD_NORM:  /* each head, or (OLMo 2) one as wide as all */
      for (int h = 0; h < op->n; h++) {
        float *x = op->x + op->offset + h * op->k;
        norm(x, op->w_norm, NULL, op->k, m->eps, x);
      }
      break;
    case OP_ACT:
      act(op);
      break;
    case OP_SHORT_CONV: /* LFM2: out = C * conv(B * x), the token's B * x stored at its position first */
      short_conv(op, position);
      break;
    case OP_DELTA_CONV: /* Qwen3.5, Granite 4.0-H: the convolution, its inputs before moved on */
      delta_conv(op);
      break;
    case OP_GROUP_NORM: /* Granite 4.0-H: the Mamba-2's gated norm, each of k parts of x normed in place */
      for (int g = 0; g < op->k; g++) {
        const int width = op->n / op->k;
        norm(op->x + g * width, op->w_norm + g * width, NULL, width, m->eps, op->x + g * width);
      }
      break;
    case OP_HEAD_GATE: /* LFM3: each head's output times its gate */
      head_gate(m, op);
      break;
    case OP_OUTPUT_GATE: /* AFMoE: each of the attention's outputs times the sigmoid of its gate */
      for (int j = 0; j < op->n; j++) op->out[j] /= 1.f + exp_approx(-op->x[j]);
      break;
    case OP_CLAMP: /* OLMo 1's clip_qkv: the q/k/v row into [-limit, limit] (compares: no libm here) */
      for (int j = 0; j < op->n; j++) op->x[j] = op->x[j] > op->scale ? op->scale
                                               : op->x[j] < -op->scale ? -op->scale : op->x[j];
      break;
  }
}

void decode_step(const struct cpu_model *m, const struct cpu_op *ops, int n_ops, int64_t token, int position,
                 double *op_seconds) {
  /* One parallel region for the whole step: the threads stay in it, and ops hand over at
     barriers (the end of each `omp for` / `omp single`) instead of a fork and join per op. A
     small op followed by a linear also quantizes that linear's input in its own `single`: one
     barrier fewer (every thread takes the same branches, so they agree on it). */
#pragma omp parallel
  {
    int quantized = 0;  /* this op's input was quantized by the op before */
    double last = op_seconds ? wall_seconds() : 0.0;
    for (int i = 0; i < n_ops; i++) {
      const struct cpu_op *op = &ops[i], *next = i + 1 < n_ops ? &ops[i + 1] : NULL;
      switch (op->kind) {
        case OP_LINEAR:
          linear(m, op, quantized);
          quantized = 0;
          break;
        case OP_ATTENTION:
          attention(m, op, position);
          break;
        case OP_LM_HEAD:
          lm_head(m, op, quantized);
          quantized = 0;
          break;
        case OP_MOE:
          moe(m, op, quantized);
          quantized = 0;
          break;
        case OP_DELTA_RULE:
          delta_rule(m, op);
          quantized = 0;
          break;
        case OP_MAMBA_RULE:
          mamba_rule(op);
          quantized = 0;
          break;
        default: {
          const int fold = next && (next->kind == OP_LINEAR || next->kind == OP_LM_HEAD || next->kind == OP_MOE);
#pragma omp single
          {
            small_op(m, op, token, position);
            if (fold) quantize_input(m, next);
          }
          quantized = fold;
        }
      }
      /* every op ends at a barrier, so thread 0's clock between two of them is the op's wall time */
      if (op_seconds && omp_thread() == 0) {
        const double now = wall_seconds();
        op_seconds[i] += now - last;
        last = now;
      }
    }
  }
}
