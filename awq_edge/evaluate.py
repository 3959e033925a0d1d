"""Perplexity over non-overlapping windows of a text (host side, torch)."""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from .errors import UserError
from .quantize_settings import PROTOCOLS


def deployed_prefix(tokenizer) -> list[int]:
    """The ids every deployed prompt starts with before its text: the BOS token when the tokenizer
    adds it (Llama, Gemma, Mistral) or the chat template begins with it (SmolLM2's <|im_start|>);
    none otherwise (Qwen has no BOS). Families trained with BOS as their attention sink behave
    differently without it, so calibration and evaluation start the same way (protocol
    "deployed"); "plain" starts mid-text, as the AWQ paper's numbers do."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    if tokenizer("hello", add_special_tokens=True)["input_ids"][:1] == [bos]:
        return [bos]
    if getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True,
                                                add_generation_prompt=True)
        except Exception:  # a template that wants other roles: the tokenizer's rule above stands
            return []
        if not isinstance(ids, list):  # a BatchEncoding (transformers 5)
            ids = list(ids["input_ids"])
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        if ids[:1] == [bos]:
            return [bos]
    return []


def window_prefix(tokenizer, protocol: str) -> list[int]:
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol} is unknown; use {' or '.join(PROTOCOLS)}")
    return deployed_prefix(tokenizer) if protocol == "deployed" else []


def perplexity(model, tokenizer, text: str, seqlen: int = 1024, windows: int | None = None,
               progress: bool = True, protocol: str = "deployed") -> dict:
    """exp(mean NLL) over `windows` windows of `seqlen` tokens (all full windows if None).

    protocol "deployed": each window is deployed_prefix() + seqlen - len(prefix) text tokens, and
    every text token is scored; "plain": seqlen text tokens, all but the first scored."""
    prefix = window_prefix(tokenizer, protocol)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    body = seqlen - len(prefix)
    available = len(ids) // body
    if available == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}; "
                        "give a longer text or a smaller --seqlen")
    n = available if windows is None else min(windows, available)
    start = torch.tensor(prefix, dtype=torch.long)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in tqdm(range(n), desc="ppl", unit="window", disable=not progress):
            x = torch.cat([start, ids[w * body:(w + 1) * body]]).unsqueeze(0)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += seqlen - 1
    mean = nll / count
    return {"perplexity": math.exp(mean) if mean < 700 else math.inf,  # garbage weights can overflow exp
            "windows": n, "tokens": count, "seqlen": seqlen, "protocol": protocol, "prefix": prefix}
