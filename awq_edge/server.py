"""`awq-edge serve`: OpenAI's HTTP API for one engine, on Starlette and uvicorn (`pip install 'awq-edge[serve]'`).

    awq-edge serve engines/smollm2 --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi!"}]}'

How a request goes, top to bottom of this file:
- It is read (at most --max-body bytes), checked and tokenized on arrival, so bad input is
  answered at once with OpenAI's error object `{"error": {"message", "type", "param", "code"}}`.
- It becomes a Job in a bounded FIFO queue; a full queue answers 429 with Retry-After.
- One worker thread owns the Engine (batch 1, one KV cache, loaded once under the user's
  --max-memory / --max-context) and answers the jobs in the order they came. It hands the
  text to the request's handler (on the event loop) through an asyncio queue: while
  streaming, the pieces of each STREAM_INTERVAL_S together, else all at the end.
- A client that goes away sets its job's cancel event; the engine checks it once per token,
  so the generation stops at the next token and the next job starts.
- KV reuse: a prompt keeps the part of the cache it shares with the previous prompt, but
  only rows that a fresh prefill computes bit for bit the same (reusable_prefix), so greedy
  output is exactly `awq-edge run`'s. docs/server.md says what holds and how it was measured.
No torch here (the runtime's rule): numpy, the engine, starlette, uvicorn.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import queue
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .engine import MAX_TOP_LOGPROBS, PREFILL_CHUNK, Engine, GenerationStats
from .errors import UserError
from .json_schema import NO_ARGUMENTS, schema_grammar, tool_calls_grammar
from .memory import peak_rss_bytes
from .sampling import Sampler, SamplingSettings, sampling_with_defaults
from .tokenizer import TEMPLATE_KWARGS_MAX_CHARS, check_template_kwargs
from .tool_calls import ToolCallStream, calls_in, parse_tool_calls, tool_call

MAX_STOPS = 16          # stop strings per request (OpenAI allows 4)
MAX_TOOLS = 128         # tools per request (OpenAI's limit)
RECENT = 64             # finished requests kept for /stats
# A streamed piece is sent with the pieces that follow it within this time: each event costs
# CPU in the event loop and in the client, which a fast model on 2 cores feels
# (benchmarks/server_overhead.py measures both); a model slower than 50 tokens/s still sends
# every token as it comes.
STREAM_INTERVAL_S = 0.02
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context_full": "length"}
# Features of OpenAI's API that this server does not have: refused unless null or one of these defaults.
UNSUPPORTED = {"functions": ("function calls (the old API; use tools)", ([],)),
               "function_call": ("function calls", ("none", "auto")),
               "suffix": ("suffix", ("",)), "best_of": ("best_of", (1,)),
               "audio": ("audio output", ())}


# ---------------------------------------------------------------- errors

class ApiError(Exception):
    """An error a client can fix, answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------- reading a request

async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object. Reads it all (a client that is still sending when answered
    may not see the answer) but keeps at most `limit` bytes."""
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
    if size > limit:
        raise ApiError(413, f"the request body is {size} bytes, more than this server's limit of {limit} "
                            "(awq-edge serve --max-body)", code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {json_type(data)}")
    return data


def json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "an integer", float: "a number", list: "an array", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)


def as_float(value: int, name: str) -> float:
    """A JSON integer as a number (one of 400 digits has none: a 400, not a 500)."""
    try:
        return float(value)
    except OverflowError:
        raise ApiError(400, f"'{name}' is out of range ({str(value)[:20]}...)", param=name) from None


def get(body: dict, name: str, kind: type, default=None, required: bool = False):
    """body[name] checked against a JSON type (null counts as absent, as in OpenAI's API)."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = as_float(value, name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        wanted = {float: "a number", int: "an integer", str: "a string", bool: "a boolean", list: "an array",
                  dict: "an object"}[kind]
        raise ApiError(400, f"'{name}' must be {wanted}, not {json_type(value)}", param=name, code="invalid_type")
    return value


def check_model(body: dict, server: "Server") -> None:
    model = get(body, "model", str, required=True)
    if model != server.name:
        raise ApiError(404, f"the model '{model}' is not served here; this server serves '{server.name}' "
                            "(GET /v1/models)", param="model", code="model_not_found")


def check_supported(body: dict) -> None:
    n = get(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, f"n={n} is not supported: one engine answers one request at a time (batch 1); "
                            "send n=1 and repeat the request", param="n", code="unsupported_parameter")
    for name, (what, defaults) in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in defaults:
            raise ApiError(400, f"'{name}': {what} are not supported by this server", param=name,
                           code="unsupported_parameter")


