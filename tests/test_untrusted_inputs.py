"""Engine folders as untrusted input, one test per class of harm (the fuzz test covers the rest):
code or files from outside the folder, numbers the memory plan would trust, silent corruption,
a cap carried over from the build host, leftovers of a killed build, runaway chat templates.

On the real SmolLM2 engine (engine_dir from conftest): its model.onnx.data (132 MiB) is a large
file, checked by its sampled hash on every load.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from awq_edge.engine import Engine, engine_plan
from awq_edge.engine_dir import read_export_info, read_manifest
from awq_edge.errors import UserError
from awq_edge.untrusted import SMALL_FILE_BYTES
from folder_helpers import edit_json, linked_copy, resign, rewrite

CLI = [sys.executable, "-m", "awq_edge.cli"]


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- files from outside the folder

def test_a_gpu_engine_cannot_name_code_outside_its_folder(engine_dir, tmp_path):
    """A TensorRT engine's manifest names its plugin library: a plain, listed file or nothing."""
    engine = linked_copy(engine_dir, tmp_path / "gpu")
    (engine / "libawq_edge_trt_plugins.so").write_bytes(b"\x7fELF not really")
    (engine / "engine.plan").write_bytes(b"plan")
    resign(engine, "manifest.json", "libawq_edge_trt_plugins.so")
    resign(engine, "manifest.json", "engine.plan")

    def as_gpu_engine(library):
        def edit(m):
            m.update(format="awq-edge-trt-engine", backend="trt", engine="engine.plan", plugin_library=library)
        edit_json(engine / "manifest.json", edit)

    for library in ("/usr/lib/x86_64-linux-gnu/libc.so.6", "../evil.so", "sub/evil.so", ".hidden.so"):
        as_gpu_engine(library)
        with pytest.raises(UserError, match="not a plain file name") as e:
            read_manifest(engine)
        one_line(e)
    as_gpu_engine("libunlisted.so")  # plain, but not among the files the manifest lists and checks
    with pytest.raises(UserError, match="not among the engine's listed files"):
        read_manifest(engine)
    as_gpu_engine("libawq_edge_trt_plugins.so")
    read_manifest(engine)  # its own, listed library: accepted (and hashed like every other file)


@pytest.mark.parametrize("name", ["../model.onnx.data", "/etc/hostname", "sub/x"])
def test_listed_files_must_be_plain_names(engine_dir, tmp_path, name):
    engine = linked_copy(engine_dir, tmp_path / "e")
    edit_json(engine / "manifest.json", lambda m: m["files"].update({name: {"size": 1, "sha256": "0" * 64}}))
    with pytest.raises(UserError, match="not a plain file name") as e:
        Engine.load(engine)
    one_line(e)


@pytest.mark.parametrize("table", ["rope.0.cos", "../lm_head.f16", "no.such.tensor"])
def test_the_exact_head_table_must_be_the_graphs_fp16_table(engine_dir, tmp_path, table):
    engine = linked_copy(engine_dir, tmp_path / "e")
    edit_json(engine / "export.json", lambda i: i["lm_head_exact"].update(table=table))
    resign(engine, "manifest.json", "export.json")
    with pytest.raises(UserError, match="is not a 49152 x 576 fp16 table of the graph") as e:
        Engine.load(engine)
    one_line(e)


