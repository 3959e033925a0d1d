"""The runtime commands as a user runs them: real subprocesses, real engine (engine_dir from conftest)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "awq_edge.cli"]


def cli(*args, stdin: bytes | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([*CLI, *map(os.fsdecode, args)], input=stdin, capture_output=True, timeout=timeout, env=env)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode("utf-8", "replace").strip()
    assert result.returncode == 1, (result.returncode, err)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_run_streams_the_greedy_reply(engine_dir):
    from awq_edge.engine import Engine

    result = cli("run", engine_dir, "--prompt", "What is the capital of France?", "--temperature", "0",
                 "--max-new-tokens", "24", "--stats")
    assert result.returncode == 0, result.stderr
    expected = Engine.load(engine_dir).generate("What is the capital of France?", max_new_tokens=24, temperature=0)
    assert result.stdout.decode() == expected + "\n"
    assert "tok/s" in result.stderr.decode()


def test_run_takes_openai_logit_bias_and_penalties(engine_dir):
    from awq_edge.engine import Engine

    prompt, adjust = "Write a paragraph about the ocean.", {"logit_bias": {5: -100.0, 6: 4.5}, "presence_penalty": 2.0,
                                                           "frequency_penalty": -0.5}
    result = cli("run", engine_dir, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "24", "--logit-bias",
                 "5=-100", "--logit-bias", "6=4.5", "--presence-penalty", "2", "--frequency-penalty", "-0.5")
    assert result.returncode == 0, result.stderr
    engine = Engine.load(engine_dir)
    expected = engine.generate(prompt, max_new_tokens=24, temperature=0, **adjust)
    assert result.stdout.decode() == expected + "\n"
    assert expected != engine.generate(prompt, max_new_tokens=24, temperature=0)


def test_run_json_prints_one_json_object(engine_dir):
    import json

    result = cli("run", engine_dir, "--prompt", "Give me a JSON object with a city and its country.", "--json",
                 "--temperature", "0", "--max-new-tokens", "120", "--stats")
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), dict) and ", stop]" in result.stderr.decode()


def test_run_json_schema_holds_the_reply_to_the_schema_and_refuses_a_bad_one(engine_dir, tmp_path):
    import json

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "size": {"enum": ["small", "large"]}},
              "required": ["city", "size"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    result = cli("run", engine_dir, "--prompt", "Tell me about Paris.", "--json-schema", tmp_path / "schema.json",
                 "--temperature", "0", "--max-new-tokens", "60")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert set(reply) == {"city", "size"} and reply["size"] in ("small", "large") and len(reply["city"]) <= 30
    (tmp_path / "bad.json").write_text(json.dumps({"type": "string", "pattern": "^a"}))
    assert "'pattern'" in one_line_error(cli("run", engine_dir, "--prompt", "hi", "--json-schema",
                                             tmp_path / "bad.json"))
    assert "is missing" in one_line_error(cli("run", engine_dir, "--prompt", "hi", "--json-schema",
                                              tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text('{"type": ')
    assert "cannot be read as JSON" in one_line_error(cli("run", engine_dir, "--prompt", "hi", "--json-schema",
                                                          tmp_path / "broken.json"))


def test_chat_three_turns_over_stdin(engine_dir):
    lines = [b"My name is Ada.", b"\xff\xfe not utf-8", b"What is my name?", b"/reset", b"Hello!", b"/exit",
             b"never read"]
    result = cli("chat", engine_dir, "--temperature", "0", "--max-new-tokens", "20", stdin=b"\n".join(lines) + b"\n")
    err = result.stderr.decode()
    assert result.returncode == 0, err
    stats = [line for line in err.splitlines() if line.startswith("[") and "tok/s" in line]
    assert len(stats) == 3, err  # three replies; the bad line was refused and the REPL went on
    assert "not valid UTF-8" in err and "[new conversation]" in err
    fed = [int(line.split("fed ")[1].split()[0]) for line in stats]
    context = [int(line.split("context ")[1].split("/")[0]) for line in stats]
    # turn 2 feeds only its own text: far less than the whole conversation in the cache
    assert fed[1] < 20 and context[1] > context[0] > fed[1]
    # after /reset the conversation starts over: the whole fresh prompt (system text included) is fed
    assert fed[2] > fed[1] and context[2] < context[1]
    assert len(result.stdout.decode().strip().splitlines()) >= 3


def test_bench_json(engine_dir):
    result = cli("bench", engine_dir, "--prompt-tokens", "32", "--new-tokens", "16", "--runs", "1", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes"):
        assert data[key] > 0, key
    assert data["peak_rss_bytes"] < data["cap_bytes"]


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "2"], "--top-p"),
    (["--top-k", "-3"], "--top-k"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--presence-penalty", "3"], "--presence-penalty"),
    (["--logit-bias", "13"], "--logit-bias takes TOKEN_ID=BIAS"),
    (["--logit-bias", "13=-101"], "--logit-bias values must be in [-100.0, 100.0]"),
    (["--logit-bias", "49152=1"], "logit_bias names token 49152, past the vocabulary"),
    (["--max-memory", "lots"], "memory size"),
    (["--max-memory", "64MiB"], "short by"),
    (["--max-context", "64", "--prompt", "word " * 200], "context holds 64"),
])
def test_run_bad_values_are_one_line_errors(engine_dir, args, needle):
    base = ["run", engine_dir, "--max-new-tokens", "4"] + ([] if "--prompt" in args else ["--prompt", "hi"])
    assert needle in one_line_error(cli(*base, *args))


def test_run_refuses_non_utf8_input(engine_dir):
    assert "UTF-8" in one_line_error(cli("run", engine_dir, "--prompt", os.fsdecode(b"caf\xe9")))
    assert "UTF-8" in one_line_error(cli("run", engine_dir, "--prompt", "-", stdin=b"caf\xe9 au lait"))


def test_run_bad_engine_dirs(tmp_path):
    assert "not found" in one_line_error(cli("run", tmp_path / "missing", "--prompt", "hi"))
    (tmp_path / "foreign").mkdir()
    assert "not an awq-edge engine" in one_line_error(cli("run", tmp_path / "foreign", "--prompt", "hi"))


def test_build_bad_inputs_write_nothing(engine_dir, tmp_path):
    out = tmp_path / "out.engine"
    assert "not found" in one_line_error(cli("build", tmp_path / "nope", "--output", out))
    # an engine is not a build source
    assert "already an engine" in one_line_error(cli("build", engine_dir, "--output", out))
    # a cap below the weights is refused after export, before anything is written
    (tmp_path / "export").mkdir()
    for f in engine_dir.iterdir():
        if f.name != "manifest.json":
            os.link(f, tmp_path / "export" / f.name)
    assert "short by" in one_line_error(cli("build", tmp_path / "export", "--output", out, "--max-memory", "100MiB"))
    assert "unknown device" in one_line_error(cli("build", tmp_path / "export", "--output", out, "--device", "pdp11"))
    out.mkdir()
    assert "already exists" in one_line_error(cli("build", tmp_path / "export", "--output", out))
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "out.engine"]  # no temp dirs left behind


def test_a_float_model_that_cannot_fit_is_refused_before_it_is_quantized(tmp_path):
    """A float model's shape is enough to know it cannot fit (its 4-bit linears alone): the build
    says so at once, as the plan would after quantizing. The folder here holds only Llama-3.1-8B's
    config.json, no weights: reaching the quantizer would fail otherwise."""
    model = tmp_path / "llama-3.1-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072}))
    out = tmp_path / "out.engine"
    for args in (["--device", "orin-nano-4gb", "--backend", "cuda"], ["--device", "cpu", "--max-memory", "3GiB"]):
        err = one_line_error(cli("build", model, "--output", out, *args))
        assert "short by" in err and "raise --max-memory or use a smaller model" in err, err
    err = one_line_error(cli("build", model, "--output", out, "--device", "orin-agx-64gb", "--backend", "cuda",
                             "--max-memory", "6GiB", "--max-context", "65536"))
    assert "--max-context 65536 does not fit" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-3.1-8b"]


def test_a_gguf_that_cannot_fit_is_refused_from_its_header_before_it_is_converted(smollm2_dir, tmp_path):
    """A GGUF the cache has not converted yet (SmolLM2's, one tensor byte changed): a cap it cannot
    fit is refused from the GGUF's header, and no float copy is written."""
    import shutil

    from awq_edge.build import build_engine
    from awq_edge.data import smollm2_gguf
    from awq_edge.errors import UserError

    gguf = tmp_path / smollm2_gguf().name
    shutil.copy(smollm2_gguf(), gguf)
    with open(gguf, "r+b") as f:
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 1]))
    models = sorted(smollm2_dir.parent.iterdir())
    with pytest.raises(UserError, match="short by"):
        build_engine(str(gguf), "cpu", tmp_path / "out.engine", max_memory="64MiB", progress=False)
    assert sorted(smollm2_dir.parent.iterdir()) == models and not (tmp_path / "out.engine").exists()


