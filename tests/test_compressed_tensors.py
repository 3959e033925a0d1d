"""compressed-tensors W4A16 "pack-quantized" checkpoints (llm-compressor's format), checked against
the compressed-tensors package itself:

  (a) the package decompresses what we write to our dequantized weights, bit for bit;
  (b) we read what the package compresses (sym and asym, group 32/64/128, fp16 and bf16) to its
      own decompression, bit for bit;
  (c) SmolLM2 in this format builds a CPU engine that is the AutoAWQ-format engine, byte for byte;
  (d) unsupported features and malformed files give one line naming what is wrong.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from compressed_tensors.compressors import ModelCompressor, PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                             QuantizationStatus, apply_quantization_config)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.numpy import load_file, save_file
from test_cli_quantize import assert_clean_error, assert_nothing_written, awq_edge

from awq_edge import packing
from awq_edge.checkpoint import read_checkpoint
from awq_edge.checkpoint import read_safetensors
from awq_edge.errors import UserError


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that equality is bit for bit (and -0 != 0)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def package_decompress(lin_tensors: dict, symmetric: bool, group_size: int, scale_dtype) -> torch.Tensor:
    """The package's pack-quantized decompression of one linear's tensors, with the scales in scale_dtype."""
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size))
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in lin_tensors.items()}
    state["weight_scale"] = state["weight_scale"].to(scale_dtype)
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


# ---------------------------------------------------------------- the layout

@pytest.mark.parametrize("out_f,in_f,group", [(20, 64, 32), (16, 256, 128), (8, 192, 64)])
def test_layout_is_the_packages_pack_to_int32(out_f, in_f, group):
    # out 20: the zero points, packed along out, end in a padded word
    rng = np.random.default_rng(out_f * in_f)
    q = rng.integers(0, 16, (out_f, in_f), dtype=np.uint8)
    zeros = rng.integers(0, 16, (out_f, in_f // group), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, zeros.shape).astype(np.float16)
    t = packing.to_compressed_tensors(q, scales, zeros, group)
    signed = lambda a: torch.from_numpy(a.astype(np.int8) - 8)  # the package's int4 is -8..7
    np.testing.assert_array_equal(t["weight_packed"], pack_to_int32(signed(q), 4).numpy())
    np.testing.assert_array_equal(t["weight_zero_point"], pack_to_int32(signed(zeros), 4, packed_dim=0).numpy())
    assert t["weight_shape"].tolist() == [out_f, in_f]
    q2, s2, z2 = packing.from_compressed_tensors(t["weight_packed"], t["weight_scale"], t["weight_zero_point"],
                                                 t["weight_shape"], group)
    assert np.array_equal(q2, q) and np.array_equal(s2, scales) and np.array_equal(z2, zeros)
    # the package's dequantization of our tensors, in fp32: exactly ours
    w = package_decompress(t, False, group, torch.float32)
    assert torch.equal(bits(w), bits(torch.from_numpy(packing.dequantize(q, scales, zeros, group))))


def test_raw_tensors_the_package_compressed_read_back_exactly():
    # asymmetric, out 20 (a padded zero-point word), on the package's own quantize + pack
    torch.manual_seed(0)
    w = torch.randn(20, 96)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    scale, zp = calculate_qparams(w.reshape(20, 3, 32).amin(-1), w.reshape(20, 3, 32).amax(-1), args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                   scheme)
    q, scales, zeros = packing.from_compressed_tensors(*(packed[k].numpy() for k in (
        "weight_packed", "weight_scale", "weight_zero_point", "weight_shape")), 32)
    assert np.array_equal(zeros, zp.numpy().astype(np.int16) + 8)
    expected = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    assert torch.equal(bits(torch.from_numpy(packing.dequantize(q, scales, zeros, 32))), bits(expected))


def test_a_short_last_group_is_refused_when_writing():
    q, s, z = np.zeros((8, 576), np.uint8), np.ones((8, 5), np.float16), np.zeros((8, 5), np.uint8)
    with pytest.raises(ValueError, match="no short last group"):
        packing.to_compressed_tensors(q, s, z, 128)


# ---------------------------------------------------------------- (a) what we write

@pytest.fixture(scope="module")
def ct_tiny(tmp_path_factory, tiny_model_dir):
    """`awq-edge quantize --format compressed-tensors` of a tiny Llama (RTN, group 32)."""
    out = tmp_path_factory.mktemp("ct") / "tiny-ct"
    proc = awq_edge("quantize", tiny_model_dir("llama"), "--method", "rtn", "--group-size", "32",
                    "--format", "compressed-tensors", "--output", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_quantize_writes_compressed_tensors_with_our_metadata(ct_tiny):
    config = json.loads((ct_tiny / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == \
        ("compressed-tensors", "pack-quantized", "compressed")
    assert qc["config_groups"]["group_0"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": False,
                                                         "strategy": "group", "group_size": 32, "dynamic": False}
    assert qc["ignore"] == ["lm_head"]
    meta = json.loads((ct_tiny / "awq_edge.json").read_text())
    assert meta["checkpoint_format"] == "compressed-tensors" and meta["settings"]["group_size"] == 32
    assert (ct_tiny / "tokenizer.json").exists()
    # its own validation of our config: the package's pydantic model forbids unknown fields
    assert QuantizationConfig.model_validate(qc).config_groups["group_0"].weights.group_size == 32


def test_the_package_decompresses_our_checkpoint_to_our_weights(ct_tiny):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ckpt = read_checkpoint(ct_tiny)
    assert len(ckpt.linears) == 14
    # transformers + compressed-tensors, as a user would load it: fp16, one rounding of the exact product
    model = AutoModelForCausalLM.from_pretrained(ct_tiny, quantization_config=CompressedTensorsConfig(dequantize=True))
    state = model.state_dict()
    stored = load_file(str(ct_tiny / "model.safetensors"))
    for prefix, lin in ckpt.linears.items():
        ours = torch.from_numpy(lin.dequantize())
        assert state[prefix + ".weight"].dtype == torch.float16
        assert torch.equal(bits(state[prefix + ".weight"]), bits(ours.half())), prefix
        # and with fp32 scales no rounding at all: the package's values are ours exactly
        parts = {k: stored[f"{prefix}.{k}"] for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                      "weight_shape")}
        assert torch.equal(bits(package_decompress(parts, False, 32, torch.float32)), bits(ours)), prefix


def test_eval_and_build_treat_it_as_a_quantized_checkpoint(ct_tiny):
    from awq_edge.build import source_kind
    from awq_edge.model import load_float_model

    assert source_kind(str(ct_tiny)) == "checkpoint"
    model, _ = load_float_model(ct_tiny)  # eval's path: dequantized to float
    lin = read_checkpoint(ct_tiny).linears["model.layers.1.mlp.down_proj"]
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, torch.from_numpy(lin.dequantize()))


def test_quantize_refuses_a_short_last_group_before_quantizing(tmp_path, tiny_model_dir):
    # the tiny model has 64 inputs: group 128 would leave a short group
    proc = awq_edge("quantize", tiny_model_dir("llama"), "--method", "rtn", "--group-size", "128",
                    "--format", "compressed-tensors", "--output", tmp_path / "out")
    assert_clean_error(proc, "64 inputs", "no short last group", "--group-size 32 or 64", "--format awq")
    assert_nothing_written(tmp_path, "out")


def test_quantize_refuses_an_unknown_format(tmp_path, tiny_model_dir):
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    with pytest.raises(UserError, match="--format gguf is unknown; use awq or compressed-tensors"):
        quantize_checkpoint(str(tiny_model_dir("llama")), tmp_path / "out", QuantizeSettings(method="rtn"),
                            checkpoint_format="gguf")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- (b) what the package writes

def package_checkpoint(out, dtype, symmetric: bool, group_size: int):
    """A one-block Llama compressed by the package itself (min-max scales, as its observers), saved
    as llm-compressor saves; returns the model, decompressed again by the package."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(group_size + symmetric)
    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=256, intermediate_size=384,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                  max_position_embeddings=128, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"],
        quantization_status=QuantizationStatus.INITIALIZED))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                w = module.weight.reshape(module.weight.shape[0], -1, group_size)
                scale, zero_point = calculate_qparams(w.amin(-1), w.amax(-1), args)
                module.weight_scale.copy_(scale)
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    scales = {name: module.weight_scale.detach().clone() for name, module in model.named_modules()
              if hasattr(module, "weight_packed")}
    compressor.decompress_model(model)
    return model, scales


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_we_read_what_the_package_compresses(tmp_path, dtype, symmetric, group_size):
    model, scales = package_checkpoint(tmp_path / "ckpt", dtype, symmetric, group_size)
    stored = read_safetensors(next((tmp_path / "ckpt").glob("*.safetensors")))
    assert any(k.endswith(".weight_zero_point") for k in stored) == (not symmetric)

    ckpt = read_checkpoint(tmp_path / "ckpt")
    assert ckpt.group_size == group_size and len(ckpt.linears) == 7
    state = model.state_dict()
    for prefix, lin in ckpt.linears.items():
        if symmetric:
            assert np.all(lin.zeros == 8)
        assert torch.equal(torch.from_numpy(lin.scales.astype(np.float32)), scales[prefix].float()), prefix
        ours = torch.from_numpy(lin.dequantize())
        assert torch.equal(bits(state[prefix + ".weight"]), bits(ours.to(dtype))), prefix
    # float tensors come through too: bf16 read exactly (as float32)
    assert torch.equal(torch.from_numpy(ckpt.tensors["lm_head.weight"].astype(np.float32)),
                       state["lm_head.weight"].float())


