/* CPU kernels of the native decode step (awq_edge/cpu_native.py builds and loads them).

   Weights are read in ONNX Runtime's MatMulNBits layout, the one the CPU engine already stores
   (awq_edge/packing.py, to_matmul_nbits): so the native kernels and ORT share one format.
       B            uint8 [N, blocks, G/2]; byte b of a block: k = 2b in the LOW nibble, 2b + 1 HIGH
       scales       float32 [N, blocks]
       zero_points  uint8 [N, ceil(blocks / 2)]; block 2j in the low nibble of byte j, 2j + 1 high
   The last block of a ragged K is padded with q = its zero point, so it dequantizes to 0.

   Activations are quantized to int8 per block of G (symmetric, scale = max|x| / 127), like
   MatMulNBits with accuracy_level 4, and stored deinterleaved per chunk of 128 k: the 64 even k
   first, then the 64 odd k. Byte j of a row's 64-byte step holds k = 2j and 2j + 1 of the
   chunk in any block size, so its low nibbles meet the first half and its high nibbles the
   second half (one contiguous load each, of 64, 32 or 16 bytes: any SIMD width).

       y[n] = sum_blocks  sx * (s * dot(q, x8) - s * z * sum(x8))      exact in the integers
*/
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of x8 for K inputs at block size G: blocks * G rounded up to whole 128-chunks. */
#define Q8_ACT_BYTES(K, G) (((((K) + (G) - 1) / (G)) * (G) + 127) / 128 * 128)

/* x [K] float -> x8 [Q8_ACT_BYTES] int8 (deinterleaved per 128-chunk, zero padded past K),
   x_scale [blocks], x_sum [blocks] (sum of the block's int8 values). */
void quantize_act_q8(const float *x, int K, int G, int8_t *x8, float *x_scale, int32_t *x_sum);

/* y [N] = the MatMulNBits product of one quantized activation row; rows split over OpenMP threads. */
void gemv_q4(const uint8_t *B, const float *scales, const uint8_t *zero_points, int N, int K, int G,
             const int8_t *x8, const float *x_scale, const int32_t *x_sum, float *y);

/* The same, as an orphaned `omp for` over the rows: called by every thread of an enclosing
   parallel region (decode_step), it shares the rows out and ends with a barrier. */
void gemv_q4_rows(const uint8_t *B, const float *scales, const uint8_t *zero_points, int N, int K, int G,
                  const int8_t *x8, const float *x_scale, const int32_t *x_sum, float *y);

/* count products back to back, each of the same x [K[i]] (zero padded as needed) into y: one
   token's weights with no Python between them (benchmarks/cpu_native_gemv.py). x8, x_scale and
   x_sum are scratch for the largest K. */
void gemv_q4_chain(int count, const uint8_t *const *B, const float *const *scales, const uint8_t *const *zero_points,
                   const int *N, const int *K, const int *G, const float *x, float *y, int8_t *x8, float *x_scale,
                   int32_t *x_sum);

/* ---------------------------------------------------------------- the decode step (decode_step.c) */

enum cpu_op_kind { OP_EMBED = 1, OP_NORM, OP_ADD_NORM, OP_LINEAR, OP_HEAD_NORM, OP_ATTENTION, OP_ACT, OP_LM_HEAD,
                   OP_ADD, OP_ROPE, OP_SHORT_CONV, OP_CLAMP, OP_MOE, OP_HEAD_GATE, OP_OUTPUT_GATE, OP_DELTA_CONV,
                   OP_DELTA_RULE, OP_MAMBA_RULE, OP_GROUP_NORM };
/* ACT_UNGATED: a flag added */
enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_RELU2 = 2, ACT_XIELU = 3, ACT_GELU = 4, ACT_RELU = 5, ACT_UNGATED = 8 };

