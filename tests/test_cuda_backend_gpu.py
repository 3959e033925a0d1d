"""The cuda backend on a real GPU against its numpy twin, the reference executor: pytest -m gpu.

The reference executor (awq_edge/reference_backend.py) runs the same op list over the same
engine file with each kernel's arithmetic in numpy; CI checks it against ONNX Runtime
(test_native_engine.py). Here the cuda backend must match it, teacher-forced over a prompt
longer than one prefill chunk (the chunked GEMM path) and 64 decode steps (CUDA graph
replays): per-step logits within fp16 rounding, and the same argmax except at near-ties.

Models: the tiny model of every family, a ragged one (K not a multiple of 32, a short last
group: the kernels' narrow paths), a SmolLM2-shaped checkpoint through the real packing, and a
random-weight Llama-3.2-1B-shaped engine. Nothing here needs a model download or ONNX Runtime,
so it runs on the bare lent GPU machine (benchmarks/gpu_check.sh).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from awq_edge import plugins
from awq_edge.cuda_runtime import find_gpus

pytestmark = pytest.mark.gpu
GPUS = find_gpus()
if not GPUS:
    pytest.skip("no NVIDIA GPU found: cuda backend tests skipped", allow_module_level=True)
if plugins.find_nvcc() is None:
    pytest.skip("nvcc not found: building a cuda engine compiles its kernels", allow_module_level=True)

from awq_edge.build import build_engine  # noqa: E402
from awq_edge.cuda_backend import GEMV_FUSIONS, CudaBackend  # noqa: E402
from awq_edge.decoder import decode_ops  # noqa: E402
from awq_edge.engine import Engine  # noqa: E402
from awq_edge.errors import UserError  # noqa: E402
from awq_edge.memory import PREFILL_CHUNK  # noqa: E402
from awq_edge.reference_backend import ReferenceBackend  # noqa: E402
from awq_edge.sampling import Sampler, SamplingSettings, candidates, choose_token  # noqa: E402
from awq_edge.synthetic import SHAPES, byte_tokenizer, write_random_checkpoint, write_random_engine  # noqa: E402
from conftest import TINY_FAMILIES  # noqa: E402
from native_helpers import (fused_gemv_error, load_benchmark, near_tie, on_device, read_native_engine,  # noqa: E402
                            prefill_attention_error, split_attention_errors, teacher_forced, tie_heavy_logits)
from test_export_helpers import tiny_checkpoint  # noqa: E402

# two prefill chunks (256 rows: the GEMM, or dequantize + cuBLAS; 20 rows: the GEMV 8 rows at a
# time), then 64 graph replays
PROMPT, DECODE = PREFILL_CHUNK + 20, 64
CONTEXT = PROMPT + DECODE + 8
TINY_GPU = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                vocab_size=320, max_position_embeddings=512)


def this_device():
    """The device profile for this GPU (by name, else any profile of its arch)."""
    from awq_edge.devices import profile_for_arch

    device = profile_for_arch(GPUS[0].arch)
    if device is None:
        pytest.skip(f"no device profile for {GPUS[0].arch}")
    return device


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return byte_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def backends(engine: Path, max_context: int = CONTEXT, cublas=None):
    """(cuda, reference) over the same engine folder; cublas=False: prefill on our GEMM only. The
    cuda backend times its GEMVs (tests run side by side on the GPU, so the choices are not
    kept: benchmarks/cuda_decode.py, later in gpu_check, times the same shapes alone)."""
    manifest, info = read_native_engine(engine)
    return (CudaBackend(engine, manifest, info, max_context, cublas=cublas, tuning_cache=False),
            ReferenceBackend(engine, max_context, info))


def check_against_reference(engine: Path, vocab: int, seed: int = 0, fused: bool = True, cublas=None,
                            gemv: str | None = None) -> None:
    """fused=False: the unfused op list on the GPU (one kernel per op; fused is the default).
    The first prefill chunk is PREFILL_CHUNK rows: through cuBLAS when found (cublas=False: not).
    gemv: the decode GEMV ("cuda_cores", "tensor_cores"; None: the backend's default)."""
    cuda, reference = backends(engine, cublas=cublas)
    if cuda.cublas is not None:  # (not the faster path timed on first use: this one, test_what_is_timed_... that)
        cuda.set_prefill_path(cuda.cublas, PREFILL_CHUNK)
    cuda.ops = decode_ops(cuda.spec, fused=fused)
    if gemv:
        cuda.set_decode_gemv(gemv)
    ids = np.random.default_rng(seed).integers(0, min(vocab, 256), PROMPT + DECODE).tolist()
    errors, disagreements = teacher_forced(cuda, reference, ids, PROMPT)
    print(f"{engine.name}: prefill error {errors[0]:.1e}, decode at most {max(errors[1:]):.1e}; "
          f"prefill: {cuda.prefill_path}; decode: {cuda.decode_path}")
    # fp16 buffers on both sides; what differs is the order of fp32 sums and fp16 rounding there
    assert max(errors) < 1e-2 and disagreements == [], (max(errors), disagreements)


def tiny_engine(root: Path, model_type: str, tokenizer_dir: Path, **overrides) -> Path:
    """A tiny random model of the family, quantized and built for this GPU; skipped where the lent machine's
    transformers predates the family (its image has its own version; LFM3's, AFMoE's are recent)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this machine's transformers has no {model_type} model to build the tiny one from")
    extra = {"query_pre_attn_scalar": 64} if model_type.startswith("gemma") else {}
    ckpt = tiny_checkpoint(root, model_type, tokenizer_dir, **{**TINY_GPU, **extra, **overrides})
    build_engine(str(ckpt), this_device().name, root / "engine", backend="cuda", progress=False)
    return root / "engine"


GEMVS = ["cuda_cores", "tensor_cores"]


@pytest.mark.parametrize("gemv", GEMVS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_every_family_matches_the_reference(model_type, fused, gemv, tokenizer_dir, tmp_path):
    """Our kernels only (cuBLAS has its own test below, and the default path the larger models'),
    decode on either GEMV."""
    check_against_reference(tiny_engine(tmp_path, model_type, tokenizer_dir), 320, fused=fused, cublas=False,
                            gemv=gemv)


def test_ragged_shapes_match_the_reference(tokenizer_dir, tmp_path):
    """hidden 136 and intermediate 200 at group 32: K % 32 != 0 (the GEMV's 4-byte loads, the
    GEMM's unvectorized path) and a short last group in every linear."""
    check_against_reference(tiny_engine(tmp_path, "llama", tokenizer_dir, hidden_size=136, intermediate_size=200),
                            320, cublas=False)


def test_long_prefill_chunks_match_the_reference_through_cublas_and_through_our_gemm(tokenizer_dir, tmp_path):
    """Both prefill paths of a 256-row chunk (dequantized slabs + cuBLAS, and our GEMM) on the
    ragged shape: K % 32 != 0 (rows not 16-byte aligned for cuBLAS either), short last groups."""
    engine = tiny_engine(tmp_path, "llama", tokenizer_dir, hidden_size=136, intermediate_size=200)
    cuda, _ = backends(engine)
    if cuda.cublas is None:
        pytest.skip(f"no cuBLAS on this machine: {cuda.prefill_path}")
    check_against_reference(engine, 320)
    check_against_reference(engine, 320, cublas=False)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_every_family_on_the_persistent_step(model_type, tokenizer_dir, tmp_path):
    """Decode's layers in one launch (decode_step.cu): its blocks at once on the GPU, each task
    waiting for the op before (the CPU emulation runs them side by side only a round at a time)."""
    check_against_reference(tiny_engine(tmp_path, model_type, tokenizer_dir), 320, cublas=False,
                            gemv="persistent_step")


@pytest.mark.parametrize("gemv", GEMVS)
@pytest.mark.parametrize("model_type, head_dim", [("phi3", 96), ("exaone", 80)])
def test_the_ragged_head_sizes_match_the_reference(model_type, head_dim, gemv, tokenizer_dir, tmp_path):
    """Phi-3 and 3.5-mini's head size 96 (a tiny Phi-3 with partial rotary) and EXAONE 3.5 2.4B's 80:
    prefill on attend_mma, decode on attend_split (the persistent step refuses both), their value
    walk leaving 8 of 128 threads idle."""
    engine = tiny_engine(tmp_path, model_type, tokenizer_dir, hidden_size=2 * head_dim, head_dim=head_dim)
    check_against_reference(engine, 320, cublas=False, gemv=gemv)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_a_post_norm_block_matches_the_reference(fused, tokenizer_dir, tmp_path):
    """OLMo 2's block: no pre-norms (q/k/v and gate/up read h), the residual adds as kernels of their
    own, q/k norms one head as wide as all heads; prefill on our GEMM, decode on the default GEMV."""
    check_against_reference(tiny_engine(tmp_path, "olmo2", tokenizer_dir), 320, fused=fused, cublas=False)


def test_q_k_norms_after_rope_match_the_reference(tokenizer_dir, tmp_path):
    """Hunyuan's block: q and k rotated in place (awq_rope_in_place), normed, then stored unrotated
    by rope_store (no tables); prefill on our GEMM, decode on the default GEMV."""
    check_against_reference(tiny_engine(tmp_path, "hunyuan_v1_dense", tokenizer_dir), 320, cublas=False)


@pytest.mark.parametrize("gemv", GEMVS + ["persistent_step"])
def test_attention_sinks_match_the_reference(gemv, tokenizer_dir, tmp_path):
    """Granite SWA's sinks (a logit a head in every softmax's denominator, each attention kernel's
    sink_term), layer 1 sliding without RoPE (queued 2026-12-07, unrun on a GPU)."""
    engine = tiny_engine(tmp_path, "granite_swa", tokenizer_dir, num_hidden_layers=2)
    check_against_reference(engine, 320, cublas=False, gemv=gemv)


@pytest.mark.parametrize("model_type, layers", [("qwen2_moe", 2), ("lfm2_moe", 3), ("ernie4_5_moe", 2), ("gpt_oss", 2),
                                                ("afmoe", 3), ("qwen3_5_moe_text", 2)])
def test_mixtures_of_experts_match_the_reference(model_type, layers, tokenizer_dir, tmp_path):
    """plugins/kernels/moe.cu: each row's experts chosen on the device (softmax or sigmoid routers, expert
    biases, a gated or ungated shared expert; gpt-oss's biased router and experts, its clamped SwiGLU and
    attention sinks; AFMoE's attention output gated value by value, awq_output_gate; Qwen3.5 MoE's after a
    delta net), their GEMVs by the
    ids in device memory, the weighted sum; in prefill and in decode's graph (queued 2026-12-07, unrun on
    a GPU)."""
    engine = tiny_engine(tmp_path, model_type, tokenizer_dir, num_hidden_layers=layers)
    check_against_reference(engine, 320, cublas=False)


@pytest.mark.parametrize("gemv", GEMVS)
def test_clip_qkv_matches_the_reference(gemv, tokenizer_dir, tmp_path):
    """OLMo 1's clip_qkv (0.1: it bites): awq_clamp on the q/k/v rows after their GEMV, RoPE then in
    rope_store; its LayerNorms without weights as norm ops."""
    check_against_reference(tiny_engine(tmp_path, "olmo", tokenizer_dir), 320, cublas=False, gemv=gemv)


@pytest.mark.parametrize("fused, gemv", [(True, "cuda_cores"), (True, "tensor_cores"), (False, None)],
                         ids=["cuda_cores", "tensor_cores", "unfused"])
def test_short_convolutions_match_the_reference(fused, gemv, tokenizer_dir, tmp_path):
    """LFM2's gated short convolutions (awq_short_conv: the tokens before a step read from its store,
    across the prefill chunks and the decode steps) around attention with q/k norms; biases on
    in_proj, out_proj and the convolution; prefill on our GEMM."""
    engine = tiny_engine(tmp_path, "lfm2", tokenizer_dir, num_hidden_layers=3, conv_bias=True,
                         layer_types=["conv", "full_attention", "conv"])
    check_against_reference(engine, 320, fused=fused, cublas=False, gemv=gemv)


@pytest.mark.parametrize("gemv", GEMVS)
def test_lfm3s_gated_heads_match_the_reference(gemv, tokenizer_dir, tmp_path):
    """LFM3: awq_head_gate after each attention (each head's output times sigmoid of its gate row . the
    normed input), sandwich norms after the convolution, attention and MLP, a sliding layer and a full
    one turning half its pairs ("proportional" RoPE); prefill on our GEMM."""
    engine = tiny_engine(tmp_path, "lfm3", tokenizer_dir, num_hidden_layers=3, sliding_window=5,
                         layer_types=["sliding_attention", "conv", "full_attention"])
    check_against_reference(engine, 320, cublas=False, gemv=gemv)


@pytest.mark.parametrize("gemv", GEMVS)
def test_qwen3_5s_delta_nets_match_the_reference(gemv, tokenizer_dir, tmp_path):
    """Qwen3.5: awq_delta_conv and awq_delta_rule (a block a value head, two to a key head) over a 320-row
    prompt (launched one by one: no padded rows in the states) and decode's graph replays; its attention's
    output gated (in q_proj, read as out_gate_proj: awq_output_gate) after (1 + w) q/k norms, a quarter of
    each head rotated (queued 2026-12-07, unrun on a GPU)."""
    engine = tiny_engine(tmp_path, "qwen3_5_text", tokenizer_dir, num_hidden_layers=3,
                         layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_key_heads=1,
                         linear_num_value_heads=2, linear_key_head_dim=64, linear_value_head_dim=128)
    check_against_reference(engine, 320, cublas=False, gemv=gemv)


@pytest.mark.parametrize("gemv", GEMVS)
def test_granite4_hs_mamba_mixers_match_the_reference(gemv, tokenizer_dir, tmp_path):
    """Granite 4.0-H: awq_delta_conv with its bias, awq_mamba_rule (a block a head of 32, four to each of two
    groups, a state of 128) and awq_group_norm over a 320-row prompt and decode's graph replays, around attention
    without RoPE (queued 2026-12-07, unrun on a GPU)."""
    engine = tiny_engine(tmp_path, "granitemoehybrid", tokenizer_dir, num_hidden_layers=3,
                         layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_n_groups=2,
                         mamba_d_state=128, position_embedding_type=None)
    check_against_reference(engine, 320, cublas=False, gemv=gemv)


@pytest.mark.parametrize("model_type", ["arcee", "apertus", "nanochat"])
@pytest.mark.parametrize("gemv", [*GEMVS, "persistent_step"])
def test_an_mlp_without_a_gate_matches_the_reference(gemv, model_type, tokenizer_dir, tmp_path):
    """Arcee's MLP: relu(up)^2 in the decode GEMV's act epilogue (kUngated) on each decode path,
    by awq_act in prefill; prefill on our GEMM. Apertus's: xIELU with each layer's parameters, an
    act op of its own (awq_act, the persistent step's act). nanochat's: Arcee's MLP after an
    embedding norm (awq_norm in place on h; the persistent step's norm op)."""
    check_against_reference(tiny_engine(tmp_path, model_type, tokenizer_dir), 320, cublas=False, gemv=gemv)


@pytest.mark.parametrize("model_type, fused, gemv", [("nemotron", True, None), ("stablelm", False, "persistent_step"),
                                                    ("cohere", True, "persistent_step"), ("cohere2", False, None),
                                                    ("jais2", True, "tensor_cores"), ("phi", True, "persistent_step"),
                                                    ("phi", False, None), ("gpt_neox", True, "persistent_step"),
                                                    ("gpt_neox", False, None), ("gpt_bigcode", True, None),
                                                    ("opt", False, None), ("gptj", True, "persistent_step")])
def test_layer_norms_match_the_reference(model_type, fused, gemv, tokenizer_dir, tmp_path):
    """LayerNorms with a bias: Nemotron's (1 + w, before Arcee's MLP) as norm ops of the fused list,
    StableLM's with the residual adds (awq_add_norm; the persistent step's add_norm op); Cohere's
    parallel block (its LayerNorms' bias zeros), fused and, with its attention's add an op, unfused;
    Jais 2's, with biases on every linear (the GEMV's act and residual epilogues add them too);
    Phi's parallel block with gelu and no gate, and its head's bias (the persistent step's head; awq_lm_head_q8);
    GPT-NeoX's parallel block on two LayerNorms (the MLP's into mlp_x before o_proj adds into h) with exact GELU;
    StarCoder 1's and OPT's learned positions (awq_add_positions), multi-query attention, OPT's ReLU."""
    check_against_reference(tiny_engine(tmp_path, model_type, tokenizer_dir), 320, fused=fused, cublas=False, gemv=gemv)


@pytest.mark.parametrize("cublas", [False, None], ids=["ours", "cublas"])
def test_a_gptq_act_order_model_matches_the_reference(cublas, tokenizer_dir, tmp_path):
    """A GPTQ act-order (desc_act) checkpoint: a gather kernel before each linear, prefill on our
    GEMM or cuBLAS, decode on the default GEMV."""
    from test_gptq_checkpoint import act_order_gptq

    folder, _ = act_order_gptq(tiny_checkpoint(tmp_path, "qwen2", tokenizer_dir, **TINY_GPU), tmp_path / "gptq")
    build_engine(str(folder), this_device().name, tmp_path / "engine", backend="cuda", progress=False)
    check_against_reference(tmp_path / "engine", 320, cublas=cublas)


@pytest.mark.parametrize("gemv", GEMVS + ["persistent_step"])
def test_a_smollm2_shaped_checkpoint_matches_the_reference(gemv, tokenizer_dir, tmp_path):
    """The real packing path (AutoAWQ checkpoint -> kernels' layout) at SmolLM2's widths: 9 heads
    of 3 KV groups, hidden 576 at group 128 (a short last group), a 49152-row tied head."""
    shape = {**SHAPES["smollm2-135m"], "num_hidden_layers": 2}
    ckpt = write_random_checkpoint(tmp_path / "ckpt", shape, 128, tokenizer_dir)
    build_engine(str(ckpt), this_device().name, tmp_path / "engine", backend="cuda", progress=False)
    check_against_reference(tmp_path / "engine", shape["vocab_size"], gemv=gemv)


@pytest.mark.parametrize("gemv", GEMVS)
def test_an_int4_head_matches_the_reference(gemv, tokenizer_dir, tmp_path):
    """--lm-head int4 end to end at SmolLM2's widths (a 49152-row head: 24 slices of candidates)
    with a soft-cap: the 4-bit head's logits and its top 64 re-scored from the fp16 table."""
    shape = {**SHAPES["smollm2-135m"], "num_hidden_layers": 2, "final_logit_softcapping": 30.0}
    ckpt = write_random_checkpoint(tmp_path / "ckpt", shape, 128, tokenizer_dir)
    build_engine(str(ckpt), this_device().name, tmp_path / "engine", backend="cuda", progress=False, lm_head_bits=4)
    check_against_reference(tmp_path / "engine", shape["vocab_size"], gemv=gemv)


@pytest.mark.parametrize("gemv", GEMVS + ["tensor_cores_persistent", "auto", "persistent_step"])
def test_a_1b_random_engine_matches_the_reference(gemv, tmp_path):
    """Llama-3.2-1B's shape (16 layers, GQA 32/8, a 128256-row tied head), random weights."""
    write_random_engine(tmp_path / "engine", "llama3.2-1b", this_device())
    check_against_reference(tmp_path / "engine", SHAPES["llama3.2-1b"]["vocab_size"], gemv=gemv)


def test_what_is_timed_on_this_gpu_leaves_nothing_a_step_reads(tmp_path):
    """Loading times every GEMV kind each role of decode takes on this GPU (tune_decode_gemv: the
    default for a backend on our own driver), and a 70-row prompt (padded to 96) times both
    prefill paths where cuBLAS is found; a backend so timed gives, bit for bit, the logits of one
    never timed that runs the same choices: the timed graphs wrote nothing a step reads. The
    persistent step, timed last against the per-op step, agreed with it (whichever was kept)."""
    from awq_edge.cuda_backend import GEMV_KINDS

    shape = {**SHAPES["smollm2-135m"], "num_hidden_layers": 4}
    write_random_engine(tmp_path / "engine", shape, this_device(), lm_head="int4")
    manifest, info = read_native_engine(tmp_path / "engine")
    tuned = CudaBackend(tmp_path / "engine", manifest, info, CONTEXT, tuning_cache=False)  # (timed, not read)
    tuning = tuned.gemv_tuning
    print(f"timed in {tuning['seconds']:.3f} s: {tuning}")
    assert set(tuning["gemv"]) == set(tuned.gemv_roles()) == set(tuning["us"])  # (576-wide: every kind fits)
    assert all(set(us) == set(GEMV_KINDS) and min(us.values()) > 0 for us in tuning["us"].values())
    assert "persistent_step_error" not in tuning and min(tuning["persistent_step_us"].values()) > 0
    plain = CudaBackend(tmp_path / "engine", manifest, info, CONTEXT, tune=False)
    assert plain.gemv_tuning is None
    plain.tuned_gemv, plain.tuned_step = dict(tuned.tuned_gemv), tuned.tuned_step
    ids = np.random.default_rng(4).integers(0, 256, 76).tolist()
    got = np.asarray(tuned.forward(ids[:70]))
    if tuned.cublas is not None:
        print(f"prefill: {tuned.prefill_path}; {tuned.prefill_tuning}")
        assert set(tuned.prefill_timed) == {96} and min(tuned.prefill_tuning[96].values()) > 0
        plain.set_prefill_path(plain.cublas, 256 if tuned.prefill_timed[96] == "ours" else 96, tuned.slab_bytes_for(96))
    assert np.array_equal(got, np.asarray(plain.forward(ids[:70])))
    for i in ids[70:]:
        assert np.array_equal(np.asarray(tuned.forward([i])), np.asarray(plain.forward([i])))


def cubin_kernel(drv, module: str, name: str):
    """Kernel `name` of plugins/kernels/<module>.cu, built for this GPU, through the driver API."""
    return drv.function(drv.load_module(plugins.build_cubins(GPUS[0].arch)[module].read_bytes()), name)


@pytest.mark.parametrize("kernel", ["cuda_cores", "tensor_cores", "tensor_cores_persistent"])
@pytest.mark.parametrize("k, n, group_size", [(576, 1536, 128), (136, 400, 32), (4096, 4096, 128), (256, 200, 64),
                                              (512, 328, 32), (11008, 4096, 128)])
@pytest.mark.parametrize("fusion", GEMV_FUSIONS)
def test_fused_gemv_kernels_match_their_twins(fusion, k, n, group_size, kernel):
    """Each decode GEMV entry point on its own (cubin, driver API), CUDA cores and tensor cores,
    fresh random data, the output poisoned with NaN, against the twins of what it fuses: norm
    prologue, bias, act, residual, RoPE and the KV write (native_helpers.fused_gemv_error). N = 200
    and 328 leave half a tensor-core tile; K = 256 leaves most of its 8 warps without a window."""
    from awq_edge.cuda_driver import Driver

    if fusion.endswith("rope") and n % 64:
        pytest.skip("q/k/v rows are whole heads of 64")
    if kernel.startswith("tensor_cores") and k % 32:
        pytest.skip("the tensor-core GEMV needs K % 32 == 0")
    drv = Driver(GPUS[0].index)
    name = (f"awq_gemv_tc_{fusion}_g{group_size}" if kernel.startswith("tensor_cores")
            else f"awq_gemv_{fusion}_g{group_size}_w{4 if k % 32 == 0 else 1}")
    blocks = 7 if kernel == "tensor_cores_persistent" else None  # (tiles taken in turn, some blocks one more)
    err = fused_gemv_error(drv, cubin_kernel(drv, "gemv_w4a16", name), fusion, k, n, group_size,
                           kernel.startswith("tensor_cores"), blocks)
    print(f"fused GEMV {fusion} on {kernel} K={k} N={n} G={group_size}: relative error {err:.1e}")
    assert err < 5e-3, err


@pytest.mark.parametrize("head", ["int8", "fp16"])
@pytest.mark.parametrize("vocab, hidden, softcap", [(49152, 576, 0.0), (1000, 136, 30.0), (32000, 4096, 0.0)])
def test_the_heads_match_their_twin(head, vocab, hidden, softcap):
    """awq_lm_head_q8 (int8 rows) and awq_lm_head (fp16) on their own (cubin, driver API) against
    twin_lm_head of the (dequantized) rows; logits poisoned with NaN first. hidden 576 and 4096:
    16-byte loads of int8 rows; 136: 8-byte ones; a vocabulary of 1000: a last warp with rows past
    the end, and a head bias (Phi's) before the soft-cap."""
    from awq_edge import packing
    from awq_edge.cuda_backend import LM_HEAD_ROWS_PER_BLOCK, NORM_THREADS
    from awq_edge.cuda_driver import Driver, f32, i32, ptr
    from awq_edge.reference_backend import twin_lm_head

    rng = np.random.default_rng(vocab + hidden)
    table = (rng.standard_normal((vocab, hidden)) / hidden ** 0.5).astype(np.float16)
    x = (rng.standard_normal(hidden) * 3).astype(np.float16)
    bias = rng.standard_normal(vocab).astype(np.float32) if softcap else None  # (Phi's head bias) before the cap
    if head == "int8":
        q, scales = packing.quantize_rows_int8(table)
        rows = packing.dequantize_rows_int8(q, scales)
        tensors, want = {"q": q, "scales": scales}, twin_lm_head(x, rows, softcap, bias)
    else:
        tensors, want = {"table": table}, twin_lm_head(x, table, softcap, bias)
    drv = Driver(GPUS[0].index)
    fn = cubin_kernel(drv, "decoder_ops", "awq_lm_head_q8" if head == "int8" else "awq_lm_head")
    biases = {} if bias is None else {"bias": bias}
    with on_device(drv, {"x": x, **tensors, "logits": np.full(vocab, np.nan, np.float32), **biases}) as dev:
        drv.launch(fn, (-(-vocab // LM_HEAD_ROWS_PER_BLOCK),), (NORM_THREADS,),
                   [ptr(dev[name]) for name in ("x", *tensors, "logits")] + [i32(vocab), i32(hidden), f32(softcap),
                                                                            ptr(dev["bias"] if biases else 0)])
        got = np.empty(vocab, np.float32)
        drv.download(got, dev["logits"])
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} logits never written"
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{head} head V={vocab} hidden={hidden}: worst element {err:.1e}")
    assert err < 1e-4 and got.argmax() == want.argmax()


@pytest.mark.parametrize("vocab, hidden, softcap", [(49152, 576, 0.0), (1003, 136, 30.0), (151936, 1536, 0.0),
                                                   (262208, 640, 0.0)])
def test_the_int4_heads_kernels_match_their_twins(vocab, hidden, softcap):
    """The three launches of an int4 head on their own (cubins, driver API), fresh random data:
    awq_gemv_logits (a vocabulary padded to a multiple of 8: the pad's logits are never written;
    hidden 136: 4-byte weight loads) against twin_lm_head of W_hat; then on those very logits
    awq_head_candidates against its block plan exactly, and awq_head_rescore: the top 64 (lowest
    ids on ties) recomputed from the fp16 table, every other logit untouched."""
    from types import SimpleNamespace

    from awq_edge.cuda_backend import GEMV_ROWS_PER_BLOCK, GEMV_THREADS, HEAD_RESCORE_ROWS, HEAD_SELECT_THREADS
    from awq_edge.cuda_driver import Driver, f32, i32, ptr
    from awq_edge.decoder import HEAD_INT4_GROUP, HEAD_TOP_K, head_slices, padded_vocab, quantize_head_int4
    from awq_edge.reference_backend import dequantized, twin_head_top_k, twin_lm_head
    from native_helpers import head_candidates_twin

    rng = np.random.default_rng(vocab + hidden)
    table = (rng.standard_normal((vocab, hidden)) / hidden ** 0.5).astype(np.float16)
    x = (rng.standard_normal(hidden) * 3).astype(np.float16)
    spec, group_size = SimpleNamespace(vocab=vocab, hidden=hidden), HEAD_INT4_GROUP
    n = padded_vocab(spec)
    q4 = quantize_head_int4(table, spec)
    want = twin_lm_head(x, dequantized(*(q4[f"lm_head.q4.{p}"] for p in ("qweight", "scales", "zeros")),
                                       group_size)[:vocab], softcap)
    slices, length = head_slices(vocab)
    drv = Driver(GPUS[0].index)
    logits_fn = cubin_kernel(drv, "gemv_w4a16", f"awq_gemv_logits_g{group_size}_w{4 if hidden % 32 == 0 else 1}")
    candidates_fn = cubin_kernel(drv, "head_top_k", "awq_head_candidates")
    rescore_fn = cubin_kernel(drv, "head_top_k", "awq_head_rescore")
    arrays = {"x": x, **q4, "table": table, "logits": np.full(n, np.nan, np.float32),
              "keys": np.full(slices * HEAD_TOP_K, 7, np.uint32), "ids": np.full(slices * HEAD_TOP_K, -7, np.int32)}
    with on_device(drv, arrays) as dev:
        drv.launch(logits_fn, (n // GEMV_ROWS_PER_BLOCK,), (GEMV_THREADS,),
                   [ptr(dev[name]) for name in ("x", "lm_head.q4.qweight", "lm_head.q4.scales", "lm_head.q4.zeros",
                                                "logits")] + [i32(n), i32(hidden), i32(vocab), f32(softcap)])
        approx = np.empty(n, np.float32)
        drv.download(approx, dev["logits"])
        drv.launch(candidates_fn, (slices,), (HEAD_SELECT_THREADS,),
                   [ptr(dev["logits"]), i32(vocab), i32(length), i32(HEAD_TOP_K), ptr(dev["keys"]), ptr(dev["ids"])])
        keys, ids = np.empty(slices * HEAD_TOP_K, np.uint32), np.empty(slices * HEAD_TOP_K, np.int32)
        drv.download(keys, dev["keys"])
        drv.download(ids, dev["ids"])
        drv.launch(rescore_fn, (-(-HEAD_TOP_K // HEAD_RESCORE_ROWS),), (HEAD_SELECT_THREADS,),
                   [ptr(dev["keys"]), ptr(dev["ids"]), i32(slices * HEAD_TOP_K), i32(HEAD_TOP_K), ptr(dev["x"]),
                    ptr(dev["table"]), i32(hidden), f32(softcap), ptr(dev["logits"])])
        got = np.empty(n, np.float32)
        drv.download(got, dev["logits"])
    assert np.isnan(approx[vocab:]).all() and not np.isnan(approx[:vocab]).any()
    err = np.abs(approx[:vocab] - want).max() / np.abs(want).max()
    print(f"int4 head V={vocab} hidden={hidden} g={group_size}: worst element {err:.1e}")
    assert err < 2e-3
    approx = approx[:vocab]
    want_keys, want_ids = head_candidates_twin(approx, vocab, length, HEAD_TOP_K)
    assert np.array_equal(keys, want_keys.reshape(-1)) and np.array_equal(ids, want_ids.reshape(-1))
    chosen = twin_head_top_k(approx, HEAD_TOP_K)
    exact = twin_lm_head(x, table[chosen], softcap)
    assert np.allclose(got[chosen], exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    others = np.setdiff1d(np.arange(vocab), chosen)
    assert np.array_equal(got[others], approx[others]) and np.isnan(got[vocab:]).all()


@pytest.mark.parametrize("vocab", [5, 100, 49152, 262208])
def test_the_head_candidate_search_on_ties_and_nan_keeps_the_twins_choice(vocab):
    """awq_head_candidates + awq_head_rescore on logits drawn from a few values (ties inside and
    across slices), infinities and NaN, and all equal: the re-scored ids are twin_head_top_k's
    (a table of ones against an x of ones makes each re-scored logit 8)."""
    from awq_edge.cuda_backend import HEAD_RESCORE_ROWS, HEAD_SELECT_THREADS
    from awq_edge.cuda_driver import Driver, f32, i32, ptr
    from awq_edge.decoder import HEAD_TOP_K, head_slices
    from awq_edge.reference_backend import twin_head_top_k

    rng = np.random.default_rng(vocab)
    top_k = min(HEAD_TOP_K, vocab)
    slices, length = head_slices(vocab)
    drv = Driver(GPUS[0].index)
    candidates_fn = cubin_kernel(drv, "head_top_k", "awq_head_candidates")
    rescore_fn = cubin_kernel(drv, "head_top_k", "awq_head_rescore")
    for logits in tie_heavy_logits(rng, vocab):
        arrays = {"logits": logits, "keys": np.zeros(slices * top_k, np.uint32),
                  "ids": np.zeros(slices * top_k, np.int32), "x": np.ones(8, np.float16),
                  "table": np.ones((vocab, 8), np.float16)}
        with on_device(drv, arrays) as dev:
            drv.launch(candidates_fn, (slices,), (HEAD_SELECT_THREADS,),
                       [ptr(dev["logits"]), i32(vocab), i32(length), i32(top_k), ptr(dev["keys"]), ptr(dev["ids"])])
            drv.launch(rescore_fn, (-(-top_k // HEAD_RESCORE_ROWS),), (HEAD_SELECT_THREADS,),
                       [ptr(dev["keys"]), ptr(dev["ids"]), i32(slices * top_k), i32(top_k), ptr(dev["x"]),
                        ptr(dev["table"]), i32(8), f32(0.0), ptr(dev["logits"])])
            got = np.empty(vocab, np.float32)
            drv.download(got, dev["logits"])
        assert np.array_equal(np.flatnonzero(got == 8.0), twin_head_top_k(logits, top_k))


@pytest.mark.parametrize("d, heads, window, softcap, sinks", [
    (64, (9, 3), 0, 0.0, False), (128, (8, 2), 700, 0.0, False), (256, (4, 4), 0, 50.0, False),
    (64, (8, 2), 0, 0.0, True)])
def test_split_decode_attention_matches_its_twin(d, heads, window, softcap, sinks):
    """awq_attend_split on its own (cubin, driver API) over a 2000-row cache: 16 splits of 128
    keys, most of them past the position or before the window; two positions in a row, so the
    per-head counters must have been reset by the first step's merging blocks. A sink a head
    (Granite SWA's, gpt-oss's: queued 2026-12-07, unrun on a GPU)."""
    from awq_edge.cuda_driver import Driver

    drv = Driver(GPUS[0].index)
    for pos, err in split_attention_errors(drv, cubin_kernel(drv, "attention", f"awq_attend_split_d{d}"), d, heads,
                                           window, softcap, 2000, (1234, 1235), sinks):
        print(f"split attention D={d} pos={pos} window={window} softcap={softcap}: worst element {err:.1e}")
        assert err < 5e-3, err


@pytest.mark.parametrize("kernel", ["block", "mma"])
@pytest.mark.parametrize("d, heads, past, rows, window, softcap, sinks", [(64, (9, 3), 1000, 37, 0, 0.0, False),
                                                                        (128, (8, 2), 700, 256, 300, 0.0, False),
                                                                        (128, (4, 1), 40, 20, 6, 0.0, False),
                                                                        (64, (2, 2), 5, 70, 0, 30.0, False),
                                                                        (256, (4, 4), 0, 33, 0, 50.0, False),
                                                                        (256, (8, 4), 600, 100, 0, 0.0, False),
                                                                        (64, (8, 2), 300, 70, 0, 0.0, True)])
def test_prefill_attention_over_blocks_of_tokens_matches_its_twin(kernel, d, heads, past, rows, window, softcap,
                                                                  sinks):
    """awq_attend_block (16 tokens a block, CUDA cores) and awq_attend_mma (64, tensor cores; 32-key
    tiles at head size 256) on their own (cubin, driver API): chunks of 37, 256, 20, 70, 33 and 100
    rows (last blocks of fewer tokens), after 0 to 1000 cached rows, windows shorter than a block
    (tiles some tokens see nothing of), GQA, the soft-cap, a sink a head (queued 2026-12-07, unrun on
    a GPU); outputs poisoned with NaN beforehand.
    The twin is twin_attend_block; the tensor-core kernel multiplies V by fp16 probabilities (its
    fragment plan is checked on the CPU, test_native_engine.py)."""
    from awq_edge.cuda_driver import Driver

    drv = Driver(GPUS[0].index)
    err = prefill_attention_error(drv, cubin_kernel(drv, "attention", f"awq_attend_{kernel}_d{d}"), kernel, d, heads,
                                  past, rows, window, softcap, sinks)
    print(f"{kernel} attention D={d} past={past} rows={rows} window={window} softcap={softcap}: worst element {err:.1e}")
    assert err < 5e-3, err


@pytest.fixture(scope="module")
def smol_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "engine"
    write_random_engine(out, "smollm2-135m", this_device())
    return out


def test_cublas_fits_the_reserve_the_memory_plan_counts_for_it(smol_engine):
    """What cuBLAS takes on the device beyond our slab and workspace (its handle, the kernels it
    loads on first use, a captured full chunk's graph), measured around its first prefills (a full
    chunk, then an 80-row one), fits cuda_backend.CUBLAS_RESERVE_BYTES."""
    from awq_edge.cublas import CublasUnavailable, load_cublas
    from awq_edge.cuda_backend import CUBLAS_FROM_ROWS, CUBLAS_RESERVE_BYTES, CUBLAS_WORKSPACE_BYTES

    cuda, _ = backends(smol_engine, cublas=False)
    cuda.drv.synchronize()
    free_before, _ = cuda.drv.memory_info()
    try:
        blas = load_cublas(cuda.drv.stream, cuda.cublas_workspace, CUBLAS_WORKSPACE_BYTES)
    except CublasUnavailable as e:
        pytest.skip(f"no cuBLAS on this machine: {e}")
    cuda.set_prefill_path(blas, CUBLAS_FROM_ROWS)
    np.asarray(cuda.forward(list(range(PREFILL_CHUNK + 80))))
    used = free_before - cuda.drv.memory_info()[0]
    print(f"cuBLAS took {used / 2**20:.1f} MiB of device memory (reserve {CUBLAS_RESERVE_BYTES / 2**20:.0f} MiB)")
    assert used <= CUBLAS_RESERVE_BYTES, used


def test_sampling_on_the_device_matches_the_host_rule(smol_engine):
    """sample_token (plugins/kernels/sample.cu, the history kept on the device) against
    choose_token, same logits and draw: greedy exactly; sampled, a kept id and 97% the same
    (float rounding at a cumulative boundary may flip a rare draw)."""
    cuda, _ = backends(smol_engine, 256)
    vocab = cuda.vocab_size
    rng = np.random.default_rng(0)
    for settings in (SamplingSettings(0.0), SamplingSettings(0.0, repetition_penalty=1.3),
                     SamplingSettings(0.7, 50, 0.95), SamplingSettings(1.0, 0, 0.9, 1.2),
                     SamplingSettings(1.2, 3000, 0.5, 1.1)):
        agree, seen = 0, rng.integers(0, vocab, 30).tolist()
        for draw in range(40):
            if draw == 20:
                seen = rng.integers(0, vocab, 10).tolist()  # another history: uploaded whole
            logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
            cuda.drv.upload(cuda.buf["logits"], logits)
            u = float(rng.random())
            got = cuda.sample_token(cuda.buf["logits"], settings, seen, u)
            want = choose_token(logits, settings, seen, u)
            if settings.temperature == 0:
                assert got == want, (settings, draw)
            else:
                assert got in set(candidates(logits, settings, seen)[0].tolist()), (settings, draw)
            agree += got == want
            seen.append(got)
        assert agree >= 0.97 * 40, (settings, agree)


def test_rewind_then_decode_equals_the_first_time(smol_engine):
    cuda, _ = backends(smol_engine, 256)
    rng = np.random.default_rng(3)
    prompt, steps = rng.integers(0, 256, 40).tolist(), rng.integers(0, 256, 6).tolist()
    np.asarray(cuda.forward(prompt))
    first = [np.asarray(cuda.forward([t])) for t in steps]
    cuda.rewind(len(prompt))
    for t, want in zip(steps, first):  # the same graph on the same cache rows: the same bits
        np.testing.assert_array_equal(np.asarray(cuda.forward([t])), want)
    cuda.rewind(len(prompt) - 5)       # into the prompt: its tail again, as a 5-row chunk
    np.asarray(cuda.forward(prompt[-5:]))
    for t, want in zip(steps, first):
        got = np.asarray(cuda.forward([t]))
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
    with pytest.raises(UserError, match="context full"):
        cuda.forward([1] * 256)


def test_a_device_position_past_the_cache_is_an_error_not_a_token(smol_engine):
    """The attention kernels' over-capacity flag reaches the host: with the device's counter
    forced to the cache's end, the decode step raises (for sampling and for host logits alike),
    the cache starts over, and the engine then decodes as it did before."""
    cuda, _ = backends(smol_engine, 64)
    prompt = np.random.default_rng(5).integers(0, 256, 10).tolist()
    want = np.asarray(cuda.forward(prompt))
    for read in ("sample", "host"):
        cuda.rewind(len(prompt) - 1)
        cuda.drv.upload(cuda.past, np.array([64], np.int64))  # the host still thinks 9
        logits = cuda.forward(prompt[-1:])
        with pytest.raises(UserError, match="past its capacity"):
            if read == "sample":
                cuda.sample_token(logits.ptr, SamplingSettings(0.0), prompt, 0.5)
            else:
                np.asarray(logits)
        assert cuda.position == 0
        np.testing.assert_array_equal(np.asarray(cuda.forward(prompt)), want)


def test_the_engine_generates_on_the_gpu(tokenizer_dir, tmp_path):
    """Engine.load picks the cuda backend: greedy tokens are the reference's argmax (but at a
    near-tie), seeded sampling repeats itself, and a cap the GPU cannot hold is one line."""
    engine_dir = tiny_engine(tmp_path, "qwen3", tokenizer_dir)
    engine = Engine.load(engine_dir, max_context=CONTEXT)
    assert type(engine.backend).__name__ == "CudaBackend"
    prompt = list(range(60, 100))
    "".join(engine.stream_ids(prompt, Sampler(SamplingSettings(0.0)), 24, ignore_eos=True))
    ids = engine.cached_ids  # the prompt and every generated token but the last (never fed)
    assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + 23
    reference = ReferenceBackend(engine_dir, CONTEXT)
    logits = np.asarray(reference.forward(prompt))
    for token in ids[len(prompt):]:
        assert token == logits.argmax() or near_tie(logits, token, 1e-2 * np.abs(logits).max())
        logits = np.asarray(reference.forward([token]))
    runs = [engine.generate("Once upon", max_new_tokens=16, temperature=0.9, seed=7) for _ in range(2)]
    assert runs[0] == runs[1]
    from awq_edge.json_reply import JsonPrefix  # JSON mode: tokens chosen on the host from the GPU's logits

    text = engine.generate("Once upon", max_new_tokens=16, temperature=0.9, seed=7, json_object=True)
    assert JsonPrefix().feed_all(text.encode()) and engine.position == len(engine.cached_ids)
    with pytest.raises(UserError) as e:
        Engine.load(engine_dir, max_memory="100TB")
    assert "\n" not in str(e.value)


def test_decode_run_ahead_gives_the_tokens_and_cache_of_one_step_at_a_time(tokenizer_dir, tmp_path):
    """On the GPU, the Engine with decode run ahead (the default: the step feeding a token queued
    before the host reads it) against one step at a time: the same tokens greedy and sampled, the
    same cache after (the next step's logits bit for bit), also when an end-of-sequence id in the
    middle takes back the step fed past it. (tests/test_kernels_on_cpu.py covers every way a reply
    ends on the emulated stream.)"""
    engine_dir = tiny_engine(tmp_path, "llama", tokenizer_dir)
    engine = Engine.load(engine_dir, max_context=CONTEXT)
    prompt = list(range(60, 100))

    def reply(run_ahead: bool, settings, eos=frozenset()):
        engine.backend.run_ahead = run_ahead
        engine.reset()
        text = "".join(engine._run(list(prompt), Sampler(settings), 24, [], set(eos)))
        cached = list(engine.cached_ids)
        return text, engine.last_stats.finish_reason, cached, np.asarray(engine.backend.forward([5])).copy()

    for settings in (SamplingSettings(0.0), SamplingSettings(0.9, 40, 0.95, 1.2, seed=11)):
        step_by_step = reply(False, settings)
        assert step_by_step[1] == "length" and len(step_by_step[2]) == len(prompt) + 23
        ahead = reply(True, settings)
        assert ahead[:3] == step_by_step[:3] and np.array_equal(ahead[3], step_by_step[3]), settings
        end = step_by_step[2][len(prompt) + 5]
        step_by_step, ahead = reply(False, settings, {end}), reply(True, settings, {end})
        assert step_by_step[1] == "eos" and ahead[:3] == step_by_step[:3] and np.array_equal(ahead[3], step_by_step[3])


@pytest.mark.parametrize("way", ["per_op", "persistent", "queue"])
def test_the_persistent_step_skeleton_matches_its_twin_with_its_blocks_at_once(way, tmp_path):
    """benchmarks/persistent_step.py's skeleton of a persistent decode step on the GPU, where its
    blocks run at once (on the CPU emulation, side by side only a round at a time, in its
    concurrent schedule), against skeleton_twin: three steps in a row, each
    on a different grid, 8 SmolLM2-shaped layers."""
    from awq_edge.cuda_driver import Driver

    bench = load_benchmark("persistent_step")
    drv = Driver(GPUS[0].index)
    module = drv.load_module(bench.build_cubin(plugins.find_nvcc(), GPUS[0].arch, tmp_path / "skeleton.cubin"))
    functions = {name: drv.function(module, name) for name in ("awq_step_skeleton", "awq_step_skeleton_queue")}
    start, words = bench.step_layout(bench.layer_phases(SHAPES["smollm2-135m"], 300), 8, 576)
    skeleton = bench.Skeleton(drv, functions, int(GPUS[0].arch.removeprefix("sm_")) >= 90, start, words,
                              np.random.default_rng(0))
    try:
        for blocks_per_sm in (2, 1, 4):
            assert skeleton.check(way, blocks_per_sm * drv.multiprocessor_count()) is None
    finally:
        skeleton.free()
