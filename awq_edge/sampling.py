"""Next-token choice from float32 logits, in numpy: repetition penalty, temperature, top-k, top-p.

temperature 0 means greedy (argmax after the repetition penalty). The random generator is
seeded once per generation, so the same seed and prompt give the same text.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError


@dataclass
class SamplingSettings:
    temperature: float = 0.7
    top_k: int = 50           # 0 = no top-k cut
    top_p: float = 0.95       # 1 = no nucleus cut
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the context
    seed: int | None = None

    def validate(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty must be > 0 (1 = off), got {self.repetition_penalty}")


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


class Sampler:
    def __init__(self, settings: SamplingSettings):
        settings.validate()
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def __call__(self, logits: np.ndarray, seen_ids=()) -> int:
        s = self.settings
        logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), seen_ids, s.repetition_penalty)
        if s.temperature == 0:
            return int(np.argmax(logits))
        # Candidates: the top-k ids (or all), highest first.
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
        return int(ids[min(np.searchsorted(np.cumsum(probs), self.rng.random()), len(ids) - 1)])
