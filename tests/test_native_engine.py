"""Native (cuda) engines without a GPU: the build, the refusal to run, and the reference executor.

The reference executor (awq_edge/reference_backend.py) runs the decoder step's op list
(awq_edge/decoder.py) in numpy with the kernels' arithmetic. Matching the ONNX Runtime engine
for SmolLM2 and a tiny model of every family proves the op list, the packed weight layouts and
the families without a GPU; the GPU tests (test_cuda_backend_gpu.py) then only compare each
kernel with its twin. Tiny models here have head_dim 64, the attention kernel's smallest.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from awq_edge import plugins
from awq_edge.backend_ort import OrtBackend
from awq_edge.build import build_engine
from awq_edge import cuda_backend
from awq_edge.cuda_backend import CUBLAS_FROM_ROWS, KERNELS_OF, CudaBackend
from awq_edge.decoder import decode_ops, decoder_spec
from awq_edge.engine import Engine
from awq_edge.errors import UserError
from awq_edge.export.spec import model_spec
from awq_edge.reference_backend import ReferenceBackend
from awq_edge.sampling import SamplingSettings
from conftest import TINY_FAMILIES, has_gpu
from folder_helpers import edit_json, linked_copy, resign
from native_helpers import (MemoryDriver, RecordingCublas, RecordingDriver, attention_f64, head_candidates_twin,
                            head_rescore_twin, read_native_engine, round_embedding_int8, teacher_forced,
                            tie_heavy_logits)
from test_export_helpers import export_for_cpu, longrope, tiny_checkpoint

CLI = [sys.executable, "-m", "awq_edge.cli"]
NATIVE_TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
needs_nvcc = pytest.mark.skipif(plugins.find_nvcc() is None, reason="nvcc not found: building a cuda engine "
                                                                    "compiles its kernels")


def tiny_native_checkpoint(root: Path, model_type: str, tokenizer_dir: Path, **overrides) -> Path:
    extra = {"query_pre_attn_scalar": 64} if model_type.startswith("gemma") else {}
    return tiny_checkpoint(root, model_type, tokenizer_dir, **{**NATIVE_TINY, **extra, **overrides})


@pytest.fixture(scope="module")
def smollm2_cuda_engine(tmp_path_factory, rtn_checkpoint):
    out = tmp_path_factory.mktemp("native") / "smollm2-orin"
    if plugins.find_nvcc() is None:
        pytest.skip("nvcc not found: building a cuda engine compiles its kernels")
    build_engine(str(rtn_checkpoint), "orin", out, backend="cuda", progress=False)
    return out


# ---------------------------------------------------------------- the build, and no GPU here

@needs_nvcc
@pytest.mark.skipif(has_gpu(), reason="this machine has a GPU: the engine would run")
def test_a_cuda_engine_builds_without_a_gpu_and_run_says_none_is_here(rtn_checkpoint, tmp_path):
    out = tmp_path / "smollm2-orin"
    build = subprocess.run([*CLI, "build", str(rtn_checkpoint), "--device", "orin", "--output", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    assert "backend cuda" in build.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["backend"], manifest["device"], manifest["gpu_arch"]) == ("cuda", "orin", "sm_87")
    # kernels of an nvcc newer than CUDA 12 do not load under JetPack 6's driver: the build says so
    newer = int(manifest["kernels_cuda"].split(".")[0]) > 12
    assert ("note: the kernels were compiled by nvcc" in build.stderr) == newer, build.stderr
    assert set(manifest["kernels"]) == set(plugins.CUBIN_SOURCES)
    for file in manifest["kernels"].values():  # GPU code, for the device's arch, in the engine
        assert (out / file).read_bytes()[:4] == b"\x7fELF" and file in manifest["files"]
    run = subprocess.run([*CLI, "run", str(out), "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: no NVIDIA GPU found"), run.stderr


@needs_nvcc
def test_a_cuda_engine_holds_rope_rows_for_its_context_alone(smollm2_dir, tmp_path):
    """A GPU engine's context is fixed at build: its RoPE tables are cut to it (decoder.json
    rope_positions), the logits of what it holds are the full-table engine's, a longer context is
    refused at load, and an edited rope_positions no longer fits the tensors (one line)."""
    ckpt = tiny_native_checkpoint(tmp_path, "qwen3", smollm2_dir, max_position_embeddings=4096)
    for name, context in (("full", None), ("short", 96)):
        build_engine(str(ckpt), "orin", tmp_path / name, backend="cuda", progress=False, max_context=context)
    short = json.loads((tmp_path / "short" / "decoder.json").read_text())
    assert short["rope_positions"] == 96 and short["tensors"]["rope.0.cos"]["shape"] == [96, 32]
    assert "rope_positions" not in json.loads((tmp_path / "full" / "decoder.json").read_text())
    assert (tmp_path / "short" / "weights.bin").stat().st_size < (tmp_path / "full" / "weights.bin").stat().st_size
    ids = np.random.default_rng(2).integers(0, 256, 90).tolist()
    full, cut = ReferenceBackend(tmp_path / "full", 96), ReferenceBackend(tmp_path / "short", 96)
    np.testing.assert_array_equal(cut.forward(ids[:60]), full.forward(ids[:60]))
    for t in ids[60:]:
        np.testing.assert_array_equal(cut.forward([t]), full.forward([t]))
    with pytest.raises(UserError, match="max_context must be 1..96"):
        ReferenceBackend(tmp_path / "short", 97)
    engine = linked_copy(tmp_path / "short", tmp_path / "edited")
    edit_json(engine / "decoder.json", lambda d: d.update(rope_positions=128))
    resign(engine, "manifest.json", "decoder.json")
    with pytest.raises(UserError, match="rope.0.cos is not float16 \\[128, 32\\]") as e:
        ReferenceBackend(engine, 64)
    assert "\n" not in str(e.value)


@needs_nvcc
def test_an_engine_for_another_arch_says_how_to_build_one_here(smollm2_cuda_engine, monkeypatch):
    """An Orin's engine (sm_87) on a machine whose GPU is an RTX 3090 (sm_86): one line naming both
    and the build for this machine's GPU."""
    from awq_edge import cuda_runtime

    monkeypatch.setattr(cuda_runtime, "find_gpus", lambda: [cuda_runtime.Gpu(0, "NVIDIA GeForce RTX 3090", "sm_86",
                                                                             24 << 30)])
    manifest, info = read_native_engine(smollm2_cuda_engine)
    with pytest.raises(UserError, match=r"built for sm_87 \(orin\) but this machine has NVIDIA GeForce RTX 3090 "
                                        r"\(sm_86\); rebuild it with `awq-edge build SRC --device gpu`"):
        CudaBackend(smollm2_cuda_engine, manifest, info, 64)


@needs_nvcc
def test_kernels_the_driver_will_not_load_are_explained_in_one_line(smollm2_cuda_engine):
    """An engine records the CUDA its kernels need (the nvcc release that compiled them); a driver
    that supports an older CUDA and refuses them (CUDA 13's cubins on JetPack 6's 12.6) gets a
    one-line error naming both and what to rebuild with; any other refusal, a line saying so."""
    from awq_edge.cuda_driver import CudaError

    manifest, info = read_native_engine(smollm2_cuda_engine)
    built_for = manifest["kernels_cuda"]
    assert built_for == plugins.nvcc_release(plugins.find_nvcc())
    older = f"{int(built_for.split('.')[0]) - 1}.6"

    class RefusingDriver(RecordingDriver):
        def __init__(self, supported: str):
            super().__init__()
            self.supported = supported

        def load_module(self, cubin: bytes):
            raise CudaError("cuModuleLoadData failed: CUDA_ERROR_UNSUPPORTED_PTX_VERSION (222)")

        def cuda_version(self) -> str:
            return self.supported

    with pytest.raises(UserError) as refused:
        CudaBackend(smollm2_cuda_engine, manifest, info, 64, driver=RefusingDriver(older))
    message = str(refused.value)
    assert "\n" not in message and f"compiled by nvcc {built_for}" in message, message
    assert f"supports CUDA {older} at most" in message and "NVCC=" in message and "UNSUPPORTED_PTX" in message
    with pytest.raises(UserError, match=r"refused the engine's kernels \(cuModuleLoadData failed"):
        CudaBackend(smollm2_cuda_engine, manifest, info, 64, driver=RefusingDriver(built_for))


