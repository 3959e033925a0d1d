"""Next-token choice from float32 logits, in numpy: repetition penalty, temperature, top-k, top-p
(and OpenAI's logit_bias, presence and frequency penalties: adjusted_logits, on the host).

temperature 0 means greedy (argmax after the repetition penalty). The random generator is
seeded once per generation, so the same seed and prompt give the same text. A NaN logit counts
as -inf (np.argmax would pick it: a broken step must not choose a token by accident), and a step
with no logit above -inf is an error (NO_USABLE_LOGITS), here and in plugins/kernels/sample.cu.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .untrusted import Fields


@dataclass
class SamplingSettings:
    temperature: float = 0.7
    top_k: int = 50           # 0 = no top-k cut
    top_p: float = 0.95       # 1 = no nucleus cut
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the context
    seed: int | None = None
    # OpenAI's: subtracted from the logit of each token generated so far (once / once per time)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = field(default_factory=dict)  # token id -> added to its logit

    @property
    def adjusts_logits(self) -> bool:
        """Whether adjusted_logits changes anything (then the host samples: the GPU sampler does not)."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0

    def validate(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= MAX_TOP_K:  # (the GPU samplers take an int32)
            raise UserError(f"--top-k must be in 0..{MAX_TOP_K} (0 = off), got {str(self.top_k)[:20]}")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:  # (NaN fails too)
                raise UserError(f"--{name.replace('_', '-')} must be in [-{MAX_PENALTY}, {MAX_PENALTY}] (0 = off), "
                                f"got {getattr(self, name)}")
        if len(self.logit_bias) > MAX_LOGIT_BIASES:
            raise UserError(f"--logit-bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIASES}")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise UserError(f"--logit-bias keys must be token ids (integers >= 0), got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -MAX_BIAS <= bias <= MAX_BIAS:
                raise UserError(f"--logit-bias values must be in [-{MAX_BIAS}, {MAX_BIAS}], got {bias} for {token}")


MAX_TOP_K = (1 << 31) - 1
# OpenAI's bounds: penalties in [-2, 2], biases in [-100, 100] (-100 bans a token in practice, 100
# forces it); the number of biased tokens is ours (a request is untrusted input)
MAX_PENALTY, MAX_BIAS, MAX_LOGIT_BIASES = 2.0, 100.0, 1024


def adjusted_logits(logits: np.ndarray, settings: SamplingSettings, generated) -> np.ndarray:
    """logits (a copy) with OpenAI's adjustments, before everything else: logit_bias added; the
    presence penalty subtracted from each token generated so far, and the frequency penalty once
    per time it was (the prompt's tokens do not count, as in vLLM: repetition_penalty covers them).
    Token ids past the vocabulary are refused by the engine before generating."""
    logits = np.array(logits, dtype=np.float32)
    if settings.logit_bias:
        ids = np.fromiter(settings.logit_bias, dtype=np.int64, count=len(settings.logit_bias))
        logits[ids] += np.fromiter(settings.logit_bias.values(), dtype=np.float32, count=ids.size)
    if len(generated) and (settings.presence_penalty or settings.frequency_penalty):
        ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
        logits[ids] -= np.float32(settings.presence_penalty) + np.float32(settings.frequency_penalty) * counts
    return logits


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty")


def model_sampling(generation_config: dict, where: str) -> dict:
    """The sampling a model's generation_config.json recommends (Qwen3: temperature 0.6, top_k 20,
    top_p 0.95; Gemma 3: top_k 64, top_p 0.95), where it says do_sample: what of SAMPLING_FIELDS it
    sets, checked (an engine folder is untrusted). Without do_sample, nothing: our defaults stay
    (transformers would decode greedily, which makes small models loop)."""
    f = Fields(generation_config, where, "fix or remove the file and rebuild the engine")
    if not f.bool("do_sample", default=False):
        return {}
    found = {"temperature": f.float("temperature", 0.0, 1e4, default=None),
             "top_k": f.int("top_k", 0, 1 << 30, default=None),
             "top_p": f.float("top_p", 1e-9, 1.0, default=None),
             "repetition_penalty": f.float("repetition_penalty", 1e-6, 1e4, default=None)}
    return {k: v for k, v in found.items() if v is not None}


def sampling_with_defaults(model: dict, seed: int | None = None, temperature: float | None = None,
                           top_k: int | None = None, top_p: float | None = None,
                           repetition_penalty: float | None = None, presence_penalty: float | None = None,
                           frequency_penalty: float | None = None, logit_bias: dict | None = None) -> SamplingSettings:
    """SamplingSettings from what the caller gave (None: not given), else the model's, else ours
    (the OpenAI adjustments are the caller's alone: off unless given)."""
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "repetition_penalty": repetition_penalty}
    chosen = {k: given[k] if given[k] is not None else model.get(k, getattr(SamplingSettings, k))
              for k in SAMPLING_FIELDS}
    return SamplingSettings(**chosen, seed=seed, presence_penalty=presence_penalty or 0.0,
                            frequency_penalty=frequency_penalty or 0.0, logit_bias=dict(logit_bias or {}))


def apply_repetition_penalty(logits: np.ndarray, seen_ids, penalty: float) -> np.ndarray:
    """CTRL-style: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    if penalty == 1.0 or not len(seen_ids):
        return logits
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[0])]
    picked = logits[ids]
    logits = logits.copy()
    logits[ids] = np.where(picked > 0, picked / penalty, picked * penalty)
    return logits


NO_USABLE_LOGITS = ("every logit of this step is NaN or -inf, so no token can be chosen; the engine or "
                    "checkpoint is broken (rebuild it from the checkpoint, or re-quantize)")


def usable_logits(logits: np.ndarray) -> np.ndarray:
    """logits with NaN as -inf (a copy only when there is a NaN); UserError when none is above -inf."""
    nan = np.isnan(logits)
    if nan.any():
        logits = np.where(nan, np.float32(-np.inf), logits)
    if not (logits > -np.inf).any():
        raise UserError(NO_USABLE_LOGITS)
    return logits


def candidates(logits: np.ndarray, settings: SamplingSettings, seen_ids=()):
    """(ids highest first, their probabilities) after the penalty, temperature, top-k and top-p."""
    s = settings
    logits = usable_logits(apply_repetition_penalty(np.asarray(logits, dtype=np.float32), seen_ids,
                                                    s.repetition_penalty))
    if 0 < s.top_k < logits.shape[0]:
        ids = np.argpartition(logits, -s.top_k)[-s.top_k:]
    else:
        ids = np.arange(logits.shape[0])
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    scaled = logits[ids].astype(np.float64) / s.temperature
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    if s.top_p < 1.0:
        # Keep the smallest head whose mass reaches top_p (always at least one token).
        keep = int(np.searchsorted(np.cumsum(probs), s.top_p)) + 1
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    return ids, probs


def choose_token(logits: np.ndarray, settings: SamplingSettings, seen_ids=(), uniform: float = 0.0) -> int:
    """The token for logits [vocab] given the draw `uniform` in [0, 1) (unused when greedy).

    plugins/kernels/sample.cu implements the same rule on the GPU; tests compare the two."""
    if settings.temperature == 0:
        logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), seen_ids,
                                          settings.repetition_penalty)
        best = int(np.argmax(logits))
        if np.isnan(logits[best]) or logits[best] == -np.inf:  # argmax returns the first NaN there is
            best = int(np.argmax(usable_logits(logits)))
        return best
    ids, probs = candidates(logits, settings, seen_ids)
    return int(ids[min(np.searchsorted(np.cumsum(probs), uniform), len(ids) - 1)])


def token_logprobs(logits, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """(the log probability of token, the top ids with theirs, best first) under the model's own
    distribution: the raw logits' log-softmax, in float64, before any penalty, temperature or cut
    (OpenAI's logprobs). A NaN logit counts as -inf, as in choose_token."""
    logits = usable_logits(np.asarray(logits, dtype=np.float32)).astype(np.float64)
    shifted = logits - logits.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    ids = np.argpartition(logp, -top)[-top:] if 0 < top < logp.size else np.arange(logp.size if top else 0)
    ids = ids[np.argsort(-logp[ids], kind="stable")]
    return float(logp[token]), [(int(i), float(logp[i])) for i in ids]


_LARGEST_FP32_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))