/* One op of the step; awq_edge/cpu_native.py (CpuOp) declares the same fields in the same order. */
struct cpu_op {
  int32_t kind;      /* cpu_op_kind */
  int32_t n;         /* outputs (linear, lm_head, act: I), width (norms, embed, add, short_conv, output_gate), heads
                        (head_norm, rope, head_gate), an expert's width (moe) */
  int32_t k;         /* inputs (linear, lm_head, moe, head_gate), a head's width (head_norm), the tokens a short_conv
                        reads */
  int32_t group;     /* the linear's block size */
  int32_t offset;    /* head_norm: first column */
  int32_t layer;     /* attention: which cache */
  int32_t window;    /* attention: sliding window, 0 = none */
  int32_t kind_arg;  /* act: ACT_SILU, ACT_GELU_TANH, ACT_RELU2, ACT_XIELU, ACT_GELU or ACT_RELU (+ ACT_UNGATED: no
                        up) */
  float scale;       /* attention: q k^T scale; embed: sqrt(hidden) or 0; clamp: its limit; moe: the chosen's
                        weights times this (LFM2-MoE's routed_scaling_factor) */
  float softcap;     /* attention scores, lm_head logits: cap * tanh(x / cap), 0 = none */
  float *x, *out, *residual;  /* short_conv: x its B, C, x side by side; residual its layer's B * x by position
                                 (ORT's array: row t + k - 1 is position t's, the first k - 1 rows zeros); moe:
                                 residual a shared expert's output, or NULL; output_gate: out (the attention's)
                                 times sigmoid(x), value by value */
  const uint8_t *w0;     /* MatMulNBits B */
  const float *w1;       /* scales */
  const uint8_t *w2;     /* zero_points */
  const float *bias;     /* linear bias, a LayerNorm's bias (norm, add_norm), moe: the router's (gpt-oss), or NULL */
  const float *w_norm;   /* norm weight (the family's offset folded in); act ACT_XIELU: a_p, a_n, beta, eps;
                            short_conv: its weight [n, k]; head_gate: the gates' weight [k, n] */
  const void *table;     /* fp16 [V, hidden]: embed; lm_head's exact table */
  const float *cos, *sin;  /* RoPE tables [max_positions, D / 2]; attention: NULL when a rope op rotated q and k */
  const int64_t *order;    /* linear: its input read as x[order[i]] (GPTQ act-order), or NULL */
  const float *positions;  /* embed: learned positions [max_positions, n], row p position p's (GPT-2's), or NULL */
  /* moe (a mixture of experts): w0..w2 every expert's gate and up [experts][2 n rows, gate i and up i side by side
     (ORT's QMoE layout)], w3..w5 their down [experts][k rows], in the MatMulNBits layout; out = the top_k experts'
     downs summed, each times its softmax probability (renormalized over the top_k with normalize) */
  const uint8_t *w3;
  const float *w4;
  const uint8_t *w5;
  const float *router;     /* moe: float32 [experts, k], the router's logits x . row */
  const float *expert_bias;  /* moe, sigmoid: added to the weights to choose by (LFM2-MoE's), or NULL */
  float *scratch;          /* moe: top_k * 2 n + n + k + 2 experts + 2 top_k floats: the chosen's gate/up rows,
                              act(gate) * up, one down's output, the weights and the scores to choose by, the
                              chosen's weights and ids */
  int32_t experts, top_k, normalize;
  int32_t sigmoid;         /* moe: the weights the logits' sigmoids (LFM2-MoE), else their softmax */
  /* moe, gpt-oss: the experts' biases, gate/up's [experts][2 n] (interleaved as w0's rows) and down's [experts][k],
     or NULL; clamped SwiGLU, g sigmoid(alpha g) (clamp(up, +-limit) + 1) with g = min(gate, limit), where
     swiglu_limit > 0, else silu(gate) up */
  const float *fc1_bias, *fc2_bias;
  float swiglu_alpha, swiglu_limit;
  const float *sinks;      /* attention: the heads' sinks (gpt-oss), a logit in each softmax's denominator, or NULL */
  /* moe, Qwen2-MoE: `residual` the shared expert's output (the ops before computed it), added in, times
     sigmoid(shared_gate . x) where shared_gate is not NULL */
  const float *shared_gate;
  /* Qwen3.5's gated delta net and Granite 4.0-H's Mamba-2 mixer (export.spec.DeltaNet; the numpy twins'
     reference_backend.twin_delta_conv, twin_delta_rule, twin_mamba_rule and twin_group_norm). delta_conv: x's first n
     values (q, k, v) replaced by silu of their causal convolution (+ bias, or NULL), w_norm its weight [n, k] (tap j
     reads the token k - 1 - j back), residual its inputs before [k - 1, n] (ORT's array, oldest first), moved on.
     delta_rule: x q, k and v after it then z, out [v_heads x v_dim], state S [v_heads, k_dim, v_dim] (ORT's array),
     normed the layer's normed input [k] that b and a [v_heads, k] read, dt_bias and rate (-exp(A_log)) [v_heads],
     w_norm the output norm's weight [v_dim]. mamba_rule: the same fields but b and w_norm (x: x, B and C, then z),
     skip (D) [v_heads], dt within dt_min..dt_max. group_norm: x [n] in k equal parts, each RMS-normed in place times
     its part of w_norm [n] */
  float *state;
  const float *normed, *delta_b, *delta_a, *dt_bias, *rate;
  int32_t k_heads, v_heads, k_dim, v_dim;
  const float *skip;
  float dt_min, dt_max;
};

struct cpu_model {
  int32_t heads, kv_heads, head_dim, max_context, top_k;
  float eps;
  float **k_cache, **v_cache;   /* per layer [kv_heads, max_context, head_dim], shared with ORT (NULL: an LFM2
                                   short convolution's layer) */
  int8_t *x8;                   /* scratch: Q8_ACT_BYTES of the largest K */
  float *x_scale;               /* scratch: blocks of the largest K */
  int32_t *x_sum;
  float *scores;                /* scratch: [heads, max_context] */
  int64_t *top_ids;             /* [top_slots, top_k]: slot 0 out, the others a thread's heap each */
  float *top_logits;            /* [top_slots, top_k] */
  /* The step's bf16 copy of the cache (decode_step.c): per layer, keys in tiles
     [kv_heads, mirror_rows / 32, head_dim, 32], values [kv_heads, mirror_rows, head_dim]. */
  uint16_t **k_mirror, **v_mirror;
  int32_t mirror_rows;          /* max_context rounded up to whole tiles of 32 */
  int32_t top_slots;            /* threads + 1 (fewer: one thread selects the top_k alone) */
  float *x_ordered;             /* scratch: the largest K, for an input gathered by an op's order */
};

/* ops[0 .. n_ops) for one new token at `position` (the rows before it are cached). */
void decode_step(const struct cpu_model *m, const struct cpu_op *ops, int n_ops, int64_t token, int position,
                 double *op_seconds /* NULL, or n_ops wall times to add each op's to (profiling) */);

/* Rows [first, first + count) of `layers` layers' ORT caches into the bf16 mirror (after ORT wrote them). */
void cpu_mirror_rows(const struct cpu_model *m, int layers, int first, int count);

/* OpenMP threads for the kernels. */
void cpu_set_threads(int threads);

/* Which SIMD path gemv_q4 was compiled with (for benchmarks and logs). */
const char *cpu_kernels_simd(void);

#ifdef __cplusplus
}
#endif
