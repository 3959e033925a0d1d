"""`awq-edge serve` as a user runs it: a real server process on 127.0.0.1 with the real SmolLM2
engine (engine_dir from conftest), driven by the official openai client and by plain HTTP."""
from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

openai = pytest.importorskip("openai")

CLI = [sys.executable, "-m", "awq_edge.cli"]
NAME = "smollm2.engine"  # the model id: the engine directory's name
GREEDY = {"temperature": 0}


class Served:
    """A `awq-edge serve` process: its URL (from the startup line), its stderr log, and an openai client."""

    def __init__(self, engine_dir, log_path, *args):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([*CLI, "serve", str(engine_dir), "--port", "0", *args], stdout=subprocess.PIPE,
                                     stderr=self.log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.startup = self._read_startup_line(timeout=120)
        self.url = self.startup.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        self.host, self.port = self.url.split("//")[1].split("/")[0].split(":")
        self.port = int(self.port)

    def _read_startup_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline().decode()
                if line.startswith("serving "):
                    return line.strip()
            if self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"the server did not start: {self.log_path.read_text()[-2000:]}")

    def client(self, **kwargs) -> "openai.OpenAI":
        kwargs = {"api_key": "unused", "timeout": 120, **kwargs}
        return openai.OpenAI(base_url=self.url, max_retries=0, **kwargs)

    def stats(self, headers=None) -> dict:
        return http_json("GET", f"http://{self.host}:{self.port}/stats", headers=headers)[1]

    def stop(self) -> int:
        """SIGTERM, as a service manager does: the server must exit 0, quickly, without a traceback."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def http_json(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON, headers) of a plain HTTP request; errors are answers too."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def chat_body(content: str, **extra) -> bytes:
    return json.dumps({"model": NAME, "messages": [{"role": "user", "content": content}], **extra}).encode()


def open_stream(served: Served, body: dict) -> http.client.HTTPConnection:
    """A streaming chat request on its own connection, so that the test can hang up in the middle."""
    conn = http.client.HTTPConnection(served.host, served.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": NAME, "stream": True, **body}),
                 {"Content-Type": "application/json", "Authorization": "Bearer secret"})
    return conn


def read_events(response: http.client.HTTPResponse, count: int) -> list[str]:
    events = []
    while len(events) < count:
        line = response.readline().decode()
        if line.startswith("data: "):
            events.append(line[6:].strip())
    return events


def wait_for(predicate, timeout: float = 30.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def served(engine_dir, tmp_path_factory):
    s = Served(engine_dir, tmp_path_factory.mktemp("serve") / "stderr.log")
    yield s
    assert s.stop() == 0, s.log_path.read_text()[-2000:]
    assert "Traceback" not in s.log_path.read_text()


# ---------------------------------------------------------------- the API

def test_startup_line_models_and_health(served, engine_dir):
    assert served.url.startswith("http://127.0.0.1:") and str(engine_dir) in served.startup
    assert "cpu" in served.startup and "context 2048 tokens" in served.startup
    assert [m.id for m in served.client().models.list().data] == [NAME]
    assert served.client().models.retrieve(NAME).id == NAME
    status, health, _ = http_json("GET", f"http://127.0.0.1:{served.port}/health")
    assert status == 200 and health["status"] == "ok" and health["context"] == 2048


def test_chat_streaming_and_not_give_the_same_text(served):
    client = served.client()
    messages = [{"role": "user", "content": "Name three colors."}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, **GREEDY)
    text = reply.choices[0].message.content
    assert text and reply.choices[0].finish_reason in ("stop", "length")
    u = reply.usage
    assert u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == u.completion_tokens and not chunks[-1].choices
    # content as a list of text parts (OpenAI's format) is the same prompt
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name three colors."}]}]
    again = client.chat.completions.create(model=NAME, messages=parts, max_tokens=16, **GREEDY)
    assert again.choices[0].message.content == text


def test_json_mode_replies_with_a_json_object_streamed_or_not(served):
    """response_format json_object: the reply is an object that closes (finish_reason stop), the
    same streamed; the same prompt without it is prose."""
    client = served.client()
    messages = [{"role": "user", "content": "Give me a JSON object with a city and its country."}]
    plain = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Name three colors."}],
                                           max_tokens=30, **GREEDY)
    with pytest.raises(ValueError):
        json.loads(plain.choices[0].message.content)
    for body in ({"messages": messages}, {"messages": [{"role": "user", "content": "Name three colors."}]}):
        reply = client.chat.completions.create(model=NAME, max_tokens=120, response_format={"type": "json_object"},
                                               **body, **GREEDY)
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict), text
        chunks = list(client.chat.completions.create(model=NAME, max_tokens=120, stream=True,
                                                     response_format={"type": "json_object"}, **body, **GREEDY))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string"},
                                         "population": {"type": "integer"},
                                         "size": {"enum": ["small", "medium", "large"]}},
        "required": ["city", "country", "population", "size"], "additionalProperties": False}
MOVE_TOOL = {"type": "function", "function": {"name": "move_arm", "description": "Move the arm to x, y (cm).",
                                              "parameters": {"type": "object", "properties": {
                                                  "x": {"type": "number"}, "y": {"type": "number"}},
                                                  "required": ["x", "y"], "additionalProperties": False}}}


def test_json_schema_replies_and_forced_tool_calls_streamed_or_not(served):
    """response_format json_schema: the reply is valid under the schema (a real validator says);
    tool_choice a named function or required: the reply is that call (or one of the tools'), its
    arguments valid under the tool's parameters, sent as tool_calls, streamed or not."""
    jsonschema = pytest.importorskip("jsonschema")
    client = served.client()
    ask = [{"role": "user", "content": "Tell me about Paris."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    reply = client.chat.completions.create(model=NAME, messages=ask, max_tokens=160, response_format=fmt, **GREEDY)
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), CITY)
    chunks = list(client.chat.completions.create(model=NAME, messages=ask, max_tokens=160, response_format=fmt,
                                                 stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (TIME_TOOL, MOVE_TOOL)}
    move = [{"role": "user", "content": "Move the arm 5 cm to the right and 2 cm up."}]
    for choice, names in (({"type": "function", "function": {"name": "move_arm"}}, {"move_arm"}),
                          ("required", set(tools))):
        kwargs = dict(model=NAME, messages=move, tools=[TIME_TOOL, MOVE_TOOL], tool_choice=choice, max_tokens=80,
                      parallel_tool_calls=False, **GREEDY)
        reply = client.chat.completions.create(**kwargs)
        message, calls = reply.choices[0].message, reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and not message.content and len(calls) == 1, reply
        assert calls[0].function.name in names
        jsonschema.validate(json.loads(calls[0].function.arguments), tools[calls[0].function.name])
        deltas = [c.choices[0].delta for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
        streamed = [t for d in deltas for t in d.tool_calls or []]
        assert [(t.function.name, t.function.arguments) for t in streamed] == \
            [(calls[0].function.name, calls[0].function.arguments)]
        assert "".join(d.content or "" for d in deltas) == ""


def test_logprobs_are_the_engines_streamed_or_not(served, engine_dir):
    """logprobs: each token's log probability and top alternatives (the raw model's), the tokens'
    texts making up the reply, greedy's token the best alternative; the same in a stream and
    from the engine in-process; completions in the legacy form, with offsets."""
    from awq_edge.engine import Engine
    from awq_edge.sampling import Sampler, SamplingSettings

    client = served.client()
    messages = [{"role": "user", "content": "Name three colors."}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, logprobs=True,
                                           top_logprobs=3, **GREEDY)
    entries = reply.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    assert len(entries) == reply.usage.completion_tokens - (reply.choices[0].finish_reason == "stop")
    for e in entries:
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert len(e.top_logprobs) == 3 and (e.token, e.logprob) == (e.top_logprobs[0].token, e.top_logprobs[0].logprob)
        assert e.logprob <= 0 and bytes(e.bytes).decode() == e.token
    chunks = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, logprobs=True,
                                            top_logprobs=3, stream=True, **GREEDY)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    engine = Engine.load(engine_dir)
    "".join(engine.stream_ids(engine.prompt_ids("Name three colors."), Sampler(SamplingSettings(0.0)), 12,
                              logprobs=3))
    assert [lp for _, lp, _ in engine.last_logprobs] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    done = client.completions.create(model=NAME, prompt="The three primary colors are", max_tokens=8, logprobs=2,
                                     **GREEDY)
    legacy = done.choices[0].logprobs
    assert "".join(legacy.tokens) == done.choices[0].text and len(legacy.token_logprobs) == 8
    assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:i]) for i in range(8)]
    assert all(len(top) == 2 and max(top.values()) == lp for top, lp in zip(legacy.top_logprobs, legacy.token_logprobs))
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_logit_bias_and_penalties_steer_the_reply(served, engine_dir):
    """OpenAI's logit_bias: +100 on a token makes greedy choose it every time, -100 never; the
    presence and frequency penalties are taken (their arithmetic: test_engine.py)."""
    from tokenizers import Tokenizer

    blue = Tokenizer.from_file(str(engine_dir / "tokenizer.json")).encode(" blue", add_special_tokens=False).ids
    assert len(blue) == 1
    client = served.client()

    def chat(**kwargs):
        reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Name a color."}],
                                               **kwargs, **GREEDY)
        return reply.choices[0].message.content, reply.usage.completion_tokens

    def complete(**kwargs):
        reply = client.completions.create(model=NAME, prompt="My favourite color is", **kwargs, **GREEDY)
        return reply.choices[0].text, reply.usage.completion_tokens

    for create in (chat, complete):
        assert create(max_tokens=3, logit_bias={str(blue[0]): 100}) == (" blue" * 3, 3)
        text, _ = create(max_tokens=12, logit_bias={str(blue[0]): -100}, presence_penalty=1.0, frequency_penalty=0.5)
        assert " blue" not in text


