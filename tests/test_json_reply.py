"""JSON mode (awq_edge/json_reply.py): the byte-level checker against Python's own JSON parser,
each token's bytes against the tokenizer's decoding, and replies of the real SmolLM2 engine."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from awq_edge.json_reply import MAX_DEPTH, MAX_INDENT, JsonPrefix, JsonReply

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 20, 10 ** 20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20)


def strict_loads(text: str):
    """json.loads without Python's NaN and Infinity (not JSON)."""
    def refuse(name):
        raise ValueError(name)
    return json.loads(text, parse_constant=refuse)


def depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(value=JSON_VALUES, indent=st.sampled_from([None, 0, 2, 4, "\t"]), ascii_only=st.booleans(),
       compact=st.booleans())
def test_every_prefix_of_a_json_object_passes_and_only_the_whole_is_done(value, indent, ascii_only, compact):
    """What json.dumps writes, compact or indented, byte by byte."""
    separators = (",", ":") if compact else None
    text = json.dumps({"v": value, "list": [value]}, indent=indent, ensure_ascii=ascii_only,
                      separators=separators).encode()
    prefix = JsonPrefix()
    for i, byte in enumerate(text):
        assert not prefix.done, text[:i]
        assert prefix.feed(byte), (text[:i + 1], text)
    assert prefix.done
    # a value that is not an object is refused at its first byte
    if not isinstance(value, dict):
        assert not JsonPrefix().feed_all(json.dumps(value).encode())


JSONISH = st.text(alphabet=list('{}[]:,"\\ \n\t0123456789-+.eEtrufalsn\x01é'), max_size=24)


@settings(max_examples=1500, derandomize=True, deadline=None, database=None)
@given(text=JSONISH)
@example(text='{"a": 01}')
@example(text='{"a": 1.}')
@example(text='{"a":1,}')
@example(text='{"a" "b"}')
@example(text='{"a": "\x01"}')
@example(text='{"a": -0.5e+3}')
@example(text='{"\\u00e9": [true, false, null]}')
def test_the_checker_agrees_with_pythons_parser(text):
    """A whole text the checker takes to its end is an object Python parses; an object Python
    parses, written by json.dumps, the checker takes (test above: byte by byte)."""
    prefix = JsonPrefix()
    passed = prefix.feed_all(text.encode())
    try:
        parsed = strict_loads(text)
    except ValueError:
        parsed = ValueError
    if passed and prefix.done:
        assert isinstance(parsed, dict), text
    if isinstance(parsed, dict):
        for indent in (None, 2):
            assert JsonPrefix().feed_all(json.dumps(parsed, indent=indent).encode())


