"""`awq-edge quantize` / `eval` from the command line: real runs and bad input.

Bad input must give one `error:` line that says what is wrong and what to do, exit code 1,
no traceback, and nothing written at (or beside) the output path.
"""
import json
import shutil
import subprocess
import sys

import pytest


def awq_edge(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "awq_edge.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def assert_clean_error(proc, *phrases):
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def assert_nothing_written(parent, name):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


def write_config(path, **config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_missing_model(tmp_path):
    proc = awq_edge("quantize", tmp_path / "nope", "--output", tmp_path / "out")
    assert_clean_error(proc, "model not found")
    assert_nothing_written(tmp_path, "out")


def test_not_a_causal_lm(tmp_path):
    src = write_config(tmp_path / "bert", architectures=["BertModel"], model_type="bert")
    proc = awq_edge("quantize", src, "--output", tmp_path / "out")
    assert_clean_error(proc, "not a causal LM")
    assert_nothing_written(tmp_path, "out")


def test_unsupported_family_lists_supported(tmp_path):
    src = write_config(tmp_path / "falcon", architectures=["FalconForCausalLM"], model_type="falcon")
    proc = awq_edge("quantize", src, "--output", tmp_path / "out")
    assert_clean_error(proc, "'falcon' is not supported", "llama", "qwen3", "gemma3_text")


def test_bad_group_size_is_refused_before_loading(tmp_path):
    proc = awq_edge("quantize", tmp_path / "whatever", "--group-size", "100", "--output", tmp_path / "out")
    assert_clean_error(proc, "--group-size 100", "32, 64, 128")


def test_corrupt_weights(tmp_path, tiny_model_dir):
    src = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir("llama"), src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    proc = awq_edge("quantize", src, "--method", "rtn", "--output", tmp_path / "out")
    assert_clean_error(proc, "corrupt")
    assert_nothing_written(tmp_path, "out")


def test_empty_calibration_file(tmp_path, tiny_model_dir):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n  \n")
    proc = awq_edge("quantize", tiny_model_dir("llama"), "--calib", calib, "--output", tmp_path / "out")
    assert_clean_error(proc, "holds no text")
    assert_nothing_written(tmp_path, "out")


def test_calibration_protocols(tmp_path, tiny_model_dir):
    """--calib-protocol deployed starts every calibration sequence with the BOS (the tiny models use
    SmolLM2's tokenizer, whose chat template begins with it) and records it; a wrong name is one line."""
    calib = tmp_path / "calib.txt"
    calib.write_text("The robot arm picks up the red block and places it on the table.\n\n" * 100)
    metas = {}
    for protocol in ("plain", "deployed"):
        out = tmp_path / protocol
        proc = awq_edge("quantize", tiny_model_dir("llama"), "--calib", calib, "--calib-samples", "4",
                        "--calib-seqlen", "64", "--group-size", "32", "--calib-protocol", protocol, "--tune-steps", "0",
                        "--output", out)
        assert proc.returncode == 0, proc.stderr[-2000:]
        metas[protocol] = json.loads((out / "awq_edge.json").read_text())
    assert metas["plain"]["calibration"]["prefix"] == [] and metas["deployed"]["calibration"]["prefix"] == [1]
    assert metas["deployed"]["settings"]["calib_protocol"] == "deployed"
    assert metas["plain"]["layers"] != metas["deployed"]["layers"]  # the searches saw other activations
    for layer in metas["plain"]["layers"]:  # the default search: coarse to fine, the best alpha of those tried
        for group in layer["groups"].values():
            alphas, losses = zip(*group["losses"])
            assert 5 <= len(alphas) < 20 and group["alpha"] == alphas[losses.index(min(losses))]
    proc = awq_edge("quantize", tiny_model_dir("llama"), "--calib-protocol", "bos", "--output", tmp_path / "x")
    assert_clean_error(proc, "--calib-protocol bos")
    assert_nothing_written(tmp_path, "x")


def test_effort_high_and_the_full_scale_search_are_what_the_checkpoint_records(tmp_path, tiny_model_dir):
    calib = tmp_path / "calib.txt"
    calib.write_text("The robot arm picks up the red block and places it on the table.\n\n" * 100)
    out = tmp_path / "high"
    proc = awq_edge("quantize", tiny_model_dir("llama"), "--calib", calib, "--calib-samples", "4", "--calib-seqlen",
                    "64", "--group-size", "32", "--effort", "high", "--scale-search", "full", "--tune-steps", "2",
                    "--output", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "awq_edge.json").read_text())
    assert meta["settings"]["block_tune_batch"] == 4 and meta["settings"]["scale_search"] == "full"
    assert meta["settings"]["block_tune_steps"] == 2
    grid = meta["settings"]["scale_grid"]
    for layer in meta["layers"]:  # every alpha of the grid was tried
        for group in layer["groups"].values():
            assert [alpha for alpha, _ in group["losses"]] == [i / grid for i in range(grid)]
    for option, value in (("--effort", "max"), ("--scale-search", "coarse")):
        proc = awq_edge("quantize", tiny_model_dir("llama"), option, value, "--output", tmp_path / "x")
        assert_clean_error(proc, f"{option} {value}")
        assert_nothing_written(tmp_path, "x")


def test_jsonl_without_text_field(tmp_path, tiny_model_dir):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"body": "hello"}\n')
    proc = awq_edge("quantize", tiny_model_dir("llama"), "--calib", calib, "--output", tmp_path / "out")
    assert_clean_error(proc, '"text"')