def test_echo_sends_the_prompt_back_with_its_tokens_log_probabilities(served, engine_dir):
    """echo on /v1/completions (lm-eval-harness scores a continuation so, max_tokens 0): the prompt,
    then the reply; each prompt token's log probability given those before it (the first's null),
    as a fresh prefill of the tokens before it gives them, and the reply's after them."""
    import numpy as np

    from awq_edge.engine import Engine
    from awq_edge.sampling import token_logprobs

    client = served.client()
    prompt = "The capital of France is Paris"
    scored = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=2, **GREEDY)
    legacy = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt == "".join(legacy.tokens)
    assert legacy.token_logprobs[0] is None and legacy.top_logprobs[0] is None
    assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:i]) for i in range(len(legacy.tokens))]
    engine = Engine.load(engine_dir)
    ids = engine.tokenizer.encode(prompt)
    assert len(ids) == len(legacy.tokens) == scored.usage.prompt_tokens and scored.usage.completion_tokens == 0
    # each as a prefill of the tokens before it gives it (many rows at once, where echo feeds one a
    # step: ORT's int8-compute kernels for one row and for many round apart: 0.11 at most, once)
    for k in range(1, len(ids)):
        engine.reset()
        want, top = token_logprobs(engine.backend.forward(ids[:k]), ids[k], 2)
        assert legacy.token_logprobs[k] == pytest.approx(want, abs=0.25) and len(legacy.top_logprobs[k]) == 2
        assert max(legacy.top_logprobs[k].values()) == pytest.approx(top[0][1], abs=0.25)
    assert np.exp(legacy.token_logprobs[-1]) > 0.1  # " Paris" after "The capital of France is" (0.2 here)
    both = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, echo=True, logprobs=1, **GREEDY)
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, **GREEDY)
    assert both.choices[0].text == prompt + plain.choices[0].text
    assert len(both.choices[0].logprobs.tokens) == len(ids) + 4
    assert client.completions.create(model=NAME, prompt=prompt, max_tokens=2, echo=True,
                                     **GREEDY).choices[0].text.startswith(prompt)
    as_ids = client.completions.create(model=NAME, prompt=[ids], max_tokens=0, echo=True, logprobs=2, **GREEDY)
    assert as_ids.choices[0].text == prompt and as_ids.choices[0].logprobs == legacy  # (a batch of one token list)
    status, answer, _ = http_json("POST", f"{served.url}/completions", json.dumps(
        {"model": NAME, "prompt": prompt, "echo": True, "stream": True}).encode())
    assert (status, answer["error"]["param"]) == (400, "echo")