def test_build_from_an_export_dir_then_run(engine_dir, tmp_path):
    (tmp_path / "export").mkdir()
    for f in engine_dir.iterdir():
        if f.name != "manifest.json":
            os.link(f, tmp_path / "export" / f.name)
    out = tmp_path / "copy.engine"
    result = cli("build", tmp_path / "export", "--output", out, "--max-memory", "512MiB")
    assert result.returncode == 0, result.stderr
    result = cli("run", out, "--prompt", "Say hi.", "--temperature", "0", "--max-new-tokens", "8")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_peak_rss_stays_under_the_cap_with_the_whole_context_filled(engine_dir):
    """Generate until the planned context is full (every KV page written, the attention at its
    widest): the child's peak RSS (ru_maxrss) stays below the cap."""
    from awq_edge.engine import Engine

    cap = 360 << 20
    context = Engine.load(engine_dir, max_memory=cap).context  # what the plan fits under the cap
    assert 512 < context < 2048
    # A fresh wrapper process whose only child is the CLI, so RUSAGE_CHILDREN is that child's peak.
    wrapper = ("import resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, r.returncode)\n")
    result = subprocess.run([sys.executable, "-c", wrapper, *CLI, "run", str(engine_dir), "--prompt",
                             "Tell me a long story about a dragon.", "--max-memory", "360MiB", "--max-new-tokens",
                             str(context), "--ignore-eos", "--temperature", "0.7", "--seed", "0", "--stats"],
                            capture_output=True, text=True, timeout=600)
    assert f"the context of {context} tokens is full" in result.stderr, result.stderr
    _, peak, rc = result.stdout.split()
    assert rc == "0" and 0 < int(peak) < cap, f"peak RSS {int(peak) / 2**20:.0f} MiB, cap {cap / 2**20:.0f} MiB"


