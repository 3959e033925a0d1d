"""JSON mode: a reply that is one JSON object (OpenAI's response_format {"type": "json_object"}),
or one a JSON Schema describes (json_schema.py: {"type": "json_schema"}, forced tool calls).

Each step the sampler's candidates (after the penalty, temperature, top-k and top-p) are tried in
order against a byte-level JSON checker, and only a token whose bytes keep the reply a prefix of a
JSON object can be chosen; the reply ends when the object closes. The draw among the allowed
candidates is the sampler's own, renormalized over them. Where none of them is allowed (the model
wants to write "Sure! ..." where "{" must come), the allowed token with the highest logit is taken,
searched among the tokens whose first byte can come next.

What the checker holds to (RFC 8259): strings without raw control characters, escapes as listed,
UTF-8 well-formed; numbers as the grammar writes them; true, false, null. Whitespace goes where
json.dumps writes it, compact or indented: after "{", "[" and ",", and before "}" and "]", one
space or a newline and at most MAX_INDENT spaces or tabs; after ":" one space; nowhere else
(llama.cpp's JSON grammar has a like rule): a small model that would rather not write JSON
otherwise fills the reply with blank lines. MAX_DEPTH bounds the nesting.
With sampling, the SAMPLED_CANDIDATES likeliest candidates are the ones tried.

A token's bytes come from Tokenizer.token_bytes (byte-level BPE or SentencePiece pieces).
"""
from __future__ import annotations

import numpy as np

from .errors import UserError
from .sampling import SamplingSettings, apply_repetition_penalty, candidates, usable_logits

MAX_DEPTH = 64           # nested objects and arrays
MAX_INDENT = 32          # spaces or tabs after a newline outside strings (8 levels of 4)
GREEDY_TRIES = 64        # greedy: the highest logits tried before the first-byte search
SAMPLED_CANDIDATES = 256  # sampling: the likeliest candidates tried (without top-k the vocabulary's tail is cut)

# the checker's modes: where in the grammar the next byte falls
(VALUE, VALUE_OR_CLOSE, KEY_OR_CLOSE, KEY, COLON, MEMBER, NEXT_OR_CLOSE, STRING, ESCAPE, HEX, NUMBER, LITERAL,
 DONE) = range(13)  # MEMBER: an object member's value, after its colon
BLANK = frozenset(b" \t\n\r")
SPACE, TAB, NEWLINE = b" \t\n"
DIGITS = frozenset(b"0123456789")
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrtu')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
# number states: after '-', after a leading 0, in the integer digits, after '.', in the fraction,
# after 'e', after the exponent's sign, in the exponent's digits; a number may end in ENDS
(N_SIGN, N_ZERO, N_INT, N_DOT, N_FRAC, N_EXP, N_EXP_SIGN, N_EXP_DIGITS) = range(8)
NUMBER_ENDS = (N_ZERO, N_INT, N_FRAC, N_EXP_DIGITS)
# each state's next one by byte (built once: the checker runs for every candidate token's bytes)
NUMBER_STEPS = {
    N_SIGN: {**dict.fromkeys(b"0", N_ZERO), **dict.fromkeys(b"123456789", N_INT)},
    N_ZERO: {**dict.fromkeys(b".", N_DOT), **dict.fromkeys(b"eE", N_EXP)},
    N_INT: {**dict.fromkeys(DIGITS, N_INT), **dict.fromkeys(b".", N_DOT), **dict.fromkeys(b"eE", N_EXP)},
    N_DOT: dict.fromkeys(DIGITS, N_FRAC),
    N_FRAC: {**dict.fromkeys(DIGITS, N_FRAC), **dict.fromkeys(b"eE", N_EXP)},
    N_EXP: {**dict.fromkeys(DIGITS, N_EXP_DIGITS), **dict.fromkeys(b"+-", N_EXP_SIGN)},
    N_EXP_SIGN: dict.fromkeys(DIGITS, N_EXP_DIGITS),
    N_EXP_DIGITS: dict.fromkeys(DIGITS, N_EXP_DIGITS),
}