def test_completions_streaming_and_not(served):
    client = served.client()
    reply = client.completions.create(model=NAME, prompt="The three primary colors are", max_tokens=8, **GREEDY)
    assert reply.choices[0].text and reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length"
    pieces = [c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="The three primary colors are", max_tokens=8, stream=True, **GREEDY)]
    assert "".join(pieces) == reply.choices[0].text


def test_stop_strings(served):
    client = served.client()
    messages = [{"role": "user", "content": "List the planets of the solar system."}]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, **GREEDY)
    text = full.choices[0].message.content
    word = text.split()[3]
    cut = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, stop=[word, "zzzz"], **GREEDY)
    assert cut.choices[0].message.content == text[:text.index(word)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, stop=word, stream=True,
                                              **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[:text.index(word)]


# ---------------------------------------------------------------- KV reuse, and greedy output as `awq-edge run`

@pytest.mark.parametrize("prompt", ["What is the capital of France?", "Name three colors."])  # 37 and 34 tokens
def test_greedy_output_is_the_same_as_awq_edge_run_with_the_cache_reused(served, engine_dir, prompt):
    """Both prompts change their greedy reply when the cache is naively reused
    (benchmarks/kv_reuse_exact.py); the server must reuse it and still answer as `run` does."""
    client = served.client()
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=1)
    replies = [client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=24, **GREEDY) for _ in range(2)]
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in replies]
    assert cached[0] > 10  # at least the template's system prompt, shared with the earlier request
    assert cached[1] >= replies[1].usage.prompt_tokens - 3  # the same prompt again: nearly all of it
    run = subprocess.run([*CLI, "run", str(engine_dir), "--prompt", prompt, "--temperature", "0",
                          "--max-new-tokens", "24"], capture_output=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert [r.choices[0].message.content + "\n" for r in replies] == [run.stdout.decode()] * 2


def test_multi_turn_reuses_the_history_and_answers_as_a_fresh_prefill(served, engine_dir):
    from awq_edge.engine import Engine

    client = served.client()
    messages = [{"role": "user", "content": "My name is Ada. What is a robot?"}]
    first = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, **GREEDY)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "What is my name?"}]
    second = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, **GREEDY)
    prompt_1 = first.usage.prompt_tokens
    # the whole first prompt (rounded down to a pair of rows) stays in the cache: the history is not fed again
    assert prompt_1 - 1 <= second.usage.prompt_tokens_details.cached_tokens <= prompt_1
    fresh = Engine.load(engine_dir).generate(messages, max_new_tokens=16, temperature=0)
    assert second.choices[0].message.content == fresh


