"""Helpers shared by the native-engine tests, CPU and GPU (no tests here; numpy only, so the
bare GPU machine imports it too).

- teacher_forced: run two backends over the same ids (the prompt, then one token per step) and
  report each step's relative logit error and where their argmaxes disagree although the
  reference's top two are further apart than that error allows.
"""
from __future__ import annotations

import numpy as np


def teacher_forced(backend, reference, ids: list[int], prompt: int, margin: float = 4.0):
    """(errors per step, steps whose argmax differs by more than a near-tie)."""
    errors, disagreements = [], []
    for step in [ids[:prompt]] + [[t] for t in ids[prompt:]]:
        a, b = np.asarray(backend.forward(step)), np.asarray(reference.forward(step))
        errors.append(float(np.linalg.norm(a - b) / np.linalg.norm(b)))
        if a.argmax() != b.argmax() and not near_tie(b, a.argmax(), margin * errors[-1] * np.abs(b).max()):
            disagreements.append(len(errors) - 1)
    return errors, disagreements


def near_tie(reference_logits: np.ndarray, token: int, tolerance: float) -> bool:
    """Whether `token` is within `tolerance` of the reference's best logit."""
    return float(reference_logits.max() - reference_logits[token]) <= tolerance