# ---------------------------------------------------------------- (c) SmolLM2 end to end

def test_smollm2_in_compressed_tensors_builds_the_same_engine(tmp_path, smollm2_dir):
    """Same RTN quantization in both formats -> same bits -> the same graph and the same greedy text.
    Group 64: SmolLM2's 576 hidden size leaves a short last group at 128, which this format lacks."""
    from awq_edge import Engine
    from awq_edge.build import build_engine
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    texts = {}
    for fmt in ("awq", "compressed-tensors"):
        quantize_checkpoint(str(smollm2_dir), tmp_path / fmt, QuantizeSettings(method="rtn", group_size=64),
                            progress=False, checkpoint_format=fmt)
        build_engine(str(tmp_path / fmt), "cpu", tmp_path / f"{fmt}.engine", max_memory="1GiB", max_context=256,
                     progress=False)
        engine = Engine.load(tmp_path / f"{fmt}.engine")
        texts[fmt] = engine.generate([{"role": "user", "content": "Name three uses of a robot arm."}],
                                     max_new_tokens=24, temperature=0)
    assert "robot arm" in texts["awq"]
    assert texts["compressed-tensors"] == texts["awq"]
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "awq.engine" / name).read_bytes() == \
            (tmp_path / "compressed-tensors.engine" / name).read_bytes(), name