# ---------------------------------------------------------------- the queue, order, cancellation

def test_eight_concurrent_clients_are_all_answered_in_arrival_order(served):
    client = served.client()
    topics = ["cats", "dogs", "trees", "rivers", "robots", "stars", "bread", "music"]

    def ask(topic):
        return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"Describe {topic}."}],
                                              max_tokens=8, temperature=0.7, seed=1)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, topics))
    assert all(r.choices[0].message.content for r in replies)
    numbers = sorted(int(r.id.split("-")[1]) for r in replies)
    recent = {r["number"]: r for r in served.stats()["recent"]}
    done = [recent[n] for n in numbers]  # sorted by arrival
    assert len(done) == 8 and all(r["finish_reason"] in ("eos", "length") for r in done)
    for before, after in zip(done, done[1:]):
        assert before["arrived"] <= after["arrived"]
        assert before["finished"] <= after["started"]  # one at a time, first come first served
    assert max(r["started"] - r["arrived"] for r in done) > 0.05  # they really waited in the queue


def test_a_client_that_hangs_up_stops_its_generation(served):
    conn = open_stream(served, {"messages": [{"role": "user", "content": "Tell me a long story."}],
                                "max_tokens": 1500, "ignore_eos": True})
    response = conn.getresponse()
    assert response.status == 200
    read_events(response, 4)
    number = served.stats()["running"]
    conn.close()  # hang up mid-stream
    t0 = time.monotonic()
    reply = served.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi!"}],
                                                    max_tokens=4, **GREEDY)
    assert reply.choices[0].message.content and time.monotonic() - t0 < 10
    entry = next(r for r in served.stats()["recent"] if r["number"] == number)
    assert entry["finish_reason"] == "cancelled" and entry["completion_tokens"] < 200, entry

    # a client that times out (non-streaming) is cancelled the same way
    with pytest.raises(openai.APITimeoutError):
        served.client(timeout=1.0).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=1500,
            extra_body={"ignore_eos": True})
    last = wait_for(lambda: (st := served.stats())["running"] is None and st["recent"][-1], what="the cancel")
    assert last["finish_reason"] == "cancelled" and last["completion_tokens"] < 300, last


def test_max_tokens_is_capped_at_the_context(served):
    prompt = "word " * 2000  # ~2010 tokens of the 2048
    reply = served.client().completions.create(model=NAME, prompt=prompt, max_tokens=1000, extra_body={"ignore_eos": True},
                                               **GREEDY)
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 2048
    assert reply.choices[0].finish_reason == "length"