def message_text(content, param: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"'{param}' must be a string or an array of text parts, not {json_type(content)}",
                       param=param, code="invalid_type")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else json_type(part)
        if kind != "text":
            raise ApiError(400, f"'{param}[{i}]' is {kind!r}: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                "are supported", param=f"{param}[{i}]", code="invalid_content")
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"'{param}[{i}].text' must be a string, not {json_type(part.get('text'))}",
                           param=f"{param}[{i}].text", code="invalid_type")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_messages(body: dict) -> list[dict]:
    """The messages as the chat template reads them: text content; an assistant's tool_calls with
    their arguments as objects (the templates write them as JSON); a tool result's tool_call_id."""
    messages = get(body, "messages", list, required=True)
    if not messages:
        raise ApiError(400, "'messages' is empty; send at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"'messages[{i}]' must be an object, not {json_type(m)}", param=f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"'messages[{i}].role' is {m.get('role')!r}; use system, user, assistant or tool",
                           param=f"messages[{i}].role")
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls is not None and not isinstance(calls, list):
            raise ApiError(400, f"'messages[{i}].tool_calls' must be an array, not {json_type(calls)}",
                           param=f"messages[{i}].tool_calls", code="invalid_type")
        content = m.get("content")
        message = {"role": role, "content": "" if content is None and calls else
                   message_text(content, f"messages[{i}].content")}
        if calls:
            message["tool_calls"] = [message_tool_call(c, f"messages[{i}].tool_calls[{j}]")
                                     for j, c in enumerate(calls)]
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def message_tool_call(call, param: str) -> dict:
    """An assistant's earlier call, {"id", "type": "function", "function": {"name", "arguments"}}."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, f"'{param}' must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                            "\"arguments\": ...}}", param=param, code="invalid_type")
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ApiError(400, f"'{param}.function.arguments' is not JSON", param=f"{param}.function.arguments") \
                from None
    return {"id": str(call.get("id", "")), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def chat_tools(body: dict) -> list[dict]:
    """The tools offered ([] with tool_choice "none"): [{"type": "function", "function": {"name", ...}}]."""
    tools = get(body, "tools", list, [])
    if body.get("tool_choice") == "none":
        return []
    if len(tools) > MAX_TOOLS:
        raise ApiError(400, f"'tools' has {len(tools)} tools; at most {MAX_TOOLS}", param="tools")
    if (size := len(json.dumps(tools))) > TEMPLATE_KWARGS_MAX_CHARS:  # (they are a template variable)
        raise ApiError(400, f"'tools' is {size} characters as JSON; at most {TEMPLATE_KWARGS_MAX_CHARS}",
                       param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ApiError(400, f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} "
                                "with a name of 1-64 letters, digits, _ . or -", param=f"tools[{i}]")
        if not isinstance(function.get("parameters", {}), dict):
            raise ApiError(400, f"'tools[{i}].function.parameters' must be a JSON schema object",
                           param=f"tools[{i}].function.parameters", code="invalid_type")
    return tools


def completion_prompt(body: dict) -> str | list[int]:
    """/v1/completions: a string, or a list of token ids, or a list of one of those (a batch of one,
    as lm-eval-harness sends)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    raise ApiError(400, "'prompt' must be a string or an array of token ids (one prompt per request: batch 1)",
                   param="prompt", code="invalid_type")


def template_kwargs(body: dict) -> dict | None:
    """chat_template_kwargs (vLLM's extension): more chat template variables, e.g. enable_thinking."""
    kwargs = get(body, "chat_template_kwargs", dict)
    try:
        return check_template_kwargs(kwargs)
    except UserError as e:
        raise ApiError(400, str(e), param="chat_template_kwargs") from None


