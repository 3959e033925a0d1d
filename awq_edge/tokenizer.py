"""Tokenizer, chat template and streaming detokenizer for the runtime (no transformers, no torch).

- Tokenizer: `tokenizers` reads tokenizer.json; tokenizer_config.json gives the special
  tokens; the chat template comes from chat_template.jinja, chat_template.json or
  tokenizer_config.json (in that order) and is rendered with jinja2 in a sandbox, the way
  Hugging Face renders it (trim_blocks, lstrip_blocks, raise_exception, tojson), within a
  time, output and memory budget (a template is code that came with the model).
- StreamDecoder: turns token ids into text pieces one token at a time and never emits half
  of a multi-byte character. Byte-level BPE and byte-fallback tokens (<0xE6>) decode to
  U+FFFD until the rest of the character has arrived, so a piece ending in U+FFFD is held back.
"""
from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from datetime import datetime
from pathlib import Path

from .errors import UserError
from .sampling import model_sampling
from .untrusted import read_json

REPLACEMENT = "\ufffd"
TEMPLATE_SECONDS = 2.0          # a chat template is code from the model's files: bound its CPU time,
TEMPLATE_MAX_CHARS = 8 << 20    # its output,
TEMPLATE_MAX_GROWTH = 256 << 20  # and the memory it may take while rendering
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
FIX = "rebuild the engine from a model with working tokenizer files"