# ---------------------------------------------------------------- bad requests

def test_malformed_requests_get_openai_errors(served):
    url = f"http://127.0.0.1:{served.port}/v1"
    chat = f"{url}/chat/completions"
    good = [{"role": "user", "content": "Hi"}]
    cases = [
        (chat, b"{not json", 400, None),
        (chat, b"[1, 2]", 400, None),
        (chat, json.dumps({"model": NAME}).encode(), 400, "messages"),
        (chat, json.dumps({"model": NAME, "messages": "Hi"}).encode(), 400, "messages"),
        (chat, json.dumps({"messages": good}).encode(), 400, "model"),
        (chat, json.dumps({"model": "gpt-4o", "messages": good}).encode(), 404, "model"),
        (chat, chat_body("Hi", temperature="hot"), 400, "temperature"),
        (chat, chat_body("Hi", temperature=-1), 400, "temperature"),
        (chat, chat_body("Hi", top_p=0), 400, "top_p"),
        (chat, chat_body("Hi", max_tokens=0), 400, "max_tokens"),
        (chat, chat_body("Hi", max_tokens=2.5), 400, "max_tokens"),
        (chat, chat_body("Hi", n=2), 400, "n"),
        (chat, chat_body("Hi", presence_penalty=2.5), 400, "presence_penalty"),
        (chat, chat_body("Hi", logit_bias={"the": 1}), 400, "logit_bias"),
        (chat, chat_body("Hi", logit_bias={"49152": 1}), 400, "logit_bias"),  # past the vocabulary
        (chat, chat_body("Hi", logit_bias={"5": 101}), 400, "logit_bias"),
        (chat, chat_body("Hi", logit_bias={"5": "up"}), 400, "logit_bias"),
        (chat, chat_body("Hi", logit_bias=[5]), 400, "logit_bias"),
        (chat, chat_body("Hi", logprobs=True, top_logprobs=21), 400, "top_logprobs"),
        (chat, chat_body("Hi", top_logprobs=2), 400, "top_logprobs"),  # (without logprobs: true)
        (chat, chat_body("Hi", logprobs="yes"), 400, "logprobs"),
        (f"{url}/completions", json.dumps({"model": NAME, "prompt": "Hi", "logprobs": 6}).encode(), 400, "logprobs"),
        (chat, chat_body("Hi", stop=5), 400, "stop"),
        (chat, chat_body("Hi", seed=-1), 400, "seed"),
        (chat, chat_body("Hi", stream="yes"), 400, "stream"),
        (chat, json.dumps({"model": NAME, "messages": [{"role": "function", "content": "x"}]}).encode(), 400,
         "messages[0].role"),
        (chat, chat_body("Hi", tools=[{"type": "function", "function": {"name": "two words"}}]), 400, "tools[0]"),
        (chat, chat_body("Hi", tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]), 400,
         "tools[0].function.parameters"),
        (chat, chat_body("Hi", tool_choice="required"), 400, "tool_choice"),  # no tools
        (chat, chat_body("Hi", tools=[TIME_TOOL], tool_choice={"type": "function", "function": {"name": "fly"}}),
         400, "tool_choice"),
        (chat, chat_body("Hi", tools=[TIME_TOOL], tool_choice="sometimes"), 400, "tool_choice"),
        (chat, chat_body("Hi", tools=[TIME_TOOL], tool_choice="required", response_format={"type": "json_object"}),
         400, "response_format"),
        (chat, chat_body("Hi", tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}}}}], tool_choice="required"),
         400, "tools"),
        (chat, chat_body("Hi", response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "string", "pattern": "^a"}}}), 400, "response_format.json_schema.schema"),
        (chat, chat_body("Hi", response_format={"type": "json_schema"}), 400, "response_format.json_schema"),
        (chat, chat_body("Hi", response_format={"type": "xml"}), 400, "response_format"),
        (chat, chat_body("Hi", response_format="json"), 400, "response_format"),
        (chat, chat_body("Hi", tools=[{**TIME_TOOL, "function": {"name": "f", "description": "x" * 70000}}]), 400,
         "tools"),
        (chat, json.dumps({"model": NAME, "messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}).encode(), 400,
         "messages[0].tool_calls[0].function.arguments"),
        (chat, json.dumps({"model": NAME, "messages": [{"role": "assistant", "content": "x", "tool_calls": "f"}]})
         .encode(), 400, "messages[0].tool_calls"),
        (chat, json.dumps({"model": NAME, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}).encode(), 400, "messages[0].content[0]"),
        (chat, chat_body("word " * 2500), 400, "messages"),  # longer than the 2048-token context
        (chat, chat_body("x" * (2 << 20)), 413, None),  # over the 1 MiB body limit
        (f"{url}/completions", json.dumps({"model": NAME}).encode(), 400, "prompt"),
        (f"{url}/completions", json.dumps({"model": NAME, "prompt": ["a", "b"]}).encode(), 400, "prompt"),
        (f"{url}/models/gpt-4o", None, 404, "model"),
        (f"http://127.0.0.1:{served.port}/nope", None, 404, None),
    ]
    for target, body, status, param in cases:
        got, answer, _ = http_json("POST" if body is not None else "GET", target, body)
        error = answer.get("error", {})
        assert (got, error.get("param")) == (status, param), (body[:80] if body else target, got, answer)
        assert set(error) == {"message", "type", "param", "code"} and error["message"], answer
        assert "Traceback" not in error["message"]
    assert "context holds 2048" in http_json("POST", chat, chat_body("word " * 2500))[1]["error"]["message"]
    # the openai client surfaces them as its own exceptions
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="gpt-4o", messages=good)
    with pytest.raises(openai.BadRequestError, match=r"frequency_penalty must be in \[-2.0, 2.0\]"):
        served.client().chat.completions.create(model=NAME, messages=good, frequency_penalty=3.0)


