// The small ops of the native decoder step (awq_edge/decoder.py lists the step; the numpy twin
// of each kernel is in awq_edge/reference_backend.py, twin_<op>).
//
// Activations are fp16 rows; every kernel computes in fp32 and rounds once when it stores.
// All are launched through the CUDA driver API from this file's cubin (awq_edge/cuda_backend.py),
// so they have C names, and the launch shape is in each comment: one block per row unless said.
// Nothing here has run on a GPU yet (the tests in tests/test_cuda_backend_gpu.py do, when one is lent).
#include <math.h>
#include <stdint.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "activation.cuh"
#include "lm_head.cuh"
#include "pdl.cuh"
#include "row_ops.cuh"

namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;

// B * x of channel c of a row of an LFM2 short convolution's bcx (B, C, x side by side), rounded to fp16
__device__ __forceinline__ __half gated_input(const __half* bcx_row, int hidden, int c) {
    return __float2half(__half2float(bcx_row[c]) * __half2float(bcx_row[2 * hidden + c]));
}

}  // namespace

// out[s, :] = table[ids[s], :] * scale. Grid: S blocks. An id outside the vocabulary gives a NaN row.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_embed(const int32_t* __restrict__ ids, const __half* __restrict__ table, __half* __restrict__ out, int hidden,
          int vocab, float scale) {
    awq_edge::begin_after_previous_kernel();
    awq_edge::embed_row(ids[blockIdx.x], table, out + static_cast<size_t>(blockIdx.x) * hidden, hidden, vocab, scale);
}

// The same from int8 rows with an fp16 scale per 32 values (row_ops.cuh embed_row_q8).
extern "C" __global__ void __launch_bounds__(kThreads)
awq_embed_q8(const int32_t* __restrict__ ids, const int8_t* __restrict__ table, const __half* __restrict__ scales,
             __half* __restrict__ out, int hidden, int vocab, float scale) {
    awq_edge::begin_after_previous_kernel();
    awq_edge::embed_row_q8(ids[blockIdx.x], table, scales, out + static_cast<size_t>(blockIdx.x) * hidden, hidden,
                           vocab, scale);
}

// out[r] = norm(x[first_row + r]) for the grid's rows (x may be out: Gemma's sandwich norms run in
// place): RMSNorm, or LayerNorm with a bias (float32, or null: RMSNorm). weight is float32 with
// the family's offset folded in (Gemma, Nemotron: 1 + w).
extern "C" __global__ void __launch_bounds__(kThreads)
awq_norm(const __half* x, const float* __restrict__ weight, const float* __restrict__ bias, __half* out, int hidden,
         float eps, int first_row) {
    awq_edge::begin_after_previous_kernel();
    __shared__ float partial[kWarps];
    const int row = first_row + blockIdx.x;
    awq_edge::norm_row(x + static_cast<size_t>(row) * hidden, weight, bias,
                       out + static_cast<size_t>(blockIdx.x) * hidden, hidden, eps, partial);
}

// The residual add fused into the next norm: residual[row] += x[row] (rounded to fp16), then
// out[r] = norm(residual[row]), row = first_row + r (bias: as awq_norm's). The final norm runs on
// the last row only.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_add_norm(const __half* __restrict__ x, __half* __restrict__ residual, const float* __restrict__ weight,
             const float* __restrict__ bias, __half* __restrict__ out, int hidden, float eps, int first_row) {
    awq_edge::begin_after_previous_kernel();
    __shared__ float partial[kWarps];
    const size_t row = static_cast<size_t>(first_row + blockIdx.x) * hidden;
    awq_edge::add_norm_row(x + row, residual + row, weight, bias, out + static_cast<size_t>(blockIdx.x) * hidden,
                           hidden, eps, partial);
}

// Per-head RMSNorm in place (Qwen3 and Gemma3's q/k norms): the heads of row r start at
// x[r * row_stride + offset], head_dim values each. Grid: (heads, rows).
extern "C" __global__ void __launch_bounds__(kThreads)
awq_head_rms_norm(__half* x, int row_stride, int offset, int head_dim, const float* __restrict__ weight, float eps) {
    awq_edge::begin_after_previous_kernel();
    __shared__ float partial[kWarps];
    __half* head = x + static_cast<size_t>(blockIdx.y) * row_stride + offset + static_cast<size_t>(blockIdx.x) * head_dim;
    awq_edge::rms_norm_row(head, weight, head, head_dim, eps, partial);
}