def test_existing_output_needs_force(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = awq_edge("quantize", tiny_model_dir("llama"), "--method", "rtn", "--output", out)
    assert_clean_error(proc, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    proc = awq_edge("quantize", tiny_model_dir("llama"), "--method", "rtn", "--group-size", "32", "--output", out,
                    "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "keep.txt").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                             "version": "gemm", "modules_to_not_convert": None}
    assert (out / "tokenizer.json").exists() and (out / "awq_edge.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_eval_json_reports_perplexity(tmp_path, tiny_model_dir):
    text = tmp_path / "t.txt"
    text.write_text("The robot arm picks up the red block and places it on the table. " * 200)
    proc = awq_edge("eval", tiny_model_dir("qwen3"), "--text", text, "--seqlen", "128", "--windows", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["windows"] == 2 and result["tokens"] == 2 * 127
    assert result["perplexity"] > 1


@pytest.mark.parametrize("args,phrase", [
    (["--seqlen", "1"], "--seqlen"),
    (["--method", "gptq"], "--method gptq"),
    (["--protocol", "bos"], "--protocol bos"),
])
def test_eval_bad_options(tmp_path, tiny_model_dir, args, phrase):
    proc = awq_edge("eval", tiny_model_dir("llama"), *args)
    assert_clean_error(proc, phrase)


def test_eval_text_shorter_than_a_window(tmp_path, tiny_model_dir):
    text = tmp_path / "short.txt"
    text.write_text("Too short.")
    proc = awq_edge("eval", tiny_model_dir("llama"), "--text", text)
    assert_clean_error(proc, "fewer than one window")


def test_gguf_cache_is_keyed_by_content_not_path(tmp_path, smollm2_dir):
    """Every fresh venv holds the same GGUF at a new path; it must reuse one float copy, and a
    changed file must not reuse a stale one."""
    from awq_edge.data import smollm2_gguf
    from awq_edge.model import _gguf_cache_dir, resolve_source

    gguf = smollm2_gguf()
    copy = tmp_path / "elsewhere" / gguf.name
    copy.parent.mkdir()
    shutil.copy(gguf, copy)
    models = smollm2_dir.parent
    before = sorted(models.iterdir())
    assert resolve_source(str(copy)) == smollm2_dir
    assert sorted(models.iterdir()) == before

    with open(copy, "r+b") as f:   # one byte of tensor data near the end
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 1]))
    assert _gguf_cache_dir(copy) != smollm2_dir
