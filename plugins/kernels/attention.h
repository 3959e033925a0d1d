/* awq-edge attention with the KV cache written in place: the plain C ABI.
 *
 * One call per layer and step (batch 1). The new rows go straight into the cache, so a
 * decode step costs O(context) reads and no copy of the cache (a Concat costs O(context)
 * writes per layer per token).
 *
 *   q        fp16 [S, H, D]     this step's queries, after any q norm, before RoPE
 *   k, v     fp16 [S, Hkv, D]   this step's keys (after any k norm, before RoPE) and values
 *   k_cache,
 *   v_cache  fp16 [Hkv, capacity, D]   rows 0..past-1 hold earlier steps; this call writes
 *                                      rows past..past+S-1 (k rotated, v as is)
 *   past     int64 [1] ON THE DEVICE: tokens already in the cache (a captured CUDA graph
 *            replays with whatever value is there)
 *   cos, sin fp16 [max_positions, D/2]: Hugging Face rotate_half RoPE tables
 *   q_rot    fp16 [S, H, D] scratch
 *   out      fp16 [S, H, D]
 *   status   int32 [1] ON THE DEVICE, or NULL: the call ORs AWQ_ATTENTION_OVER_CAPACITY into it when
 *            the step does not fit (below); the host reads it with the step's result and clears it
 * Query head h reads KV head h / (H / Hkv). The query at position p = past + s sees keys
 * max(0, p - window + 1)..p (window 0: all of 0..p). scores = scale * q.k, then
 * softcap * tanh(scores / softcap) when softcap > 0; softmax and sums in fp32.
 *
 * Requirements (checked; AWQ_ATTENTION_INVALID_ARGUMENT, nothing launched):
 *   S >= 1; H % Hkv == 0; D in {64, 80, 96, 128, 256}; capacity >= S; max_positions >= S;
 *   q, k, v, caches and out 4-byte aligned.
 * On the device, past + S > capacity or > max_positions (or past < 0) writes nothing to the cache,
 * fills out with NaN and sets the status flag: the host must not take that step's logits for a
 * model's (the NaN alone would reach it only as "no usable logits").
 * Asynchronous on `stream`; returns 0, the error above, or the cudaError_t of a launch.
 */
#ifndef AWQ_EDGE_ATTENTION_H
#define AWQ_EDGE_ATTENTION_H

#include <stdint.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AWQ_ATTENTION_INVALID_ARGUMENT (-1)
#define AWQ_ATTENTION_OVER_CAPACITY 1 /* a bit of *status */

int awq_attention(const __half* q, const __half* k, const __half* v, __half* k_cache, __half* v_cache,
                  const int64_t* past, const __half* cos, const __half* sin, __half* q_rot, __half* out, int S,
                  int H, int Hkv, int D, int capacity, int max_positions, int window, float scale, float softcap,
                  int* status, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* AWQ_EDGE_ATTENTION_H */
