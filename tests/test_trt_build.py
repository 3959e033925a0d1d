"""`awq-edge build --device <gpu>` checks and planning, on a machine with no GPU and no TensorRT.

What a real build does needs a GPU and TensorRT; these tests cover every check that comes
before it (each must fail with one line and leave nothing at OUTPUT) and the pure planning.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types

import pytest

from awq_edge import cuda_runtime, trt_backend, trt_build
from awq_edge.cuda_runtime import Gpu
from awq_edge.errors import UserError

RTX4090 = Gpu(0, "NVIDIA GeForce RTX 4090", "sm_89")
ORIN = Gpu(0, "Orin", "sm_87")


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory, smollm2_dir):
    """A real `--target trt` export of a tiny Llama (the checks before the build read it all)."""
    from awq_edge.export import export_checkpoint
    from test_export_helpers import tiny_checkpoint

    root = tmp_path_factory.mktemp("trt-src")
    return export_checkpoint(tiny_checkpoint(root, "llama", smollm2_dir), root / "export", "trt")


@pytest.fixture
def src(trt_export, tmp_path):
    """A copy of the trt export that a test may edit."""
    copy = tmp_path / "export"
    shutil.copytree(trt_export, copy)
    return copy


def with_gpus(monkeypatch, gpus):
    monkeypatch.setattr(cuda_runtime, "find_gpus", lambda: gpus)


def assert_fails_cleanly(src, output, device="rtx4090", **kwargs) -> str:
    with pytest.raises(UserError) as info:
        trt_build.build_trt_engine(src, device, output, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.tmp-*"))
    return message


def test_no_gpu(monkeypatch, src, tmp_path):
    with_gpus(monkeypatch, [])
    message = assert_fails_cleanly(src, tmp_path / "engine")
    assert "no NVIDIA GPU found" in message and "sm_89" in message


@pytest.mark.skipif(bool(cuda_runtime.find_gpus()), reason="this machine has a GPU")
def test_no_gpu_for_real(src, tmp_path):
    assert "no NVIDIA GPU found" in assert_fails_cleanly(src, tmp_path / "engine")


def test_gpu_arch_differs_from_the_device_profile(monkeypatch, src, tmp_path):
    with_gpus(monkeypatch, [ORIN])
    message = assert_fails_cleanly(src, tmp_path / "engine", device="rtx4090")
    assert "sm_89" in message and "Orin (sm_87)" in message and "orin-" in message


def test_tensorrt_missing(monkeypatch, src, tmp_path):
    with_gpus(monkeypatch, [RTX4090])
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    assert "tensorrt >= 10.0" in assert_fails_cleanly(src, tmp_path / "engine")


def test_tensorrt_too_old(monkeypatch, src, tmp_path):
    with_gpus(monkeypatch, [RTX4090])
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    message = assert_fails_cleanly(src, tmp_path / "engine")
    assert "TensorRT 8.6.1 found" in message and ">= 10.0" in message


def test_source_checks(tmp_path, src):
    assert "not found" in assert_fails_cleanly(tmp_path / "missing", tmp_path / "engine")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no .onnx graph" in assert_fails_cleanly(empty, tmp_path / "engine")
    info = json.loads((src / "export.json").read_text())
    (src / "export.json").write_text(json.dumps({**info, "target": "ort"}))
    assert "--target trt" in assert_fails_cleanly(src, tmp_path / "engine")


def test_existing_output_is_kept_without_force(src, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(UserError, match="--force"):
        trt_build.build_trt_engine(src, "rtx4090", out)
    assert (out / "keep").read_text() == "x"


def test_cpu_device_is_refused(src, tmp_path):
    assert "no GPU" in assert_fails_cleanly(src, tmp_path / "engine", device="cpu")


def test_memory_plan_is_the_runtimes_with_the_gpu_overhead(trt_export):
    from awq_edge.devices import resolve
    from awq_edge.engine_dir import read_export_info
    from awq_edge.memory import GPU_RUNTIME_OVERHEAD

    info = read_export_info(trt_export)
    plan = trt_build.plan_memory(info, resolve("rtx4090"), max_memory=None, max_context=None)
    assert plan["weights"] == info.weight_bytes and plan["kv_mode"] == "shared_buffer"
    full = info.max_position_embeddings
    assert plan["context"] == full  # a tiny model: every position fits
    assert plan["runtime_overhead"] == GPU_RUNTIME_OVERHEAD  # the same figure the runtime plans with
    assert plan["kv_bytes"] == plan["context"] * info.kv_bytes_per_token
    assert plan["weights"] + plan["kv_bytes"] + plan["workspace"] + plan["runtime_overhead"] == plan["total"]
    assert plan["total"] <= plan["cap"] == resolve("rtx4090").default_memory_bytes()
    with pytest.raises(UserError, match="short by"):
        trt_build.plan_memory(info, resolve("rtx4090"), max_memory=GPU_RUNTIME_OVERHEAD, max_context=None)
    tight = plan["total"] - 1  # one byte short of the whole context
    with pytest.raises(UserError, match="--max-memory"):
        trt_build.plan_memory(info, resolve("rtx4090"), max_memory=tight, max_context=full)


def test_profiles_follow_the_graph_contract():
    inputs = [("input_ids", [1, "S"]), ("past_length", [1]), ("past_key.0", [1, 3, "C", 64])]
    prefill, decode = trt_build.profile_shapes(inputs, max_input=512, max_context=1024, kv_mode="concat")
    assert prefill["input_ids"] == ((1, 1), (1, 256), (1, 512))
    assert decode["input_ids"] == ((1, 1), (1, 1), (1, 1))
    assert decode["past_key.0"][2] == (1, 3, 1023, 64) and "past_length" not in decode
    _, shared = trt_build.profile_shapes(inputs, 512, 1024, kv_mode="shared_buffer")
    # the KV buffers hold up to the built context; the runtime may plan fewer rows at load
    assert shared["past_key.0"] == ((1, 3, 1, 64), (1, 3, 1024, 64), (1, 3, 1024, 64))
    with pytest.raises(UserError, match="no shape rule"):
        trt_build.profile_shapes([("mystery", [1, "Q"])], 512, 1024)


def test_engine_manifest_is_checked_against_the_gpu():
    manifest = {"gpu_arch": "sm_89", "gpu_name": "NVIDIA GeForce RTX 4090", "tensorrt_version": "10.3.0"}
    with pytest.raises(UserError, match=r"engine built for sm_89 \(NVIDIA GeForce RTX 4090\) but this GPU is "
                                        r"sm_87 \(Orin\)"):
        trt_backend.check_manifest(manifest, [ORIN], None)
    with pytest.raises(UserError, match="no NVIDIA GPU found"):
        trt_backend.check_manifest(manifest, [], None)
    with pytest.raises(UserError, match="TensorRT 10.3.0 but TensorRT 10.7.0"):
        trt_backend.check_manifest(manifest, [RTX4090], "10.7.0")
    trt_backend.check_manifest(manifest, [RTX4090], "10.3.0")  # matches: no error


def test_backend_imports_without_tensorrt():
    code = "import sys; sys.modules['tensorrt'] = None; import awq_edge.trt_backend, awq_edge.trt_build"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_build_for_rtx4090_fails_with_one_line_and_writes_nothing(src, tmp_path):
    from awq_edge.cli import app

    if not any(getattr(c, "name", None) == "build" or getattr(c.callback, "__name__", "") == "build"
               for c in app.registered_commands):
        pytest.xfail("the `awq-edge build` command is not in awq_edge/cli.py yet")
    if cuda_runtime.find_gpus():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "engine"
    proc = subprocess.run([sys.executable, "-m", "awq_edge.cli", "build", str(src), "--device", "rtx4090",
                           "--backend", "trt", "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no NVIDIA GPU found" in lines[0], proc.stderr
    assert not out.exists()
