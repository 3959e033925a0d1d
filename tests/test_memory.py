"""The memory planner: size parsing, the largest context that fits, refusals that say by how much."""
from __future__ import annotations

import pytest

from awq_edge.devices import resolve
from awq_edge.errors import UserError
from awq_edge.memory import (CPU_RUNTIME_OVERHEAD, GIB, MIB, MIN_CONTEXT, format_size, parse_size, plan_memory,
                             workspace_bytes)


@pytest.mark.parametrize("text, expected", [
    ("6GB", 6 * GIB), ("512MiB", 512 * MIB), ("1.5", int(1.5 * GIB)), ("2G", 2 * GIB),
    ("2 gib", 2 * GIB), ("100m", 100 * MIB), ("4096", 4096 * GIB), ("1024KB", MIB), (" 3gb ", 3 * GIB),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "6XB", "-1GB", "1.2.3G", "0", "GB", "6 G B"])
def test_parse_size_rejects_garbage_in_one_line(text):
    with pytest.raises(UserError) as e:
        parse_size(text)
    assert "\n" not in str(e.value)


def test_plan_picks_the_largest_context_that_fits():
    cpu = resolve("cpu")
    weights, per_token = 100 * MIB, 46080  # SmolLM2's fp32 KV: 30 layers x 2 x 3 heads x 64 x 4 bytes
    plan = plan_memory(weights, per_token, cpu, max_memory=512 * MIB, max_position_embeddings=100_000,
                       workspace=8 * MIB, runtime_overhead=200 * MIB)
    assert plan.total <= plan.cap == 512 * MIB
    assert plan.total == weights + per_token * plan.context + 8 * MIB + 200 * MIB
    assert plan.kv_bytes == per_token * plan.context
    # one more token would not fit
    assert weights + per_token * (plan.context + 1) + 8 * MIB + 200 * MIB > plan.cap
    # the arithmetic, spelled out
    assert plan.context == (512 * MIB - weights - 8 * MIB - 200 * MIB) // per_token


def test_plan_is_capped_by_max_positions_and_max_context():
    cpu = resolve("cpu")
    plan = plan_memory(10 * MIB, 1000, cpu, max_memory=8 * GIB, max_position_embeddings=8192)
    assert plan.context == 8192
    plan = plan_memory(10 * MIB, 1000, cpu, max_memory=8 * GIB, max_context=1000, max_position_embeddings=8192)
    assert plan.context == 1000


def test_workspace_that_grows_with_context_is_counted():
    cpu = resolve("cpu")

    def ws(ctx):
        return workspace_bytes(576, 1536, 49152, 9, ctx)

    plan = plan_memory(100 * MIB, 46080, cpu, max_memory=400 * MIB, max_position_embeddings=100_000, workspace=ws)
    assert plan.workspace == ws(plan.context)
    assert plan.total <= plan.cap
    assert 100 * MIB + 46080 * (plan.context + 1) + ws(plan.context + 1) + plan.runtime_overhead > plan.cap


def test_plan_refuses_when_weights_do_not_fit_and_says_by_how_much():
    cpu = resolve("cpu")
    with pytest.raises(UserError) as e:
        plan_memory(int(3.9 * GIB), 46080, cpu, max_memory=2 * GIB)
    msg = str(e.value)
    assert "\n" not in msg and "short by" in msg and "--max-memory" in msg
    # short by = weights + MIN_CONTEXT tokens of KV + runtime overhead (no workspace given) - cap
    need = int(3.9 * GIB) + 46080 * MIN_CONTEXT + CPU_RUNTIME_OVERHEAD
    assert f"short by {format_size(need - 2 * GIB)}" in msg


def test_explicit_max_context_that_does_not_fit_is_refused():
    cpu = resolve("cpu")
    with pytest.raises(UserError) as e:
        plan_memory(100 * MIB, 46080, cpu, max_memory=400 * MIB, max_context=8000, max_position_embeddings=8192)
    assert "--max-context 8000" in str(e.value) and "at most" in str(e.value)


def test_default_cap_comes_from_the_device_profile():
    orin = resolve("orin-nano-8gb")
    plan = plan_memory(GIB, 100_000, orin, max_position_embeddings=4096)
    assert plan.cap == orin.default_memory_bytes()
    assert plan.runtime_overhead > 0 and plan.total <= plan.cap