def test_bounds_and_utf8():
    assert JsonPrefix().feed_all(b'{"a":' * MAX_DEPTH)
    assert not JsonPrefix().feed_all(b'{"a":' * (MAX_DEPTH + 1))
    assert JsonPrefix().feed_all(b'{\n' + b" " * MAX_INDENT + b'"a": 1,\n\t"b": [1, 2]\n}')
    assert not JsonPrefix().feed_all(b"{\n" + b" " * (MAX_INDENT + 1))
    for blanks in (b"  ", b"\n\n", b" \n", b"\r\n", b"\t"):  # no blank lines, no runs of spaces
        assert not JsonPrefix().feed_all(b"{" + blanks), blanks
    # where json.dumps writes none, none: before a colon or a comma; after a colon one space
    for text in (b'{"a" :', b'{"a":  1', b'{"a": 1 ,', b'{"a":\n1', b'[1 ,'):
        assert not JsonPrefix(object_only=False).feed_all(text), text
    for text in (b'{"a":1}', b'{"a": 1, "b": 2}', b'{\n  "a": [\n    1,\n    2\n  ]\n}', b'{ "a": 1 }'):
        assert JsonPrefix().feed_all(text), text
    for good in ("é", "€", "𝄞", "ü"):
        assert JsonPrefix().feed_all(b'{"a": "' + good.encode() + b'"}')
    for bad in (b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf5\x80\x80\x80", b"\xe2\x82x"):  # stray, overlong,
        assert not JsonPrefix().feed_all(b'{"a": "' + bad + b'"}')                         # surrogate, > U+10FFFF


def test_token_bytes_are_what_the_tokenizer_decodes(smollm2_dir):
    """Byte-level BPE (SmolLM2): each token's bytes, where they are a whole character, decode to
    the tokenizer's text for it; special tokens have none."""
    from awq_edge.tokenizer import Tokenizer

    tokenizer = Tokenizer(smollm2_dir)
    table = tokenizer.token_bytes()
    assert len(table) == tokenizer.vocab_size and table is tokenizer.token_bytes()
    checked = 0
    for i, data in enumerate(table):
        text = tokenizer.decode([i], skip_special_tokens=False)
        if data is None:
            assert tokenizer.tk.get_added_tokens_decoder()[i].special
        elif "\ufffd" not in text:
            assert data.decode() == text, i
            checked += 1
    assert checked > 48000  # of 49152: the rest are special tokens and parts of characters
    assert any(data and data[0] >= 0x80 and len(data) == 1 for data in table)  # lone bytes, e.g. UTF-8 leads


def test_sentencepiece_pieces_and_byte_fallback_tokens(tmp_path):
    """A SentencePiece-style vocabulary (Llama 2, Gemma, Phi-3): U+2581 is a space, <0xNN> a byte."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models

    from awq_edge.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x7B>": 3, "<0xC3>": 4, "<0xA9>": 5, "\u2581hello": 6, "{\"": 7,
             "\u2581": 8}
    tk = HfTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tk.add_special_tokens(["<s>", "</s>"])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.save(str(tmp_path / "tokenizer.json"))
    table = Tokenizer(tmp_path).token_bytes()
    assert table[:9] == [b"<unk>", None, None, b"{", b"\xc3", b"\xa9", b" hello", b'{"', b" "]


def engine_reply(engine, prompt: str, **kwargs) -> tuple[str, str]:
    text = engine.generate(prompt, **kwargs)
    return text, engine.last_stats.finish_reason


@pytest.fixture(scope="module")
def engine(engine_dir):
    from awq_edge.engine import Engine

    return Engine.load(engine_dir, max_context=1024)


PROMPTS = ["List three colors.", "Give me a JSON object with a city and its country.",
           "What is the capital of France?", "Write a haiku about rain."]


SAMPLINGS = ({"temperature": 0}, {"temperature": 0.9, "seed": 1},
             {"temperature": 1.3, "top_k": 0, "top_p": 1.0, "seed": 2})  # (the whole vocabulary's tail)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_json_mode_replies_are_json_objects_or_cut_prefixes_of_one(engine, prompt):
    """A reply that ends by itself is a JSON object; one cut at max_new_tokens (a 135M model
    repeats itself inside a string) is the start of one. Most close within 120 tokens."""
    plain, _ = engine_reply(engine, prompt, max_new_tokens=40, temperature=0)
    with pytest.raises(ValueError):
        strict_loads(plain)  # (without JSON mode this model answers in prose)
    closed = 0
    for sampling in SAMPLINGS:
        text, reason = engine_reply(engine, prompt, max_new_tokens=120, json_object=True, **sampling)
        prefix = JsonPrefix()
        assert prefix.feed_all(text.encode()) and reason in ("stop", "length"), (sampling, text)
        assert prefix.done == (reason == "stop"), (sampling, text, reason)
        if reason == "stop":
            assert isinstance(strict_loads(text), dict), (sampling, text)
            closed += 1
    assert closed >= 1


def test_a_json_reply_cut_by_max_tokens_is_a_prefix_of_one(engine):
    text, reason = engine_reply(engine, PROMPTS[1], max_new_tokens=6, temperature=0, json_object=True)
    assert reason == "length" and text.lstrip().startswith("{")
    prefix = JsonPrefix()
    assert prefix.feed_all(text.encode()) and not prefix.done


def test_choose_keeps_the_samplers_draw_over_the_allowed_tokens():
    """Tokens: 0 '{', 1 'Sure', 2 '{"a', 3 ' ', 4 EOS (special), 5 '":1}'. The top candidates are
    not allowed at the start; the draw picks among the allowed ones in their renormalized shares."""
    from awq_edge.sampling import SamplingSettings

    table = [b"{", b"Sure", b'{"a', b" ", None, b'":1}']
    logits = np.array([1.0, 5.0, 1.0, 0.0, 6.0, -1.0], np.float32)
    greedy = SamplingSettings(temperature=0.0)
    assert JsonReply(table).choose(logits, greedy, [], 0.0) == 0  # the first of the two best allowed
    sampled = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0)
    picks = {JsonReply(table).choose(logits, sampled, [], u) for u in np.linspace(0, 0.999, 50)}
    assert picks == {0, 2, 3}
    reply = JsonReply(table)
    reply.push(2)  # in a key now: anything but the special token
    assert [reply.allows(t) for t in range(6)] == [True, True, False, True, False, True] and not reply.done
    reply.push(5)
    assert reply.done and [reply.allows(t) for t in range(6)] == [False, False, False, True, False, False]
    with pytest.raises(ValueError):
        reply.push(1)