// y[r, :] += bias (Qwen2's q/k/v bias, after the fp16 GEMV output). Grid: rows.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_bias_add(__half* __restrict__ y, const __half* __restrict__ bias, int n) {
    awq_edge::begin_after_previous_kernel();
    __half* row = y + static_cast<size_t>(blockIdx.x) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = __float2half(__half2float(row[i]) + __half2float(bias[i]));
}

// out[r, j] = act(gate_up[r, 2j]) * gate_up[r, 2j + 1] (gate and up rows interleaved at packing),
// or act(gate_up[r, j]) (kind has kUngated: rows of inter values); kind: activation.cuh ActKind;
// params: the layer's activation parameters (Apertus's xIELU: 4 floats), or null. Grid: rows. The
// decode GEMV fuses this (act epilogue), but for an activation with parameters.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_act(const __half* __restrict__ gate_up, __half* __restrict__ out, int inter, int kind,
        const float* __restrict__ params) {
    awq_edge::begin_after_previous_kernel();
    const size_t width = (kind & awq_edge::kUngated) ? inter : 2 * static_cast<size_t>(inter);
    awq_edge::act_row(gate_up + blockIdx.x * width, out + static_cast<size_t>(blockIdx.x) * inter, inter, kind,
                      params);
}

// x[r, :n] clamped to [-limit, limit] in place (OLMo 1's clip_qkv on the q/k/v rows). Grid: rows.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_clamp(__half* __restrict__ x, int n, float limit) {
    awq_edge::begin_after_previous_kernel();
    __half* row = x + static_cast<size_t>(blockIdx.x) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        row[i] = __float2half(fminf(fmaxf(__half2float(row[i]), -limit), limit));
}

// LFM3's head gates, in place: ctx[r, head * head_dim ..] (the attention's output) times
// sigmoid(weight[head, :] . x[r, :]), x the attention's normed input, weight float32 [heads, hidden].
// Grid: (heads, rows).
extern "C" __global__ void __launch_bounds__(kThreads)
awq_head_gate(__half* __restrict__ ctx, const __half* __restrict__ x, const float* __restrict__ weight, int hidden,
              int head_dim) {
    awq_edge::begin_after_previous_kernel();
    __shared__ float partial[kWarps];
    const __half* row = x + static_cast<size_t>(blockIdx.y) * hidden;
    const float* gate_row = weight + static_cast<size_t>(blockIdx.x) * hidden;
    float dot = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dot += gate_row[i] * __half2float(row[i]);
    const float gate = 1.f / (1.f + expf(-awq_edge::block_sum(dot, partial)));
    __half* head = ctx + (static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x) * head_dim;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) head[i] = __float2half(__half2float(head[i]) * gate);
}

// AFMoE's gates, in place: ctx[r, i] (the attention's output) times sigmoid(gate[r, i]) (out_gate_proj's
// output), n values a row. Grid: rows.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_output_gate(__half* __restrict__ ctx, const __half* __restrict__ gate, int n) {
    awq_edge::begin_after_previous_kernel();
    const size_t row = static_cast<size_t>(blockIdx.x) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        ctx[row + i] = __float2half(__half2float(ctx[row + i]) / (1.f + expf(-__half2float(gate[row + i]))));
}

// out[r, i] = x[r, order[i]]: a GPTQ act-order linear's input in the order its levels are stored
// (its groups' columns together). order is a permutation of 0..n-1 (engine_dir checks it at load).
// Grid: rows.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_gather_columns(const __half* __restrict__ x, const int* __restrict__ order, __half* __restrict__ out, int n) {
    awq_edge::begin_after_previous_kernel();
    const size_t row = static_cast<size_t>(blockIdx.x) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[row + i] = x[row + order[i]];
}

// h[r, :] += y[r, :], rounded to fp16: the residual add of a prefill step, which the decode GEMV
// fuses into its epilogue. Grid: rows.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_residual_add(__half* __restrict__ h, const __half* __restrict__ y, int n) {
    awq_edge::begin_after_previous_kernel();
    const size_t row = static_cast<size_t>(blockIdx.x) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) h[row + i] = __float2half(__half2float(h[row + i]) + __half2float(y[row + i]));
}

// GPT-2's, OPT's learned positions: h[r] += table[*past + r] (each sum rounded to fp16, as the
// embedding's row was). table fp16 [max_positions, hidden], row p position p's. Grid: rows.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_add_positions(__half* __restrict__ h, const __half* __restrict__ table, const int64_t* __restrict__ past,
                  int hidden) {
    awq_edge::begin_after_previous_kernel();
    awq_edge::add_position_row(h + static_cast<size_t>(blockIdx.x) * hidden, table, *past + blockIdx.x, hidden);
}