def tokenize(engine: Engine, prompt, param: str, kwargs: dict | None = None) -> list[int]:
    """Token ids as `awq-edge run` makes them: messages through the chat template, a string as plain text.

    Called in a thread: a 1 MiB prompt takes most of a second, which would stall the other
    replies' streams if it ran on the event loop."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        bad = [t for t in prompt if not 0 <= t < engine.backend.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is out of range 0..{engine.backend.vocab_size - 1}", param=param)
        ids = list(prompt)
    else:
        if isinstance(prompt, list) and not engine.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions with a plain prompt")
        try:
            ids = engine.prompt_ids(prompt, chat_template=False, template_kwargs=kwargs)
        except UserError as e:  # e.g. a chat template that refuses the order of the roles
            raise ApiError(400, str(e), param=param) from None
    if not ids:
        raise ApiError(400, "the prompt is empty", param=param)
    if len(ids) >= engine.context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens but the context holds {engine.context} (one more is "
                            "needed for the reply); shorten it", param=param, code="context_length_exceeded")
    return ids


def logit_bias(body: dict, vocab: int) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias}, ids as decimal strings, each in the vocabulary
    (the values' range and the number of them: SamplingSettings.validate)."""
    raw = get(body, "logit_bias", dict, {})
    biases = {}
    for key, bias in raw.items():
        if not re.fullmatch(r"[0-9]{1,9}", key) or int(key) >= vocab:
            raise ApiError(400, f"'logit_bias' keys must be token ids below the vocabulary size {vocab}, got "
                                f"{key[:40]!r}", param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise ApiError(400, f"'logit_bias' values must be numbers, got {json_type(bias)} for {key}",
                           param="logit_bias", code="invalid_type")
        biases[int(key)] = as_float(bias, "logit_bias")
    return biases


def sampling_settings(body: dict, model: dict, vocab: int) -> SamplingSettings:
    """temperature, top_p, top_k, repetition_penalty, seed; those left out are `awq-edge run`'s:
    model (the engine's generation_config.json advice, sampling.model_sampling), else ours. Then
    OpenAI's presence_penalty, frequency_penalty and logit_bias (sampling.adjusted_logits)."""
    seed = get(body, "seed", int)
    if seed is not None and seed < 0:  # numpy's generator takes none
        raise ApiError(400, f"'seed' must be >= 0, got {seed}", param="seed")
    settings = sampling_with_defaults(model, seed, temperature=get(body, "temperature", float),
                                      top_k=get(body, "top_k", int), top_p=get(body, "top_p", float),
                                      repetition_penalty=get(body, "repetition_penalty", float),
                                      presence_penalty=get(body, "presence_penalty", float),
                                      frequency_penalty=get(body, "frequency_penalty", float),
                                      logit_bias=logit_bias(body, vocab))
    try:
        settings.validate()
    except UserError as e:  # the message names the CLI flag (--top-p); say the JSON field (top_p)
        flag = re.search(r"--([a-z-]+)", str(e))
        name = flag.group(1).replace("-", "_") if flag else None
        raise ApiError(400, re.sub(r"--[a-z-]+", name or "", str(e)), param=name) from None
    return settings


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' has {len(stops)} strings; at most {MAX_STOPS}", param="stop")
    return [s for s in stops if s]


@dataclass
class ReplyFormat:
    """What a reply is held to: any JSON object (json_object), a compiled schema (grammar:
    json_schema's (grammar, root)), and the call it must be (forced: "required", a tool's name)."""
    json_object: bool = False
    grammar: tuple | None = None
    forced: str | None = None


def reply_format(body: dict, tools: list[dict]) -> ReplyFormat:
    """response_format text, json_object or json_schema; tool_choice auto, none, required or a
    named function. A schema outside what awq_edge/json_schema.py takes is a 400 naming it."""
    choice = body.get("tool_choice")
    fmt = get(body, "response_format", dict, {"type": "text"})
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise ApiError(400, f"'response_format.type' {str(kind)[:40]!r} is not one of text, json_object, json_schema",
                       param="response_format", code="unsupported_parameter")
    if choice in (None, "auto", "none"):
        if kind != "json_schema":
            return ReplyFormat(json_object=kind == "json_object")
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise ApiError(400, "'response_format.json_schema' must be {\"name\": ..., \"schema\": {...}}",
                           param="response_format.json_schema", code="invalid_type")
        return ReplyFormat(grammar=compiled(lambda: schema_grammar(spec.get("schema", {})),
                                            "response_format.json_schema.schema"))
    if kind != "text":
        raise ApiError(400, "'tool_choice' required or a named function holds the reply to a call; send "
                            "response_format text with it", param="response_format", code="unsupported_parameter")
    functions = {t["function"]["name"]: t["function"].get("parameters", NO_ARGUMENTS) for t in tools}
    if choice == "required":
        if not functions:
            raise ApiError(400, "'tool_choice' is 'required' but no tools are offered", param="tool_choice")
        parallel = get(body, "parallel_tool_calls", bool, True)
        return ReplyFormat(grammar=compiled(lambda: tool_calls_grammar(functions, parallel), "tools"),
                           forced="required")
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise ApiError(400, "'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                            "{\"name\": ...}}", param="tool_choice", code="invalid_value")
    if name not in functions:
        raise ApiError(400, f"'tool_choice' names {name[:64]!r}, which is not among the tools offered",
                       param="tool_choice", code="invalid_value")
    return ReplyFormat(grammar=compiled(lambda: schema_grammar(functions[name]), "tools"), forced=name)


def compiled(build, param: str) -> tuple:
    try:
        return build()
    except UserError as e:
        raise ApiError(400, str(e), param=param, code="unsupported_parameter") from None


def forced_calls(text: str, forced: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(content, calls) of a reply held to a call: a named function's arguments are the reply
    itself; tool_choice "required"'s reply is the array of calls (one call without parallel tool
    calls), read as any reply's JSON calls are. A reply cut short (max_tokens) that is not whole
    JSON stays text."""
    if forced == "required":
        calls = calls_in(text, names)
        return (None, calls) if calls else (text, [])
    try:
        return None, [tool_call(forced, json.loads(text))]
    except ValueError:
        return text, []


class ForcedCallStream:
    """ToolCallStream's interface for a reply held to a call: nothing is streamed as text; the
    calls are sent whole at the end."""

    def __init__(self, forced: str, names: set[str]):
        self.forced, self.names, self.pieces = forced, names, []

    def feed(self, piece: str) -> str:
        self.pieces.append(piece)
        return ""

    def finish(self) -> tuple[str, list[dict]]:
        content, calls = forced_calls("".join(self.pieces), self.forced, self.names)
        return content or "", calls


def echo_asked(body: dict, chat: bool, stream: bool) -> bool:
    """A completion's echo: the prompt sent back before the reply, with its tokens' log probabilities
    when logprobs are asked (not streamed: the prompt's are computed before the reply starts)."""
    echo = get(body, "echo", bool, False)
    if echo and (chat or stream):
        raise ApiError(400, "'echo' is taken on /v1/completions without stream", param="echo",
                       code="unsupported_parameter")
    return echo


def logprobs_asked(body: dict, chat: bool) -> int | None:
    """How many alternatives to send with each token's log probability, or None for none: a chat's
    logprobs (true/false) and top_logprobs (0-20); a completion's logprobs (0-5, OpenAI's legacy)."""
    if not chat:
        top = get(body, "logprobs", int)
        if top is not None and not 0 <= top <= 5:
            raise ApiError(400, f"'logprobs' must be 0..5 (the alternatives per token), got {top}", param="logprobs")
        return top
    top = get(body, "top_logprobs", int)
    if not get(body, "logprobs", bool, False):
        if top:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return None
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'top_logprobs' must be 0..{MAX_TOP_LOGPROBS}, got {top}", param="top_logprobs")
    return top or 0


class LogprobFormat:
    """OpenAI's logprobs object for a reply's (token, logprob, alternatives) entries
    (Engine.last_logprobs): a chat's {"content": [{token, logprob, bytes, top_logprobs}]}, a
    completion's {tokens, token_logprobs, top_logprobs, text_offset}, whose offsets run on across
    the chunks of a stream. A log probability of -inf is sent as -9999.0, as OpenAI does."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer, self.table, self.chat, self.offset = tokenizer, tokenizer.token_bytes(), chat, 0

    def token(self, token: int) -> tuple[str, list[int]]:
        data = self.table[token] if token < len(self.table) and self.table[token] is not None else \
            self.tokenizer.decode([token], skip_special_tokens=False).encode()
        return data.decode("utf-8", "backslashreplace"), list(data)

    def __call__(self, entries: list[tuple]) -> dict | None:
        if not entries:
            return None
        if self.chat:
            def one(token, logprob):
                text, data = self.token(token)
                return {"token": text, "logprob": max(logprob, -9999.0), "bytes": data}
            return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in top]}
                                for t, lp, top in entries], "refusal": None}
        tokens, offsets = [self.token(t)[0] for t, _, _ in entries], []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        # (an echoed prompt's first token has no log probability: None, as OpenAI sends it)
        return {"tokens": tokens, "token_logprobs": [None if lp is None else max(lp, -9999.0) for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {self.token(a)[0]: max(alp, -9999.0) for a, alp in top}
                                 for _, _, top in entries],
                "text_offset": offsets}


def max_new_tokens(body: dict, prompt_tokens: int, context: int, echo: bool = False) -> int:
    """max_completion_tokens or max_tokens, capped at the room left in the context (also the default);
    0 only with echo (the prompt's log probabilities alone)."""
    room = context - prompt_tokens
    for name in ("max_completion_tokens", "max_tokens"):
        value = get(body, name, int)
        if value is not None:
            if value < (0 if echo else 1):
                raise ApiError(400, f"'{name}' must be >= {0 if echo else 1}, got {value}", param=name)
            return min(value, room)
    return room


# ---------------------------------------------------------------- the queue and the worker

@dataclass
class Job:
    number: int                  # arrival order
    ids: list[int]
    settings: SamplingSettings
    max_new_tokens: int
    stops: list[str]
    ignore_eos: bool
    format: ReplyFormat          # response_format, or the call tool_choice requires
    logprobs: int | None         # alternatives sent with each token's log probability (None: no logprobs)
    echo: bool                   # a completion's prompt sent back first (its log probabilities with logprobs)
    stream: bool                 # send each piece as it comes (else the whole text at the end)
    loop: asyncio.AbstractEventLoop
    # ("piece", (text, logprob entries)) while streaming, then ("done", (stats, text, logprob entries))
    # or ("error", (status, message))
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.time)
    started: float = 0.0

    def send(self, kind: str, value) -> None:
        """From the worker thread to the handler on the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


@dataclass
class Server:
    engine: Engine
    name: str                    # the model id clients send
    queue_size: int
    api_key: str | None
    max_body: int
    reuse_unit: int              # prompt rows are reused in multiples of this (exact_reuse_unit)
    jobs: queue.Queue = None
    arrivals: int = 0
    prompt_rows: int = 0         # cache rows [0, prompt_rows) hold the last prompt, computed as a fresh prefill would
    running: Job | None = None
    closing: bool = False        # set by Ctrl-C / SIGTERM: every job stops at its next token
    counts: dict = field(default_factory=lambda: dict.fromkeys(
        ("requests", "completed", "cancelled", "refused_queue_full", "errors", "prompt_tokens", "cached_tokens",
         "completion_tokens"), 0))
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT))

    def __post_init__(self):
        self.jobs = queue.Queue(maxsize=self.queue_size)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def exact_reuse_unit(engine: Engine) -> int:
    """Prompt rows are kept in multiples of this, so that reusing them changes no bit of the output.

    The engine feeds a prompt in chunks. ORT's int8-compute MatMulNBits (x86) computes a
    chunk's rows two at a time, the odd last row of a chunk alone, and a 1-token chunk with
    another kernel, each with its own rounding (up to ~1.5 in a logit). A row's result depends
    only on which of the three it was, not on the chunk's size or place (measured:
    benchmarks/kv_reuse_exact.py). So keeping an even number of rows of an earlier prompt and
    feeding the rest gives a fresh prefill's rows, bit for bit, if the last token is fed alone
    exactly when a fresh prefill does so (reusable_prefix). This checks that on this machine;
    where it fails, only whole prefill chunks are kept, which a fresh prefill computes the same."""
    text = "The quick brown fox jumps over the lazy dog while the robot arm sorts red and blue parts. "
    ids = (engine.tokenizer.encode(text) * 8)[:33]

    def last_logits(chunks: list[int]) -> np.ndarray:
        engine.reset()
        start = 0
        for n in chunks:
            logits = engine.backend.forward(ids[start:start + n])
            start += n
        return logits

    exact = all(np.array_equal(last_logits(fresh), last_logits(split))
                for fresh, split in (([32], [2, 6, 10, 14]), ([33], [4, 8, 21]), ([32, 1], [2, 30, 1])))
    engine.reset()
    return 2 if exact else PREFILL_CHUNK


def reusable_prefix(server: Server, ids: list[int]) -> int:
    """How many cached tokens this prompt keeps: what it shares with the cache, but only rows of
    the previous prompt (its reply was computed one token at a time, unlike a fresh prefill), in
    multiples of reuse_unit, and at least one token is left to feed."""
    n = min(common_prefix(server.engine.cached_ids, ids), server.prompt_rows, len(ids) - 1)
    n -= n % server.reuse_unit
    # Feed the last prompt token alone (a 1-token chunk) exactly when a fresh prefill does:
    # for a prompt of 256 k + 1 tokens. Otherwise it is the last row of a longer chunk.
    while n > 0 and ((len(ids) - n) % PREFILL_CHUNK == 1) != (len(ids) % PREFILL_CHUNK == 1):
        n -= server.reuse_unit
    return n


def run_job(server: Server, job: Job) -> tuple[GenerationStats, str, list]:
    """One reply: (stats, text, logprob entries). While streaming, pieces go to the handler as they
    come, those of STREAM_INTERVAL_S together, each with the logprob entries chosen since the last."""
    engine = server.engine

    def stopped() -> bool:  # checked once per token
        return job.cancel.is_set() or server.closing

    if stopped():  # its client left while it waited (or the server is closing): skip it
        return GenerationStats(finish_reason="cancelled"), "", []
    prompt_entries = []
    if job.echo and job.logprobs is not None:  # (a token at a time: a cache a fresh prefill would not compute)
        prompt_entries = engine.prompt_logprobs(job.ids, job.logprobs, cancel=stopped)
        server.prompt_rows = 0
        if prompt_entries is None:
            return GenerationStats(finish_reason="cancelled"), "", []
    engine.rewind(reusable_prefix(server, job.ids))
    text, sent, sent_logprobs, last_send = [], 0, 0, 0.0

    def send() -> None:
        nonlocal sent, sent_logprobs
        job.send("piece", ("".join(text[sent:]), engine.last_logprobs[sent_logprobs:]))
        sent, sent_logprobs = len(text), len(engine.last_logprobs)

    for piece in engine.stream_ids(job.ids, Sampler(job.settings), job.max_new_tokens, job.stops,
                                   ignore_eos=job.ignore_eos, reuse_cache=True, cancel=stopped,
                                   json_object=job.format.json_object, json_schema=job.format.grammar,
                                   logprobs=job.logprobs):
        text.append(piece)
        if job.stream and time.perf_counter() - last_send >= STREAM_INTERVAL_S:
            send()
            last_send = time.perf_counter()
    if job.stream and (sent < len(text) or sent_logprobs < len(engine.last_logprobs)):
        send()
    server.prompt_rows = len(job.ids)
    return engine.last_stats, "".join(text), prompt_entries + list(engine.last_logprobs)


def worker(server: Server) -> None:
    """The one thread that runs the engine: jobs in arrival order, until a None arrives."""
    while (job := server.jobs.get()) is not None:
        server.running = job
        job.started = time.time()
        error = None
        try:
            stats, text, logprobs = run_job(server, job)
            if server.closing and stats.finish_reason == "cancelled":
                error = (503, "the server is shutting down; send the request again when it is back")
        except Exception as e:  # a bug, not the client's fault: log it, answer 500, start the next job clean
            traceback.print_exc()
            server.engine.reset()
            server.prompt_rows = 0
            stats, text, logprobs = GenerationStats(finish_reason="error"), "", []
            error = (500, f"the engine failed: {type(e).__name__}: {e}")
        server.running = None
        record(server, job, stats)  # before the answer, so a client that then asks /stats finds it
        if error:
            job.send("error", error)
        else:
            job.send("done", (stats, text, logprobs))


def record(server: Server, job: Job, stats: GenerationStats) -> None:
    """Counters and the recent requests for /stats, and one log line on stderr."""
    done = time.time()
    c = server.counts
    c[{"cancelled": "cancelled", "error": "errors"}.get(stats.finish_reason, "completed")] += 1
    c["prompt_tokens"] += stats.prompt_tokens
    c["cached_tokens"] += stats.reused_tokens
    c["completion_tokens"] += stats.new_tokens
    server.recent.append({"number": job.number, "arrived": job.arrived, "started": job.started, "finished": done,
                          "prompt_tokens": stats.prompt_tokens, "cached_tokens": stats.reused_tokens,
                          "completion_tokens": stats.new_tokens, "finish_reason": stats.finish_reason})
    print(f"[request {job.number}] {stats.prompt_tokens} prompt tokens ({stats.reused_tokens} cached), "
          f"{stats.new_tokens} new at {stats.decode_tok_s:.1f} tok/s, {stats.finish_reason}, "
          f"waited {job.started - job.arrived:.2f} s, took {done - job.started:.2f} s", file=sys.stderr, flush=True)


def enqueue(server: Server, body: dict, ids: list[int], chat: bool, stream: bool, fmt: ReplyFormat) -> Job:
    """Check the generation settings, then queue the job (or 429 when the queue is full)."""
    engine, echo = server.engine, echo_asked(body, chat, stream)
    job = Job(number=server.arrivals + 1, ids=ids,
              settings=sampling_settings(body, engine.tokenizer.sampling, engine.backend.vocab_size),
              max_new_tokens=max_new_tokens(body, len(ids), server.engine.context, echo), stops=stop_strings(body),
              ignore_eos=get(body, "ignore_eos", bool, False), format=fmt, logprobs=logprobs_asked(body, chat),
              echo=echo, stream=stream, loop=asyncio.get_running_loop())
    server.counts["requests"] += 1
    try:
        server.jobs.put_nowait(job)
    except queue.Full:
        server.counts["refused_queue_full"] += 1
        took = [r["finished"] - r["started"] for r in list(server.recent)] or [1.0]  # list(): the worker appends
        wait = math.ceil(sum(took) / len(took) * (server.queue_size + 1))  # about when a place frees up
        raise ApiError(429, f"the server is busy: {server.queue_size} requests are waiting (awq-edge serve "
                            "--queue-size); retry later", code="queue_full",
                       headers={"Retry-After": str(max(1, wait))}) from None
    server.arrivals += 1
    return job


# ---------------------------------------------------------------- answering

def usage(stats: GenerationStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens}}


def choice(chat: bool, text: str | None, finish_reason: str | None, stream: bool, calls: list | None = None,
           logprobs: dict | None = None) -> dict:
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    message = {} if text is None else {"content": text}
    if calls:
        message["tool_calls"] = calls
    if stream:
        return {"index": 0, "delta": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text, **message}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def tool_call_objects(job: "Job", calls: list[dict], stream: bool) -> list[dict]:
    """OpenAI's tool_calls of a reply (parse_tool_calls' calls); a stream's carry their index."""
    return [{**({"index": i} if stream else {}), "id": f"call_{job.number}_{i}", "type": "function",
             "function": call} for i, call in enumerate(calls)]


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: only disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer(request: Request, server: Server, body: dict, ids: list[int], chat: bool, tools: set[str],
                 fmt: ReplyFormat):
    """tools: the names of the tools offered (a chat's): the reply is parsed for calls of them,
    or is the call fmt.forced asks for."""
    stream = get(body, "stream", bool, False)
    stream_options = get(body, "stream_options", dict, {})
    include_usage = stream and get(stream_options, "include_usage", bool, False)
    job = enqueue(server, body, ids, chat, stream, fmt)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.number}",
            "object": ("chat.completion" if chat else "text_completion") + (".chunk" if stream and chat else ""),
            "created": int(job.arrived), "model": server.name}
    logprobs = LogprobFormat(server.engine.tokenizer, chat) if job.logprobs is not None else None
    if stream:
        return StreamingResponse(sse(job, head, chat, include_usage, tools, logprobs),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    result = asyncio.ensure_future(job.events.get())
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        job.cancel.set()  # no-op when done; stops the generation when the client left (or we were cancelled)
        gone.cancel()
    if not result.done():
        result.cancel()
        return JSONResponse({}, status_code=499)  # nobody is listening
    kind, value = result.result()
    if kind == "error":
        raise ApiError(*value)
    stats, text, entries = value
    content, calls = forced_calls(text, fmt.forced, tools) if fmt.forced else \
        parse_tool_calls(text, tools) if tools else (text, [])
    finish = "tool_calls" if calls else FINISH_REASONS.get(stats.finish_reason)
    calls = tool_call_objects(job, calls, False)
    if job.echo:  # the prompt as sent (or its ids' text), then the reply
        prompt = completion_prompt(body)
        content = (prompt if isinstance(prompt, str) else server.engine.tokenizer.decode(ids)) + content
    return JSONResponse({**head, "choices": [choice(chat, content, finish, False, calls,
                                                    logprobs(entries) if logprobs else None)],
                         "usage": usage(stats)})


async def sse(job: Job, head: dict, chat: bool, include_usage: bool, tools: set[str],
              logprobs: LogprobFormat | None = None):
    """Server-sent events: one chunk per text piece, a last chunk with finish_reason, data: [DONE].
    With tools offered, text that may be a call is held back (ToolCallStream) and its calls sent
    whole in one chunk before the last. Logprob entries go with the next chunk sent after them."""
    pending = []

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    def with_logprobs(*args, **kwargs) -> dict:
        entries = pending[:]
        pending.clear()
        return choice(*args, **kwargs, logprobs=logprobs(entries) if logprobs else None)

    try:
        if chat:
            yield event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]})
        forced = job.format.forced
        held = ForcedCallStream(forced, tools) if forced else ToolCallStream(tools) if tools else None
        while (item := await job.events.get())[0] == "piece":
            piece, entries = item[1]
            pending.extend(entries)
            if text := held.feed(piece) if held else piece:
                yield event({**head, "choices": [with_logprobs(chat, text, None, True)]})
        kind, value = item
        if kind == "error":
            yield event({"error": {"message": value[1], "type": "server_error", "param": None, "code": None}})
        else:
            stats, (rest, calls) = value[0], held.finish() if held else ("", [])
            if rest or calls:
                yield event({**head, "choices": [with_logprobs(chat, rest or None, None, True,
                                                               tool_call_objects(job, calls, True))]})
            finish = "tool_calls" if calls else FINISH_REASONS.get(stats.finish_reason)
            yield event({**head, "choices": [with_logprobs(chat, None, finish, True)]})
            if include_usage:
                yield event({**head, "choices": [], "usage": usage(stats)})
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away: Starlette cancels this generator
        job.cancel.set()


