"""Tokenizer, chat template and streaming detokenizer for the runtime (no transformers, no torch).

- Tokenizer: `tokenizers` reads tokenizer.json; tokenizer_config.json gives the special
  tokens; the chat template comes from chat_template.jinja, chat_template.json or
  tokenizer_config.json (in that order) and is rendered with jinja2 in a sandbox, the way
  Hugging Face renders it (trim_blocks, lstrip_blocks, raise_exception, tojson).
- StreamDecoder: turns token ids into text pieces one token at a time and never emits half
  of a multi-byte character. Byte-level BPE and byte-fallback tokens (<0xE6>) decode to
  U+FFFD until the rest of the character has arrived, so a piece ending in U+FFFD is held back.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import UserError

REPLACEMENT = "\ufffd"


def _token_text(value) -> str | None:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); rebuild the engine") from None


def find_chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template") or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


class Tokenizer:
    def __init__(self, folder: Path, config: dict | None = None):
        from tokenizers import Tokenizer as HfTokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            raise UserError(f"{folder} has no tokenizer.json; rebuild the engine from a model that has one")
        try:
            self.tk = HfTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a plain Exception on a bad file
            raise UserError(f"cannot read {folder / 'tokenizer.json'}: {str(e).splitlines()[0][:200]}") from None
        self.config = _read_json(folder / "tokenizer_config.json")
        self.special = {k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.chat_template = find_chat_template(folder, self.config)
        self._template = None
        self.eos_ids = self._eos_ids(config or {}, _read_json(folder / "generation_config.json"))

    def _eos_ids(self, model_config: dict, generation_config: dict) -> set[int]:
        """Every id that ends a reply: eos_token_id of generation_config / config, and eos_token."""
        ids: set[int] = set()
        for source in (generation_config, model_config):
            value = source.get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        if self.special["eos_token"]:
            eos = self.tk.token_to_id(self.special["eos_token"])
            if eos is not None:
                ids.add(eos)
        return {int(i) for i in ids}

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------ chat template
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise UserError("this model has no chat template; pass a plain prompt (--no-chat-template)")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{k: v or "" for k, v in self.special.items()})
        except UserError:
            raise
        except Exception as e:  # a template error is a problem of the model files, said in one line
            raise UserError(f"the chat template failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise UserError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise UserError(f"the chat template does not parse: {e}") from None


class StreamDecoder:
    """Feed ids one at a time with push(); each call returns the text that is now complete.

    Decodes the pending ids together with a few ids before them (so tokenizers that strip a
    leading space from the first token, e.g. SentencePiece's Metaspace, keep it) and emits
    the difference. A piece ending in U+FFFD is an unfinished character and is held back,
    unless MAX_PENDING ids have piled up (the model really produced invalid bytes).
    """

    CONTEXT = 4
    MAX_PENDING = 8  # a UTF-8 character has at most 4 bytes, i.e. at most 4 byte tokens

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # ids[:emitted] have been turned into text

    def _text(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        start = max(0, self.emitted - self.CONTEXT)
        before = self._text(start, self.emitted)
        full = self._text(start, len(self.ids))
        settled = full.startswith(before) and not full.endswith(REPLACEMENT)
        if not settled and len(self.ids) - self.emitted < self.MAX_PENDING:
            return ""  # an unfinished character (or a decoder that rewrote earlier text): wait
        piece = full[len(before):]
        self.emitted = len(self.ids)
        return piece

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end)."""
        if self.emitted == len(self.ids):
            return ""
        start = max(0, self.emitted - self.CONTEXT)
        piece = self._text(start, len(self.ids))[len(self._text(start, self.emitted)):]
        self.emitted = len(self.ids)
        return piece.rstrip(REPLACEMENT)  # the reply was cut inside a character: drop the half