# The well-formed UTF-8 sequences past ASCII (RFC 3629): a lead byte's range, the range of the
# byte after it (no overlong forms, no surrogates, nothing past U+10FFFF), then how many more
# continuation bytes (0x80-0xBF). json_schema.py's grammar spells out the same table.
UTF8_FORMS = (((0xC2, 0xDF), (0x80, 0xBF), 0), ((0xE0, 0xE0), (0xA0, 0xBF), 1), ((0xE1, 0xEC), (0x80, 0xBF), 1),
              ((0xED, 0xED), (0x80, 0x9F), 1), ((0xEE, 0xEF), (0x80, 0xBF), 1), ((0xF0, 0xF0), (0x90, 0xBF), 2),
              ((0xF1, 0xF3), (0x80, 0xBF), 2), ((0xF4, 0xF4), (0x80, 0x8F), 2))


def utf8_lead(byte: int) -> tuple[int, int, int] | None:
    """(continuation bytes to come, the range of the first one) for a UTF-8 lead byte >= 0x80, or
    None where it cannot lead (a continuation byte, an overlong C0/C1, F5-FF)."""
    for (low, high), (next_low, next_high), more in UTF8_FORMS:
        if low <= byte <= high:
            return 1 + more, next_low, next_high
    return None


class JsonPrefix:
    """Whether bytes so far are the start of one JSON value (an object, with object_only): feed()
    one byte at a time; it answers False, and keeps its state, for a byte that cannot come next."""

    __slots__ = ("stack", "mode", "key", "aux", "utf8", "blanks", "object_only")

    def __init__(self, object_only: bool = True):
        self.stack: tuple = ()     # open containers, innermost last: "{" or "["
        self.mode = VALUE
        self.key = False           # STRING, ESCAPE, HEX: the string is an object's key
        self.aux = 0               # HEX: digits to come; NUMBER: its state; LITERAL: bytes matched
        self.utf8 = (0, 0, 0)      # STRING: (continuation bytes to come, the next one's range)
        self.blanks = 0            # this run of whitespace: 0 none, -1 a space, n > 0 a newline and n - 1 more
        self.object_only = object_only

    def copy(self) -> "JsonPrefix":
        other = JsonPrefix.__new__(JsonPrefix)
        for name in JsonPrefix.__slots__:
            setattr(other, name, getattr(self, name))
        return other

    @property
    def done(self) -> bool:
        return self.mode == DONE

    def feed_all(self, data: bytes) -> bool:
        """Feed every byte; False at the first that cannot come (the state is then undefined: feed a copy)."""
        return all(self.feed(b) for b in data)

    def feed(self, b: int) -> bool:
        mode = self.mode
        if mode == STRING:
            return self._string(b)
        if mode == ESCAPE:
            if b not in ESCAPES:
                return False
            self.mode, self.aux = (HEX, 4) if b == ord("u") else (STRING, 0)
            return True
        if mode == HEX:
            if b not in HEX_DIGITS:
                return False
            self.aux -= 1
            if self.aux == 0:
                self.mode = STRING
            return True
        if mode == LITERAL:
            word, at = self.aux
            if b != word[at]:
                return False
            if at + 1 == len(word):
                self._value_done()
            else:
                self.aux = (word, at + 1)
            return True
        if mode == NUMBER:
            if self._number(b):
                return True
            if self.aux not in NUMBER_ENDS or not self.stack:  # (a bare top-level number never ends)
                return False
            saved = (self.mode, self.aux)
            self._value_done()
            if self.feed(b):  # the byte after the number, read in the container
                return True
            self.mode, self.aux = saved
            return False
        if b in BLANK:
            return self._blank(b)
        if mode == DONE:
            return False
        ok = self._structure(b, mode)
        if ok:
            self.blanks = 0
        return ok

    def _blank(self, b: int) -> bool:
        """Whitespace outside strings: one space, or a newline and up to MAX_INDENT spaces or tabs;
        only a space after a colon, none before a colon or a comma (where json.dumps writes none)."""
        n = self.blanks
        if self.mode == COLON or self.mode == MEMBER and (n != 0 or b != SPACE):
            return False
        if n == 0 and b in (SPACE, NEWLINE):
            self.blanks = -1 if b == SPACE else 1
            return True
        if 0 < n <= MAX_INDENT and b in (SPACE, TAB):
            self.blanks = n + 1
            return True
        return False

    def _structure(self, b: int, mode: int) -> bool:
        """A byte outside strings, numbers and literals (whitespace handled)."""
        c = chr(b)
        if mode in (VALUE_OR_CLOSE, KEY_OR_CLOSE, NEXT_OR_CLOSE) and c in "]}":
            if not self.stack or self.stack[-1] != ("[" if c == "]" else "{"):
                return False
            if mode == VALUE_OR_CLOSE and c != "]" or mode == KEY_OR_CLOSE and c != "}":
                return False
            self.stack = self.stack[:-1]
            self._value_done()
            return True
        if mode in (KEY_OR_CLOSE, KEY):
            if c != '"':
                return False
            self.mode, self.key, self.utf8 = STRING, True, (0, 0, 0)
            return True
        if mode == COLON:
            if c != ":":
                return False
            self.mode = MEMBER
            return True
        if mode == NEXT_OR_CLOSE:
            if c != "," or self.blanks:
                return False
            self.mode = KEY if self.stack[-1] == "{" else VALUE
            return True
        # VALUE, VALUE_OR_CLOSE or MEMBER: a value starts
        if self.object_only and not self.stack and c != "{":
            return False
        if c in "{[":
            if len(self.stack) >= MAX_DEPTH:
                return False
            self.stack += (c,)
            self.mode = KEY_OR_CLOSE if c == "{" else VALUE_OR_CLOSE
        elif c == '"':
            self.mode, self.key, self.utf8 = STRING, False, (0, 0, 0)
        elif c == "-" or b in DIGITS:
            self.mode, self.aux = NUMBER, N_SIGN if c == "-" else N_ZERO if c == "0" else N_INT
        elif b in LITERALS:
            self.mode, self.aux = LITERAL, (LITERALS[b], 0)
        else:
            return False
        return True

    def _string(self, b: int) -> bool:
        left, lo, hi = self.utf8
        if left:
            if not lo <= b <= hi:
                return False
            self.utf8 = (left - 1, 0x80, 0xBF)
            return True
        if b >= 0x80:
            lead = utf8_lead(b)
            if lead is None:
                return False
            self.utf8 = lead
            return True
        if b < 0x20:  # a raw control character: JSON wants it escaped
            return False
        if b == ord("\\"):
            self.mode = ESCAPE
        elif b == ord('"'):
            if self.key:
                self.mode = COLON
            else:
                self._value_done()
        return True

    def _number(self, b: int) -> bool:
        """One more byte of the number, if it can be one (the state moves on); False leaves it."""
        step = NUMBER_STEPS[self.aux].get(b)
        if step is None:
            return False
        self.aux = step
        return True

    def _value_done(self) -> None:
        self.mode, self.aux, self.blanks = (NEXT_OR_CLOSE if self.stack else DONE), 0, 0


