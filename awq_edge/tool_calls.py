"""Tool calls in a model's reply, as OpenAI's API returns them (the server's `tools`).

The families' chat templates describe the tools to the model (`tools` is a template variable);
what the model writes back to call one differs by family:

    Qwen 2.5/3, SmolLM3 (Hermes):  <tool_call>{"name": ..., "arguments": {...}}</tool_call>, after
                                   any text, one block per call
    Llama 3.1/3.2:                 {"name": ..., "parameters": {...}}  (after <|python_tag|>)
    Mistral (v3 tokenizers):       [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
    Mistral (v11+), Ministral 3:   [TOOL_CALLS]name[ARGS]{...}, once per call
    Phi-4-mini, Granite 3:         <|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>

The markers of the last four are special tokens, which decoding drops, so what is left is JSON,
or (v11+) name{...}name{...}.
A call counts only when it names one of the tools offered and its arguments are a JSON object;
anything else stays text (a reply that merely starts with "{" is content).
"""
from __future__ import annotations

import json
import re

HERMES_OPEN = "<tool_call>"
HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
MARKERS = ("<|python_tag|>", "[TOOL_CALLS]", "<|tool_call|>")  # where decoding keeps special tokens
MARKER_END = "<|/tool_call|>"


def tool_call(name: str, arguments: dict) -> dict:
    """One call as OpenAI's `function` holds it: the arguments as a JSON string."""
    return {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}


def calls_in(text: str, names: set[str]) -> list[dict] | None:
    """The calls a JSON object or array of objects makes ({"name", "arguments" as a JSON string}),
    or None unless each names an offered tool with an object of arguments."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    calls = []
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):  # some write the arguments as a JSON string already
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(tool_call(item["name"], arguments))
    return calls or None


def named_calls(text: str, names: set[str]) -> list[dict] | None:
    """Mistral v11+'s calls with their markers dropped, name{...} after name{...}, or None."""
    calls, at, decoder = [], 0, json.JSONDecoder()
    longest_first = sorted(names, key=len, reverse=True)
    while at < len(text):
        name = next((n for n in longest_first if text.startswith(n + "{", at)), None)
        if name is None:
            return None
        try:
            arguments, at = decoder.raw_decode(text, at + len(name))
        except ValueError:
            return None
        if not isinstance(arguments, dict):
            return None
        calls.append(tool_call(name, arguments))
        while at < len(text) and text[at].isspace():
            at += 1
    return calls or None


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(the reply's content, its calls): the text before the first Hermes block (None if blank)
    and the blocks' calls, or the whole reply as calls (JSON, or Mistral v11+'s); else (text, [])."""
    if HERMES_OPEN in text:
        found = [calls_in(block.strip(), names) for block in HERMES_BLOCK.findall(text)]
        if found and all(found):
            return text[:text.index(HERMES_OPEN)].strip() or None, [c for calls in found for c in calls]
        return text, []
    body = text.strip()
    for marker in MARKERS:
        body = body.removeprefix(marker).strip()
    body = body.removesuffix(MARKER_END).strip()
    calls = calls_in(body, names) or named_calls(body, names)
    return (None, calls) if calls else (text, [])


class ToolCallStream:
    """A streamed reply with tools offered: pieces pass through until a call may be starting (a
    Hermes tag, or a reply that starts with "{", "[", a marker or a tool's name and "{"), and from
    there on are held back, for finish() to parse with everything before them."""

    def __init__(self, names: set[str]):
        self.names, self.sent, self.held, self.holding = names, "", "", False

    def feed(self, piece: str) -> str:
        """The part of the reply so far that can be sent now."""
        self.held += piece
        if self.holding:
            return ""
        if not self.sent.strip():  # the reply's first characters: JSON or a marker means hold it all
            start, heads = self.held.lstrip(), MARKERS + tuple(n + "{" for n in self.names)
            if not start:
                return ""
            if start[0] in "{[" or start.startswith(heads):
                self.holding = True
                return ""
            if any(h.startswith(start) for h in heads):  # may still become one
                return ""
        at = self.held.find(HERMES_OPEN)
        if at >= 0:
            self.holding = True
        else:  # keep back a tail that may be the start of a tag
            at = len(self.held) - next((n for n in range(len(HERMES_OPEN) - 1, 0, -1)
                                        if self.held.endswith(HERMES_OPEN[:n])), 0)
        out, self.held = self.held[:at], self.held[at:]
        self.sent += out
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(the text still to send, the calls): the whole reply parsed; what was sent stays sent."""
        content, calls = parse_tool_calls(self.sent + self.held, self.names)
        return ("", calls) if calls else (self.held, [])