# ---------------------------------------------------------------- endpoints

def endpoint(handler, needs_key: bool = True):
    """Wraps a handler: the API key check, and ApiError -> OpenAI's error object."""
    async def wrapped(request: Request):
        server = request.app.state.server
        try:
            if needs_key and server.api_key:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                    raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                        "with the key given to awq-edge serve --api-key", code="invalid_api_key")
            return await handler(request, server)
        except ApiError as e:
            return e.response()
    return wrapped


async def chat_completions(request: Request, server: Server):
    return await completion(request, server, chat=True)


async def completions(request: Request, server: Server):
    return await completion(request, server, chat=False)


async def completion(request: Request, server: Server, chat: bool):
    """/v1/chat/completions (messages through the chat template) or /v1/completions (a plain prompt)."""
    body = await read_json(request, server.max_body)
    check_model(body, server)
    check_supported(body)
    prompt, field_name = (chat_messages(body), "messages") if chat else (completion_prompt(body), "prompt")
    tools = chat_tools(body) if chat else []
    fmt = await run_in_threadpool(reply_format, body, tools)  # (a large schema takes a while to compile)
    kwargs = {**template_kwargs(body), **({"tools": tools} if tools else {})} if chat else None
    ids = await run_in_threadpool(tokenize, server.engine, prompt, field_name, kwargs)
    return await answer(request, server, body, ids, chat, {t["function"]["name"] for t in tools}, fmt)