def check_launches_against_the_cubins(engine: Path, fused: bool = True, gemv: str = "auto") -> set[str]:
    """The cuda backend on a recording driver: a 9-row prefill chunk (the tensor-core GEMV, one pass),
    two decode steps (the graph's capture and a replay), a sampled token, a 40-row chunk (the
    GEMM), and a 64-row chunk (its linears through the
    dequantize kernel and cuBLAS, whose calls must cover every output column of every linear
    once). Every launch must pass exactly the parameters its
    kernel in the engine's cubin declares (count, offsets, sizes: a pointer is 8 bytes, an int or
    float 4) in a block no bigger than its __launch_bounds__. gemv: the decode GEMV choice
    (cuda_backend.DECODE_GEMVS). Returns the kernels launched."""
    import ctypes

    manifest, info = read_native_engine(engine)
    driver = RecordingDriver()
    backend = CudaBackend(engine, manifest, info, 64, driver=driver)
    # the memory plan counts every device byte the backend allocates
    assert driver.allocated <= info.weight_bytes + 64 * info.kv_bytes_per_token + info.workspace(64)
    backend.ops = decode_ops(info.spec, fused=fused)
    backend.set_decode_gemv(gemv)
    backend.forward(list(range(1, 10)))
    before = len(driver.launches)
    backend.forward([3])
    decode_launches = len(driver.launches) - before
    spec = info.spec
    head = 3 if spec.lm_head == "int4" else 1  # (the int4 head's logits, then its top 64 re-scored)
    if gemv == "persistent_step":  # the step (with an fp16/int8 head), an int4 head's kernels, the advance
        assert decode_launches == 2 + (head if head == 3 else 0), decode_launches
    elif fused and not (spec.post_norms or spec.layer_norm or spec.clip_qkv):
        # embed; per layer 4 GEMVs + attention (+ q/k norms and RoPE/KV; + act-order's 4 gathers and the 2
        # norms they take out of the GEMVs; an LFM2 short convolution: its in_proj and out_proj GEMVs, the
        # convolution and the MLP's 2); norm, head, advance
        per_layer = 5 + 3 * spec.qk_norm + 6 * spec.act_order
        convs = len(spec.conv_layers)
        assert decode_launches == 1 + (spec.layers - convs) * per_layer + convs * (5 + 6 * spec.act_order) + 2 + head, \
            decode_launches
    backend.forward([4])
    backend.sample_token(backend.buf["logits"], SamplingSettings(0.7, 40, 0.9, 1.1), [1, 2, 3], 0.5)
    backend.forward(list(range(40)))  # a chunk of more rows than the chunked GEMV takes: the GEMM
    assert backend.cublas is None and backend.prefill_path.startswith("awq-edge GEMV/GEMM")  # a driver given: no cuBLAS
    assert f"lm_head {spec.lm_head}" in backend.decode_path  # (what awq-edge bench prints)
    backend.rewind(0)
    assert backend.cublas_from_rows == CUBLAS_FROM_ROWS
    backend.set_prefill_path(blas := RecordingCublas(), 64)  # (the switch down to a chunk this context holds)
    before = len(driver.launches)
    backend.forward(list(range(64)))
    long_chunk = {name for name, *_ in driver.launches[before:]}
    assert "awq_dequantize_g%d" % spec.group_size in long_chunk and not any("gemm" in n for n in long_chunk)
    assert all(c["rows"] == 64 and c["w"] == backend.dequant_slab for c in blas.calls)
    calls = iter(blas.calls)  # per linear in order: its slabs, side by side, covering its N columns once
    for a in (op.args for op in backend.ops if op.kind == "linear"):
        first = next(calls)
        done, y0 = first["n"], first["y"]
        assert (first["k"], first["ldc"]) == (a["K"], a["N"])
        while done < a["N"]:
            call = next(calls)
            assert (call["k"], call["ldc"], call["y"]) == (a["K"], a["N"], y0 + 2 * done)
            done += call["n"]
        assert done == a["N"], (a["weight"], done)
    assert next(calls, None) is None
    assert driver.programmatic == (manifest["gpu_arch"] == "sm_90")  # overlapping launches: sm_90 only
    for name, grid, block, args in driver.launches:
        kernel, where = driver.kernel_info[name], f"{engine.name}: {name}"
        offset, passed = 0, []
        for value in args:
            size = ctypes.sizeof(value)
            offset = -(-offset // size) * size  # natural alignment, as the parameter buffer lays them out
            passed.append((offset, size))
            offset += size
        assert passed == kernel["params"], f"{where} launched with {passed}, the cubin declares {kernel['params']}"
        threads = int(np.prod(block))
        assert kernel["max_threads"] is None or threads <= kernel["max_threads"], f"{where}: {threads} threads"
        assert min(grid) >= 1, f"{where}: grid {grid}"
    return {name for name, *_ in driver.launches}


@needs_nvcc
def test_every_launch_of_the_cuda_backend_matches_its_kernel_in_the_cubin(smollm2_cuda_engine, smollm2_dir, tmp_path):
    """The host side of every kernel call, checked without a GPU: SmolLM2 (group 128, sm_87) with
    the fused and the unfused op list, then tiny ragged engines at group 32 (sm_87): Qwen2 (q/k/v
    bias, K % 32 != 0: the narrow GEMV and GEMM paths), Qwen3 (q/k norms), Gemma 3 (sandwich norms;
    sm_90, whose launches may overlap), LFM2 (a short convolution, its biases), OLMo 1 (LayerNorms, clip_qkv)."""
    launched = check_launches_against_the_cubins(smollm2_cuda_engine)
    assert {"awq_gemv_tc_norm_rope_g128", "awq_gemv_tc_norm_act_g128", "awq_gemv_residual_g128_w4",  # ("auto")
            "awq_residual_add", "awq_act", "awq_rope_store",  # (prefill: the fusions' kernels)
            "awq_gemv_mma_x16_g128"} <= launched  # (a 9-row chunk: one pass on tensor cores)
    assert not {"awq_add_norm", "awq_gemv_store_g128_w4", "awq_gemv_norm_store_g128_w4"} & launched
    on_cuda_cores = check_launches_against_the_cubins(smollm2_cuda_engine, gemv="cuda_cores")
    assert {"awq_gemv_norm_rope_g128_w4", "awq_gemv_norm_act_g128_w4", "awq_gemv_residual_g128_w4"} <= on_cuda_cores
    on_tensor_cores = check_launches_against_the_cubins(smollm2_cuda_engine, gemv="tensor_cores")
    assert {"awq_gemv_tc_residual_g128", "awq_gemv_tc_norm_act_g128"} <= on_tensor_cores
    persistent = check_launches_against_the_cubins(smollm2_cuda_engine, gemv="tensor_cores_persistent")
    assert {"awq_gemv_tc_norm_rope_g128", "awq_gemv_tc_residual_g128"} <= persistent
    one_launch = check_launches_against_the_cubins(smollm2_cuda_engine, gemv="persistent_step")
    assert "awq_decode_step_g128" in one_launch
    launched |= on_cuda_cores | on_tensor_cores | persistent | one_launch
    unfused = check_launches_against_the_cubins(smollm2_cuda_engine, fused=False)
    assert {"awq_gemv_store_g128_w4", "awq_add_norm", "awq_act"} <= unfused
    assert not {name for name in unfused if "norm_" in name or "residual" in name}
    launched |= unfused
    for model_type in ("qwen2", "qwen3", "gemma3_text", "lfm2", "olmo"):
        extra = ({"query_pre_attn_scalar": 64} if model_type.startswith("gemma") else
                 {"conv_bias": True} if model_type == "lfm2" else {})
        ckpt = tiny_checkpoint(tmp_path / model_type, model_type, smollm2_dir,
                               **{**NATIVE_TINY, "hidden_size": 136, "intermediate_size": 200, **extra})
        device = "h200" if model_type == "gemma3_text" else "orin"  # sm_90: programmatic launches
        build_engine(str(ckpt), device, tmp_path / model_type / "engine", backend="cuda", progress=False)
        launched |= check_launches_against_the_cubins(tmp_path / model_type / "engine")
    every = {name for names in KERNELS_OF.values() for name in names}
    # not launched here: head_dim 128/256 attention, and the GEMV/GEMM of the group sizes not built above
    assert {"awq_rope_store", "awq_attend_d64", "awq_attend_mma_d64", "awq_attend_split_d64", "awq_sample_step", "awq_advance", "awq_bias_add",
            "awq_head_rms_norm", "awq_gemv_norm_rope_g32_w1", "awq_gemv_norm_store_g32_w1", "awq_gemv_act_g32_w1",
            "awq_short_conv", "awq_clamp",
            "awq_gemv_store_g32_w1", "awq_gemv_rows8_g32_w1",
            "awq_gemm_g32_v0"} <= launched <= every


@needs_nvcc
def test_auto_runs_the_normed_linears_of_a_wide_model_on_persistent_tensor_cores(tmp_path):
    """decode_gemv "auto" (the default): the linears with a norm prologue (q/k/v, gate/up) run the
    tensor-core GEMV on its persistent grid (at most GEMV_TC_BLOCKS_PER_SM blocks an SM) and o_proj
    and down the CUDA-core one (what the H200 measured faster for each)."""
    from awq_edge.devices import resolve
    from awq_edge.synthetic import SHAPES, write_random_engine

    shape = dict(SHAPES["llama3.2-1b"], num_hidden_layers=1, vocab_size=512)
    write_random_engine(tmp_path / "e", shape, resolve("h200"), max_context=64)
    manifest, info = read_native_engine(tmp_path / "e")
    driver = RecordingDriver()
    backend = CudaBackend(tmp_path / "e", manifest, info, 64, driver=driver)
    backend.forward([1, 2, 3])
    before = len(driver.launches)
    backend.forward([4])
    grids = {name: grid for name, grid, *_ in driver.launches[before:]}
    assert {"awq_gemv_tc_norm_rope_g128", "awq_gemv_tc_norm_act_g128", "awq_gemv_residual_g128_w4"} <= set(grids)
    assert not {"awq_gemv_norm_rope_g128_w4", "awq_gemv_norm_act_g128_w4", "awq_gemv_tc_residual_g128"} & set(grids)
    gate_up_tiles = 2 * shape["intermediate_size"] // cuda_backend.GEMV_TC_ROWS
    assert grids["awq_gemv_tc_norm_act_g128"][0] == min(gate_up_tiles, cuda_backend.GEMV_TC_BLOCKS_PER_SM
                                                         * backend.sm_count) < gate_up_tiles


@needs_nvcc
def test_the_decode_gemvs_timed_at_load_choose_per_role_and_the_whole_step_has_the_last_word(tmp_path):
    """tune_decode_gemv on a recording driver whose clock is a cost per launch: each role of
    decode's GEMVs gets the one timed fastest (here q/k/v on CUDA cores, o_proj and down on the
    persistent tensor-core grid, against auto's defaults), the decode graph launches those, and
    every graph timed is freed. When those choices make the step slower as a whole (a
    tensor-core o_proj slowing the gate/up after it), auto keeps its defaults."""
    from awq_edge.devices import resolve
    from awq_edge.synthetic import SHAPES, write_random_engine

    shape = dict(SHAPES["llama3.2-1b"], num_hidden_layers=2, vocab_size=512)
    write_random_engine(tmp_path / "e", shape, resolve("h200"), max_context=64)
    manifest, info = read_native_engine(tmp_path / "e")
    cheap_qkv = {"awq_gemv_norm_rope": 1e-11}

    def decode_kernels(costs: dict, slowed_after=("", ""), slowed=0.0) -> tuple:
        driver = RecordingDriver()
        driver.costs, driver.slowed_after, driver.slowed = costs, slowed_after, slowed
        backend = CudaBackend(tmp_path / "e", manifest, info, 64, driver=driver, tune=True)
        assert driver.released == driver.captures  # every timed graph freed (none kept)
        backend.forward([1, 2, 3])
        before = len(driver.launches)
        backend.forward([4])
        return backend, {name: grid for name, grid, *_ in driver.launches[before:]}

    backend, grids = decode_kernels(cheap_qkv)
    tuning, sm_blocks = backend.gemv_tuning, cuda_backend.GEMV_TC_BLOCKS_PER_SM * backend.sm_count
    assert tuning["gemv"] == {"self_attn.qkv_proj norm_rope": "cuda_cores",
                              "self_attn.o_proj residual": "tensor_cores_persistent",
                              "mlp.gate_up_proj norm_act": "tensor_cores_persistent",  # (auto's default)
                              "mlp.down_proj residual": "tensor_cores_persistent"}, tuning
    assert tuning["step_us"]["tuned"] < tuning["step_us"]["default"]
    assert set(tuning["us"]["self_attn.o_proj residual"]) == set(cuda_backend.GEMV_KINDS)
    assert {"awq_gemv_norm_rope_g128_w4", "awq_gemv_tc_residual_g128", "awq_gemv_tc_norm_act_g128"} <= set(grids)
    assert not {"awq_gemv_tc_norm_rope_g128", "awq_gemv_residual_g128_w4"} & set(grids)
    assert grids["awq_gemv_tc_residual_g128"] == (sm_blocks,)  # (o_proj and down: both on the persistent grid)
    assert "as timed on this GPU (qkv_proj on CUDA cores; o_proj on tensor cores (persistent grid)" in \
        backend.decode_path

    backend, grids = decode_kernels(cheap_qkv, ("awq_gemv_tc_residual", "awq_gemv_tc_norm_act"), 1.0)
    tuning = backend.gemv_tuning
    assert tuning["step_us"]["tuned"] > tuning["step_us"]["default"]
    assert tuning["gemv"] == {"self_attn.qkv_proj norm_rope": "tensor_cores_persistent",
                              "self_attn.o_proj residual": "cuda_cores",
                              "mlp.gate_up_proj norm_act": "tensor_cores_persistent",
                              "mlp.down_proj residual": "cuda_cores"}, tuning
    assert {"awq_gemv_tc_norm_rope_g128", "awq_gemv_residual_g128_w4"} <= set(grids)
    # a GPU that refuses the timing (here its events) leaves auto's defaults, and nothing kept
    from awq_edge.cuda_driver import CudaError

    class NoTimer(RecordingDriver):
        def elapsed(self, start, end):
            raise CudaError("cuEventElapsedTime failed: CUDA_ERROR_INVALID_HANDLE (400)")

    driver = NoTimer()
    untimed = CudaBackend(tmp_path / "e", manifest, info, 64, driver=driver, tune=True, tuning_cache=tmp_path / "t")
    assert untimed.gemv_tuning["error"].startswith("cuEventElapsedTime") and not untimed.time_prefill
    assert untimed.auto_choices() == untimed.gemv_tuning["gemv"] == {
        role: cuda_backend.auto_default(ops[0].args) for role, ops in untimed.gemv_roles().items()}
    assert driver.released == driver.captures and not (tmp_path / "t").exists()
    assert "as timed" not in untimed.decode_path
    # a backend the caller gives a driver is not timed unless asked (tests, benchmarks)
    assert CudaBackend(tmp_path / "e", manifest, info, 64, driver=RecordingDriver()).gemv_tuning is None


@needs_nvcc
def test_what_a_gpu_timed_is_kept_for_the_next_load_and_a_bad_file_is_timed_over(smollm2_dir, tmp_path):
    """With a tuning cache folder, the choices timed at load go into one file for this GPU, these
    kernels and these shapes; the next load reads them (nothing timed: no graph captured) and
    runs the same kernels. A file that is not JSON, too big, of another format, or naming a
    role or kind this engine has not (a tensor-core GEMV for the ragged model's RoPE linear, or
    the persistent step it cannot run) is ignored (as is a prefetch or step flag that is not a
    bool): timed again and written over. A file choosing the persistent step gives a decode on
    it. Another shape gets another file."""
    from awq_edge import gpu_tuning
    from awq_edge.devices import resolve
    from awq_edge.synthetic import SHAPES, write_random_engine
    from awq_edge.untrusted import MAX_JSON_BYTES

    shape = dict(SHAPES["llama3.2-1b"], num_hidden_layers=2, vocab_size=512)
    write_random_engine(tmp_path / "e", shape, resolve("h200"), max_context=64)
    manifest, info = read_native_engine(tmp_path / "e")

    def load(engine=tmp_path / "e", info=info, manifest=manifest, folder=tmp_path / "tuning"):
        driver = RecordingDriver()
        driver.costs = {"awq_gemv_norm_rope": 1e-11}  # (q/k/v cheapest on CUDA cores)
        backend = CudaBackend(engine, manifest, info, 64, driver=driver, tune=True, tuning_cache=folder)
        return backend, driver

    timed, driver = load()
    assert driver.captures > 0 and "us" in timed.gemv_tuning
    [kept] = (tmp_path / "tuning").iterdir()
    assert json.loads(kept.read_text())["gemv"] == timed.gemv_tuning["gemv"] == timed.auto_choices()
    again, driver = load()
    assert driver.captures == 0 and again.gemv_tuning == {"gemv": timed.auto_choices(), "prefetch": False,
                                                          "persistent_step": False, "cached": str(kept)}
    assert again.auto_choices()["self_attn.qkv_proj norm_rope"] == "cuda_cores"
    good = kept.read_text()
    kept.write_text(json.dumps({**json.loads(good), "step": True}))
    on_step, driver = load()
    assert driver.captures == 0 and on_step.decodes_on_step() and "in one persistent launch" in on_step.decode_path
    on_step.forward([1])
    assert [name for name, *_ in driver.launches[-2:]] == ["awq_decode_step_g128", "awq_advance"]
    bad_kind = json.loads(good)
    bad_kind["gemv"]["self_attn.o_proj residual"] = "tensor_cores_everywhere"
    bad_role = json.loads(good)
    bad_role["gemv"]["model.layers.0.mlp.up_proj residual"] = "cuda_cores"
    bad_size = json.loads(good)
    bad_size["prefill"] = {"100": "cublas"}
    bad_digits = [json.dumps({**json.loads(good), "prefill": {rows: "ours"}})  # (digits to str.isdigit, not to
                  for rows in ("9\u00b2", "9" * 5000)]                          # int, or too many for it)
    for bad in ("not json", "[" * 60000, json.dumps(bad_kind), json.dumps(bad_role), json.dumps(bad_size), *bad_digits,
                json.dumps({**json.loads(good), "format": True}),
                json.dumps({**json.loads(good), "format": 0}), json.dumps({**json.loads(good), "prefetch": "no"}),
                json.dumps({**json.loads(good), "step": 1}), json.dumps({k: v for k, v in json.loads(good).items()
                                                                         if k != "step"}),
                good + " " * MAX_JSON_BYTES):
        kept.write_text(bad)
        retimed, driver = load()
        assert driver.captures > 0 and "us" in retimed.gemv_tuning, bad[:40]
        assert kept.read_text() == good
    # a folder that cannot be written (here: under a file) only means timing at every load
    (tmp_path / "a_file").write_text("")
    assert not gpu_tuning.write_tuning(tmp_path / "a_file" / "t.json", {}, {}, False, False)
    unkept, driver = load(folder=tmp_path / "a_file" / "tuning")
    assert driver.captures > 0 and unkept.auto_choices() == timed.auto_choices()
    # the ragged model's q/k/v (K = 136) runs on CUDA cores only: a file saying otherwise is not read
    ckpt = tiny_checkpoint(tmp_path / "ragged", "llama", smollm2_dir,
                           **{**NATIVE_TINY, "hidden_size": 136, "intermediate_size": 200})
    build_engine(str(ckpt), "h200", tmp_path / "ragged" / "engine", backend="cuda", progress=False)
    r_manifest, r_info = read_native_engine(tmp_path / "ragged" / "engine")
    ragged, driver = load(tmp_path / "ragged" / "engine", r_info, r_manifest)
    ragged_file = ragged.tuning_path
    qkv = "self_attn.qkv_proj norm_rope"
    assert ragged_file != kept and ragged.auto_choices()[qkv] == "cuda_cores"
    right = ragged_file.read_text()
    for wrong in ({"gemv": {**json.loads(right)["gemv"], qkv: "tensor_cores"}}, {"step": True}):
        ragged_file.write_text(json.dumps({**json.loads(right), **wrong}))
        assert load(tmp_path / "ragged" / "engine", r_info, r_manifest)[1].captures > 0
        assert ragged_file.read_text() == right


@needs_nvcc
def test_auto_decodes_on_the_persistent_step_only_where_it_is_timed_faster_and_agrees(tmp_path):
    """The timing at load's last word: a decode step on auto's per-op launches against the
    persistent step. A clock on which the step is cheaper makes auto decode on it (the step and
    the advance, until another decode is chosen); one on which it is dearer, or where its output
    differs from the per-op step's (a driver whose downloads after the step read 1.5, after the
    per-op step 1), or where it stalls (the status word's bit, cleared after), or whose launch
    the GPU refuses, keeps the per-op step (and the GEMVs timed before it), and says why. The
    check runs with an empty cache at STEP_CHECK_POSITION (here the cache's last row), the
    position put back after. A stall of the step auto took, later in use, is a one-line error
    that resets the conversation, and decode goes on per op from then on (and at the next load:
    the tuning file says so)."""
    from awq_edge.cuda_driver import CudaError
    from awq_edge.devices import resolve
    from awq_edge.synthetic import SHAPES, write_random_engine

    write_random_engine(tmp_path / "e", dict(SHAPES["smollm2-135m"], num_hidden_layers=2, vocab_size=512),
                        resolve("h200"), max_context=64)
    manifest, info = read_native_engine(tmp_path / "e")

    class Differs(RecordingDriver):  # downloads read ones, after a replay of the step one and a half
        after_step, status_after_step = 1.5, 0

        def __init__(self):
            super().__init__()
            self.last, self.zeroed, self.uploads = None, [], []

        def upload(self, device_ptr, array):
            self.uploads.append((device_ptr, np.array(array).tolist()))

        def replay(self, executable):
            super().replay(executable)
            self.last = executable

        def download(self, array, device_ptr):
            on_step = any(name.startswith("awq_decode_step") for name, *_ in self.graphs.get(self.last, []))
            if array.dtype == np.int32:  # (the status word)
                array[...] = self.status_after_step if on_step else 0
            else:
                array[...] = self.after_step if on_step else 1

        def zero(self, device_ptr, nbytes):
            self.zeroed.append(device_ptr)

    class Stalls(Differs):  # ... the same output, but the status word after the step has the stall's bit
        after_step, status_after_step = 1, cuda_backend.STEP_STALLED

    class Refuses(RecordingDriver):  # a GPU that cannot launch the step (its registers, say)
        def launch(self, fn, grid, block, args, shared_bytes=0, programmatic=False):
            if fn.startswith("awq_decode_step"):
                raise CudaError("cuLaunchKernel failed: CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES (701)")
            super().launch(fn, grid, block, args, shared_bytes, programmatic)

        def capture(self, launches):
            try:
                return super().capture(launches)
            except CudaError:
                self.captures -= 1  # (no graph made)
                raise

    agrees = Differs()
    agrees.after_step = 1
    for driver, cheap, taken, error in ((agrees, True, True, None), (RecordingDriver(), False, False, None),
                                        (Differs(), True, False, "differed from the per-op step's"),
                                        (Stalls(), True, False, "stalled"),
                                        (Refuses(), True, False, "the GPU refused it: cuLaunchKernel")):
        driver.costs = {"awq_decode_step": 1e-12} if cheap else {}
        backend = CudaBackend(tmp_path / "e", manifest, info, 64, driver=driver, tune=True,
                              tuning_cache=tmp_path / f"tuning-{error}-{cheap}")
        tuning = backend.gemv_tuning
        assert tuning["persistent_step"] is taken is backend.decodes_on_step(), tuning
        assert driver.released == driver.captures and "us" in tuning and "error" not in tuning
        if error:
            assert error in tuning["persistent_step_error"] and "persistent_step_us" not in tuning
        else:
            us = tuning["persistent_step_us"]
            assert (us["persistent"] < us["per_op"]) is cheap and "persistent_step_error" not in tuning
        zeroed = getattr(driver, "zeroed", [])  # (after the check: the counts and the queue, whatever it found)
        assert (backend.status in zeroed) is (error == "stalled")
        assert not zeroed or {backend.step_done, backend.step_queue, backend.attn_counters} <= set(zeroed[-3:])
        assert ("in one persistent launch" in backend.decode_path) is taken
        if driver is agrees:  # (checked at the cache's last row, the filled keys all before it: then 0 again)
            assert [v for at, v in driver.uploads if at == backend.past] == [[63], [0]]
        for decode, on_step in (("auto", taken), ("cuda_cores", False), ("auto", taken)):
            backend.set_decode_gemv(decode)
            backend.forward([1, 2])
            before = len(driver.launches)
            backend.forward([3])
            names = [name for name, *_ in driver.launches[before:]]
            assert (names == ["awq_decode_step_g128", "awq_advance"]) is on_step, names
    kept = next((tmp_path / "tuning-None-True").iterdir())
    assert json.loads(kept.read_text())["step"] is True
    backend = CudaBackend(tmp_path / "e", manifest, info, 64, driver=agrees, tune=True, tuning_cache=kept.parent)
    assert backend.decodes_on_step() and "cached" in backend.gemv_tuning
    backend.forward([1, 2])
    agrees.status_after_step = cuda_backend.STEP_STALLED  # (the status word read after the decode step)
    zeroed = len(agrees.zeroed)
    with pytest.raises(UserError, match=r"^the GPU's persistent decode step stalled \(decode goes on without it\) "
                                        r"\(an engine bug, please report it\); the conversation was reset"):
        np.asarray(backend.forward([3]))
    assert backend.position == 0 and not backend.decodes_on_step() and not backend.gemv_tuning["persistent_step"]
    assert {backend.status, backend.step_done, backend.step_queue} <= set(agrees.zeroed[zeroed:])
    assert json.loads(kept.read_text())["step"] is False
    backend.forward([1, 2])
    before = len(agrees.launches)
    backend.forward([3])
    names = [name for name, *_ in agrees.launches[before:]]  # (a graph captured anew: per op)
    assert "awq_advance" in names and "awq_decode_step_g128" not in names, names


def test_the_l2_prefetch_of_sm87_and_sm89_is_kept_only_where_it_is_timed_faster(tmp_path):
    """On a GPU without overlapped launches each decode GEMV sends the next linear's weights
    toward L2; the timing at load keeps that only when the step runs faster with it (a clock
    where prefetching GEMVs take less time), else the GEMVs are launched without it, and the
    choice is kept for the next load."""
    from awq_edge.devices import resolve
    from awq_edge.synthetic import SHAPES, write_random_engine

    write_random_engine(tmp_path / "e", dict(SHAPES["smollm2-135m"], num_hidden_layers=2, vocab_size=512),
                        resolve("orin-agx-64gb"), max_context=64)
    manifest, info = read_native_engine(tmp_path / "e")

    class PrefetchHelps(RecordingDriver):
        def cost(self, name, grid, args=()):
            prefetching = name.startswith("awq_gemv_") and args and args[-1].value > 0
            return super().cost(name, grid, args) * (0.5 if prefetching else 1.0)

    for driver, helps in ((PrefetchHelps(), True), (RecordingDriver(), False), (RecordingDriver(), False)):
        backend = CudaBackend(tmp_path / "e", manifest, info, 64, driver=driver, tune=True,
                              tuning_cache=tmp_path / ("helps" if helps else "not"))
        assert not backend.programmatic and backend.gemv_tuning["prefetch"] is helps
        assert ("prefetch_us" in backend.gemv_tuning) is (driver.captures > 0)  # (the third load reads the file)
        backend.forward([1, 2])
        before = len(driver.launches)
        backend.forward([3])
        sizes = [args[-1].value for name, _, _, args in driver.launches[before:] if name.startswith("awq_gemv_")]
        assert len(sizes) == 8 and (max(sizes) > 0) is helps, sizes


@needs_nvcc
def test_prefill_chunks_and_decode_steps_replay_graphs_captured_once(smollm2_cuda_engine):
    """A 600-token prompt is chunks of 256, 256 and 88: the full chunk's graph is captured (its
    launches recorded once) and replayed, the short one padded to 96 rows and that size's graph
    captured; each chunk's tail (the last row's norm, the head, the advance) is launched for its
    real rows, so the position counts real tokens. A second prompt replays the same graphs; a
    chunk whose padding would not fit the cache is launched one by one. A new prefill path drops
    the prefill graphs (they hold the old choice) but not decode's."""
    from awq_edge.cuda_backend import prefill_graph_rows, step_tail
    from awq_edge.memory import PREFILL_CHUNK

    manifest, info = read_native_engine(smollm2_cuda_engine)
    driver = RecordingDriver()
    backend = CudaBackend(smollm2_cuda_engine, manifest, info, 1024, driver=driver)
    assert PREFILL_CHUNK == 256
    backend.forward(list(range(600)))
    # each chunk's tail after its graph: the final norm of its last real row (one block), the head, the advance
    tails = [(name, grid, args) for name, grid, _, args in driver.launches
             if name in ("awq_norm", "awq_add_norm", "awq_advance") and grid == (1,)]
    assert [args[-1].value for name, grid, args in tails] == [255, 256, 255, 256, 87, 88]
    backend.forward([5])
    assert (driver.captures, driver.replays, backend.position) == (3, 4, 601)
    backend.rewind(0)
    backend.forward(list(range(344)))  # 256 (a replay) + 88 (a replay of the 96-row graph)
    assert (driver.captures, driver.replays, backend.position) == (3, 6, 344)
    launches = len(driver.launches)
    backend.forward(list(range(1024 - 344 - 1)))  # ... + 79: padded to 96 it would not fit the 80 rows left
    assert prefill_graph_rows(79, 80) is None and prefill_graph_rows(79, 96) == 96
    assert (driver.captures, driver.replays) == (3, 8)
    eager = [name for name, *_ in driver.launches[launches:]]
    assert len(eager) > len(backend.ops) and eager[-1] == "awq_advance"
    backend.set_prefill_path(RecordingCublas(), 64)
    backend.rewind(0)
    backend.forward(list(range(256)))
    backend.forward([7])
    assert (driver.captures, driver.replays) == (4, 10) and backend.cublas.calls  # recaptured through cuBLAS
    assert backend.ops[step_tail(backend.ops)].args["last_row"] and backend.ops[-1].kind == "lm_head"


def test_a_prefill_chunk_is_padded_to_at_most_half_again_its_rows_within_the_room_left():
    """prefill_graph_rows: every chunk size 2..256 gets the smallest graph size that holds it,
    at most 1.5x its rows (so at most a third of a padded chunk's work is padding), none past the
    room left in the cache, and the largest is a full chunk."""
    from awq_edge.cuda_backend import PREFILL_GRAPH_ROWS, prefill_graph_rows
    from awq_edge.memory import PREFILL_CHUNK

    assert PREFILL_GRAPH_ROWS[-1] == PREFILL_CHUNK and list(PREFILL_GRAPH_ROWS) == sorted(set(PREFILL_GRAPH_ROWS))
    for rows in range(2, PREFILL_CHUNK + 1):
        size = prefill_graph_rows(rows, 10_000)
        assert rows <= size <= 1.5 * rows and not any(rows <= s < size for s in PREFILL_GRAPH_ROWS)
        assert prefill_graph_rows(rows, size) == size and prefill_graph_rows(rows, size - 1) is None


@needs_nvcc
def test_a_failing_call_of_a_stand_in_cublas_hands_prefill_back_to_our_kernels(smollm2_cuda_engine):
    """cuBLAS refusing a GEMM mid-prefill: that linear and every later one run our kernels (the
    GEMM writes the whole output), prefill_path says why, and nothing is raised to the user."""
    from awq_edge.cublas import CublasUnavailable

    class RefusingCublas(RecordingCublas):
        def gemm_wt(self, *args, **kwargs):
            super().gemm_wt(*args, **kwargs)
            if len(self.calls) == 3:
                raise CublasUnavailable("cublasGemmEx failed with cuBLAS status 15")

    manifest, info = read_native_engine(smollm2_cuda_engine)
    driver = RecordingDriver()
    backend = CudaBackend(smollm2_cuda_engine, manifest, info, 128, driver=driver, cublas=RefusingCublas())
    backend.set_prefill_path(backend.cublas, 64)  # (a chunk below the full one the switch waits for)
    backend.forward(list(range(100)))
    linears = sum(op.kind == "linear" for op in backend.ops)
    gemms = [name for name, *_ in driver.launches if name.startswith("awq_gemm_")]
    assert backend.cublas is None and "cuBLAS failed: cublasGemmEx failed" in backend.prefill_path
    assert len(gemms) == linears - 2  # the third linear on: our GEMM (100 rows)


@needs_nvcc
def test_an_engine_whose_cubins_lack_a_kernel_is_refused_with_rebuild(smollm2_cuda_engine):
    """An engine built before a kernel existed (its cubin has no such name) gets one line saying so."""
    from awq_edge.cuda_driver import CudaError

    class OlderCubins(RecordingDriver):
        def function(self, module, name):
            if name == "awq_gemv_mma_g128":
                raise CudaError(f"cuModuleGetFunction({name}) failed: CUDA_ERROR_NOT_FOUND (500)")
            return super().function(module, name)

    manifest, info = read_native_engine(smollm2_cuda_engine)
    with pytest.raises(UserError, match="has no kernel awq_gemv_mma_g128: the engine was built by an older awq-edge; "
                                        "rebuild it"):
        CudaBackend(smollm2_cuda_engine, manifest, info, 64, driver=OlderCubins())


@needs_nvcc
def test_awq_edge_decode_picks_the_decode_choice_and_refuses_a_name_it_does_not_know(smollm2_cuda_engine,
                                                                                    monkeypatch):
    manifest, info = read_native_engine(smollm2_cuda_engine)
    monkeypatch.setenv("AWQ_EDGE_DECODE", "persistent_step")
    driver = RecordingDriver()
    backend = CudaBackend(smollm2_cuda_engine, manifest, info, 64, driver=driver)
    backend.forward([1, 2, 3])
    before = len(driver.launches)
    backend.forward([4])
    assert [name for name, *_ in driver.launches[before:]] == ["awq_decode_step_g128", "awq_advance"]
    assert "one persistent launch" in backend.decode_path
    monkeypatch.setenv("AWQ_EDGE_DECODE", "tensor-cores")
    with pytest.raises(UserError, match="AWQ_EDGE_DECODE='tensor-cores' is not a decode choice; set one of auto, "
                                        "cuda_cores, tensor_cores, tensor_cores_persistent, persistent_step"):
        CudaBackend(smollm2_cuda_engine, manifest, info, 64, driver=RecordingDriver())


@needs_nvcc
def test_a_short_chunks_linear_is_one_tensor_core_gemv_sized_for_its_rows(smollm2_cuda_engine):
    """Without cuBLAS, each linear of a chunk of 1-32 rows is one GEMV launch over all its rows (8, 16
    or 32 rows of x a pass on tensor cores; one row on CUDA cores), and from 33 rows the GEMM."""
    manifest, info = read_native_engine(smollm2_cuda_engine)
    driver = RecordingDriver()
    backend = CudaBackend(smollm2_cuda_engine, manifest, info, 64, driver=driver, cublas=False)
    g, a = info.spec.group_size, next(op.args for op in backend.ops if op.kind == "linear")
    expected = {1: f"awq_gemv_rows1_g{g}_w4", 2: f"awq_gemv_mma_g{g}", 8: f"awq_gemv_mma_g{g}",
                9: f"awq_gemv_mma_x16_g{g}", 16: f"awq_gemv_mma_x16_g{g}", 17: f"awq_gemv_mma_x32_g{g}",
                32: f"awq_gemv_mma_x32_g{g}", 33: f"awq_gemm_g{g}_v1"}
    for rows, name in expected.items():
        launches = len(driver.launches)
        backend.matmul(backend.buf[a["x"]], a["weight"], a["N"], a["K"], backend.buf[a["out"]], rows)
        assert [fn for fn, *_ in driver.launches[launches:]] == [name], rows


@needs_nvcc
def test_a_prefill_chunks_linears_give_x_times_w_hat_on_every_path(smollm2_cuda_engine):
    """The three ways a prefill chunk's linear runs, on host memory with numpy twins of the
    kernels and of cuBLAS (the dequantize kernel's twin is packing.dequantize rounded to fp16, as
    test_kernels_gpu.py checks on a GPU): 64 rows as slabs of weight rows dequantized into one
    scratch buffer and each multiplied by cuBLAS into its columns (slabs small enough here that
    every linear of layer 0 takes several, the last one short); 19 rows through the tensor-core
    GEMV in one pass; 40 rows through the GEMM, K split over blocks as for a 132-SM GPU. Each gives x @ W_hat^T from
    weights.bin, and every launch covers its output."""
    from awq_edge.packing import dequantize, unpack_int4

    slab_bytes = 2 * 1536 * 40  # 104 rows at K = 576, 40 at 1536
    manifest, info = read_native_engine(smollm2_cuda_engine)
    g = info.spec.group_size

    def w_hat(drv, qweight, scales, zeros, n, k):
        groups = -(-k // g)
        q = unpack_int4(drv.array_at(qweight, np.int32, (n, k // 8)))
        s, z = (drv.array_at(a, np.float16, (n, groups)) for a in (scales, zeros))
        return dequantize(q, s, z, g).astype(np.float16)

    def dequantize_twin(drv, args):
        qweight, scales, zeros, w, n, k = args
        drv.array_at(w, np.float16, (n, k))[:] = w_hat(drv, qweight, scales, zeros, n, k)

    def product_twin(drv, x, qweight, scales, zeros, y, m, n, k):
        weights = w_hat(drv, qweight, scales, zeros, n, k).astype(np.float32)
        product = drv.array_at(x, np.float16, (m, k)).astype(np.float32) @ weights.T
        drv.array_at(y, np.float16, (m, n))[:] = product.astype(np.float16)

    twins = {f"awq_dequantize_g{g}": dequantize_twin,
             f"awq_gemm_g{g}_v1": lambda drv, a: product_twin(drv, *a[:5], *a[5:8])}
    for m in range(1, 9):
        twins[f"awq_gemv_rows{m}_g{g}_w4"] = lambda drv, a, m=m: product_twin(drv, *a[:5], m, *a[5:])
    twins[f"awq_gemv_mma_x32_g{g}"] = lambda drv, a: product_twin(drv, *a)

    class H200Sized(MemoryDriver):  # 132 SMs: the GEMM's 40-row chunks split K (its twin ignores how)
        def multiprocessor_count(self):
            return 132

    driver = H200Sized(twins)
    backend = CudaBackend(smollm2_cuda_engine, manifest, info, 64, driver=driver, cublas=False)
    blas = RecordingCublas(driver)
    weights = np.memmap(smollm2_cuda_engine / info.weights_file, np.uint8, "r")

    def tensor(name):
        dtype, shape, offset = info.tensors[name]
        return weights[offset:offset + np.dtype(dtype).itemsize * int(np.prod(shape))].view(dtype).reshape(shape)

    rng = np.random.default_rng(3)
    for rows, path in ((64, "cublas"), (19, "gemv"), (40, "gemm")):
        backend.set_prefill_path(blas if path == "cublas" else None, 64, slab_bytes)  # (64 rows: cuBLAS too)
        for a in (op.args for op in backend.ops if op.kind == "linear" and op.args["layer"] == 0):
            name, n, k = a["weight"], a["N"], a["K"]
            if path == "cublas":
                slab = cuda_backend.slab_rows(n, k, slab_bytes)
                assert -(-n // slab) > 2 and n % slab
            x = rng.standard_normal((rows, k)).astype(np.float16)
            driver.upload(backend.buf[a["x"]], x)
            y = driver.alloc(2 * rows * n)
            launches = len(driver.launches)
            backend.matmul(backend.buf[a["x"]], name, n, k, y, rows)
            launched = driver.launches[launches:]
            assert {fn for fn, *_ in launched} == {
                "cublas": {f"awq_dequantize_g{g}"}, "gemv": {f"awq_gemv_mma_x32_g{g}"},
                "gemm": {f"awq_gemm_g{g}_v1"}}[path]
            for fn, grid, block, args in launched:  # every weight word (dequantize) or output row has a thread
                covered = grid[0] * block[0] >= args[4].value * k // 8 if path == "cublas" else \
                    grid[0] * {"gemv": 16, "gemm": cuda_backend.GEMM_TILE_N}[path] >= n
                assert covered and (path != "gemm" or grid[1] * cuda_backend.GEMM_TILE_M >= rows), (fn, grid)
                assert path != "gemm" or block[0] == cuda_backend.GEMM_THREADS
                if path == "gemm":  # K split as gemm_split_count says, within the workspace it is given
                    tiles = grid[0] * grid[1]
                    assert grid[2] == cuda_backend.gemm_split_count(rows, n, k, 132) > 1, (name, grid)
                    assert grid[2] * tiles * cuda_backend.GEMM_SPLIT_TILE_BYTES <= cuda_backend.GEMM_SPLIT_WORKSPACE_BYTES
                    assert tiles <= cuda_backend.GEMM_SPLIT_MAX_TILES
                    assert [args[8].value, args[9].value] == [backend.gemm_partials, backend.gemm_counters]
            weights_hat = dequantize(unpack_int4(tensor(f"{name}.qweight")), tensor(f"{name}.scales"),
                                     tensor(f"{name}.zeros"), g)
            expected = x.astype(np.float32) @ weights_hat.astype(np.float16).astype(np.float32).T
            got = driver.array_at(y, np.float16, (rows, n)).astype(np.float32)
            assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max(), (path, name)


@pytest.mark.parametrize("vocab", [5, 64, 100, 2049, 49152, 151936, 262208, 1 << 20])
def test_an_int4_heads_candidate_search_keeps_the_top_64_lowest_ids_on_ties(vocab):
    """The two kernels of the int4 head's re-scoring, as their block plans (select.cuh step by
    step), choose reference_backend.twin_head_top_k's set: the 64 largest logits, of equal ones
    the lowest ids, NaN never before a number, whatever the slices cut: logits drawn from a few
    values (ties across slices), infinities and NaN, or all equal; at vocabularies below 64, every
    id. The slices fit the kernels' shared memory up to the largest vocabulary an int4 head takes."""
    from awq_edge.decoder import HEAD_SELECT_CAPACITY, HEAD_TOP_K, head_slices
    from awq_edge.reference_backend import twin_head_top_k

    slices, length = head_slices(vocab)
    assert length <= HEAD_SELECT_CAPACITY and slices * HEAD_TOP_K <= HEAD_SELECT_CAPACITY and slices * length >= vocab
    rng = np.random.default_rng(vocab)
    top_k = min(HEAD_TOP_K, vocab)
    for logits in [rng.standard_normal(vocab).astype(np.float32)] + tie_heavy_logits(rng, vocab):
        keys, ids = head_candidates_twin(logits, vocab, length, top_k)
        scratch = logits.copy()
        chosen = head_rescore_twin(keys, ids, top_k, np.zeros(8, np.float16), np.zeros((vocab, 8), np.float16), 0.0,
                                   scratch)
        expected = twin_head_top_k(logits, top_k)
        assert np.array_equal(np.sort(chosen), expected) and expected.size == top_k
        assert not np.isnan(logits[expected]).any() or np.isnan(logits).sum() > vocab - top_k
        assert (scratch[chosen] == 0).all()  # re-scored (against a zero x)


@needs_nvcc
def test_an_int4_heads_three_launches_give_the_rescored_logits_on_host_memory(tmp_path):
    """The int4 head through the cuda backend, on host memory with the kernels' twins: the 4-bit
    GEMV's logits (group 32 in an engine of group 64; a vocabulary of 20003 rows, padded to 20008
    in weights.bin: the pad is never written), each slice's candidates, then their re-scoring from the fp16 table, soft-capped.
    The logits are reference_backend.twin_rescored_head's from the engine's own tensors."""
    from awq_edge.decoder import HEAD_INT4_GROUP, padded_vocab
    from awq_edge.devices import resolve
    from awq_edge.packing import dequantize, unpack_int4
    from awq_edge.reference_backend import dequantized, load_tensors, twin_rescored_head
    from awq_edge.synthetic import SHAPES, write_random_engine

    shape = dict(SHAPES["smollm2-135m"], num_hidden_layers=1, vocab_size=20003, tie_word_embeddings=False,
                 final_logit_softcapping=30.0)
    write_random_engine(tmp_path / "e", shape, resolve("orin-agx-64gb"), group_size=64, max_context=32, lm_head="int4")
    manifest, info = read_native_engine(tmp_path / "e")
    spec = info.spec
    assert (spec.final_softcap, padded_vocab(spec)) == (30.0, 20008)

    def logits_twin(drv, args):
        x, qweight, scales, zeros, logits, n, k, vocab, softcap = args
        groups = -(-k // HEAD_INT4_GROUP)
        w = dequantize(unpack_int4(drv.array_at(qweight, np.int32, (n, k // 8))),
                       *(drv.array_at(a, np.float16, (n, groups)) for a in (scales, zeros)), HEAD_INT4_GROUP)
        y = w.astype(np.float16).astype(np.float32)[:vocab] @ drv.array_at(x, np.float16, (k,)).astype(np.float32)
        drv.array_at(logits, np.float32, (vocab,))[:] = softcap * np.tanh(y / softcap) if softcap > 0 else y

    def candidates_twin(drv, args):
        logits, vocab, length, top_k, keys, ids = args
        slices = -(-vocab // length)
        k, i = head_candidates_twin(drv.array_at(logits, np.float32, (vocab,)), vocab, length, top_k)
        drv.array_at(keys, np.uint32, (slices, top_k))[:], drv.array_at(ids, np.int32, (slices, top_k))[:] = k, i

    def rescore_twin(drv, args):
        keys, ids, candidates, top_k, x, table, hidden, softcap, logits = args
        head_rescore_twin(drv.array_at(keys, np.uint32, (candidates,)), drv.array_at(ids, np.int32, (candidates,)),
                          top_k, drv.array_at(x, np.float16, (hidden,)),
                          drv.array_at(table, np.float16, (spec.vocab, hidden)), softcap,
                          drv.array_at(logits, np.float32, (spec.vocab,)))

    driver = MemoryDriver({"awq_gemv_logits_g32_w4": logits_twin, "awq_head_candidates": candidates_twin,
                           "awq_head_rescore": rescore_twin})
    backend = CudaBackend(tmp_path / "e", manifest, info, 32, driver=driver)
    x = np.random.default_rng(4).standard_normal(spec.hidden).astype(np.float16)
    driver.upload(backend.buf["x"], x)
    driver.upload(backend.buf["logits"], np.full(spec.vocab, np.nan, np.float32))
    head = next(op for op in backend.ops if op.kind == "lm_head")
    backend.launch_op(head, 1)
    assert [fn for fn, *_ in driver.launches] == ["awq_gemv_logits_g32_w4", "awq_head_candidates", "awq_head_rescore"]
    tensors = load_tensors(tmp_path / "e", info)
    w_hat = dequantized(*(tensors[f"lm_head.q4.{part}"] for part in ("qweight", "scales", "zeros")), HEAD_INT4_GROUP)
    expected = twin_rescored_head(x, w_hat[:spec.vocab], tensors["lm_head.weight"], 64, 30.0)
    got = driver.array_at(backend.buf["logits"], np.float32, (spec.vocab,))
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-5), np.abs(got - expected).max()


# ---------------------------------------------------------------- the reference executor

@needs_nvcc
def test_reference_executor_matches_the_ort_engine_for_smollm2(smollm2_cuda_engine, rtn_checkpoint, tmp_path):
    reference = ReferenceBackend(smollm2_cuda_engine, max_context=128)
    ort = OrtBackend(export_for_cpu(rtn_checkpoint, tmp_path, "ort"), max_context=128)  # fp32, exact
    ids = np.random.default_rng(0).integers(0, 49152, 16 + 32).tolist()
    errors, disagreements = teacher_forced(reference, ort, ids, 16)
    # fp16 activations against fp32 ones: ~1e-3 (measured 1.0e-3 prefill, 2.2e-3 decode at most)
    assert max(errors) < 1e-2 and disagreements == [], (max(errors), disagreements)


YARN = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 16}}  # cos/sin scaled by 1.139


@needs_nvcc
@pytest.mark.parametrize("model_type, overrides",
                         [*((t, {}) for t in TINY_FAMILIES), ("qwen3", YARN), ("phi3", longrope(64, original=24)),
                          ("smollm3", {}), ("granite", {}), ("glm", {}), ("glm4", {}), ("ernie4_5", {}),
                          ("olmo2", {}), ("olmo3", {}), ("exaone4", {}), ("gemma", {}), ("vaultgemma", {}),
                          ("hunyuan_v1_dense", {}), ("arcee", {}), ("nemotron", {}), ("stablelm", {}), ("cohere", {}),
                          ("cohere2", {}), ("jais2", {}), ("starcoder2", {}),
                          ("granitemoehybrid", {"position_embedding_type": None}), ("phi", {}),
                          ("hyperclovax", {}), ("olmo", {}), ("apertus", {}), ("apertus1p5_text", {}),
                          ("nanochat", {}),
                          ("lfm2", {"conv_bias": True, "num_hidden_layers": 3,
                                    "layer_types": ["conv", "full_attention", "conv"]}),
                          ("lfm3", {"num_hidden_layers": 4,
                                    "layer_types": ["sliding_attention", "conv", "full_attention", "conv"]}),
                          ("gpt_neox", {}), ("gpt_neox", {"use_parallel_residual": False}),
                          ("gpt_bigcode", {}), ("gpt_bigcode", {"multi_query": False}), ("opt", {"ffn_dim": 256}),
                          ("gpt2", {}),
                          ("gptj", {"rotary_dim": 16}), ("gpt_neo", {}), ("granite_swa", {}),
                          ("qwen2_moe", {}), ("lfm2_moe", {}), ("ernie4_5_moe", {}), ("gpt_oss", {}), ("afmoe", {}),
                          ("mellum", {}),
                          ("qwen3_5_text", {"num_hidden_layers": 3, "layer_types": ["linear_attention",
                                                                                   "full_attention",
                                                                                   "linear_attention"]}),
                          ("qwen3_5_moe_text", {})],
                         ids=[*TINY_FAMILIES, "qwen3_yarn", "phi3_longrope", "smollm3_nope", "granite", "glm", "glm4",
                              "ernie4_5", "olmo2", "olmo3", "exaone4", "gemma", "vaultgemma", "hunyuan", "arcee",
                              "nemotron", "stablelm", "cohere", "cohere2", "jais2", "starcoder2",
                              "granite4_nope", "phi", "hyperclovax", "olmo", "apertus", "apertus1p5", "nanochat",
                              "lfm2", "lfm3",
                              "gpt_neox", "gpt_neox_sequential", "gpt_bigcode_multi_query", "gpt_bigcode",
                              "opt", "gpt2", "gptj", "gpt_neo", "granite_swa_sinks", "qwen2_moe", "lfm2_moe",
                              "ernie4_5_moe", "gpt_oss", "afmoe", "mellum", "qwen3_5", "qwen3_5_moe"])
def test_reference_executor_matches_the_ort_engine_for_every_family(model_type, overrides, smollm2_dir, tmp_path):
    ckpt = tiny_native_checkpoint(tmp_path, model_type, smollm2_dir, **overrides)
    round_embedding_int8(ckpt)  # what the cuda engine's int8 embedding reads (its cost: a benchmark's)
    engine = tmp_path / "engine"
    build_engine(str(ckpt), "orin", engine, backend="cuda", progress=False)
    reference = ReferenceBackend(engine, max_context=64)
    ort = OrtBackend(export_for_cpu(ckpt, tmp_path / "exports", "ort"), max_context=64)
    # 44 tokens: longer than Mistral's (5) and Gemma 3's (4) sliding windows in these tiny configs
    ids = np.random.default_rng(1).integers(0, 256, 12 + 32).tolist()
    errors, disagreements = teacher_forced(reference, ort, ids, 12)
    assert max(errors) < 1e-2 and disagreements == [], (max(errors), disagreements)


@pytest.mark.parametrize("model_type, backend, refusal", [
    ("llama", "cuda", "head_dim 16 is not supported by the cuda backend's attention kernel"),
    ("hunyuan_v1_dense", "trt", "q/k norms come after RoPE, and the trt target's attention plugin"),
    ("granite_swa", "trt", "granite_swa's attention sinks are not in the trt target's attention plugin"),
])
def test_a_gpu_build_refuses_what_its_kernels_cannot_run_before_quantizing(model_type, backend, refusal,
                                                                           tiny_model_dir, tmp_path, monkeypatch):
    from awq_edge import build

    monkeypatch.setattr(build, "_quantize", lambda *args: pytest.fail("quantized before refusing"))
    with pytest.raises(UserError, match=refusal):
        build.build_engine(str(tiny_model_dir(model_type)), "rtx4090", tmp_path / "engine", backend=backend,
                           progress=False)
    assert not (tmp_path / "engine").exists()


@needs_nvcc
def test_biases_on_every_linear_run_on_the_cuda_op_list_as_on_the_cpu_engine(tmp_path, smollm2_dir):
    """Llama's attention_bias biases o_proj as well as q/k/v, mlp_bias gate/up/down (ERNIE 4.5's
    use_bias, Jais 2's): the cuda engine holds them all (decoder.json out_bias; gate/up's
    interleaved with its rows) and its op list adds them as the ORT graph does; the graph matches
    transformers."""
    from awq_edge.checkpoint import load_awq_as_float
    from test_export_helpers import check_against_reference

    ckpt = tiny_native_checkpoint(tmp_path, "llama", smollm2_dir, attention_bias=True, mlp_bias=True)
    round_embedding_int8(ckpt)  # what the cuda engine's int8 embedding reads
    build_engine(str(ckpt), "orin", tmp_path / "engine", backend="cuda", progress=False)
    assert json.loads((tmp_path / "engine" / "decoder.json").read_text())["out_bias"] is True
    ort = export_for_cpu(ckpt, tmp_path / "exports", "ort")
    ids = np.random.default_rng(2).integers(0, 256, 12 + 8).tolist()
    check_against_reference(ort, load_awq_as_float(ckpt).eval(), ids, 12, 1e-5)
    errors, disagreements = teacher_forced(ReferenceBackend(tmp_path / "engine", max_context=64),
                                           OrtBackend(ort, max_context=64), ids, 12)
    assert max(errors) < 1e-2 and disagreements == [], (max(errors), disagreements)


@needs_nvcc
def test_a_cuda_engines_head_is_int8_unless_int4_or_float_is_asked(tmp_path, smollm2_dir):
    """int8 rows (half the bytes read per token) by default, the checkpoint's fp16 with --lm-head
    float, a 4-bit linear with its top 64 re-scored from the fp16 table with --lm-head int4. On
    the reference executor the int8 head's logits stay within 1 % of the fp16 head's and pick the
    same token at every step; the int4 head's top 64 hold the fp16 head's best token at every
    step, with the fp16 head's very logits, so it picks the same token too."""
    ckpt = tiny_native_checkpoint(tmp_path, "qwen2", smollm2_dir)  # untied: the fp16 head is its own tensor
    backends = {}
    for bits, head in (("auto", "int8"), (None, "fp16"), (4, "int4")):
        engine = tmp_path / head
        build_engine(str(ckpt), "orin", engine, backend="cuda", progress=False, lm_head_bits=bits)
        decoder = json.loads((engine / "decoder.json").read_text())
        assert decoder["lm_head"] == head
        assert ("lm_head.q8" in decoder["tensors"], "lm_head.weight" in decoder["tensors"],
                "lm_head.q4.qweight" in decoder["tensors"]) == (head == "int8", head != "int8", head == "int4")
        backends[head] = ReferenceBackend(engine, max_context=64)
    ids = np.random.default_rng(2).integers(0, 256, 40).tolist()
    errors, disagreements = teacher_forced(backends["int8"], backends["fp16"], ids, 8, margin=0)
    assert max(errors) < 1e-2 and disagreements == [], (max(errors), disagreements)
    backends["fp16"].rewind(0)
    for step in [ids[:8]] + [[t] for t in ids[8:]]:
        exact, got = backends["fp16"].forward(step), backends["int4"].forward(step)
        rescored = np.flatnonzero(np.abs(got - exact) <= 1e-5 * np.abs(exact).max())
        assert rescored.size >= 64 and exact.argmax() in rescored and got.argmax() == exact.argmax()
    assert "awq_lm_head" in check_launches_against_the_cubins(tmp_path / "fp16")  # the fp16 head's launch
    launched = check_launches_against_the_cubins(tmp_path / "int4")
    assert {"awq_head_candidates", "awq_head_rescore"} <= launched
    assert any(name.startswith("awq_gemv_logits_") for name in launched)
    refused = subprocess.run([*CLI, "build", str(ckpt), "--device", "orin", "--backend", "cuda", "--lm-head",
                              "int3", "--output", str(tmp_path / "int3")], capture_output=True, text=True)
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1 and "--lm-head int3" in refused.stderr
    assert not (tmp_path / "int3").exists()


def test_a_head_with_a_bias_runs_on_the_int8_and_fp16_heads_and_is_refused_on_int4():
    """Phi's head bias: the int8 and fp16 heads' kernels add it (lm_head.cuh), the int4 head's do not."""
    model = model_spec({"model_type": "phi", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
                        "num_attention_heads": 4, "vocab_size": 300})
    for head in ("int8", "fp16"):
        assert decode_ops(decoder_spec(model, 32, lm_head=head))[-1].args["bias"] == "lm_head.bias"
    with pytest.raises(UserError, match="phi's head has a bias, which the int4 head's kernels do not add"):
        decoder_spec(model, 32, lm_head="int4")


def test_an_activation_with_parameters_is_an_act_op_of_its_own_fused_or_not():
    """Apertus's xIELU (each layer's parameters): never the GEMV's act epilogue (which takes none);
    an act op with the layer's `act_fn.xielu`, after a GEMV that norms its input in the fused list."""
    model = model_spec({"model_type": "apertus", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "vocab_size": 300})
    for fused in (True, False):
        ops = decode_ops(decoder_spec(model, 32), fused=fused)
        acts = [i for i, op in enumerate(ops) if op.kind == "act"]
        assert [ops[i].args["params"] for i in acts] == [f"model.layers.{i}.mlp.act_fn.xielu" for i in range(2)]
        assert all(ops[i - 1].args["weight"].endswith("mlp.up_proj") for i in acts)
        assert all(op.args["epilogue"] != "act" for op in ops if op.kind == "linear")
        assert bool(ops[acts[0] - 1].args["norm"]) == fused


@needs_nvcc
def test_an_engine_runs_on_the_reference_executor(smollm2_cuda_engine, engine_dir):
    """The backend interface end to end (Engine, tokenizer, sampler) on the reference executor:
    the greedy reply is the ONNX Runtime engine's."""
    from awq_edge.engine import engine_plan
    from awq_edge.engine_dir import check_files, read_decoder_info, read_manifest
    from awq_edge.tokenizer import Tokenizer

    path = smollm2_cuda_engine
    manifest = read_manifest(path)
    files = check_files(path, manifest["files"])
    info = read_decoder_info(path, files)
    plan = engine_plan({**manifest, "device": "orin-nano-8gb"}, info, max_context=256)  # built for the family
    native = Engine(path, manifest, info, Tokenizer(path, info.config, files), ReferenceBackend(path, 256, info), plan)
    prompt = "What is the capital of France?"
    got = native.generate(prompt, max_new_tokens=12, temperature=0)
    # ONNX Runtime decoding: the default native CPU step's int8 / bf16 rounding can flip a near-tie
    onnxruntime = Engine.load(engine_dir, native_decode=False)
    assert got == onnxruntime.generate(prompt, max_new_tokens=12, temperature=0) and "Paris" in got


@needs_nvcc
def test_random_models_run_on_the_reference_executor(tmp_path):
    """awq_edge/synthetic.py, which the GPU tests and benchmarks/cuda_decode.py use where no model
    can be carried: a random checkpoint of SmolLM2's widths (2 layers) exports to an ORT engine that
    the reference executor matches, and a random engine written straight in the kernels' layout
    passes the engine checks and gives finite logits of the size it promises."""
    from awq_edge.devices import resolve
    from awq_edge.synthetic import SHAPES, byte_tokenizer, write_random_checkpoint, write_random_engine

    shape = {**SHAPES["smollm2-135m"], "num_hidden_layers": 2}
    ckpt = write_random_checkpoint(tmp_path / "ckpt", shape, 128, byte_tokenizer(tmp_path / "tokenizer"))
    round_embedding_int8(ckpt)  # what the cuda engine's int8 embedding reads
    build_engine(str(ckpt), "orin", tmp_path / "engine", backend="cuda", progress=False)
    reference = ReferenceBackend(tmp_path / "engine", max_context=64)
    ort = OrtBackend(export_for_cpu(ckpt, tmp_path / "exports", "ort"), max_context=64)
    ids = np.random.default_rng(2).integers(0, 258, 12 + 20).tolist()
    errors, disagreements = teacher_forced(reference, ort, ids, 12)
    assert max(errors) < 1e-2 and disagreements == [], (max(errors), disagreements)

    manifest = write_random_engine(tmp_path / "random", shape, resolve("orin-agx-64gb"))
    assert manifest["backend"] == "cuda" and manifest["model"]["source"] == "random:custom"
    logits = ReferenceBackend(tmp_path / "random", max_context=16).forward(ids[:8])
    assert logits.shape == (shape["vocab_size"],) and np.isfinite(logits).all() and logits.std() > 1


# ---------------------------------------------------------------- the op list and its layouts

@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_the_op_list_has_what_each_family_needs(model_type, tiny_model_dir):
    config = json.loads((tiny_model_dir(model_type) / "config.json").read_text())
    spec = decoder_spec(model_spec({**config, "head_dim": 64}), 32, qkv_bias=model_type == "qwen2")
    layers, post_norms = spec.layers, bool(spec.post_norms)
    for fused in (False, True):
        ops = decode_ops(spec, fused=fused)
        kinds = [op.kind for op in ops]
        linears = [op.args for op in ops if op.kind == "linear"]
        assert kinds[0] == "embed" and kinds[-1] == "lm_head" and ops[-2].args["last_row"]
        assert kinds.count("attention") == layers and len(linears) == 4 * layers  # qkv, o, gate_up, down
        assert kinds.count("head_norm") == (2 * layers if spec.qk_norm else 0)
        assert sum(a["bias"] for a in linears) == (layers if model_type == "qwen2" else 0)  # on q/k/v only
        windows = [op.args["window"] for op in ops if op.kind == "attention"]
        assert windows == [w or 0 for w in model_spec(config).layer_windows]
        sandwich = 2 * layers if post_norms else 0
        prologues = sum(a["norm"] is not None for a in linears)
        residuals = sum(a["epilogue"] == "residual" for a in linears)
        acts = sum(a["epilogue"] == "act" for a in linears)
        if not fused:
            assert (prologues, residuals, acts, kinds.count("act")) == (0, 0, 0, layers)
            assert kinds.count("norm") == 1 + sandwich and kinds.count("add_norm") == 2 * layers
        elif post_norms:  # the post-norms keep the adds in add_norm: only layer 0's first norm is a prologue
            assert (prologues, residuals, acts, kinds.count("act")) == (1, 0, layers, 0)
            assert kinds.count("norm") == sandwich and kinds.count("add_norm") == 2 * layers
        else:  # a layer is its four linears and the attention
            assert (prologues, residuals, acts, kinds.count("act")) == (2 * layers, 2 * layers, layers, 0)
            ropes = sum(a["epilogue"] == "rope" for a in linears)
            rotated = sum(op.args["rotated"] for op in ops if op.kind == "attention")
            assert ropes == rotated == (0 if spec.qk_norm else layers)  # RoPE waits for q/k norms
            assert kinds.count("norm") == 1 and kinds.count("add_norm") == 0
            assert set(kinds) == {"embed", "linear", "head_norm", "attention", "norm", "lm_head"} - \
                ({"head_norm"} if model_type not in ("qwen3",) else set())


@needs_nvcc
def test_fused_and_unfused_op_lists_compute_the_same_logits(tmp_path, smollm2_dir):
    """The twins round at the same places whether an op is fused or not: bit-identical logits,
    for a family with sandwich norms (Gemma 3) and one without, with a prefill and decode steps."""
    for model_type in ("qwen2", "gemma3_text"):
        ckpt = tiny_native_checkpoint(tmp_path / model_type, model_type, smollm2_dir)
        build_engine(str(ckpt), "orin", tmp_path / model_type / "engine", backend="cuda", progress=False)
        fused = ReferenceBackend(tmp_path / model_type / "engine", max_context=64)
        unfused = ReferenceBackend(tmp_path / model_type / "engine", max_context=64)
        unfused.ops = decode_ops(unfused.spec, fused=False)
        assert fused.ops != unfused.ops
        for step in ([5, 9, 200, 31, 7, 77], [3], [8]):
            assert np.array_equal(fused.forward(step), unfused.forward(step)), model_type


def test_gate_up_rows_are_interleaved_and_the_act_twin_pairs_them():
    from awq_edge.decoder import interleave_halves
    from awq_edge.reference_backend import twin_act

    assert interleave_halves(6).tolist() == [0, 3, 1, 4, 2, 5]
    rng = np.random.default_rng(0)
    gate, up = rng.standard_normal((3, 4)).astype(np.float16), rng.standard_normal((3, 4)).astype(np.float16)
    side_by_side = np.concatenate([gate, up], axis=1)
    out = twin_act(side_by_side[:, interleave_halves(8)], "silu")
    g = gate.astype(np.float32)
    assert np.array_equal(out, (g / (1 + np.exp(-g)) * up.astype(np.float32)).astype(np.float16))


def test_launch_shapes_match_the_kernel_sources():
    """The cuda backend launches the kernels with the block sizes their __launch_bounds__ say."""
    import awq_edge.cuda_backend as cb

    src = {name: (plugins.PLUGINS_DIR / "kernels" / f"{name}.cu").read_text() for name in plugins.CUBIN_SOURCES}
    assert f"constexpr int kThreads = {cb.NORM_THREADS};" in src["decoder_ops"]
    assert f"constexpr int kRowsPerBlock = {cb.GEMV_ROWS_PER_BLOCK};" in src["gemv_w4a16"]
    assert "__launch_bounds__(128)" in src["gemv_w4a16"] and cb.GEMV_THREADS == 128
    assert f"constexpr int kTileM = {cb.GEMM_TILE_M};" in src["gemm_w4a16"]
    assert f"constexpr int kTileN = {cb.GEMM_TILE_N};" in src["gemm_w4a16"]
    assert f"constexpr int kStepK = {cb.GEMM_STEP_K};" in src["gemm_w4a16"]
    assert f"constexpr int kThreads = {cb.GEMM_THREADS};" in src["gemm_w4a16"]
    assert re.search(rf"__launch_bounds__\({cb.GEMM_THREADS}, 2\)\s*\\\s*awq_gemm_g", src["gemm_w4a16"])
    assert f"constexpr int kRopeThreads = {cb.ROPE_THREADS};" in src["attention"]
    assert "constexpr int kWarps = 4;" in src["attention"] and cb.ATTEND_THREADS == 4 * 32
    assert f"constexpr int kTileKeys = {cb.ATTEND_SPLIT_KEYS};" in src["attention"]
    assert "constexpr int kSplitKeys = kTileKeys;" in src["attention"] and cb.ATTEND_THREADS == cb.ATTEND_SPLIT_KEYS
    assert f"constexpr int kBlockQueries = {cb.ATTEND_BLOCK_QUERIES};" in src["attention"]
    assert f"constexpr int kMmaQueries = {cb.ATTEND_MMA_QUERIES};" in src["attention"]
    assert f"constexpr int kThreads = {cb.SAMPLE_THREADS};" in src["sample"]
    assert f"constexpr int kMmaRowsPerBlock = {cb.GEMV_MMA_ROWS_PER_BLOCK};" in src["gemv_w4a16"]
    assert cb.GEMV_TC_ROWS == cb.GEMV_MMA_ROWS_PER_BLOCK and "constexpr int kTcRows = kMmaRowsPerBlock;" in src["gemv_w4a16"]
    assert f"constexpr int kTcWarps = {cb.GEMV_TC_THREADS // 32};" in src["gemv_w4a16"]
    assert f"constexpr int kTcMaxK = {cb.GEMV_TC_MAX_K};" in src["gemv_w4a16"]
    assert f"constexpr int kTcBlocksPerSm = {cb.GEMV_TC_BLOCKS_PER_SM};" in src["gemv_w4a16"]
    assert len(re.findall(r"__launch_bounds__\(awq_edge::kTcThreads, awq_edge::kTcBlocksPerSm\)\s*\\\s*awq_gemv_tc_",
                          src["gemv_w4a16"])) == 2  # the fused entries' macro and the logits'
    assert "constexpr int kTcThreads = kTcWarps * kWarpSize;" in src["gemv_w4a16"]
    header = (plugins.PLUGINS_DIR / "kernels" / "w4a16.h").read_text()
    assert f"#define AWQ_W4A16_GEMV_MAX_ROWS {cb.GEMV_MAX_ROWS}\n" in header
    assert f"#define AWQ_W4A16_GEMV_CHUNKED_MAX_ROWS {cb.GEMV_CHUNKED_MAX_ROWS}\n" in header
    # the split-K GEMM's workspace as the C header documents it: a tile's accumulators, its threads' 32 each
    flat = re.sub(r"\s*\n \*\s*", " ", header)  # the comments' lines joined
    assert f"ceil(M / {cb.GEMM_TILE_M}) * ceil(N / {cb.GEMM_TILE_N}) * {cb.GEMM_SPLIT_TILE_BYTES // 4}]" in flat
    assert f"at most ceil(K / {cb.GEMM_STEP_K})" in flat
    assert re.search(rf"__launch_bounds__\({cb.DEQUANT_THREADS}\)\s*\\\s*awq_dequantize_g", src["gemm_w4a16"])
    head = (plugins.PLUGINS_DIR / "kernels" / "lm_head.cuh").read_text()
    assert "constexpr int kHeadRowsPerWarp = 4;" in head and '#include "lm_head.cuh"' in src["decoder_ops"]
    assert cb.LM_HEAD_ROWS_PER_BLOCK == cb.NORM_THREADS // 32 * 4  # the heads: 4 vocabulary rows a warp
    assert cb.STEP_HEAD_ROWS == 128 // 32 * 4
    assert "kBlockRows = kStepThreads / 32 * kHeadRowsPerWarp;" in src["decode_step"]
    from awq_edge.decoder import HEAD_SELECT_CAPACITY, HEAD_TOP_K
    assert f"constexpr int kThreads = {cb.HEAD_SELECT_THREADS};" in src["head_top_k"]
    assert f"constexpr int kRowsPerBlock = {cb.HEAD_RESCORE_ROWS};" in src["head_top_k"]
    assert f"constexpr int kTopK = {HEAD_TOP_K};" in src["head_top_k"]
    assert f"constexpr int kCapacity = {HEAD_SELECT_CAPACITY};" in src["head_top_k"]
    assert f"constexpr int kMoeThreads = {cb.MOE_THREADS};" in src["moe"]
    from awq_edge.export.spec import MAX_EXPERTS  # (the router's scores in shared memory: every expert's)
    assert f"constexpr int kMaxExperts = {MAX_EXPERTS};" in src["moe"]
    fusions = re.search(r"#define AWQ_GEMV_FUSIONS\(ENTRIES\)(.*?)\n\n", src["gemv_w4a16"], re.S)
    fusions = fusions.group(1).split("AWQ_GEMV_FUSIONS(AWQ_GEMV_ENTRIES)")[0] if fusions else ""
    # the persistent step's table (decode_step.cu StepOp) as cuda_backend.step_ops writes it: its
    # kinds in order, its argument slots, the GEMV's fusions by index, the stall's status bit
    step = src["decode_step"]
    assert f"constexpr int kStepArgs = {cb.STEP_ARGS};" in step and f"#define AWQ_STEP_STALLED {cb.STEP_STALLED} " in step
    assert "constexpr int kStepThreads = 128;" in step and cb.GEMV_THREADS == 128
    kinds = re.search(r"enum StepKind \{(.*?)\};", step, re.S).group(1).replace("\n", " ")
    enum_name = {"embed": "kStepEmbed", "norm": "kStepNorm", "add_norm": "kStepAddNorm", "head_norm": "kStepHeadNorm",
                 "act": "kStepAct", "rope_store": "kStepRopeStore", "attention": "kStepAttend", "linear": "kStepGemv",
                 "lm_head": "kStepLmHead"}
    assert [k.strip() for k in kinds.split(",")] == [enum_name[k] for k in sorted(cb.STEP_KINDS, key=cb.STEP_KINDS.get)]
    for i, fusion in enumerate(cb.GEMV_FUSIONS):
        norm, epilogue = re.search(rf"ENTRIES\({fusion}, (\w+), (\w+)\)", fusions).groups()
        case = "default:" if i == len(cb.GEMV_FUSIONS) - 1 else f"case {i}:"
        assert f"{case} step_gemv<kGroupSize, {norm}, Epilogue::{epilogue}>" in step, fusion
    for module, names in KERNELS_OF.items():  # every name the backend looks up is a C-named kernel there
        for name in names:
            base = re.sub(r"_(g|d)\d.*$", "", name)
            if name.startswith("awq_gemv_mma"):  # a macro per B-tile count, each for every group size
                assert f"AWQ_GEMV_MMA_ENTRIES({base}, 1, {dict(awq_gemv_mma=1, awq_gemv_mma_x16=2, awq_gemv_mma_x32=4)[base]})" \
                    in src[module], name
            elif name.startswith("awq_gemv_rows"):  # made by a macro per row count
                assert f"AWQ_GEMV_ROWS_ENTRIES({base[len('awq_gemv_rows'):]})" in src[module], name
            elif name.startswith("awq_gemv_tc_logits"):  # on tensor cores: a macro per group size
                assert f"AWQ_GEMV_TC_LOGITS_ENTRY({name.rsplit('_g', 1)[1]})" in src[module], name
            elif name.startswith("awq_gemv_tc_"):  # the fusions' list, each for every group size
                assert "AWQ_GEMV_FUSIONS(AWQ_GEMV_TC_ENTRIES)" in src[module], name
                assert f"ENTRIES({base[len('awq_gemv_tc_'):]}," in fusions, name
            elif name.startswith("awq_gemv_logits"):  # the int4 head: a macro per group size and load width
                assert f"AWQ_GEMV_LOGITS_ENTRY({name[len('awq_gemv_logits_g'):].replace('_w', ', ')})" in src[module], name
            elif module == "gemv_w4a16":  # the fusions' list, each for every group size and load width
                assert "AWQ_GEMV_FUSIONS(AWQ_GEMV_ENTRIES)" in src[module], name
                assert f"ENTRIES({base[len('awq_gemv_'):]}," in fusions, name
            elif name.startswith("awq_moe_gemv_"):  # the experts' GEMVs: a macro per fusion, then per group and width
                fusion, g, w = re.match(r"awq_moe_gemv_(\w+)_g(\d+)_w(\d)$", name).groups()
                assert f"AWQ_MOE_GEMV_ENTRIES({fusion}, " in src[module], name
                assert f"AWQ_MOE_GEMV_ENTRY(NAME, EPILOGUE, {g}, {w})" in src[module], name
            elif module == "attention" and base.startswith("awq_attend") and "split" not in base:
                assert f"AWQ_ATTEND_ROWS_ENTRY({name}, " in src[module], name  # prefill: a macro per kernel
            else:
                assert re.search(rf'extern "C" __global__[^{{]*{base}', src[module], re.S), (module, name)


# ---------------------------------------------------------------- untrusted native engines

@needs_nvcc
@pytest.mark.parametrize("edit, message", [
    (lambda d: d["tensors"]["model.norm.weight"].update(offset=0), "overlaps"),
    (lambda d: d["tensors"]["model.norm.weight"].update(shape=[1]), "is not float32"),
    (lambda d: d["tensors"].pop("model.norm.weight"), "not the ones config.json implies"),
    (lambda d: d.update(group_size=64), "is not"),
    (lambda d: d.update(weights="../weights.bin"), "not a plain file name"),
])
def test_a_tampered_decoder_json_is_refused(smollm2_cuda_engine, tmp_path, edit, message):
    from awq_edge.engine_dir import check_files, read_decoder_info, read_manifest

    engine = linked_copy(smollm2_cuda_engine, tmp_path / "e")
    edit_json(engine / "decoder.json", edit)
    resign(engine, "manifest.json", "decoder.json")
    with pytest.raises(UserError, match=message) as e:
        read_decoder_info(engine, check_files(engine, read_manifest(engine)["files"]))
    assert "\n" not in str(e.value)


@needs_nvcc
def test_kernels_named_outside_the_engine_are_refused(smollm2_cuda_engine, tmp_path):
    engine = linked_copy(smollm2_cuda_engine, tmp_path / "e")
    edit_json(engine / "manifest.json", lambda m: m["kernels"].update(sample="../sample.cubin"))
    with pytest.raises(UserError, match="not a plain file name"):
        Engine.load(engine)


@pytest.mark.parametrize("pos, window, softcap, heads", [(0, 0, 0.0, (4, 2)), (127, 0, 0.0, (4, 2)),
                                                         (128, 0, 50.0, (2, 2)), (300, 0, 0.0, (6, 3)),
                                                         (300, 100, 0.0, (4, 1)), (383, 4096, 30.0, (4, 4))])
def test_attention_tile_and_split_twins_equal_one_softmax(pos, window, softcap, heads):
    """awq_attend_split's twin (splits of 128 keys, each with its softmax state, then merged) and
    awq_attend's (tiles of 128 keys from the first visible one, an online softmax) against one
    float64 softmax over the visible keys: splits that see no key (past the position, before the
    window) must weigh nothing, and a tile's rescaling must keep the earlier tiles' weights."""
    from awq_edge.reference_backend import twin_attend_split, twin_attend_tiles

    H, Hkv = heads
    D, capacity, rng = 64, 384, np.random.default_rng(pos + window)
    q = rng.standard_normal((H, D)).astype(np.float16)
    k_cache = rng.standard_normal((Hkv, capacity, D)).astype(np.float16)
    v_cache = rng.standard_normal((Hkv, capacity, D)).astype(np.float16)
    split = twin_attend_split(q, k_cache, v_cache, pos, window, 0.125, softcap).reshape(H, D).astype(np.float64)
    tiles = twin_attend_tiles(q, k_cache, v_cache, pos, window, 0.125, softcap).reshape(H, D).astype(np.float64)
    want = attention_f64(q[None], k_cache, v_cache, pos, window, 0.125, softcap)[0]
    for got in (split, tiles):
        worst = np.abs(got - want).max(axis=1) / np.maximum(1.0, np.abs(want).max(axis=1))
        assert worst.max() < 2e-3, worst.argmax()


def attend_mma_lanes(q_rot, k_cache, v_cache, past: int, window: int, scale: float, softcap: float) -> np.ndarray:
    """awq_attend_mma (plugins/kernels/attention.cu) lane by lane: per (head, 64 tokens) 4 warps of
    16 tokens; per tile of 64 keys (32 at D = 256) a warp's scores as keys / 8 x (D / 16) mma (A: its q rows, B: K rows
    2t.. of key g), masked and soft-capped, an online softmax per fragment row (max over the row's
    4 lanes; each lane sums its own columns), P rounded to fp16 as the A fragments of P V (two
    score fragments each), V's B fragments (keys 2t, 2t + 1 | + 8 of dim g); float64 otherwise."""
    from native_helpers import LANE_G, LANE_T, emulate_mma_16816

    S, H, D = q_rot.shape
    Hkv, g, t = k_cache.shape[0], LANE_G, LANE_T
    keys = 32 if D == 256 else 64  # a tile
    out = np.full((S, H, D), np.nan)
    for h in range(H):
        kv = h // (H // Hkv)
        for t0 in range(0, S, 64):
            block_first = max(0, past + t0 - window + 1) if window > 0 else 0
            block_last = past + min(t0 + 64, S) - 1
            for warp in range(4):
                token = np.stack([t0 + warp * 16 + g, t0 + warp * 16 + g + 8], axis=1)  # [lane, row]
                pos = past + token
                first = np.maximum(0, pos - window + 1) if window > 0 else np.zeros_like(pos)
                q = np.zeros((S + 64, D))
                q[:S] = q_rot[:, h].astype(np.float64)
                qa = np.stack([np.stack([q[token[:, r], 16 * ks + 2 * t + 8 * c + e] for r, c in
                                         ((0, 0), (1, 0), (0, 1), (1, 1)) for e in (0, 1)], axis=1).reshape(32, 4, 2)
                               for ks in range(D // 16)], axis=1)  # [lane, k step, reg, half]
                o, rmax, rsum = np.zeros((32, D // 8, 4)), np.full((32, 2), -np.inf), np.zeros((32, 2))
                for begin in range(block_first, block_last + 1, keys):
                    n = min(keys, block_last + 1 - begin)
                    ks_, vs_ = np.zeros((keys, D)), np.zeros((keys, D))
                    ks_[:n], vs_[:n] = k_cache[kv, begin:begin + n], v_cache[kv, begin:begin + n]
                    sc = np.zeros((32, keys // 8, 4))
                    for nt in range(keys // 8):
                        for ks in range(D // 16):
                            b = np.stack([ks_[8 * nt + g, 16 * ks + c + 2 * t + e] for c in (0, 8) for e in (0, 1)],
                                         axis=1).reshape(32, 2, 2)
                            emulate_mma_16816(sc[:, nt], qa[:, ks], b)
                    key = begin + 8 * np.arange(keys // 8)[None, :, None] + 2 * t[:, None, None] + np.array([0, 1, 0, 1])
                    row = np.array([0, 0, 1, 1])
                    tok, p_, f_ = token[:, row][:, None, :], pos[:, row][:, None, :], first[:, row][:, None, :]
                    scaled = sc * scale
                    capped = softcap * np.tanh(scaled / softcap) if softcap > 0 else scaled
                    sc = np.where((tok < S) & (key >= f_) & (key <= p_), capped, -np.inf)
                    tile_max = np.stack([sc[:, :, :2].max(axis=(1, 2)), sc[:, :, 2:].max(axis=(1, 2))], axis=1)
                    tile_max = tile_max.reshape(8, 4, 2).max(axis=1).repeat(4, axis=0)  # over the row's 4 lanes
                    new_max = np.maximum(rmax, tile_max)
                    rescale = np.where(new_max == -np.inf, 1.0, np.exp(rmax - np.where(new_max == -np.inf, 0, new_max)))
                    rmax = new_max
                    row_max = np.where(rmax == -np.inf, 0, rmax)[:, row][:, None, :]
                    pr = np.where(sc == -np.inf, 0.0, np.exp(sc - row_max))
                    rsum = rsum * rescale + np.stack([pr[:, :, :2].sum(axis=(1, 2)), pr[:, :, 2:].sum(axis=(1, 2))], 1)
                    o *= rescale[:, row][:, None, :]
                    ph = pr.astype(np.float16).astype(np.float64)  # the A fragments of P V are fp16
                    for kk in range(keys // 16):
                        a = np.stack([ph[:, 2 * kk, :2], ph[:, 2 * kk, 2:],
                                      ph[:, 2 * kk + 1, :2], ph[:, 2 * kk + 1, 2:]], axis=1)
                        for dn in range(D // 8):
                            b = np.stack([vs_[16 * kk + c + 2 * t + e, 8 * dn + g] for c in (0, 8) for e in (0, 1)],
                                         axis=1).reshape(32, 2, 2)
                            emulate_mma_16816(o[:, dn], a, b)
                total = rsum.reshape(8, 4, 2).sum(axis=1).repeat(4, axis=0)
                for lane in range(32):
                    for r in range(2):
                        if token[lane, r] < S:
                            for dn in range(D // 8):
                                d = 8 * dn + 2 * t[lane]
                                out[token[lane, r], h, d:d + 2] = o[lane, dn, 2 * r:2 * r + 2] / total[lane, r]
    return out


@pytest.mark.parametrize("D, past, S, window, softcap, heads", [(64, 0, 70, 0, 0.0, (2, 1)),
                                                                (128, 90, 37, 20, 0.0, (2, 2)),
                                                                (64, 10, 65, 0, 30.0, (3, 3)),
                                                                (256, 40, 20, 9, 0.0, (2, 1))])
def test_the_tensor_core_prefill_attentions_fragment_plan_equals_one_softmax(D, past, S, window, softcap, heads):
    """awq_attend_mma's plan run lane by lane with the PTX ISA's fragment layouts against a float64
    softmax per token: a last block of fewer tokens (70 = 64 + 6), warps with no token, a window
    shorter than a warp's tokens (tiles some rows see nothing of), the soft-cap, every head size
    (32-key tiles at 256).
    Within P's fp16 rounding (the kernel multiplies V by fp16 probabilities)."""
    H, Hkv = heads
    rng = np.random.default_rng(D + past + S)
    q = rng.standard_normal((S, H, D)).astype(np.float16)
    k_cache = rng.standard_normal((Hkv, past + S + 3, D)).astype(np.float16)
    v_cache = rng.standard_normal((Hkv, past + S + 3, D)).astype(np.float16)
    got = attend_mma_lanes(q, k_cache, v_cache, past, window, D ** -0.5, softcap)
    want = attention_f64(q, k_cache, v_cache, past, window, D ** -0.5, softcap)
    worst = np.abs(got - want).max(axis=2) / np.maximum(1.0, np.abs(want).max(axis=2))
    assert worst.max() < 4e-3, np.unravel_index(worst.argmax(), worst.shape)


@pytest.mark.parametrize("D, past, S, window, softcap, heads", [(64, 0, 37, 0, 0.0, (4, 2)),
                                                                (64, 100, 40, 20, 0.0, (2, 1)),
                                                                (128, 250, 33, 0, 30.0, (6, 3)),
                                                                (256, 60, 17, 5, 0.0, (2, 2))])
def test_the_prefill_block_attention_twin_equals_one_softmax(D, past, S, window, softcap, heads):
    """awq_attend_block's twin (16 tokens a block sharing key tiles of 4096 / D, each token with its
    own online softmax) against a float64 softmax per token: a last block of fewer tokens, tiles
    that some of a block's tokens see nothing of (a window shorter than the block: 20 and 5), GQA,
    the soft-cap, every head size."""
    from awq_edge.reference_backend import twin_attend_block

    H, Hkv = heads
    rng = np.random.default_rng(past + S)
    q = rng.standard_normal((S, H, D)).astype(np.float16)
    k_cache = rng.standard_normal((Hkv, past + S + 3, D)).astype(np.float16)
    v_cache = rng.standard_normal((Hkv, past + S + 3, D)).astype(np.float16)
    got = twin_attend_block(q, k_cache, v_cache, past, window, D ** -0.5, softcap).reshape(S, H, D).astype(np.float64)
    want = attention_f64(q, k_cache, v_cache, past, window, D ** -0.5, softcap)
    worst = np.abs(got - want).max(axis=2) / np.maximum(1.0, np.abs(want).max(axis=2))
    assert worst.max() < 2e-3, np.unravel_index(worst.argmax(), worst.shape)