class JsonReply:
    """The constraint a generation runs under (Engine.stream's json_object or json_schema):
    choose() picks each token, push() takes the chosen one, done says the reply is whole (it ends
    there). prefix: the checker, JsonPrefix (any JSON object) or json_schema.GrammarPrefix."""

    def __init__(self, token_bytes: list[bytes | None], prefix=None, eos_ids=frozenset()):
        self.token_bytes, self.eos_ids = token_bytes, eos_ids
        self.prefix = prefix if prefix is not None else JsonPrefix(object_only=True)

    @property
    def done(self) -> bool:
        """The reply is whole and nothing but whitespace could follow (a top-level number that
        could go on is whole too, but ends by an end-of-sequence token)."""
        return self.prefix.done and not any(self.prefix.copy().feed(b) for b in range(256) if b not in BLANK)

    def allows(self, token: int) -> bool:
        if token in self.eos_ids:
            return self.prefix.done
        data = self.token_bytes[token] if 0 <= token < len(self.token_bytes) else None
        return bool(data) and self.prefix.copy().feed_all(data)

    def push(self, token: int) -> None:
        if token in self.eos_ids and self.prefix.done:
            return
        if not self.allows(token):
            raise ValueError(f"token {token} does not continue the JSON reply")
        self.prefix.feed_all(self.token_bytes[token])

    def choose(self, logits, settings: SamplingSettings, seen_ids, uniform: float) -> int:
        """The token: the sampler's rule over the allowed candidates, else the best allowed token.
        (Logits past the tokenizer's ids, a padded vocabulary's, are never chosen; a tokenizer
        larger than the logits, a test's tiny model, has its ids past them left out.)"""
        logits = np.asarray(logits, dtype=np.float32)[:len(self.token_bytes)]
        if settings.temperature == 0:
            scores = usable_logits(apply_repetition_penalty(logits, seen_ids, settings.repetition_penalty))
            top = np.argpartition(scores, -GREEDY_TRIES)[-GREEDY_TRIES:] if scores.size > GREEDY_TRIES else \
                np.arange(scores.size)
            for token in top[np.argsort(-scores[top], kind="stable")]:
                if self.allows(int(token)):
                    return int(token)
            return self.best_allowed(scores)
        ids, probs = candidates(logits, settings, seen_ids)
        ids, probs = ids[:SAMPLED_CANDIDATES], probs[:SAMPLED_CANDIDATES]
        allowed = np.array([self.allows(int(t)) for t in ids])
        if not allowed.any():
            return self.best_allowed(usable_logits(apply_repetition_penalty(logits, seen_ids,
                                                                            settings.repetition_penalty)))
        ids, probs = ids[allowed], probs[allowed] / probs[allowed].sum()
        return int(ids[min(np.searchsorted(np.cumsum(probs), uniform), len(ids) - 1)])

    def best_allowed(self, scores: np.ndarray) -> int:
        """The allowed token with the highest score, among those whose first byte can come next."""
        by_first_byte = first_byte_index(self.token_bytes)
        nexts = [b for b in range(256) if self.prefix.copy().feed(b)]
        ids = np.concatenate([by_first_byte[b] for b in nexts]) if nexts else np.zeros(0, np.int64)
        ids = ids[ids < scores.size]
        for token in ids[np.argsort(-scores[ids], kind="stable")]:
            if scores[token] > -np.inf and self.allows(int(token)):
                return int(token)
        raise UserError("no token of this model can continue the JSON reply; turn JSON mode off for this model")


