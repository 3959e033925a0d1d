"""The native CPU kernels (plugins/cpu/, awq_edge/cpu_native.py): built here with the system C
compiler, checked against their numpy twins, against ONNX Runtime's MatMulNBits on the same
bytes, and the whole decode step against the ORT engine for SmolLM2 and a tiny model of every
family (q/k norms, biases, sandwich norms, GELU, sliding windows, soft-caps)."""
from __future__ import annotations

import platform

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from awq_edge import cpu_native
from awq_edge.backend_ort import OrtBackend
from awq_edge.errors import UserError
from awq_edge.export import export_checkpoint
from awq_edge.packing import dequantize, to_matmul_nbits
from conftest import MOE_EXPERTS, TINY_FAMILIES
from native_helpers import teacher_forced
from test_export_helpers import tiny_checkpoint

pytestmark = pytest.mark.skipif(cpu_native.find_cc() is None, reason="no C compiler (cc, gcc, clang) here")

BASE = ("-O3", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c11")
# Every SIMD path this machine can run: x86-64 v1 is plain C, v3 is AVX2 without VNNI, v4 AVX-512
# without VNNI (a Skylake-SP: the AVX2 steps, the rest compiled for 512-bit vectors), and v3 with
# AVX512-VNNI but not AVX512BW the 256-bit VNNI steps (native takes the 512-bit ones where it can).
FLAGS = {"native": cpu_native.DEFAULT_FLAGS}
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.update({"avx2": ("-march=x86-64-v3", *BASE), "plain": ("-march=x86-64", *BASE)})
    cpu_flags = set(open("/proc/cpuinfo").read().split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= cpu_flags:
        FLAGS["avx512"] = ("-march=x86-64-v4", *BASE)
    if "avx512_vnni" in cpu_flags:
        FLAGS["vnni256"] = ("-march=x86-64-v3", "-mavx512f", "-mavx512vl", "-mavx512vnni", *BASE)


def random_weight(rng, n: int, k: int, group: int):
    blocks = -(-k // group)
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    s = (rng.random((n, blocks)) * 0.02 + 0.001).astype(np.float32)
    z = rng.integers(0, 16, (n, blocks)).astype(np.uint8)
    return q, s, z, to_matmul_nbits(q, s, z, group)


# (n, k, group): whole and ragged blocks, every block size, K below a 128-chunk (also test_cpu_native_arm.py's)
GEMV_SHAPES = [(64, 576, 128), (40, 1536, 64), (24, 100, 32), (8, 48, 16), (9, 1000, 128), (5, 576, 32), (3, 200, 16),
               (4, 99, 32), (2, 17, 16)]


@pytest.mark.parametrize("path", sorted(FLAGS))
@pytest.mark.parametrize("n,k,group", GEMV_SHAPES)
def test_gemv_matches_its_numpy_twin_on_every_simd_path(path, n, k, group):
    lib = cpu_native.load_library(FLAGS[path])
    rng = np.random.default_rng(n * k + group)
    q, s, z, t = random_weight(rng, n, k, group)
    x = (rng.standard_normal(k) * rng.choice([1e-3, 1.0, 50.0], k)).astype(np.float32)
    x[rng.integers(0, k)] = 0.0
    got_q = cpu_native.quantize_act_q8(lib, x, group)
    want_q = cpu_native.quantize_act_q8_reference(x, group)
    for got, want in zip(got_q, want_q):
        assert np.array_equal(got, want)
    y = cpu_native.gemv_q4(lib, t["B"], t["scales"], t["zero_points"], x, k, group)
    twin = cpu_native.gemv_q4_reference(t["B"], t["scales"], t["zero_points"], x, k, group)
    assert np.abs(y - twin).max() <= 1e-5 * np.abs(twin).max()
    exact = dequantize(q, s, z, group).astype(np.float64) @ x.astype(np.float64)
    assert np.abs(y - exact).max() <= 0.03 * np.abs(exact).max()  # int8 activations, like accuracy_level 4


@pytest.mark.parametrize("n,k,group", [(96, 576, 128), (64, 1536, 128), (200, 576, 32), (48, 256, 64)])
def test_gemv_matches_onnxruntime_matmulnbits_on_the_same_bytes(n, k, group):
    lib = cpu_native.load_library()
    rng = np.random.default_rng(k + group)
    _, _, _, t = random_weight(rng, n, k, group)
    x = rng.standard_normal(k).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=group, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(t["B"], "B"), numpy_helper.from_array(t["scales"], "s"),
                               numpy_helper.from_array(t["zero_points"], "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x[None]})[0][0]
    got = cpu_native.gemv_q4(lib, t["B"], t["scales"], t["zero_points"], x, k, group)
    # MLAS quantizes the activations the same way: the two agree to float rounding (measured ~1e-6)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_gemv_refuses_a_weight_of_the_wrong_size():
    lib = cpu_native.load_library()
    _, _, _, t = random_weight(np.random.default_rng(0), 8, 128, 32)
    with pytest.raises(ValueError, match="B: expected"):
        cpu_native.gemv_q4(lib, t["B"].reshape(8, -1)[:, 1:].copy(), t["scales"], t["zero_points"], np.zeros(128, np.float32), 128, 32)


def test_the_step_records_are_laid_out_as_cpu_ops_h_declares_them(tmp_path):
    """CpuOp and CpuModel (ctypes) against struct cpu_op and cpu_model as the C compiler lays them
    out: each size and each field's offset, by name."""
    import ctypes
    import subprocess

    structs = {"cpu_op": cpu_native.CpuOp, "cpu_model": cpu_native.CpuModel}
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "cpu_ops.h"', "int main(void) {"]
    for struct, cls in structs.items():
        lines.append(f'printf("%zu\\n", sizeof(struct {struct}));')
        lines += [f'printf("%zu\\n", offsetof(struct {struct}, {name}));' for name, _ in cls._fields_]
    (tmp_path / "layout.c").write_text("\n".join(lines + ["}"]) + "\n")
    subprocess.run([cpu_native.find_cc(), "-I", str(cpu_native.CPU_SOURCES), "-o", str(tmp_path / "layout"),
                    str(tmp_path / "layout.c")], check=True, timeout=120)
    got = [int(v) for v in subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True).stdout.split()]
    want = [n for cls in structs.values() for n in [ctypes.sizeof(cls)] + [getattr(cls, f).offset for f, _ in cls._fields_]]
    assert got == want


@pytest.fixture(scope="module")
def default_export(rtn_checkpoint, tmp_path_factory):
    """SmolLM2 exported as `awq-edge build --device cpu` does (int4 lm_head re-scored, accuracy_level 4)."""
    return export_checkpoint(rtn_checkpoint, tmp_path_factory.mktemp("native-cpu") / "ort", "ort")


def native_and_onnxruntime(export, max_context: int):
    """Two backends over one export: native decode (asserted to run) and ONNX Runtime decode."""
    native = OrtBackend(export, max_context=max_context, threads=2, native_decode=True)
    assert native.decode_path.startswith("native"), native.decode_path
    return native, OrtBackend(export, max_context=max_context, threads=2)


def test_native_decode_matches_onnxruntime_for_smollm2(default_export):
    native, reference = native_and_onnxruntime(default_export, 256)
    ids = np.random.default_rng(0).integers(0, 49152, 48 + 40).tolist()
    errors, disagreements = teacher_forced(native, reference, ids, 48)
    # both quantize activations to int8 per block; rounding flips amplified over 30 layers: ~1-2 %
    assert max(errors) < 0.1 and len(disagreements) <= 2, (max(errors), disagreements)
    assert native.position == reference.position == len(ids)
    # the KV buffers are ORT's: a prefill after native steps sees what they wrote
    native.rewind(60)
    reference.rewind(60)
    a, b = native.forward(ids[60:70]), reference.forward(ids[60:70])
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.1
    # ... and native steps after that prefill read the rows it wrote (copied into the bf16 cache)
    errors, disagreements = teacher_forced(native, reference, ids[70:80], 1)
    assert max(errors) < 0.1 and len(disagreements) <= 1, (errors, disagreements)


def test_native_top_k_is_the_k_largest_over_the_whole_vocabulary(default_export):
    # each thread keeps a heap of its share of the vocabulary; the merge must see every share
    backend = OrtBackend(default_export, max_context=64, threads=2, native_decode=True)
    backend.forward(list(range(100, 120)))
    for token in (5, 49151, 700):
        logits = backend.forward([token])
        decoder = backend.native
        quantized, ids = decoder.buffers["logits"], decoder.scratch["top_ids"][0]
        assert set(ids.tolist()) == set(np.argsort(quantized)[-decoder.top_k:].tolist())
        assert np.array_equal(logits[ids], decoder.scratch["top_logits"][0])


def test_the_bf16_cache_copy_is_its_numpy_twin_after_prefill_and_steps(default_export):
    # cpu_mirror_rows (after ORT's prefill) and the step's own writes, against the layout in cpu_ops.h
    backend = OrtBackend(default_export, max_context=70, threads=2, native_decode=True)  # 70: a ragged last tile
    backend.forward(list(range(100, 140)))
    for token in (7, 8, 9):
        backend.forward([token])
    decoder, n = backend.native, backend.position
    for layer in (0, 17, decoder.spec.layers - 1):
        k, v = (backend._cache[2 * layer + i].numpy()[0, :, :n] for i in (0, 1))
        keys, values = cpu_native.mirror_reference(k, v, decoder.model.mirror_rows)
        assert np.array_equal(decoder.mirrors[2 * layer].ravel(), keys)
        assert np.array_equal(decoder.mirrors[2 * layer + 1].ravel(), values)
    # round half to even (1 + 2^-8 down, 1 + 3 * 2^-8 up), infinities kept, a NaN whose rounding would carry stays NaN
    bits = np.array([0x3F800000, 0xC0200000, 0x3F808000, 0x3F818000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FFFFFFF],
                    np.uint32)
    assert cpu_native.to_bf16_reference(bits.view(np.float32)).tolist() == [
        0x3F80, 0xC020, 0x3F80, 0x3F82, 0x7F80, 0xFF80, 0x7FC0, 0x7FFF]


def test_native_decode_checks_its_input_like_onnxruntime(default_export):
    native = OrtBackend(default_export, max_context=8, threads=2, native_decode=True)
    with pytest.raises(UserError, match="out of range"):
        native.forward([49152])
    native.forward([1] * 7)
    native.forward([2])
    with pytest.raises(UserError, match="context full"):
        native.forward([3])


MOE_FAMILIES = tuple(MOE_EXPERTS)
FAMILIES = TINY_FAMILIES + ("olmo2", "hunyuan_v1_dense", "arcee", "nemotron", "stablelm", "cohere2", "jais2",
                            "starcoder2", "granitemoehybrid", "phi", "hyperclovax", "olmo", "apertus",
                            "apertus1p5_text", "nanochat", "lfm2", "lfm3", "gpt_neox", "gpt_bigcode", "opt", "gpt2",
                            "gptj", "gpt_neo", "granite_swa", "qwen3_5_text") + MOE_FAMILIES
# families whose head is hidden / heads, whatever head_dim says (OLMoE's q norm is hidden wide)
HEAD_FROM_HEADS = ("stablelm", "gpt_neox", "gpt_bigcode", "opt", "gpt2", "gptj", "gpt_neo", "olmoe")


def tiny_family_checkpoint(root, model_type: str, tokenizer_dir):
    """The native decode's tiny checkpoint of a family: hidden 128, heads of 64 (the native attention's
    smallest), LFM2's short convolutions (their biases too) around attention; LFM3's sliding and full
    attention (gated heads) around one; Qwen3.5's delta nets (value heads two to a key head) around attention."""
    extra = {"query_pre_attn_scalar": 64} if model_type.startswith("gemma") else {}
    if model_type == "qwen3_5_text":
        extra = {"num_hidden_layers": 3, "layer_types": ["linear_attention", "full_attention", "linear_attention"],
                 "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
                 "linear_value_head_dim": 64}
    if model_type == "lfm2":
        extra = {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"], "conv_bias": True}
    if model_type == "lfm3":
        extra = {"num_hidden_layers": 3, "layer_types": ["sliding_attention", "conv", "full_attention"]}
    heads = 2 if model_type in HEAD_FROM_HEADS else 4
    return tiny_checkpoint(root, model_type, tokenizer_dir, hidden_size=128, intermediate_size=256,
                           num_attention_heads=heads, num_key_value_heads=2, head_dim=64, **extra)


# (Qwen3.5 MoE's pieces, its delta nets and Qwen2-MoE's mixture, each run here in its own family: not again together)
@pytest.mark.parametrize("model_type", [f for f in FAMILIES if f != "qwen3_5_moe_text"])
def test_native_decode_matches_onnxruntime_for_every_family(model_type, smollm2_dir, tmp_path):
    ckpt = tiny_family_checkpoint(tmp_path, model_type, smollm2_dir)
    native, reference = native_and_onnxruntime(export_checkpoint(ckpt, tmp_path / "ort", "ort"), 64)
    # 44 tokens: longer than Mistral's (5) and Gemma 3's (4) sliding windows in these tiny configs
    ids = np.random.default_rng(1).integers(0, 256, 12 + 32).tolist()
    errors, disagreements = teacher_forced(native, reference, ids, 12)
    # the bf16 copy of the cache and int8 activations: under 3 % in every family
    # (benchmarks/native_decode_families.py); an MLP computed wrong, ~8 % (GPT-NeoX's GELU without erf's
    # sign, its MLP on the attention's norm; LFM2's taps in the wrong order; LFM2: one attention layer's
    # bf16 copy of the cache, ~1 %). A mixture of experts: those differences may turn a near tie of two
    # experts the other way on a step (Mixtral's: ~8 % there), so one step is let off; an expert
    # computed or weighted wrong errs on every step. LFM3, AFMoE: their sandwich norms scale the tiny
    # random outputs' int8 rounding up to each norm's RMS, more where random gates shut most of the
    # attention's outputs (6.5 % and 4.3 % at most: native_decode_families-20261207-153515.json); a gate
    # left out, read transposed or of the wrong sign errs over 100 % (decode_step.c mutated by hand)
    worst = sorted(errors)[-2] if model_type in MOE_FAMILIES else max(errors)
    limit = {"lfm2": 0.03, "lfm3": 0.08, "afmoe": 0.08}.get(model_type, 0.04)
    assert worst < limit and max(errors) < 0.2 and len(disagreements) <= 1, (errors, disagreements)


@pytest.mark.parametrize("path", sorted(set(FLAGS) - {"native"}))
def test_native_decode_on_every_simd_path_matches_onnxruntime(path, smollm2_dir, tmp_path, monkeypatch):
    """The whole step, not only its GEMV, built as a machine without this one's ISA would build it
    (an AVX2-only desktop: most Intel and pre-Zen 4 AMD ones, where native decode is the default):
    a tiny Gemma 3 (GELU, soft-caps, a sliding window, sandwich norms) against ONNX Runtime."""
    build = cpu_native.load_library
    monkeypatch.setattr(cpu_native, "load_library", lambda flags=FLAGS[path]: build(flags))
    ckpt = tiny_checkpoint(tmp_path, "gemma3_text", smollm2_dir, hidden_size=128, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64)
    native, reference = native_and_onnxruntime(export_checkpoint(ckpt, tmp_path / "ort", "ort"), 64)
    assert native.native.lib._name == str(build(FLAGS[path])._name)  # (the build of that path ran)
    ids = np.random.default_rng(1).integers(0, 256, 12 + 24).tolist()
    errors, disagreements = teacher_forced(native, reference, ids, 12)
    assert max(errors) < 0.1 and len(disagreements) <= 1, (max(errors), disagreements)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 3, 64), (4, 1, 128), (2, 1, 256), (3, 1, 80), (2, 1, 96)])
def test_native_attention_for_other_head_shapes(heads, kv_heads, head_dim, smollm2_dir, tmp_path):
    # every head size the step takes (80 and 96 with a tail of 16 and 32 dimensions in the value
    # walk: from session 38 to 41 96 got in unwalked and its logits were NaN), a group split between
    # the two threads (6 heads in groups of 2; 3 heads: one lone head a thread walks alone), one KV
    # head for all (MQA); 80 tokens span three key blocks
    ckpt = tiny_checkpoint(tmp_path, "llama", smollm2_dir, hidden_size=192, intermediate_size=256,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    native, reference = native_and_onnxruntime(export_checkpoint(ckpt, tmp_path / "ort", "ort"), 96)
    ids = np.random.default_rng(2).integers(0, 256, 40 + 40).tolist()
    errors, disagreements = teacher_forced(native, reference, ids, 40)
    assert max(errors) < 0.1 and len(disagreements) <= 1, (max(errors), disagreements)


def test_an_engine_the_native_step_cannot_run_decodes_in_onnxruntime(rtn_checkpoint, tmp_path):
    export = export_checkpoint(rtn_checkpoint, tmp_path / "ort", "ort", lm_head_bits=None)  # float head
    backend = OrtBackend(export, max_context=32, threads=2, native_decode=True)
    assert backend.native is None and "lm_head" in backend.decode_path, backend.decode_path
    assert backend.forward([1, 2, 3]).shape == (49152,)
    assert backend.forward([4]).shape == (49152,)


def test_an_engine_loaded_with_native_decode_plans_for_both_copies_and_generates(engine_dir):
    from awq_edge.engine import Engine

    plain = Engine.load(engine_dir, max_context=256, threads=2, native_decode=False)
    native = Engine.load(engine_dir, max_context=256, threads=2, native_decode=True)
    assert native.backend.decode_path.startswith("native") and plain.backend.decode_path == "onnxruntime"
    assert native.plan.weights == 2 * plain.plan.weights  # the mapped file beside ORT's prepacked copy
    assert 2 * native.plan.kv_bytes == 3 * plain.plan.kv_bytes  # ORT's float32 cache and the bf16 copy
    assert sum(m.nbytes for m in native.backend.native.mirrors) == plain.plan.kv_bytes // 2  # 256: whole tiles
    text = native.generate("Name three colours.", max_new_tokens=24, temperature=0)
    assert native.last_stats.new_tokens == 24 or native.last_stats.finish_reason == "eos"
    assert text.strip(), text


def test_by_default_native_decode_is_on_only_when_the_plan_keeps_its_context(engine_dir):
    from awq_edge.engine import Engine

    roomy = Engine.load(engine_dir, threads=2)  # the engine's built plan: 1 GiB, 2048 tokens
    assert roomy.backend.decode_path.startswith("native") and roomy.plan.context == 2048
    # a cap that holds the weights once at 2048 tokens but not twice: ONNX Runtime decodes, same context
    once = Engine.load(engine_dir, threads=2, native_decode=False)
    tight = once.plan.total + once.plan.weights // 2
    auto = Engine.load(engine_dir, threads=2, max_memory=tight)
    assert auto.plan.context == Engine.load(engine_dir, max_memory=tight, native_decode=False).plan.context
    assert auto.backend.decode_path.startswith("onnxruntime (native decode off"), auto.backend.decode_path


def test_without_a_simd_kernel_native_decode_is_not_the_default(engine_dir, monkeypatch):
    # plain C is ~18x slower than MLAS (cpu_native_gemv.py --march x86-64): ORT decodes unless forced
    from awq_edge.engine import Engine

    monkeypatch.setattr(cpu_native, "has_simd_kernel", lambda: False)
    auto = Engine.load(engine_dir, threads=2)
    assert auto.backend.decode_path.startswith("onnxruntime (native decode off: no SIMD"), auto.backend.decode_path
    assert auto.plan.weights == Engine.load(engine_dir, threads=2, native_decode=False).plan.weights
    assert Engine.load(engine_dir, threads=2, native_decode=True).backend.decode_path.startswith("native")


def test_the_native_step_refuses_a_fused_op_list(default_export):
    """decode_step.c runs the unfused op list; a fused linear (norm prologue, act or residual
    epilogue) would write past its buffer, so building records from one is refused, not run."""
    from awq_edge.decoder import decode_ops

    native = OrtBackend(default_export, max_context=64, threads=2, native_decode=True).native
    fused = [op for op in decode_ops(native.spec) if op.kind == "linear" and op.args["epilogue"] == "act"]
    with pytest.raises(cpu_native.Unsupported, match="fused linear"):
        native._op(fused[0])