def test_a_full_queue_gets_429_and_a_wrong_key_401(engine_dir, tmp_path):
    s = Served(engine_dir, tmp_path / "stderr.log", "--queue-size", "1", "--api-key", "secret",
               "--max-memory", "400MiB")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        status, answer, _ = http_json("GET", s.url + "/models")
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert http_json("GET", f"http://127.0.0.1:{s.port}/health")[0] == 200  # liveness needs no key
        key = {"Authorization": "Bearer secret"}
        long = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1500,
                "ignore_eos": True}
        running = open_stream(s, long)
        read_events(running.getresponse(), 2)  # the first request runs
        waiting = open_stream(s, long)  # the second waits in the queue of 1
        wait_for(lambda: s.stats(key)["waiting"] == 1, what="the second request to wait")
        status, answer, headers = http_json("POST", s.url + "/chat/completions", chat_body("Hi"), key)
        assert status == 429 and answer["error"]["code"] == "queue_full" and int(headers["Retry-After"]) >= 1
        with pytest.raises(openai.RateLimitError):
            s.client(api_key="secret").chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}])
        waiting.close()  # it is skipped when its turn comes: nobody waits for it any more
        time.sleep(0.3)  # (only so that the server sees this hang-up before the next one)
        running.close()
        stats = wait_for(lambda: (st := s.stats(key))["running"] is None and st["waiting"] == 0 and st,
                         what="the queue to drain")
        assert stats["refused_queue_full"] == 2 and stats["cancelled"] == 2
        assert [r["finish_reason"] for r in stats["recent"]] == ["cancelled", "cancelled"]
        assert stats["recent"][1]["completion_tokens"] == 0
        assert 0 < stats["peak_rss_bytes"] < stats["plan"]["cap"] == 400 << 20  # the memory cap holds

        # Ctrl-C / SIGTERM in the middle of a reply: the reply ends with an error event, the server exits 0 at once
        response = open_stream(s, long).getresponse()
        read_events(response, 2)
        t0 = time.monotonic()
        assert s.stop() == 0 and time.monotonic() - t0 < 10
        rest = response.read().decode()
        assert "shutting down" in rest and rest.rstrip().endswith("data: [DONE]")
    finally:
        assert s.stop() == 0
    assert "Traceback" not in (tmp_path / "stderr.log").read_text()


# ---------------------------------------------------------------- the command line

def test_serve_command_errors(engine_dir):
    def serve(*args):
        return subprocess.run([*CLI, "serve", str(engine_dir), *args], capture_output=True, text=True, timeout=120)

    result = serve("--queue-size", "0")
    assert result.returncode == 1 and result.stderr.strip() == "error: --queue-size must be >= 1, got 0"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        result = serve("--port", str(busy.getsockname()[1]))
    assert result.returncode == 1 and result.stderr.startswith("error: cannot listen on 127.0.0.1:")
    assert "\n" not in result.stderr.strip()


def test_only_loopback_addresses_pass_without_a_warning():
    from awq_edge.server import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "robot.local"))


TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                             "parameters": {"type": "object", "properties": {}}}}
CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'  # Hermes, as Qwen writes it


def test_a_tool_call_in_the_reply_comes_back_as_tool_calls_streamed_or_not(served):
    """Four turns that each answer with a call of get_time (SmolLM2 copies them, greedy): with the
    tool offered the reply is OpenAI's tool_calls (finish_reason tool_calls, no content), streamed
    or not; without it, or with tool_choice none, the same reply is text. The call's result then
    goes back as a tool message, after the assistant's tool_calls, for the next turn."""
    client = served.client()
    messages = [m for _ in range(4) for m in ({"role": "user", "content": "What time is it?"},
                                             {"role": "assistant", "content": CALL})]
    messages.append({"role": "user", "content": "What time is it?"})
    reply = client.chat.completions.create(model=NAME, messages=messages, tools=[TIME_TOOL], max_tokens=40, **GREEDY)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None, reply
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "get_time", {})
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, tools=[TIME_TOOL], max_tokens=40,
                                                 stream=True, **GREEDY))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [t for d in deltas for t in d.tool_calls or []]
    assert [(t.index, t.type, t.function.name, t.function.arguments) for t in streamed] == \
        [(0, "function", "get_time", call.function.arguments)] and streamed[0].id.startswith("call_")
    assert "".join(d.content or "" for d in deltas) == "" and chunks[-1].choices[0].finish_reason == "tool_calls"
    for offered in ({}, {"tools": [TIME_TOOL], "tool_choice": "none"}):
        plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=40, **offered, **GREEDY)
        assert plain.choices[0].message.content == CALL and plain.choices[0].message.tool_calls is None
        assert plain.choices[0].finish_reason == "stop"
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    assert client.chat.completions.create(model=NAME, messages=follow, tools=[TIME_TOOL], max_tokens=4,
                                          **GREEDY).usage.prompt_tokens > reply.usage.prompt_tokens


@pytest.mark.parametrize("reply, content, calls", [
    ('Sure.\n<tool_call>\n{"name": "move_arm", "arguments": {"x": 1.5}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_time", "arguments": {}}\n</tool_call>', "Sure.", [("move_arm", {"x": 1.5}), ("get_time", {})]),
    ('<think>\nThe time.\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {}}',  # cut at max_tokens
     "<think>\nThe time.\n</think>", [("get_time", {})]),
    ('{"name": "move_arm", "parameters": {"x": 1}}', None, [("move_arm", {"x": 1})]),  # Llama 3.x
    ('[{"name": "move_arm", "arguments": {"x": 1}}, {"name": "get_time", "arguments": {}}]', None,  # Mistral
     [("move_arm", {"x": 1}), ("get_time", {})]),
    ('<|tool_call|>[{"name": "get_time", "arguments": "{}"}]<|/tool_call|>', None, [("get_time", {})]),  # Phi-4
    ('move_arm{"x": 2, "y": {"z": 1}}get_time{}', None, [("move_arm", {"x": 2, "y": {"z": 1}}), ("get_time", {})]),
    ("get_time is a tool I have.", None, []),  # (Mistral v11+'s name{...} above: here only text)
    ('{"name": "fly", "arguments": {}}', None, []),  # not offered
    ('<tool_call>\n{"name": "get_time", "arguments": [1]}\n</tool_call>', None, []),  # arguments not an object
    ('{"name": "get_time", "arguments": {}', None, []),  # not JSON
    ("[1] is the first reference. <tool_ is not a tag", None, []),
    ("The arm is at <x>, not <tool_", None, []),  # streamed as it comes, but for the tail that may be a tag
])
def test_tool_calls_are_read_in_each_familys_format_and_streamed_the_same(reply, content, calls):
    """parse_tool_calls on each family's way of writing calls; and ToolCallStream, fed the reply in
    pieces of every size from 1 to 8, finds the same calls and sends the text before a Hermes
    block, or the whole of a reply without calls (some of it only at the end)."""
    from awq_edge.tool_calls import ToolCallStream, parse_tool_calls

    names = {"move_arm", "get_time"}
    got_content, got = parse_tool_calls(reply, names)
    assert [(c["name"], json.loads(c["arguments"])) for c in got] == calls
    assert got_content == (content if calls else reply)
    for size in range(1, 9):
        stream = ToolCallStream(names)
        sent = "".join(stream.feed(reply[i:i + size]) for i in range(0, len(reply), size))
        rest, streamed = stream.finish()
        assert streamed == got
        assert (sent.strip() or None, rest) == (content, "") if calls else sent + rest == reply
        if reply.startswith(("The", "get_time is")):  # streamed as it came
            assert rest == ("<tool_" if reply.startswith("The") else "")