# ---------------------------------------------------------------- (d) unsupported and malformed

def edit_config(path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def weights(qc):
    return qc["config_groups"]["group_0"]["weights"]


Q = "model.layers.0.self_attn.q_proj"
CONFIG_CASES = {
    "num_bits": (lambda qc: weights(qc).update(num_bits=8), "num_bits 8"),
    "float": (lambda qc: weights(qc).update(type="float", num_bits=8), "float weights"),
    "channel": (lambda qc: weights(qc).update(strategy="channel", group_size=None), "strategy 'channel'"),
    "group_size": (lambda qc: weights(qc).update(group_size=256), "group_size 256"),
    "actorder": (lambda qc: weights(qc).update(actorder="group"), "actorder 'group'"),
    "activations": (lambda qc: qc["config_groups"]["group_0"].update(input_activations={"num_bits": 8}),
                    "input activations quantization"),
    "format": (lambda qc: qc.update(format="float-quantized"), "format 'float-quantized'"),
    "sparsity": (lambda qc: qc.update(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity"),
    "kv_cache": (lambda qc: qc.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "KV-cache"),
    "transform": (lambda qc: qc.update(transform_config={"config_groups": {"u": {}}}), "transforms"),
    "two_schemes": (lambda qc: qc["config_groups"].update(group_1={"targets": ["re:.*down_proj"], "weights": dict(
        weights(qc), group_size=64)}), "different weight schemes"),
    "no_groups": (lambda qc: qc.update(config_groups={}), "config_groups is missing"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_unsupported_configs_are_named(tmp_path, ct_tiny, case):
    edit, phrase = CONFIG_CASES[case]
    ckpt = shutil.copytree(ct_tiny, tmp_path / "ckpt")
    edit_config(ckpt, edit)
    with pytest.raises(UserError, match=phrase) as e:
        read_checkpoint(ckpt)
    assert "\n" not in str(e.value)


def _float_linear(t):
    for part in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
        del t[f"{Q}.{part}"]
    t[f"{Q}.weight"] = np.zeros((64, 64), np.float16)


TENSOR_CASES = {
    "missing_scale": (lambda t: t.pop(f"{Q}.weight_scale"), f"{Q} lacks weight_scale"),
    "missing_zero_point": (lambda t: t.pop(f"{Q}.weight_zero_point"), "lacks weight_zero_point"),
    "packed_shape": (lambda t: t.update({f"{Q}.weight_packed": t[f"{Q}.weight_packed"][:, :4].copy()}),
                     r"weight_packed must be int32 \[64, 8\]"),
    "packed_dtype": (lambda t: t.update({f"{Q}.weight_packed": t[f"{Q}.weight_packed"].astype(np.int64)}),
                     "weight_packed must be int32"),
    "scale_shape": (lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"][:, :1].copy()}),
                    r"weight_scale must be float \[64, 2\]"),
    "zero_point_shape": (lambda t: t.update({f"{Q}.weight_zero_point": t[f"{Q}.weight_zero_point"][:4].copy()}),
                         "weight_zero_point must be int32"),
    # a lying weight_shape must be refused before anything of that size is allocated
    "huge_shape": (lambda t: t.update({f"{Q}.weight_shape": np.array([1 << 40, 1 << 40], np.int64)}),
                   "weight_packed must be int32"),
    "bad_shape": (lambda t: t.update({f"{Q}.weight_shape": np.array([64], np.int64)}), "weight_shape must be"),
    "inf_scale": (lambda t: t[f"{Q}.weight_scale"].__setitem__((0, 0), np.inf), "fp16 cannot hold"),
    "g_idx": (lambda t: t.update({f"{Q}.weight_g_idx": np.zeros(64, np.int32)}), "actorder with g_idx"),
    "float_linear": (_float_linear, f"{Q} is stored float"),
    "stray_scale": (lambda t: t.update({"model.layers.0.mlp.up_proj.input_scale": np.ones(1, np.float32)}),
                    "unexpected tensor model.layers.0.mlp.up_proj.input_scale"),
    "quantized_head": (lambda t: t.update({"lm_head.weight_packed": t[f"{Q}.weight_packed"]}),
                       "lm_head is quantized"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_malformed_tensors_are_named(tmp_path, ct_tiny, case):
    edit, phrase = TENSOR_CASES[case]
    ckpt = shutil.copytree(ct_tiny, tmp_path / "ckpt")
    edit_tensors(ckpt, edit)
    with pytest.raises(UserError, match=phrase) as e:
        read_checkpoint(ckpt)
    assert "\n" not in str(e.value)


def test_symmetric_config_with_a_zero_point_is_malformed(tmp_path, ct_tiny):
    ckpt = shutil.copytree(ct_tiny, tmp_path / "ckpt")
    edit_config(ckpt, lambda qc: weights(qc).update(symmetric=True))
    with pytest.raises(UserError, match="has a weight_zero_point but its scheme is symmetric"):
        read_checkpoint(ckpt)


def _rewrite_header(path, fn):
    """Edit the JSON header of model.safetensors (offsets count from the data, so its length may change)."""
    raw = (path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


@pytest.mark.parametrize("case,phrase", [
    ("truncated", "truncated or corrupt"),
    ("past_the_end", "bad shape or byte range"),
    ("size_mismatch", "does not fill its"),
    ("float8", "F8_E4M3, which awq-edge cannot read"),
])
def test_corrupt_safetensors_are_refused(tmp_path, ct_tiny, case, phrase):
    ckpt = shutil.copytree(ct_tiny, tmp_path / "ckpt")
    f = ckpt / "model.safetensors"
    if case == "truncated":
        f.write_bytes(f.read_bytes()[:5000])
    else:
        def lie(header):
            entry = header[f"{Q}.weight_scale"]
            if case == "past_the_end":
                entry["data_offsets"][1] += 10 ** 12
            elif case == "size_mismatch":
                entry["shape"] = [64, 3]
            else:
                entry["dtype"] = "F8_E4M3"
        _rewrite_header(ckpt, lie)
    with pytest.raises(UserError, match=phrase):
        read_checkpoint(ckpt)


def test_cli_export_and_build_say_what_is_unsupported(tmp_path, ct_tiny):
    ckpt = shutil.copytree(ct_tiny, tmp_path / "ckpt")
    edit_config(ckpt, lambda qc: weights(qc).update(num_bits=8))
    proc = awq_edge("export", ckpt, "--target", "ort", "--output", tmp_path / "out")
    assert_clean_error(proc, "num_bits 8", "compressed-tensors", "W4A16")
    assert_nothing_written(tmp_path, "out")
    proc = awq_edge("build", ckpt, "--device", "cpu", "--output", tmp_path / "engine")
    assert_clean_error(proc, "num_bits 8")
    assert_nothing_written(tmp_path, "engine")


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_lfm3s_head_gates_stored_quantized_read_as_their_float_values(fmt, tmp_path, smollm2_dir):
    """LFM3's head gates (g_proj) stay float in our checkpoints and engines; another tool's checkpoint may
    store them quantized (llm-compressor's W4A16 recipes quantize every Linear), in either layout: read as
    the float weights their levels give, and the engine built from it matches that model."""
    from awq_edge.checkpoint import QuantizedLinear, load_awq_as_float, read_checked
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint, quantize_tensor
    from test_export_helpers import check_against_reference, export_for_cpu, tiny_checkpoint

    shape = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16}  # (8 gate rows: AWQ packs by 8)
    ckpt = tiny_checkpoint(tmp_path, "lfm3", smollm2_dir, **shape)
    if fmt == "compressed-tensors":
        ckpt = tmp_path / "ct"
        quantize_checkpoint(str(tmp_path / "float"), ckpt, QuantizeSettings(method="rtn", group_size=32),
                            progress=False, checkpoint_format=fmt)
    tensors, expected = load_file(ckpt / "model.safetensors"), {}
    for name in [n for n in tensors if n.endswith(".self_attn.g_proj.weight")]:
        q, s, z = (t.numpy() for t in quantize_tensor(torch.from_numpy(tensors.pop(name).astype(np.float32)), 32))
        expected[name] = QuantizedLinear(q, s, z, 32).dequantize()
        stored = packing.to_awq_gemm(q, s, z, 32) if fmt == "awq" else packing.to_compressed_tensors(q, s, z, 32)
        tensors.update({f"{name.removesuffix('.weight')}.{key}": value for key, value in stored.items()})
    assert expected
    save_file(tensors, ckpt / "model.safetensors")
    read, _ = read_checked(ckpt)
    for name, weight in expected.items():
        assert np.array_equal(read.tensors[name], weight) and name.removesuffix(".weight") not in read.linears
    ids = np.random.default_rng(3).integers(0, 256, 20).tolist()
    check_against_reference(export_for_cpu(ckpt, tmp_path / "exports", "ort"), load_awq_as_float(ckpt).eval(), ids,
                            12, 1e-5)