def gpus_here(monkeypatch, *gpus) -> None:
    """This machine's GPUs, as the driver would report them (this CI machine has none)."""
    from awq_edge import cuda_runtime, devices

    monkeypatch.setattr(cuda_runtime, "find_gpus", lambda: [cuda_runtime.Gpu(i, *g) for i, g in enumerate(gpus)])
    monkeypatch.setattr(devices, "_jetson_model", lambda: "")


def test_a_gpu_the_table_does_not_list_is_profiled_from_its_driver(monkeypatch):
    """An RTX 3090 (sm_86, in no profile): `awq-edge devices` marks a `gpu` row of its arch and
    memory, and `--device gpu` resolves to it, its cap leaving 8% (at least 1.5 GiB) as the listed
    profiles do; a Jetson Thor's (integrated) leaves 15% (at least 2.5 GiB) of the board's memory
    to the system too; a listed GPU resolves to its own profile; a Turing GPU (sm_75) is not offered."""
    from typer.testing import CliRunner

    from awq_edge.cli import app
    from awq_edge.devices import detect

    gpus_here(monkeypatch, ("NVIDIA GeForce RTX 3090", "sm_86", 24 * GIB))
    here = detect()
    assert (here.name, here.gpu_arch, here.total_memory_gib, here.usable_memory_gib) == ("gpu", "sm_86", 24, 22.08)
    assert resolve("gpu") == here and here.default_cap_here() == int(22.08 * GIB)
    listing = CliRunner().invoke(app, ["devices"])
    assert listing.exit_code == 0
    marked = [line for line in listing.output.splitlines() if line.endswith("<- this machine")]
    assert len(marked) == 1 and marked[0].split()[:2] == ["gpu", "sm_86"] and "RTX 3090" in marked[0], listing.output
    gpus_here(monkeypatch, ("NVIDIA Jetson AGX Thor", "sm_110", 128 * GIB, True))  # (integrated: the board's memory)
    here = detect()
    assert (here.gpu_arch, here.unified_memory, here.usable_memory_gib) == ("sm_110", True, 128 - 19.2)
    gpus_here(monkeypatch, ("NVIDIA GeForce RTX 4090", "sm_89", 24 * GIB))
    assert resolve("gpu").name == detect().name == "rtx4090"
    gpus_here(monkeypatch, ("Tesla T4", "sm_75", 16 * GIB))
    assert detect().name == "cpu"
    with pytest.raises(UserError, match=r"Tesla T4 is sm_75, and the cuda kernels need sm_80"):
        resolve("gpu")
    gpus_here(monkeypatch)
    with pytest.raises(UserError, match="no NVIDIA GPU found"):
        resolve("gpu")


def test_an_engine_for_an_unlisted_gpu_plans_for_the_gpu_it_loads_on(monkeypatch, tmp_path):
    """`--device gpu` on an H100 NVL (sm_90, not in the table): the engine names `gpu` and the H100's
    arch, its kernels compiled for it; at load the cap is the smaller of the built one and that of
    the GPU found then (an 80 GB H100 gets its own), and on a machine without one the error says
    so in one line."""
    import json

    from awq_edge.engine import engine_plan
    from awq_edge.synthetic import SHAPES, write_random_engine
    from native_helpers import read_native_engine

    gpus_here(monkeypatch, ("NVIDIA H100 NVL", "sm_90", 94 * GIB))
    write_random_engine(tmp_path / "engine", {**SHAPES["smollm2-135m"], "num_hidden_layers": 2}, resolve("gpu"))
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert (manifest["device"], manifest["gpu_arch"]) == ("gpu", "sm_90")
    assert manifest["memory_plan"]["cap"] == int(0.92 * 94 * GIB)
    _, info = read_native_engine(tmp_path / "engine")
    assert engine_plan(manifest, info).cap == int(0.92 * 94 * GIB)
    gpus_here(monkeypatch, ("NVIDIA H100 80GB HBM3", "sm_90", 80 * GIB))
    assert engine_plan(manifest, info).cap == int((80 - 6.4) * GIB)
    gpus_here(monkeypatch)
    with pytest.raises(UserError, match="no NVIDIA GPU found"):
        engine_plan(manifest, info)