def _token_text(value) -> str | None:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, folder: Path, config: dict | None = None, listed=None):
        """listed: the folder's checked files (an engine's manifest); a tokenizer file that is there
        but not listed is refused (it would change the output unchecked). None: any tokenizer file
        present (a model or checkpoint folder on the host)."""
        from tokenizers import Tokenizer as HfTokenizer

        folder = Path(folder)
        present = {n for n in TOKENIZER_FILES if (folder / n).is_file()}
        unlisted = sorted(present - set(listed)) if listed is not None else []
        if unlisted:
            raise UserError(f"{folder / unlisted[0]} is not among the engine's listed files; rebuild the engine "
                            "or remove the file")
        if "tokenizer.json" not in present:
            raise UserError(f"{folder} has no tokenizer.json; rebuild the engine from a model that has one")
        try:
            self.tk = HfTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a plain Exception on a bad file
            raise UserError(f"cannot read {folder / 'tokenizer.json'}: {str(e).splitlines()[0][:200]}; {FIX}") from None

        def read(name: str) -> dict:
            return read_json(folder / name, FIX) if name in present else {}

        self.config = read("tokenizer_config.json")
        self.special = {k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        if "chat_template.jinja" in present:
            try:
                self.chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{folder / 'chat_template.jinja'} is not UTF-8 text; {FIX}") from None
        else:
            self.chat_template = _pick_template(read("chat_template.json").get("chat_template")
                                                or self.config.get("chat_template"), folder)
        self._template = None
        self._token_bytes: list[bytes | None] | None = None
        generation = read("generation_config.json")
        self.eos_ids = self._eos_ids(config or {}, generation)
        self.sampling = model_sampling(generation, str(folder / "generation_config.json"))  # the model's advice

    def _eos_ids(self, model_config: dict, generation_config: dict) -> set[int]:
        """Every id that ends a reply: eos_token_id of generation_config / config, and eos_token."""
        ids: set[int] = set()
        for source in (generation_config, model_config):
            value = source.get("eos_token_id")
            values = value if isinstance(value, list) else [] if value is None else [value]
            for v in values:
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size:
                    raise UserError(f"eos_token_id {str(v)[:40]} is not a token id of this model "
                                    f"(0..{self.vocab_size - 1}); {FIX}")
                ids.add(v)
        if self.special["eos_token"]:
            eos = self.tk.token_to_id(self.special["eos_token"])
            if eos is not None:
                ids.add(eos)
        return ids

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes as the decoder writes them (JSON mode checks tokens by them); None for a
        special token or an id the vocabulary lacks. Byte-level BPE pieces through GPT-2's byte
        alphabet; SentencePiece pieces with U+2581 as a space and <0xNN> byte-fallback tokens;
        any other vocabulary's tokens each decoded alone. Built once, on first use."""
        if self._token_bytes is None:
            types = _decoder_types(json.loads(self.tk.to_str()).get("decoder"))
            added = self.tk.get_added_tokens_decoder()
            alphabet = _byte_alphabet() if "ByteLevel" in types else None
            pieces = types & {"Metaspace", "Replace", "ByteFallback"}
            out: list[bytes | None] = []
            for i in range(self.vocab_size):
                piece = self.tk.id_to_token(i)
                if i in added:
                    out.append(None if added[i].special else added[i].content.encode())
                elif piece is None:
                    out.append(None)
                elif alphabet is not None:
                    out.append(bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else None)
                elif pieces:
                    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece) if "ByteFallback" in types else None
                    out.append(bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode())
                else:
                    out.append(self.tk.decode([i]).encode())
            self._token_bytes = out
        return self._token_bytes

    # ------------------------------------------------------------ chat template
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    template_kwargs: dict | None = None) -> str:
        """template_kwargs: more variables for the template (Qwen3's enable_thinking), checked by
        check_template_kwargs; they cannot replace the messages or the special tokens."""
        if not self.chat_template:
            raise UserError("this model has no chat template; pass a plain prompt (--no-chat-template)")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        context = dict(check_template_kwargs(template_kwargs), messages=messages,
                       add_generation_prompt=add_generation_prompt, **{k: v or "" for k, v in self.special.items()})
        try:
            return _render_bounded(self._template, context)
        except UserError:
            raise
        except Exception as e:  # a template error is a problem of the model files, said in one line
            raise UserError(f"the chat template failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


TEMPLATE_KWARGS_MAX_CHARS = 1 << 16


def _decoder_types(decoder) -> set[str]:
    """The types of a tokenizer.json decoder and of the decoders a Sequence holds."""
    if not isinstance(decoder, dict):
        return set()
    types = {decoder.get("type")}
    for inner in decoder.get("decoders") or []:
        types |= _decoder_types(inner)
    return types


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    others, in order, for U+0100 on."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[chr(b)] = b
        else:
            alphabet[chr(0x100 + extra)] = b
            extra += 1
    return alphabet


def check_template_kwargs(kwargs) -> dict:
    """A JSON object of names to JSON values (at most 64 KiB as JSON), or a one-line UserError."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise UserError("chat template kwargs must be a JSON object of variable names, e.g. "
                        '{"enable_thinking": false}')
    try:
        size = len(json.dumps(kwargs))
    except (TypeError, ValueError):
        raise UserError("chat template kwargs must hold JSON values (strings, numbers, booleans, lists, objects)") \
            from None
    if size > TEMPLATE_KWARGS_MAX_CHARS:
        raise UserError(f"chat template kwargs are {size} characters as JSON; at most {TEMPLATE_KWARGS_MAX_CHARS}")
    return kwargs


def _pick_template(template, where: Path) -> str | None:
    """A template string, or a list of {"name", "template"} (the "default" one is used)."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise UserError(f"{where}: chat_template is not a string; {FIX}")
    return template or None


def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """Refuses `"x" * n` and `a ** b` that would build huge values in one C-level step
        (the time budget cannot interrupt those; ranges are already capped by the sandbox)."""
        intercepted_binops = frozenset(("*", "**"))

        def call_binop(self, context, operator, left, right):
            sized = [v for v in (left, right) if isinstance(v, (str, list, tuple))]
            counts = [v for v in (left, right) if isinstance(v, int)]
            if operator == "*" and sized and counts and len(sized[0]) * counts[0] > TEMPLATE_MAX_CHARS:
                raise UserError("the chat template builds a value too large to render")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 256:
                raise UserError("the chat template raises a number to a huge power")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise UserError(f"the chat template refused the messages: {str(message)[:200]}")

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except (TemplateError, RecursionError, MemoryError) as e:
        raise UserError(f"the chat template does not parse: {str(e)[:200]}") from None


def _render_bounded(template, context: dict) -> str:
    """template.render(context) within TEMPLATE_SECONDS, TEMPLATE_MAX_CHARS of output and
    TEMPLATE_MAX_GROWTH of resident memory: a trace function checks the clock and the RSS on
    every line the template (compiled to Python) runs, so a loop that never ends or never
    stops growing is stopped, in any thread. The clock is this thread's CPU time: the
    template's own work, which a busy machine (or a server's other requests) does not inflate."""
    rss = _RssReader()
    start_rss = rss()
    deadline = time.thread_time() + TEMPLATE_SECONDS

    def check(frame, event, arg):
        # memory first: a value that doubles each line runs past both, and its memory is the cause
        if rss() - start_rss > TEMPLATE_MAX_GROWTH:
            raise UserError("the chat template took too much memory to render")
        if time.thread_time() > deadline:
            raise UserError(f"the chat template took more than {TEMPLATE_SECONDS:g} s of CPU time to render; "
                            "it loops too long for these messages")
        return check

    pieces, size = [], 0
    previous = sys.gettrace()
    sys.settrace(check)
    try:
        for piece in template.generate(**context):
            size += len(piece)
            if size > TEMPLATE_MAX_CHARS:
                raise UserError(f"the chat template's output is over {TEMPLATE_MAX_CHARS >> 20} M characters")
            pieces.append(piece)
    except RecursionError:
        raise UserError("the chat template recursed too deeply") from None
    finally:
        sys.settrace(previous)
        rss.close()
    return "".join(pieces)


class _RssReader:
    """This process's resident set size, cheaply (a few us: one pread of /proc/self/statm); where
    /proc is missing, the peak RSS instead (bounds the growth above the earlier peak)."""

    def __init__(self):
        try:
            self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self.fd = None

    def __call__(self) -> int:
        if self.fd is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # KiB on Linux
        return int(os.pread(self.fd, 128, 0).split()[1]) * _PAGE

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


_PAGE = os.sysconf("SC_PAGE_SIZE")


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