def model_card(server: Server) -> dict:
    return {"id": server.name, "object": "model", "created": int(server.engine.path.stat().st_mtime),
            "owned_by": "awq-edge"}


async def models(request: Request, server: Server):
    return JSONResponse({"object": "list", "data": [model_card(server)]})


async def model(request: Request, server: Server):
    if request.path_params["name"] != server.name:
        raise ApiError(404, f"the model '{request.path_params['name']}' is not served here; this server serves "
                            f"'{server.name}'", param="model", code="model_not_found")
    return JSONResponse(model_card(server))


async def health(request: Request, server: Server):
    return JSONResponse({"status": "ok", "model": server.name, "device": server.engine.manifest.get("device"),
                         "context": server.engine.context})


async def stats(request: Request, server: Server):
    """What the server is doing: for operators and tests (the queue, what runs, recent requests)."""
    running = server.running
    return JSONResponse({"waiting": server.jobs.qsize(), "queue_size": server.queue_size,
                         "running": running.number if running else None, "context": server.engine.context,
                         "kv_reuse_unit": server.reuse_unit, "plan": server.engine.plan.to_dict(),
                         "peak_rss_bytes": peak_rss_bytes(),
                         **server.counts, "recent": list(server.recent)})


async def http_error(request: Request, exc: HTTPException):
    """Starlette's own errors (unknown path, wrong method) in OpenAI's format too."""
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()