def fp32_draw(uniform: float) -> float:
    """The draw as the GPU sampler reads it: a float32 in [0, 1) (a float64 draw just under 1
    would round to 1.0 in float32)."""
    return min(float(uniform), _LARGEST_FP32_BELOW_ONE)


class DeviceLogits:
    """Logits float32 [vocab] that stay on a GPU (the cuda and TensorRT backends), valid until the
    backend's next forward. The Sampler hands them its draw and the backend picks the token there
    (plugins/kernels/sample.cu, the rule of choose_token); np.asarray() copies them to the host."""

    def __init__(self, backend, device_ptr: int, vocab: int):
        self.backend, self.ptr, self.shape = backend, device_ptr, (vocab,)

    def __array__(self, dtype=None, copy=None):
        host = self.backend.logits_to_host(self.ptr)
        return host if dtype is None else host.astype(dtype)

    def sample_on_device(self, settings, seen_ids, uniform: float) -> int:
        return self.backend.sample_token(self.ptr, settings, seen_ids, uniform)


class Sampler:
    """Draws one uniform per sampled token from a generator seeded once per generation.

    Logits that live on a GPU (DeviceLogits) are sampled there with the same draw."""

    def __init__(self, settings: SamplingSettings):
        settings.validate()
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def draw(self) -> float:
        """The next token's uniform (greedy: none drawn, 0)."""
        return self.rng.random() if self.settings.temperature > 0 else 0.0

    def __call__(self, logits, seen_ids=()) -> int:
        uniform = self.draw()
        if hasattr(logits, "sample_on_device"):
            return logits.sample_on_device(self.settings, seen_ids, uniform)
        return choose_token(logits, self.settings, seen_ids, uniform)