// LFM2's gated short convolution of a step's rows: bcx [rows, 3 hidden] holds B, C and x side by
// side (in_proj's output); out[r, c] = C[r, c] * (sum_j weight[c, j] * bx(p - kernel + 1 + j) (+ bias[c])),
// p = *past + r, bx(q) = B * x of position q rounded to fp16. store [kernel - 1 + context, hidden]
// keeps bx by position (row q + kernel - 1; its first kernel - 1 rows stay zero: before the first
// token). A row reads the positions before the step from the store and the step's own from bcx
// (another block writes those rows of the store: reading them there would race), then stores its
// own bx. weight float32 [hidden, kernel], bias float32 [hidden] or null. Grid: rows.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_short_conv(const __half* __restrict__ bcx, __half* __restrict__ out, __half* __restrict__ store,
               const float* __restrict__ weight, const float* __restrict__ bias, const int64_t* __restrict__ past,
               int hidden, int kernel) {
    awq_edge::begin_after_previous_kernel();
    const int r = blockIdx.x;
    const int64_t first = *past;  // row 0's position
    const size_t width = 3 * static_cast<size_t>(hidden);
    const __half* row = bcx + r * width;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        const __half own = gated_input(row, hidden, c);  // (the last tap's)
        float acc = 0.f;
        for (int j = 0; j < kernel - 1; ++j) {
            const int s = r - kernel + 1 + j;  // the step's row of the tap's position, if it is in the step
            const __half bx = s >= 0 ? gated_input(bcx + s * width, hidden, c)
                                     : store[static_cast<size_t>(first + s + kernel - 1) * hidden + c];
            acc += weight[static_cast<size_t>(c) * kernel + j] * __half2float(bx);
        }
        acc += weight[static_cast<size_t>(c) * kernel + kernel - 1] * __half2float(own);
        if (bias) acc += bias[c];
        out[static_cast<size_t>(r) * hidden + c] = __float2half(__half2float(row[hidden + c]) * acc);
        store[static_cast<size_t>(first + r + kernel - 1) * hidden + c] = own;
    }
}

// The lm_head: logits[v] = table[v, :] . x in fp32 (+ bias[v], float, where the head has one:
// Phi's; null otherwise), then softcap * tanh(l / softcap) when softcap > 0. Two tables: fp16
// rows (awq_lm_head), or int8 rows with an fp16 scale per 32 values (awq_lm_head_q8, the cuda
// engine's default: half the bytes; q int8 [vocab, hidden], scales fp16 [vocab, ceil(hidden / 32)]).
// The head is a third of a small model's reads a token, so it is laid out like the decode GEMV
// (lm_head.cuh: a warp's rows, each lane's loads of all of them in flight). hidden % 8 == 0 (the
// backend checks). Grid: ceil(vocab / 32) blocks of 256 threads.
extern "C" __global__ void __launch_bounds__(kThreads)
awq_lm_head(const __half* __restrict__ x, const __half* __restrict__ table, float* __restrict__ logits, int vocab,
            int hidden, float softcap, const float* __restrict__ bias) {
    awq_edge::let_next_kernel_start();
    const int v0 = (blockIdx.x * kWarps + threadIdx.x / 32) * awq_edge::kHeadRowsPerWarp;
    awq_edge::prefetch_head_rows(table, v0, vocab, 2 * hidden);
    awq_edge::wait_for_previous_kernel();
    if (v0 >= vocab) return;  // (a whole warp: the shuffles see all 32 lanes)
    awq_edge::lm_head_warp<false>(x, table, nullptr, v0, vocab, hidden, softcap, bias, logits);
}

extern "C" __global__ void __launch_bounds__(kThreads)
awq_lm_head_q8(const __half* __restrict__ x, const int8_t* __restrict__ q, const __half* __restrict__ scales,
               float* __restrict__ logits, int vocab, int hidden, float softcap, const float* __restrict__ bias) {
    awq_edge::let_next_kernel_start();
    const int v0 = (blockIdx.x * kWarps + threadIdx.x / 32) * awq_edge::kHeadRowsPerWarp;
    awq_edge::prefetch_head_rows(q, v0, vocab, hidden);
    awq_edge::wait_for_previous_kernel();
    if (v0 >= vocab) return;
    awq_edge::lm_head_warp<true>(x, q, scales, v0, vocab, hidden, softcap, bias, logits);
}

// The position counter on the device: past += S after a step (the next replay reads it). Grid: 1 x 1.
extern "C" __global__ void awq_advance(int64_t* past, int S) {
    awq_edge::begin_after_previous_kernel();
    *past += S;
}
