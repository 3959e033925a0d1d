"""Random AWQ checkpoints of real models' shapes, for machines that have no model files.

The GPU machine lent to development sessions reaches no registry and holds no weights, yet its
speed is a matter of shapes: decode reads every weight once per token whatever the values.

    write_random_checkpoint("ckpt/", SHAPES["llama3.2-1b"], group_size=128, tokenizer_dir=tok)

writes an AutoAWQ GEMM checkpoint (our reader's format) of a Llama-family model with random
INT4 weights scaled so activations stay O(1) through the layers (no fp16 overflow), and random
norms. `byte_tokenizer` makes a tokenizer without any download (ids 0-255 are bytes).

    write_random_engine("engine/", "llama2-7b", resolve("h200"))

writes a native (cuda) engine of the same kind of model straight in the kernels' layout, in
seconds even at 7B (packing a checkpoint's levels would take minutes).
Used by tests/test_cuda_backend_gpu.py and benchmarks/cuda_decode.py; numpy only (no torch).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from .checkpoint import QuantizedLinear, commit_staging, output_staging, write_checkpoint

# name -> the config of a public model of that shape (hidden, intermediate, layers, heads, kv
# heads, head_dim, vocab, tied embeddings, positions, RoPE base); the weights are random.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                        max_position_embeddings=8192, rope_theta=500000.0),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=8192, rope_theta=1000000.0),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, head_dim=128, vocab_size=32000, tie_word_embeddings=False,
                      max_position_embeddings=4096, rope_theta=10000.0),
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                        max_position_embeddings=8192, rope_theta=500000.0),
    # a mixture of experts: Granite 3.0 1B-A400M's shapes (8 of 32 experts a token, each 512 wide; its
    # multipliers left out), the CPU engine's (benchmarks/cpu_experts.py)
    "granite3-1b-a400m": dict(model_type="granitemoe", architectures=["GraniteMoeForCausalLM"], hidden_size=1024,
                              intermediate_size=512, num_hidden_layers=24, num_attention_heads=16,
                              num_key_value_heads=8, head_dim=64, vocab_size=49155, tie_word_embeddings=True,
                              max_position_embeddings=4096, rope_theta=10000.0, num_local_experts=32,
                              num_experts_per_tok=8),
    # Qwen3.5 0.8B's published layers, hidden size, heads and vocabulary (18 gated delta nets, 6 attention layers,
    # a quarter of each 256-wide head rotated); its MLP width and delta-net heads (16 of 128 for keys and for
    # values) as its larger siblings' configs have them: the CPU engine's (benchmarks/cpu_delta_net.py)
    "qwen3.5-0.8b": dict(model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"], hidden_size=1024,
                         intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=256, vocab_size=248320, tie_word_embeddings=True, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                          "partial_rotary_factor": 0.25},
                         linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
                         linear_value_head_dim=128, linear_conv_kernel_dim=4),
    # Granite 4.0-H micro (3B) as third-party copies of its config.json have it (no hub here to check): 40 layers,
    # attention (no RoPE) at 5, 15, 25 and 35, 36 Mamba-2 mixers of 64 heads of 64 in one group, a state of 128,
    # hidden 2048, MLPs 8192 wide; its multipliers left out: the CPU engine's (benchmarks/cpu_delta_net.py)
    "granite-4.0-h-micro": dict(model_type="granitemoehybrid", architectures=["GraniteMoeHybridForCausalLM"],
                                hidden_size=2048, intermediate_size=8192, shared_intermediate_size=8192,
                                num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                vocab_size=100352, tie_word_embeddings=True, max_position_embeddings=8192,
                                position_embedding_type="nope", num_local_experts=0,
                                layer_types=["attention" if i % 10 == 5 else "mamba" for i in range(40)],
                                mamba_n_heads=64, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1,
                                mamba_d_conv=4, mamba_expand=2),
}
BOS, EOS = 256, 257  # byte_tokenizer's special tokens


def byte_tokenizer(folder: Path) -> Path:
    """tokenizer.json + tokenizer_config.json of a byte-level tokenizer (ids 0-255: the bytes,
    256 <s>, 257 </s>) with a plain chat template; made here, nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<s>{{ m.role }}: {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": template}, indent=1))
    return folder


def random_linear(rng: np.random.Generator, n: int, k: int, group_size: int) -> QuantizedLinear:
    """INT4 levels, zero points near 8 and scales such that w_hat's rows have norm ~1: y = x @ w.T
    keeps x's scale."""
    groups = -(-k // group_size)
    q = rng.integers(0, 16, (n, k), dtype=np.uint8)
    zeros = rng.integers(6, 10, (n, groups), dtype=np.uint8)
    return QuantizedLinear(q, random_scales(rng, (n, groups), k), zeros, group_size)


def random_scales(rng: np.random.Generator, shape: tuple, k: int) -> np.ndarray:
    """fp16 group scales [N, groups] for levels uniform on 0..15 around a zero near 8 (their
    spread 4.6) such that each row of w_hat over K inputs has norm ~1."""
    level_std = 4.6
    return (rng.uniform(0.8, 1.2, shape) / (level_std * math.sqrt(k))).astype(np.float16)


def llama_linears(shape: dict) -> list[tuple[str, int, int]]:
    """(name within a block, N, K) of a Llama block's seven linears, in the checkpoint's order."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    q_width = shape["num_attention_heads"] * shape["head_dim"]
    kv_width = shape["num_key_value_heads"] * shape["head_dim"]
    return [("self_attn.q_proj", q_width, hidden), ("self_attn.k_proj", kv_width, hidden),
            ("self_attn.v_proj", kv_width, hidden), ("self_attn.o_proj", hidden, q_width),
            ("mlp.gate_proj", inter, hidden), ("mlp.up_proj", inter, hidden), ("mlp.down_proj", hidden, inter)]


def random_checkpoint_config(shape: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "attention_bias": False, "bos_token_id": BOS, "eos_token_id": EOS, **shape}


def write_random_checkpoint(output: Path, shape: dict, group_size: int = 128, tokenizer_dir: Path | None = None,
                            seed: int = 0, force: bool = False) -> Path:
    """An AWQ checkpoint of `shape` (a SHAPES entry: a Llama unless it names another model_type) with random
    weights: every tensor its config implies (export.spec.checkpoint_shapes), norms near 1."""
    from .export.spec import checkpoint_shapes, model_spec

    rng = np.random.default_rng(seed)
    config = random_checkpoint_config(shape)
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    linear_shapes, tensor_shapes = checkpoint_shapes(model_spec(config))
    if not shape["tie_word_embeddings"]:
        tensor_shapes["lm_head.weight"] = (vocab, hidden)
    tensors = {}
    for name, size in tensor_shapes.items():  # norms near 1; the head's and a router's rows of norm ~1
        spread = 1 if name == "model.embed_tokens.weight" else math.sqrt(hidden)
        values = rng.uniform(0.8, 1.2, size) if len(size) == 1 else rng.standard_normal(size, np.float32) / spread
        tensors[name] = values.astype(np.float16)
    linears = {name: random_linear(rng, n, k, group_size) for name, (n, k) in linear_shapes.items()}
    metadata = {"source_model": "random", "shape": shape, "seed": seed}
    output = Path(output)
    staging = output_staging(output, force)
    try:
        write_checkpoint(staging, config, linears, tensors, metadata, tokenizer_dir)
        commit_staging(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def random_engine_tensors(spec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random tensors in the kernels' layout (decoder.tensor_layout), with random_linear's scales:
    random int32 words are random nibbles, so nothing is packed (a 7B engine in seconds). An int4
    head is quantized from its fp16 table (its re-scoring needs the two to agree)."""
    from .decoder import lm_head_table, quantize_head_int4, rope_weights, tensor_layout

    layout, out = tensor_layout(spec), rope_weights(spec)
    for name, (dtype, shape) in layout.items():
        if name in out:
            continue
        if name.startswith("lm_head.q4."):
            out.update(quantize_head_int4(out[lm_head_table(spec)], spec))  # (the table comes first in the layout)
            continue
        if name.endswith(".qweight"):
            out[name] = rng.integers(-2**31, 2**31, shape, dtype=np.int64).astype(np.int32)
        elif name.endswith(".scales"):
            out[name] = random_scales(rng, shape, k=layout[name.replace(".scales", ".qweight")][1][1] * 8)
        elif name.endswith(".zeros"):
            out[name] = rng.integers(6, 10, shape).astype(np.float16)
        elif name.endswith(".q8"):  # int8 rows (uniform: std 73)
            out[name] = rng.integers(-127, 128, shape).astype(np.int8)
        elif name == "lm_head.q8_scales":  # rows of norm ~1, as an untied fp16 head's below
            out[name] = np.full(shape, 1 / (73 * math.sqrt(spec.hidden)), np.float16)
        elif name == "model.embed_tokens.q8_scales":  # O(1) values, as the fp16 embedding's below
            out[name] = np.full(shape, 1 / 73, np.float16)
        elif name.endswith(".bias"):
            out[name] = (0.1 * rng.standard_normal(shape, np.float32)).astype(np.float16)
        elif dtype == "float32":  # norms, with the family's offset folded in
            out[name] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        else:  # the embedding (O(1) rows) and an untied lm_head (rows of norm ~1)
            scale = 1.0 if name == "model.embed_tokens.weight" else 1 / math.sqrt(shape[1])
            out[name] = (scale * rng.standard_normal(shape, np.float32)).astype(np.float16)
    return {name: out[name] for name in layout}


def write_random_engine(output: Path, shape: str | dict, device, group_size: int = 128, seed: int = 0,
                        max_context: int | None = None, force: bool = False, lm_head: str = "int8") -> dict:
    """A native (cuda) engine of a SHAPES model (a name, or a dict like one) with random weights,
    written straight in the kernels' layout (no checkpoint), its head of kind lm_head
    (decoder.LM_HEADS); returns its manifest."""
    import tempfile

    from .cuda_build import write_cuda_engine
    from .decoder import decoder_spec
    from .export.spec import model_spec

    shape_name = shape if isinstance(shape, str) else "custom"
    config = random_checkpoint_config(SHAPES[shape] if isinstance(shape, str) else shape)
    spec = decoder_spec(model_spec(config), group_size, lm_head=lm_head)
    tensors = random_engine_tensors(spec, np.random.default_rng(seed))
    with tempfile.TemporaryDirectory(prefix="awq-edge-random-") as model_dir:
        byte_tokenizer(Path(model_dir))
        (Path(model_dir) / "config.json").write_text(json.dumps(config, indent=1))
        source = {"source": f"random:{shape_name}", "model_type": "llama", "architectures": config["architectures"],
                  "quantization": {"method": "random", "group_size": group_size, "seed": seed}}
        return write_cuda_engine(output, device, spec, tensors.items(), Path(model_dir), source,
                                 max_context=max_context, force=force)
