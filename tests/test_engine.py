"""The runtime on the real SmolLM2-135M (RTN checkpoint -> ort export -> engine) with real ONNX Runtime."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from awq_edge.engine import Engine
from awq_edge.engine_dir import ENGINE_FORMAT_VERSION
from awq_edge.errors import UserError
from awq_edge.untrusted import SMALL_FILE_BYTES, sampled_sha256, sha256_file
from folder_helpers import linked_copy, rewrite

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def engine(engine_dir):
    return Engine.load(engine_dir)


def test_engine_dir_is_self_contained_and_hashed(engine_dir):
    names = {p.name for p in engine_dir.iterdir()}
    assert {"model.onnx", "export.json", "tokenizer.json", "tokenizer_config.json", "manifest.json"} <= names
    assert all(p.is_file() for p in engine_dir.iterdir())
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["format_version"] == ENGINE_FORMAT_VERSION and manifest["device"] == "cpu"
    assert manifest["quantization"]["method"] == "rtn"
    assert set(manifest["versions"]) == {"awq_edge", "onnx", "onnxruntime"}
    plan = manifest["memory_plan"]
    assert plan["cap"] == 1 << 30 and plan["context"] == 2048 and plan["total"] <= plan["cap"]
    assert set(manifest["files"]) == names - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert sha256_file(engine_dir / name) == entry["sha256"]
        if entry["size"] > SMALL_FILE_BYTES:  # model.onnx.data: checked on every load by this
            assert entry["sampled_sha256"] == sampled_sha256(engine_dir / name)
    assert {n for n, e in manifest["files"].items() if "sampled_sha256" in e} == {"model.onnx.data"}
    leftovers = [p.name for p in engine_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temp dirs of the build are gone


def test_generate_greedy_is_deterministic_and_answers(engine):
    a = engine.generate("What is the capital of France?", max_new_tokens=24, **GREEDY)
    b = engine.generate("What is the capital of France?", max_new_tokens=24, **GREEDY)
    assert a == b and "Paris" in a
    assert engine.last_stats.reused_tokens == 0  # one-shot prompts start from an empty cache


def test_stream_gives_the_same_text_as_generate(engine):
    pieces = list(engine.stream("List three fruits.", max_new_tokens=24, **GREEDY))
    assert len(pieces) > 3
    assert "".join(pieces) == engine.generate("List three fruits.", max_new_tokens=24, **GREEDY)


def test_seeds_make_sampling_reproducible(engine):
    prompt = "Write a short poem about the sea."
    texts = [engine.generate(prompt, max_new_tokens=16, temperature=1.0, seed=s) for s in (1, 1, 2, 3)]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) > 1


def test_logit_bias_and_penalties_steer_each_greedy_choice(engine):
    """Each token greedy chooses with OpenAI's adjustments is the argmax of the raw logits (fed
    again one token at a time) plus logit_bias, less the presence penalty for each token generated
    so far and the frequency penalty per time (sampling.adjusted_logits; the prompt not counted)."""
    import numpy as np

    from awq_edge.sampling import Sampler, SamplingSettings

    ids = engine.prompt_ids("Write a paragraph about the ocean.")
    "".join(engine.stream_ids(ids, Sampler(SamplingSettings(0.0)), 16, ignore_eos=True, logprobs=0))
    plain = [token for token, _, _ in engine.last_logprobs]
    settings = SamplingSettings(0.0, logit_bias={plain[0]: -100.0, plain[2]: 3.0}, presence_penalty=1.5,
                                frequency_penalty=0.75)
    "".join(engine.stream_ids(ids, Sampler(settings), 16, ignore_eos=True, logprobs=0))
    steered = [token for token, _, _ in engine.last_logprobs]
    assert steered[0] != plain[0] and steered != plain
    engine.reset()
    logits = engine.backend.forward(ids)
    for i, token in enumerate(steered):
        raw = np.asarray(logits, np.float64).copy()
        raw[plain[0]] -= 100.0
        raw[plain[2]] += 3.0
        for t in set(steered[:i]):
            raw[t] -= 1.5 + 0.75 * steered[:i].count(t)
        assert token == int(np.argmax(raw)), i
        logits = engine.backend.forward([token])
    engine.reset()
    with pytest.raises(UserError, match="logit_bias names token 49152, past the vocabulary"):
        engine.generate("Hi", logit_bias={49152: 1.0})
    with pytest.raises(UserError, match="--frequency-penalty must be in"):
        engine.generate("Hi", frequency_penalty=2.5)


def test_stop_strings_end_the_reply(engine):
    prompt = "Write a paragraph about the ocean."
    full = engine.generate(prompt, max_new_tokens=40, **GREEDY)
    assert len(full) > 20
    stop = full[len(full) // 2:len(full) // 2 + 4]  # some text from the middle of the reply
    cut = engine.generate(prompt, max_new_tokens=40, stop=[stop, "never appears"], **GREEDY)
    assert cut == full[:full.index(stop)] and engine.last_stats.finish_reason == "stop"


def test_utf8_streaming_of_multibyte_text(engine):
    prompt = "Repeat exactly: 日本語のテキスト, Grüße, emoji 🎉"
    pieces = list(engine.stream(prompt, max_new_tokens=40, **GREEDY))
    text = "".join(pieces)
    assert any(ord(ch) > 0x2FFF for ch in text)  # CJK or emoji made it through
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # no lone surrogates


def test_multi_turn_chat_does_not_prefill_earlier_turns(engine):
    chat = engine.chat()
    chat.send("My name is Ada.", max_new_tokens=20, **GREEDY)
    after_first = engine.position
    assert after_first == len(engine.cached_ids) > 20
    chat.send("What is my name?", max_new_tokens=20, **GREEDY)
    s = engine.last_stats
    assert s.reused_tokens == after_first  # all of turn 1 (prompt + reply) stayed in the cache
    fed = s.prompt_tokens - s.reused_tokens
    assert fed < 20  # only "<|im_end|>\n<|im_start|>user\nWhat is my name?<|im_end|>\n<|im_start|>assistant\n"
    assert engine.position == s.prompt_tokens + s.new_tokens - (1 if s.finish_reason in ("eos", "length") else 0)
    third = chat.send("Thanks!", max_new_tokens=10, **GREEDY)
    assert engine.last_stats.reused_tokens >= s.prompt_tokens
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 3 and chat.messages[-1]["content"] == third


def test_cancel_from_another_thread_stops_at_the_next_token(engine):
    import threading

    stop = threading.Event()
    pieces = []
    for piece in engine.stream("Tell me a long story about a dragon.", max_new_tokens=200, cancel=stop.is_set,
                               **GREEDY):
        pieces.append(piece)
        if len(pieces) == 3:
            setter = threading.Thread(target=stop.set)
            setter.start()
            setter.join()
    s = engine.last_stats
    assert s.finish_reason == "cancelled" and 3 <= s.new_tokens <= 6, s  # a piece is one token, or a few
    assert engine.position == len(engine.cached_ids) == s.prompt_tokens + s.new_tokens  # the cache is consistent
    full = engine.generate("Tell me a long story about a dragon.", max_new_tokens=s.new_tokens, **GREEDY)
    assert full.startswith("".join(pieces))
    engine.rewind(5)
    assert engine.position == len(engine.cached_ids) == 5


def test_context_limits(engine_dir):
    small = Engine.load(engine_dir, max_context=64)
    assert small.context == 64
    with pytest.raises(UserError, match="context holds 64"):
        small.generate("word " * 100, max_new_tokens=4)
    small.generate("Tell me a long story about a dragon.", max_new_tokens=200, **GREEDY)
    assert small.last_stats.finish_reason == "context_full" and small.position == 64
    chat = small.chat()
    chat.send("Tell me a long story.", max_new_tokens=200, **GREEDY)
    with pytest.raises(UserError, match="no longer fits"):
        chat.send("And another one.", max_new_tokens=4)


def test_refuses_a_cap_below_the_weights_before_loading(engine_dir, monkeypatch):
    import awq_edge.engine as engine_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("the backend was created although the plan does not fit")

    monkeypatch.setattr(engine_module, "open_backend", must_not_load)
    with pytest.raises(UserError, match="short by") as e:
        Engine.load(engine_dir, max_memory="100MiB")
    assert "\n" not in str(e.value)


def test_load_recomputes_the_plan_from_the_users_cap(engine_dir):
    e = Engine.load(engine_dir, max_memory="400MiB")
    assert e.plan.cap == 400 << 20 and e.plan.total <= e.plan.cap
    assert e.context == e.plan.context < 2048  # fewer tokens fit than the 2048 the engine was built with
    assert e.backend.kv_bytes() == e.plan.kv_bytes  # the KV cache is allocated once, as planned


def test_bad_engine_dirs_are_one_line_errors(engine_dir, tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "nope"
    (tmp_path / "file").write_text("x")
    cases["a file"] = tmp_path / "file"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "weights.bin").write_bytes(b"\0" * 10)
    cases["foreign"] = tmp_path / "foreign"
    bad_json = linked_copy(engine_dir, tmp_path / "bad_json")
    rewrite(bad_json / "manifest.json", b"{not json")
    cases["corrupt manifest"] = bad_json
    old = linked_copy(engine_dir, tmp_path / "old")
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    rewrite(old / "manifest.json", json.dumps({**manifest, "format_version": 99}).encode())
    cases["incompatible format"] = old
    truncated = linked_copy(engine_dir, tmp_path / "truncated")
    rewrite(truncated / "model.onnx", (engine_dir / "model.onnx").read_bytes()[:1000])
    cases["truncated model"] = truncated
    no_tok = linked_copy(engine_dir, tmp_path / "no_tok")
    (no_tok / "tokenizer.json").unlink()
    cases["missing tokenizer"] = no_tok
    messages = {}
    for what, path in cases.items():
        with pytest.raises(UserError) as e:
            Engine.load(path)
        messages[what] = str(e.value)
        assert "\n" not in messages[what], what
    assert "incompatible" in messages["incompatible format"] and "99" in messages["incompatible format"]
    assert "corrupt" in messages["truncated model"] and "model.onnx" in messages["truncated model"]
    assert "not an awq-edge engine" in messages["foreign"]


def test_full_hash_check_catches_changed_bytes(engine_dir, tmp_path):
    changed = linked_copy(engine_dir, tmp_path / "changed")
    data = bytearray((engine_dir / "tokenizer_config.json").read_bytes())
    data[-2] ^= 1
    rewrite(changed / "tokenizer_config.json", bytes(data))
    with pytest.raises(UserError, match="sha256"):
        Engine.load(changed, verify=True)


def test_runtime_never_imports_torch(engine_dir):
    code = ("import sys\nfrom awq_edge import Engine\n"
            f"e = Engine.load({str(engine_dir)!r})\n"
            "print(e.generate('Hi', max_new_tokens=4, temperature=0))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