_FIRST_BYTES: dict[int, tuple] = {}  # id(token_bytes) -> (token_bytes, its index): one per tokenizer table


def first_byte_index(token_bytes: list[bytes | None]) -> dict[int, np.ndarray]:
    """byte -> the ids of the tokens that start with it (built once per table)."""
    if id(token_bytes) not in _FIRST_BYTES:
        firsts = np.array([data[0] if data else -1 for data in token_bytes])
        _FIRST_BYTES[id(token_bytes)] = (token_bytes, {b: np.flatnonzero(firsts == b) for b in range(256)})
    return _FIRST_BYTES[id(token_bytes)][1]


def reply_constraint(token_bytes: list[bytes | None], eos_ids, json_object: bool = False,
                     json_schema=None) -> JsonReply | None:
    """What a generation is held to: a JSON Schema (any JSON value it allows; or the (grammar,
    root) json_schema.schema_grammar or tool_calls_grammar made of one), any JSON object, or
    nothing (None). eos_ids: the tokens that end a reply (allowed once it is whole)."""
    if json_schema is not None:
        from .json_schema import GrammarPrefix, schema_grammar

        grammar = json_schema if isinstance(json_schema, tuple) else schema_grammar(json_schema)
        return JsonReply(token_bytes, GrammarPrefix(*grammar), eos_ids)
    return JsonReply(token_bytes, eos_ids=eos_ids) if json_object else None
