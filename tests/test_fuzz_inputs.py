"""Hostile and unlucky inputs, as a property of the whole CLI.

Every outcome of `awq-edge run`, `build`, `export` and `eval` on a mutated engine, export or
checkpoint must be exit 0 with the right output, or a non-zero exit with exactly one `error:`
line: never a traceback, an internal error, a hang, or a half-written output.

The folders are real: a tiny random Gemma 3 (the family with the most config fields) with
SmolLM2's tokenizer, quantized (AutoAWQ and compressed-tensors checkpoints), exported and
built once. Each example copies one folder (hard
links; only the mutated file is rewritten), then either sets one JSON field to something it
should not be (deleted, null, another type, negative, zero, huge, nested in a list or an object)
(or, for a number, half, double or one more: plausible but wrong) or changes the bytes of one
file (a flipped byte, a truncation, appended bytes), and runs a
command in-process with a time limit. An engine or export is also mutated "re-signed": its
listing (manifest / export.json `files`) is updated to the new file, as a hostile editor would,
so the field checks themselves, not the hashes, must hold; a run that still succeeds must then
plan with the same weight and KV sizes as the original (a number typed into a JSON file may not
move the memory plan).

AWQ_EDGE_FUZZ_EXAMPLES=N runs N examples per test instead of the CI default.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from awq_edge.cli import app
from folder_helpers import linked_copy, resign, rewrite

EXAMPLES = int(os.environ.get("AWQ_EDGE_FUZZ_EXAMPLES", "0"))
SECONDS = 60  # per command; a tiny model runs each in well under 5 s
RUN = ["--prompt", "Name a color.", "--temperature", "0", "--max-new-tokens", "4"]
JSON_FILES = ("manifest.json", "export.json", "config.json", "tokenizer_config.json", "generation_config.json",
              "awq_edge.json", "special_tokens_map.json")
JSON_WEIGHT = {"manifest.json": 3, "export.json": 4, "config.json": 2}
WRONG_VALUES = {"null": None, "string": "x", "negative": -1, "zero": 0, "huge": 10 ** 18, "float": 1e308,
                "bool": True, "list": [], "object": {}}


def fuzz_settings(ci_examples: int):
    return settings(max_examples=EXAMPLES or ci_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


class Hang(BaseException):
    """A command ran past SECONDS (BaseException: no `except Exception` in the product swallows it)."""


def _on_alarm(signum, frame):
    raise Hang


def invoke(*args) -> tuple[int, str, str]:
    """The CLI in-process (its user_errors wrapper included): exit code, stdout, stderr."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(SECONDS)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"awq-edge {' '.join(map(str, args))} raised {result.exception!r}") from result.exception
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, err: str, what: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), f"{what}: exit {code}, stderr {err!r}"
    assert "internal error" not in lines[0], f"{what}: {lines[0]}"


# ---------------------------------------------------------------- the folders, built once

@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir):
    from awq_edge.build import build_engine
    from awq_edge.export import export_checkpoint
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    root = tmp_path_factory.mktemp("fuzz")
    ckpt, ct_ckpt = root / "checkpoint", root / "ct-checkpoint"
    rtn = QuantizeSettings(method="rtn", group_size=32)
    quantize_checkpoint(str(tiny_model_dir("gemma3_text")), ckpt, rtn, progress=False)
    quantize_checkpoint(str(tiny_model_dir("gemma3_text")), ct_ckpt, rtn, progress=False,
                        checkpoint_format="compressed-tensors")
    export = export_checkpoint(ckpt, root / "export", "ort")
    engine = root / "engine"
    build_engine(str(export), "cpu", engine, max_memory="1GiB", progress=False)
    text = root / "text.txt"
    text.write_text("Robots on small boards need memory caps and careful engineers.\n\n" * 12)
    code, out, err = invoke("run", engine, *RUN)
    assert code == 0, err
    return {"checkpoint": ckpt, "compressed-tensors": ct_ckpt, "export": export, "engine": engine, "text": text, "root": root,
            "reference": out, "plan": _plan_facts(engine)}


def _plan_facts(engine: Path):
    from awq_edge.engine import Engine

    return Engine.load(engine).plan


