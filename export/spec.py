"""What the graph needs to know about a model, read once from the checkpoint's config.json.

ModelSpec turns the Hugging Face config (which differs per family and per transformers
version) into plain numbers: sizes, per-layer attention kind (full or sliding window) and
per-layer RoPE frequencies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..families import Family, family_for

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelSpec:
    family: Family
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_positions: int
    tie_embeddings: bool
    attn_scale: float  # multiplies q.k
    layer_windows: list[int | None]  # per layer: sliding window (tokens attended, self included) or None
    layer_inv_freq: list[np.ndarray]  # per layer: RoPE inverse frequencies [head_dim / 2]
    attn_softcap: float | None
    final_softcap: float | None

    @property
    def kv_bytes_per_token(self) -> int:
        """Elements per token per K or V, times 2 (K and V), times layers; multiply by itemsize."""
        return 2 * self.layers * self.kv_heads * self.head_dim


def inv_freq(rope: dict, head_dim: int, where: str) -> np.ndarray:
    """RoPE inverse frequencies for one rope parameter dict (HF semantics), float64."""
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    theta = float(rope.get("rope_theta", 10000.0))
    freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope_type == "default":
        return freq
    if rope_type == "linear":
        return freq / float(rope["factor"])
    if rope_type == "llama3":
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_ctx = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * freq / factor + smooth * freq
        out = np.where(wavelen > old_ctx / low, freq / factor, freq)
        medium = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return np.where(medium, smoothed, out)
    raise UserError(f"{where}: RoPE type {rope_type!r} is not supported by the exporter "
                    f"(supported: {', '.join(ROPE_TYPES)})")


def _rope_params(config: dict) -> dict[str, dict]:
    """Per layer type ('full_attention', 'sliding_attention') -> rope dict, from old or new configs."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        return dict(params)  # transformers 5, one dict per layer type (Gemma3)
    if isinstance(params, dict) and params:
        base = dict(params)
    else:  # transformers 4 style: rope_theta + rope_scaling
        base = dict(config.get("rope_scaling") or {})
        base.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    base.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    out = {"full_attention": base}
    local = config.get("rope_local_base_freq")
    out["sliding_attention"] = {"rope_type": "default", "rope_theta": local} if local else base
    return out


def model_spec(config: dict) -> ModelSpec:
    model_type = config.get("model_type", "?")
    family = family_for(model_type)
    where = f"model type {model_type}"
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"config.json lacks a usable {e}; the checkpoint config is incomplete") from None
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError(f"{where}: partial rotary embeddings are not supported by the exporter")
    if heads % kv_heads:
        raise UserError(f"{where}: {heads} attention heads is not a multiple of {kv_heads} KV heads")

    # Which layers use a sliding window, and how wide (tokens attended, the query's own included).
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if not layer_types:
        sliding_all = window is not None and model_type == "mistral"
        layer_types = ["sliding_attention" if sliding_all else "full_attention"] * layers
    if len(layer_types) != layers:
        raise UserError(f"config.json has {len(layer_types)} layer_types for {layers} layers")
    windows = [int(window) if t == "sliding_attention" and window else None for t in layer_types]

    ropes = _rope_params(config)
    freqs = []
    for t in layer_types:
        rope = ropes.get(t) or ropes.get("full_attention")
        if rope is None:
            raise UserError(f"{where}: no RoPE parameters for layer type {t!r}")
        freqs.append(inv_freq(rope, head_dim, where))

    scalar = config.get("query_pre_attn_scalar")  # Gemma: scale by this instead of head_dim
    attn_scale = float(scalar) ** -0.5 if scalar else head_dim ** -0.5
    return ModelSpec(
        family=family, model_type=model_type, hidden=hidden, layers=layers, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, vocab=vocab,
        eps=float(config.get("rms_norm_eps", 1e-6)),
        max_positions=int(config.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        attn_scale=attn_scale, layer_windows=windows, layer_inv_freq=freqs,
        attn_softcap=config.get("attn_logit_softcapping"),
        final_softcap=config.get("final_logit_softcapping"),
    )


def rope_tables(freq: np.ndarray, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [positions, head_dim / 2] in float32.

    The angle is rounded to float32 like Hugging Face's float32 `position * inv_freq`, so long
    positions (large angles) agree with the reference model to float32 rounding of cos/sin."""
    angles = np.outer(np.arange(positions, dtype=np.float32), freq.astype(np.float32))
    return (np.cos(angles.astype(np.float64)).astype(np.float32),
            np.sin(angles.astype(np.float64)).astype(np.float32))
