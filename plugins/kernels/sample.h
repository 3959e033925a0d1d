/* awq-edge token sampling on the GPU: the plain C ABI (ctypes, any C caller).
 *
 * Batch-1 decode picks the next token where the logits are, so the host copies back one
 * int32 instead of V floats. The rule is the one of awq_edge/sampling.py (Sampler):
 *   1. repetition penalty on the ids in `seen` (positive logits / penalty, negative * penalty);
 *   2. temperature <= 0: argmax, the lowest id on ties;
 *   3. top-k (0 < top_k < vocab): keep the logits >= the k-th largest (ties at it all kept);
 *   4. top-p (< 1): keep the smallest head, highest logit first, whose mass reaches top_p;
 *   5. with u = `uniform` in [0, 1) drawn by the caller: the first kept id, highest first,
 *      at which the cumulative mass reaches u * (kept mass).
 * Given the same u the token is the host Sampler's, up to float rounding at a boundary.
 * A NaN logit counts as -inf; when no logit is above -inf, `token` receives -1 (the host raises).
 *
 * `work` is scratch of AWQ_SAMPLE_WORK_FLOATS(vocab) floats; `token` receives the id.
 * Requirements (checked; a violation returns AWQ_SAMPLE_INVALID_ARGUMENT, nothing launched):
 *   vocab >= 1; top_k >= 0; 0 < top_p <= 1; 0 <= uniform < 1; penalty > 0; n_seen >= 0.
 * Asynchronous on `stream`; returns 0, the error above, or the cudaError_t of the launch.
 */
#ifndef AWQ_EDGE_SAMPLE_H
#define AWQ_EDGE_SAMPLE_H

#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AWQ_SAMPLE_INVALID_ARGUMENT (-1)
#define AWQ_SAMPLE_WORK_FLOATS(vocab) (2 * (size_t)(vocab))

int awq_sample_token(const float* logits, int vocab, const int32_t* seen, int n_seen, float repetition_penalty,
                     float temperature, int top_k, float top_p, float uniform, float* work, int32_t* token,
                     cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* AWQ_EDGE_SAMPLE_H */
