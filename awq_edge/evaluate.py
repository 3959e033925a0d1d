"""Perplexity over non-overlapping windows of a text (host side, torch)."""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from .errors import UserError


def perplexity(model, tokenizer, text: str, seqlen: int = 1024, windows: int | None = None,
               progress: bool = True) -> dict:
    """exp(mean NLL) over `windows` windows of `seqlen` tokens (all full windows if None)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    available = len(ids) // seqlen
    if available == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}; "
                        "give a longer text or a smaller --seqlen")
    n = available if windows is None else min(windows, available)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in tqdm(range(n), desc="ppl", unit="window", disable=not progress):
            x = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += seqlen - 1
    mean = nll / count
    return {"perplexity": math.exp(mean) if mean < 700 else math.inf,  # garbage weights can overflow exp
            "windows": n, "tokens": count, "seqlen": seqlen}