async def server_error(request: Request, exc: Exception):
    traceback.print_exception(exc)  # the log gets the traceback, the client one line
    return ApiError(500, f"internal error: {type(exc).__name__}").response()


def make_app(server: Server) -> Starlette:
    app = Starlette(routes=[
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{name:path}", endpoint(model), methods=["GET"]),
        Route("/health", endpoint(health, needs_key=False), methods=["GET"]),
        Route("/stats", endpoint(stats), methods=["GET"]),
    ], exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.server = server
    return app


# ---------------------------------------------------------------- running it

class Uvicorn(uvicorn.Server):
    """uvicorn, plus: Ctrl-C or SIGTERM first stops the generation, so that open replies end at
    once (with an error event) and uvicorn's graceful shutdown has nothing left to wait for."""

    def __init__(self, config: uvicorn.Config, server: Server):
        super().__init__(config)
        self.awq_server = server

    def handle_exit(self, sig, frame) -> None:
        self.awq_server.closing = True  # a plain flag: safe in a signal handler
        super().handle_exit(sig, frame)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_socket(host: str, port: int) -> socket.socket:
    """Bind before the engine loads, so a busy port fails at once (and port 0 picks a free one)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --host/--port") from None
    return sock


def serve(engine: Engine, sock: socket.socket, name: str, queue_size: int = 16, api_key: str | None = None,
          max_body: int = 1 << 20) -> None:
    """Answer requests on sock until Ctrl-C or SIGTERM."""
    server = Server(engine, name, queue_size, api_key, max_body, reuse_unit=exact_reuse_unit(engine))
    thread = threading.Thread(target=worker, args=(server,), name="awq-edge-engine", daemon=True)
    thread.start()
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"serving {engine.path} as '{name}' at {url}/v1 ({engine.manifest.get('device')}, context "
          f"{engine.context} tokens, queue {queue_size}{', API key required' if api_key else ''})", flush=True)
    config = uvicorn.Config(make_app(server), log_level="warning", access_log=False, lifespan="off",
                            # a reply in progress at Ctrl-C gets this long, then its client is cut and it stops
                            timeout_graceful_shutdown=2,
                            # connections (each may hold a body of --max-body) are bounded too: 503 past this
                            limit_concurrency=queue_size + 32)
    # uvicorn shuts down cleanly on SIGTERM, then raises it again: let that do nothing, so we exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        Uvicorn(config, server).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again after its clean shutdown
        pass
    finally:
        server.closing = True
        while True:  # drop what still waits, then stop the worker
            try:
                server.jobs.get_nowait()
            except queue.Empty:
                break
        server.jobs.put(None)
        thread.join(timeout=10)
        sock.close()