TOOLS_TEMPLATE = ("{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}"
                  "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                  "{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}{% endfor %}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_tools_and_earlier_calls_reach_the_chat_template(engine_dir, tmp_path):
    """A template that lists the tools' names and writes earlier calls' arguments (as objects, the
    way the families' templates take them): tools make the prompt longer, tool_choice none does not."""
    from folder_helpers import linked_copy, resign, rewrite

    engine = linked_copy(engine_dir, tmp_path / NAME)
    rewrite(engine / "chat_template.jinja", TOOLS_TEMPLATE.encode())
    resign(engine, "manifest.json", "chat_template.jinja")
    served = Served(engine, tmp_path / "stderr.log")
    try:
        client = served.client()
        messages = [{"role": "user", "content": "What time is it?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_0", "type": "function",
                         "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
                    {"role": "tool", "tool_call_id": "call_0", "content": "12:00"}]

        def prompt(**offered) -> int:
            return client.chat.completions.create(model=NAME, messages=messages, max_tokens=1, **offered,
                                                  **GREEDY).usage.prompt_tokens

        plain = prompt()
        assert prompt(tools=[TIME_TOOL]) > plain == prompt(tools=[TIME_TOOL], tool_choice="none")
    finally:
        assert served.stop() == 0
    from awq_edge.server import chat_messages

    read = chat_messages({"messages": messages})
    assert read[1]["tool_calls"][0]["function"]["arguments"] == {"tz": "UTC"} and read[1]["content"] == ""
    assert read[2] == {"role": "tool", "content": "12:00", "tool_call_id": "call_0"}


def test_chat_template_kwargs_are_passed_or_refused_with_a_400(served):
    url = f"http://127.0.0.1:{served.port}/v1/chat/completions"
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **GREEDY}
    status, reply, _ = http_json("POST", url, json.dumps({**body, "chat_template_kwargs": {"enable_thinking": False}})
                                 .encode(), {"Content-Type": "application/json"})
    assert status == 200, reply  # SmolLM2's template has no such switch: the same prompt
    plain = http_json("POST", url, json.dumps(body).encode(), {"Content-Type": "application/json"})[1]
    assert reply["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    for bad in ("x", {"not a name": 1}):
        status, error, _ = http_json("POST", url, json.dumps({**body, "chat_template_kwargs": bad}).encode(),
                                     {"Content-Type": "application/json"})
        assert status == 400 and error["error"]["param"] == "chat_template_kwargs", error


# ---------------------------------------------------------------- any request body

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.sampled_from([10 ** 400, -10 ** 400, 2 ** 31, 2 ** 63]) |
    st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
FIELDS = ["messages", "prompt", "tools", "tool_choice", "parallel_tool_calls", "response_format", "temperature",
          "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed",
          "stop", "max_tokens", "max_completion_tokens", "n", "logprobs", "top_logprobs", "chat_template_kwargs",
          "echo", "best_of", "ignore_eos"]


@settings(max_examples=400, derandomize=True, deadline=None, database=None)
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5))
def test_any_request_fields_are_taken_or_refused_with_a_one_line_400(body):
    """The checks a request passes before its job is queued, on any JSON in the fields they read:
    each takes it or raises an ApiError 400 naming a field, never another exception (a 500)."""
    from awq_edge.server import (ApiError, chat_messages, chat_tools, check_supported, completion_prompt,
                                 echo_asked, logprobs_asked, max_new_tokens, reply_format, sampling_settings,
                                 stop_strings, template_kwargs)

    checks = [check_supported, chat_messages, completion_prompt, chat_tools, lambda b: reply_format(b, []),
              template_kwargs, lambda b: sampling_settings(b, {}, 1000), stop_strings,
              lambda b: logprobs_asked(b, True), lambda b: logprobs_asked(b, False),
              lambda b: max_new_tokens(b, 10, 100), lambda b: echo_asked(b, False, False)]
    for check in checks:  # each on its own: a request refused by one never reaches the next
        try:
            check(body)
        except ApiError as e:
            assert e.status == 400 and e.param and "\n" not in str(e), (body, e)