def _reference_workspace(engine: Path, context: int) -> int:
    """What the unmutated engine's files say one prefill chunk needs at this context."""
    from awq_edge.engine_dir import read_export_info
    from awq_edge.memory import workspace_bytes

    i = read_export_info(engine)
    return workspace_bytes(i.hidden_size, i.intermediate_size, i.vocab_size, i.num_heads, context, i.all_logits)


def json_paths(value, prefix=(), depth=6):
    """Every key path into a JSON value (objects and lists), up to `depth` levels."""
    if depth == 0:
        return
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in list(items)[:64]:
        yield prefix + (key,)
        yield from json_paths(child, prefix + (key,), depth - 1)


@st.composite
def json_mutation(draw, folder: Path):
    """(file name, key path, kind) for one JSON file of the folder: the files the runtime plans
    with drawn more often, and a depth drawn first, so top-level fields are not drowned out by
    the many nested ones."""
    names = sorted(n for n in JSON_FILES if (folder / n).is_file())
    name = draw(st.sampled_from([n for n in names for _ in range(JSON_WEIGHT.get(n, 1))]))
    paths = list(json_paths(json.loads((folder / name).read_text())))
    depth = draw(st.integers(1, max(len(p) for p in paths)))
    path = draw(st.sampled_from([p for p in paths if len(p) == depth]))
    kind = draw(st.sampled_from(["delete", "nest_list", "nest_object", "halve", "double", "plus_one", *WRONG_VALUES]))
    return name, path, kind