def test_external_weights_must_be_a_listed_file_inside(engine_dir, tmp_path):
    """model.onnx names its weight file; ONNX Runtime would follow any path it gives."""
    engine = linked_copy(engine_dir, tmp_path / "e")
    os.link(engine_dir / "model.onnx.data", tmp_path / "elsewhere.data")
    for location, message in (("../elsewhere.data", "not a plain file name"),
                              ("unlisted.data", "not a listed file")):
        model = onnx.load(str(engine_dir / "model.onnx"), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        rewrite(engine / "model.onnx", model.SerializeToString())
        resign(engine, "manifest.json", "model.onnx")
        with pytest.raises(UserError, match=message):
            Engine.load(engine)


# ---------------------------------------------------------------- numbers the plan would trust

@pytest.mark.parametrize("key, value, message", [
    ("weight_bytes", 1 << 20, "weight_bytes"),           # would let a 186 MiB model plan as 1 MiB
    ("kv_bytes_per_token", 4096, "kv_bytes_per_token"),  # a tenth of the real KV per token
    ("vocab_size", 1 << 40, "vocab_size"),                # would size the logits buffer
    ("num_layers", 2, "num_layers|kv_bytes_per_token"),
    ("intermediate_size", 64, "intermediate_size"),      # shrinks the workspace estimate
])
def test_export_numbers_are_checked_against_the_files(engine_dir, tmp_path, key, value, message):
    engine = linked_copy(engine_dir, tmp_path / "e")
    edit_json(engine / "export.json", lambda i: i.update({key: value}))
    resign(engine, "manifest.json", "export.json")
    with pytest.raises(UserError, match=message) as e:
        Engine.load(engine)
    one_line(e)


def test_a_cap_from_the_build_host_is_not_reused_here(engine_dir, tmp_path):
    """Built on a 2 TiB host, loaded here: the cap is this machine's default, not the recorded one."""
    from awq_edge.devices import resolve

    engine = linked_copy(engine_dir, tmp_path / "e")
    edit_json(engine / "manifest.json", lambda m: m["memory_plan"].update(cap=2 << 40))
    here = resolve("cpu").default_cap_here()
    assert Engine.load(engine).plan.cap == here < 2 << 40


def test_max_memory_above_this_machines_memory_is_refused(engine_dir):
    from awq_edge.devices import host_memory_bytes

    too_much = f"{host_memory_bytes() * 2 // 2**30}GiB"
    with pytest.raises(UserError, match="more than this machine has") as e:
        Engine.load(engine_dir, max_memory=too_much)
    one_line(e)


def test_a_gpu_engine_plans_with_the_load_time_cap_and_context(engine_dir):
    """A GPU engine's context is fixed at build (its shapes): at load a smaller cap or --max-context
    plans fewer tokens, a larger --max-context is refused. (Planning only: no GPU here.)"""
    manifest = {**read_manifest(engine_dir), "backend": "trt", "device": "rtx4090",
                "memory_plan": {"cap": 8 << 30, "context": 2048}}
    info = read_export_info(engine_dir)
    assert engine_plan(manifest, info).context == 2048
    assert engine_plan(manifest, info, max_context=512).context == 512
    small = engine_plan(manifest, info, max_memory="720MiB")
    assert small.context < 2048 and small.total <= small.cap == 720 << 20
    with pytest.raises(UserError, match="built for") as e:
        engine_plan(manifest, info, max_context=4096)
    one_line(e)


# ---------------------------------------------------------------- silent corruption

def test_same_size_corruption_of_the_weights_is_caught_without_verify(engine_dir, tmp_path):
    data = engine_dir / "model.onnx.data"
    assert data.stat().st_size > SMALL_FILE_BYTES  # checked by its sampled hash
    zeroed = linked_copy(engine_dir, tmp_path / "zeroed")
    blob = bytearray(data.read_bytes())
    middle = len(blob) // 2
    blob[middle:middle + (1 << 20)] = bytes(1 << 20)  # a zeroed MiB, as a bad sector or a broken copy leaves
    rewrite(zeroed / "model.onnx.data", bytes(blob))
    started = time.perf_counter()
    with pytest.raises(UserError, match="model.onnx.data does not match its sampled sha256") as e:
        Engine.load(zeroed)
    one_line(e)
    assert time.perf_counter() - started < 5
    swapped = linked_copy(engine_dir, tmp_path / "swapped")  # another file of the very same size
    rewrite(swapped / "model.onnx.data", os.urandom(data.stat().st_size))
    with pytest.raises(UserError, match="model.onnx.data does not match"):
        Engine.load(swapped)


def test_verify_hashes_every_byte(engine_dir, tmp_path):
    flipped = linked_copy(engine_dir, tmp_path / "flipped")
    blob = bytearray((engine_dir / "model.onnx.data").read_bytes())
    blob[12345] ^= 0x40  # one bit, where no sample falls
    rewrite(flipped / "model.onnx.data", bytes(blob))
    with pytest.raises(UserError, match="does not match its sha256"):
        Engine.load(flipped, verify=True)


def test_a_graph_onnx_runtime_cannot_run_is_one_line(engine_dir, tmp_path):
    engine = linked_copy(engine_dir, tmp_path / "e")
    model = onnx.load(str(engine_dir / "model.onnx"), load_external_data=False)
    model.graph.node[5].op_type = "NoSuchOperator"
    rewrite(engine / "model.onnx", model.SerializeToString())
    resign(engine, "manifest.json", "model.onnx")
    with pytest.raises(UserError, match="ONNX Runtime cannot load .*model.onnx") as e:
        Engine.load(engine)
    one_line(e)


# ---------------------------------------------------------------- runaway chat templates

@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took more than"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output is over"),
    ("{{ 'x' * 10000000000 }}", "too large"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "too much memory"),
])
def test_a_chat_template_is_bounded_in_time_output_and_memory(engine_dir, tmp_path, template, message):
    engine = linked_copy(engine_dir, tmp_path / "e")
    rewrite(engine / "chat_template.jinja", template.encode())
    resign(engine, "manifest.json", "chat_template.jinja")
    started = time.perf_counter()
    result = subprocess.run([*CLI, "run", str(engine), "--prompt", "hi", "--max-new-tokens", "2"],
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
    assert time.perf_counter() - started < 30


# ---------------------------------------------------------------- leftovers

def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_build_stopped_by_a_signal_leaves_nothing(rtn_checkpoint, tmp_path, signum):
    out = tmp_path / "engine"
    proc = subprocess.Popen([*CLI, "build", str(rtn_checkpoint), "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _leftovers(tmp_path) and time.monotonic() < deadline:  # wait until it is writing
        time.sleep(0.05)
    assert _leftovers(tmp_path), "the build never started writing"
    time.sleep(0.5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1].startswith(f"error: stopped by {signal.Signals(signum).name}"), err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_temp_dirs_of_a_killed_build_are_swept_by_the_next_one(engine_dir, tmp_path):
    """SIGKILL (or a power cut) runs no cleanup: the next build into the same output removes what a
    process that no longer runs left, and leaves a live process's temp dir alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    export = linked_copy(engine_dir, tmp_path / "export")
    (export / "manifest.json").unlink()
    stale = [tmp_path / f".engine.tmp-{dead}-abc123", tmp_path / f".engine.work-{dead}-def456"]
    live = tmp_path / f".engine.tmp-{os.getppid()}-live01"
    for d in (*stale, live):
        d.mkdir()
        (d / "model.onnx.data").write_bytes(b"half")
    result = subprocess.run([*CLI, "build", str(export), "--output", str(tmp_path / "engine")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert _leftovers(tmp_path) == [live.name]


def test_an_output_that_cannot_be_written_is_one_line(engine_dir, tmp_path):
    (tmp_path / "a-file").write_text("x")
    export = linked_copy(engine_dir, tmp_path / "export")
    (export / "manifest.json").unlink()
    result = subprocess.run([*CLI, "build", str(export), "--output", str(tmp_path / "a-file" / "engine")],
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "a-file" in lines[0], result.stderr