# A Qwen3-style switch (written here, not Qwen's template): an empty think block when thinking is off.
THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                     "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_chat_template_kwargs_reach_the_template(engine_dir, tmp_path):
    """`--chat-template-kwargs '{"enable_thinking": false}'` (run, chat, the API's template_kwargs)."""
    import re

    from awq_edge import Engine
    from folder_helpers import linked_copy, resign, rewrite

    engine = linked_copy(engine_dir, tmp_path / "engine")
    rewrite(engine / "chat_template.jinja", THINKING_TEMPLATE.encode())  # the engine may have one: not in place
    resign(engine, "manifest.json", "chat_template.jinja")
    args = ["run", engine, "--prompt", "Hi", "--max-new-tokens", "1", "--temperature", "0", "--stats"]
    plain, on, off = (cli(*args, *extra) for extra in (
        [], ["--chat-template-kwargs", '{"enable_thinking": true}'], ["--chat-template-kwargs", '{"enable_thinking": false}']))

    def prompt_tokens(result) -> int:
        assert result.returncode == 0, result.stderr
        return int(re.search(r"\[(\d+) prompt tokens", result.stderr.decode()).group(1))

    assert prompt_tokens(off) > prompt_tokens(plain) == prompt_tokens(on)
    eng = Engine.load(engine)
    ids = eng.prompt_ids("Hi", template_kwargs={"enable_thinking": False})
    assert len(ids) == prompt_tokens(off) and eng.tokenizer.decode(ids, False).endswith("<think>\n\n</think>\n\n")
    chat = eng.chat(template_kwargs={"enable_thinking": False})  # every turn renders with them
    chat.send("Hi", max_new_tokens=2, temperature=0)
    assert eng.tokenizer.decode(eng.cached_ids, False).count("</think>") == 1
    assert "enable_thinking" in one_line_error(cli(*args, "--chat-template-kwargs", '{"enable_thinking": fals}'))
    assert "variable names" in one_line_error(cli(*args, "--chat-template-kwargs", "[1]"))