def apply_json_mutation(folder: Path, name: str, path: tuple, kind: str) -> None:
    data = json.loads((folder / name).read_text())
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if kind == "delete":
        parent.pop(key) if isinstance(parent, dict) else parent.pop(key)
    elif kind == "nest_list":
        parent[key] = [parent[key]]
    elif kind == "nest_object":
        parent[key] = {"value": parent[key]}
    elif kind in ("halve", "double", "plus_one"):  # plausible but wrong (a number that still looks right)
        value = parent[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[key] = {"halve": value // 2 if isinstance(value, int) else value / 2, "double": value * 2,
                           "plus_one": value + 1}[kind]
    else:
        parent[key] = WRONG_VALUES[kind]
    rewrite(folder / name, json.dumps(data).encode())


@st.composite
def byte_mutation(draw, folder: Path):
    """(file name, kind, offset, byte) for any file of the folder."""
    name = draw(st.sampled_from(sorted(f.name for f in folder.iterdir())))
    size = (folder / name).stat().st_size
    kind = draw(st.sampled_from(["flip", "truncate", "append"]))
    offset = draw(st.integers(0, max(size - 1, 0)))
    return name, kind, offset, draw(st.integers(1, 255))


def apply_byte_mutation(folder: Path, name: str, kind: str, offset: int, byte: int) -> None:
    data = bytearray((folder / name).read_bytes())
    if kind == "flip" and data:
        data[offset] ^= byte
    elif kind == "truncate":
        del data[offset:]
    else:
        data += bytes([byte]) * (offset % 4096 + 1)
    rewrite(folder / name, bytes(data))


def _changed(original: Path, mutated: Path, name: str) -> bool:
    return not (mutated / name).exists() or (mutated / name).read_bytes() != (original / name).read_bytes()


def check_run(folders, engine: Path, what: str, must_fail: bool = False, same_output: bool = True) -> None:
    """`awq-edge run` on a (mutated) engine: one error line, or the reference text (same_output)
    planned with the reference's weight and KV sizes."""
    code, out, err = invoke("run", engine, *RUN)
    if code != 0:
        return assert_one_line_error(code, err, what)
    assert not must_fail, f"{what}: a changed file was not caught"
    assert err == "", f"{what}: {err!r}"
    if same_output:
        assert out == folders["reference"], f"{what}: ran, but printed {out!r}"
    plan, ref = _plan_facts(engine), folders["plan"]
    assert (plan.weights, plan.kv_per_token) == (ref.weights, ref.kv_per_token), f"{what}: the plan moved"
    assert plan.workspace >= _reference_workspace(folders["engine"], plan.context), f"{what}: the workspace shrank"
    assert plan.total <= plan.cap, f"{what}: {plan.describe()}"


def mutate(folder: Path, data) -> tuple[str, str]:
    """One JSON field or the bytes of one file, as hypothesis draws it: (file name, description)."""
    if data.draw(st.booleans(), "json field"):
        name, path, kind = data.draw(json_mutation(folder), "mutation")
        apply_json_mutation(folder, name, path, kind)
        return name, f"{name} {list(path)} {kind}"
    name, kind, offset, byte = data.draw(byte_mutation(folder), "mutation")
    apply_byte_mutation(folder, name, kind, offset, byte)
    return name, f"{name} {kind} at {offset}"


# ---------------------------------------------------------------- the properties

def _plan_numbers(engine: Path) -> list[tuple[str, tuple]]:
    """Every number of manifest.json and export.json outside the model config and file records."""
    found = []
    for name in ("manifest.json", "export.json"):
        data = json.loads((engine / name).read_text())
        for path in json_paths(data):
            value = data
            for key in path:
                value = value[key]
            if path[0] not in ("config", "files", "quantization") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                found.append((name, path))
    return found


def test_no_number_in_the_engine_metadata_moves_the_plan(folders, tmp_path):
    """Each number the manifest and export.json hold, halved or doubled and re-signed: the run
    fails in one line, or plans with the weight and KV sizes the files really have."""
    numbers = _plan_numbers(folders["engine"])
    assert len(numbers) > 15  # weight_bytes, kv_bytes_per_token, layers, heads, the plan's cap ...
    for i, (name, path) in enumerate(numbers):
        for kind in ("halve", "double"):
            engine = linked_copy(folders["engine"], tmp_path / f"{i}-{kind}")
            apply_json_mutation(engine, name, path, kind)
            resign(engine, "manifest.json", name)
            check_run(folders, engine, f"{name} {list(path)} {kind} (re-signed)", same_output=False)
            shutil.rmtree(engine)


@fuzz_settings(240)
@given(data=st.data())
def test_run_on_a_mutated_engine(folders, tmp_path_factory, data):
    engine = linked_copy(folders["engine"], tmp_path_factory.mktemp("e") / "engine")
    name, what = mutate(engine, data)
    signed = name != "manifest.json" and data.draw(st.booleans(), "re-signed")
    if signed:
        resign(engine, "manifest.json", name)
    changed = name != "manifest.json" and _changed(folders["engine"], engine, name)
    check_run(folders, engine, what + (" (re-signed)" if signed else ""), must_fail=changed and not signed,
              same_output=not signed)
    shutil.rmtree(engine.parent)


@fuzz_settings(120)
@given(data=st.data())
def test_build_from_a_mutated_export(folders, tmp_path_factory, data):
    work = tmp_path_factory.mktemp("x")
    export = linked_copy(folders["export"], work / "export")
    name, what = mutate(export, data)
    signed = name != "export.json" and data.draw(st.booleans(), "re-signed")
    if signed:
        resign(export, "export.json", name)
    out = work / "engine"
    code, _, err = invoke("build", export, "--device", "cpu", "--output", out, "--max-memory", "1GiB")
    leftovers = [p.name for p in work.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"{what}: left {leftovers}"
    if code != 0:
        assert not out.exists(), f"{what}: a failed build wrote {out}"
        assert_one_line_error(code, err, what)
    else:
        changed = name != "export.json" and _changed(folders["export"], export, name)
        assert signed or not changed, f"{what}: a changed export built without complaint"
        check_run(folders, out, what + " (built)", same_output=not signed)
    shutil.rmtree(work)


@pytest.mark.parametrize("checkpoint_format", ["checkpoint", "compressed-tensors"])
@fuzz_settings(48)
@given(data=st.data())
def test_export_and_eval_of_a_mutated_checkpoint(folders, tmp_path_factory, checkpoint_format, data):
    work = tmp_path_factory.mktemp("c")
    ckpt = linked_copy(folders[checkpoint_format], work / "checkpoint")
    _, what = mutate(ckpt, data)
    out = work / "export"
    code, _, err = invoke("export", ckpt, "--output", out)
    if code != 0:
        assert not out.exists(), f"{what}: a failed export wrote {out}"
        assert_one_line_error(code, err, what + " (export)")
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == [], f"{what}: export left temp dirs"
    if data.draw(st.booleans(), "eval too"):
        code, out_text, err = invoke("eval", ckpt, "--text", folders["text"], "--seqlen", "32", "--windows", "2",
                                     "--json")
        if code != 0:
            assert_one_line_error(code, err, what + " (eval)")
        else:
            assert "perplexity" in json.loads(out_text), what
    shutil.rmtree(work)
