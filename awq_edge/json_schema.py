"""Replies held to a JSON Schema (response_format json_schema; the server's forced tool calls).

schema_grammar(schema) compiles a schema into a byte grammar; GrammarPrefix tells, byte by byte,
whether a text is still the start of one the grammar generates (the set of parse stacks that
llama.cpp's grammar sampler also keeps). json_reply.JsonReply picks tokens with it as with the
plain JSON checker.

The schema subset (what OpenAI's structured outputs take, and a little more):
- type (one or a list), enum and const (their values of that type), anyOf, oneOf (as anyOf),
  allOf of one schema (keywords beside a combinator held in each branch), $ref into the
  document (#, #/$defs/..., #/definitions/...: recursion allowed), {} or true for any value;
- objects: properties (written in the schema's order; a required one always, an optional one
  or not), required, additionalProperties (false, true or a schema; absent with properties
  means none are written, which the schema allows);
- arrays: items, prefixItems, minItems, maxItems (up to MAX_UNROLL);
- strings: minLength, maxLength (up to MAX_UNROLL characters, counted as json.loads counts them: a
  \\u surrogate pair is one);
- annotations are read past: title, description, default, examples, format (an annotation in
  JSON Schema 2020-12), deprecated, readOnly, writeOnly, $schema, $id, $comment, $defs.
Any other keyword (pattern, minimum, multipleOf, ...) is refused in one line that names it and
where it is, rather than ignored: a reply would not be held to it. So is a keyword beside $ref,
beside an enum (but type), or contradicting a combinator's branch. With both properties and
additionalProperties, a free key is written without escapes and is none of the listed names
(key_except), so no key is there twice.

Whitespace goes where json_reply's checker lets it: where json.dumps writes it.
"""
from __future__ import annotations

import json

from .errors import UserError
from .json_reply import MAX_INDENT, UTF8_FORMS, utf8_lead

MAX_UNROLL = 256       # minItems/maxItems and minLength/maxLength are unrolled into this many rules at most
MAX_RULES = 50_000     # a schema that compiles to more rules, alternatives of one rule or elements
MAX_ALTERNATIVES = 1024  # in all is refused (a request is untrusted input)
MAX_ELEMENTS = 1_000_000
MAX_NESTING = 64       # nested schemas
MAX_STACKS = 4096      # parses kept at once: an ambiguous schema (anyOf of the same value twice, nested)
                       # would double them at each level; past this some are dropped, never a wrong one kept
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "format", "deprecated", "readOnly",
                         "writeOnly", "$schema", "$id", "$comment", "$defs", "definitions"})
KEYWORDS = frozenset({"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "properties", "required",
                      "additionalProperties", "items", "prefixItems", "minItems", "maxItems", "minLength",
                      "maxLength"})
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


PLAIN_BYTES = (*range(0x20, 0x22), *range(0x23, 0x5C), *range(0x5D, 0x80))  # one-byte characters but '"' and '\\'


# the bytes a string's character (but an escape) may start with
LEADING_BYTES = (*PLAIN_BYTES, *(b for (low, high), _, _ in UTF8_FORMS for b in range(low, high + 1)))


def byte_set(*ranges) -> bytes:
    """A terminal: a 256-entry table, 1 for each byte in the ranges (a byte, or (low, high))."""
    table = bytearray(256)
    for r in ranges:
        low, high = (r, r) if isinstance(r, int) else r
        table[low:high + 1] = b"\x01" * (high - low + 1)
    return bytes(table)


class Grammar:
    """Rules of alternatives; an alternative is a tuple of elements, each a rule's id (an int) or
    a terminal (byte_set). GrammarPrefix walks it; nothing in it may be left-recursive."""

    def __init__(self):
        self.rules: list[list[int]] = []    # rule id -> the ids of its alternatives
        self.alts: list[tuple] = []          # alternative id -> its elements
        self.named: dict = {}                # shared rules: key -> rule id
        self.elements = 0                    # in all alternatives (bounded: MAX_ELEMENTS)
        self._bytes = [byte_set(b) for b in range(256)]

    def new(self) -> int:
        if len(self.rules) >= MAX_RULES:
            raise UserError(f"the schema is too large to hold a reply to (over {MAX_RULES} grammar rules); "
                            "simplify it")
        self.rules.append([])
        return len(self.rules) - 1

    def define(self, rule: int, *alternatives) -> int:
        if len(alternatives) > MAX_ALTERNATIVES:
            raise UserError(f"the schema has a choice of {len(alternatives)} (an enum, anyOf or type list); at "
                            f"most {MAX_ALTERNATIVES} can hold a reply")
        for alt in alternatives:
            self.elements += len(alt)
            self.alts.append(tuple(alt))
            self.rules[rule].append(len(self.alts) - 1)
        if self.elements > MAX_ELEMENTS:
            raise UserError(f"the schema is too large to hold a reply to (over {MAX_ELEMENTS} grammar elements); "
                            "simplify it")
        return rule

    def rule(self, *alternatives) -> int:
        return self.define(self.new(), *alternatives)

    def literal(self, text: bytes) -> list:
        return [self._bytes[b] for b in text]

    def shared(self, key, build) -> int:
        """The rule for key, built once (build(rule_id) defines it: recursion can refer to it)."""
        if key not in self.named:
            self.named[key] = rule = self.new()
            build(rule)
        return self.named[key]


class GrammarPrefix:
    """Whether bytes so far start a text of the grammar: the checker json_reply.JsonReply takes
    (feed, feed_all, copy, done). A stack is a tuple of (alternative, element index) frames; its
    top always points at a terminal (or the stack is empty: the text may end here)."""

    __slots__ = ("grammar", "stacks")

    def __init__(self, grammar: Grammar, root: int):
        self.grammar = grammar
        stacks: set = set()
        for alt in grammar.rules[root]:
            self._expand(((alt, 0),), stacks)
        self.stacks = frozenset(stacks)

    def copy(self) -> "GrammarPrefix":
        other = GrammarPrefix.__new__(GrammarPrefix)
        other.grammar, other.stacks = self.grammar, self.stacks  # (stacks is never changed in place)
        return other

    @property
    def done(self) -> bool:
        return () in self.stacks

    def feed_all(self, data: bytes) -> bool:
        return all(self.feed(b) for b in data)

    def feed(self, byte: int) -> bool:
        alts, out = self.grammar.alts, set()
        for stack in self.stacks:
            if stack:
                alt, i = stack[-1]
                if alts[alt][i][byte]:
                    self._expand(stack[:-1] + ((alt, i + 1),), out)
        if not out:
            return False
        if len(out) > MAX_STACKS:  # (sound still: each parse kept is one the grammar has)
            out = sorted(out)[:MAX_STACKS]
        self.stacks = frozenset(out)
        return True

    def _expand(self, stack: tuple, out: set) -> None:
        """Add to out every stack whose top is a terminal, reached from stack without reading a byte."""
        alts, rules = self.grammar.alts, self.grammar.rules
        while stack:
            alt, i = stack[-1]
            elements = alts[alt]
            if i == len(elements):  # this alternative is whole: its rule's caller moves on
                stack = stack[:-1]
                if stack:
                    caller, j = stack[-1]
                    stack = stack[:-1] + ((caller, j + 1),)
                continue
            element = elements[i]
            if isinstance(element, bytes):
                out.add(stack)
                return
            # a rule: each of its alternatives on top; a rule last in its alternative replaces that
            # frame (a tail call: a long array or string does not grow the stack)
            base = stack[:-1] if i == len(elements) - 1 and len(stack) > 1 else stack
            for sub in rules[element]:
                self._expand(base + ((sub, 0),), out)
            return
        out.add(())


# ---------------------------------------------------------------- schema -> grammar

class SchemaCompiler:
    def __init__(self, document):
        self.document = document
        self.g = Grammar()
        g = self.g
        # whitespace: nothing, a space, or a newline and up to MAX_INDENT spaces or tabs
        indent = g.rule([])
        for _ in range(MAX_INDENT):
            indent = g.rule([], [byte_set(0x20, 0x09), indent])
        self.ws = g.rule([], g.literal(b" "), [*g.literal(b"\n"), indent])
        self.colon = g.rule(g.literal(b":"), g.literal(b": "))  # a key's colon, and one space after it or none
        cont = self.cont = byte_set((0x80, 0xBF))
        utf8 = g.rule(*[[byte_set(lead), byte_set(second), *[cont] * more] for lead, second, more in UTF8_FORMS])
        hex_digit = byte_set((0x30, 0x39), (0x41, 0x46), (0x61, 0x66))
        # \uXXXX of one character, as a reader counts them (minLength, maxLength): a UTF-16 surrogate
        # pair is one, so a high surrogate comes only with its low one (alone a low one is one more)
        d, high, low = byte_set(*b"dD"), byte_set(*b"89abAB"), byte_set(*b"cdefCDEF")
        not_high = g.rule([byte_set((0x30, 0x39), (0x41, 0x43), (0x45, 0x46), (0x61, 0x63), (0x65, 0x66)),
                           hex_digit, hex_digit, hex_digit],
                          [d, byte_set((0x30, 0x37), *b"cdefCDEF"), hex_digit, hex_digit])
        pair = [d, high, hex_digit, hex_digit, *g.literal(b"\\u"), d, low, hex_digit, hex_digit]
        escape = g.rule([byte_set(*b'"\\/bfnrt')], [*g.literal(b"u"), not_high], [*g.literal(b"u"), *pair])
        self.char = g.rule([byte_set(*PLAIN_BYTES)], [*g.literal(b"\\"), escape], [utf8])
        self.plain_char = g.rule([byte_set(*PLAIN_BYTES)], [utf8])  # (a free key's: no escapes)
        digit, digits = byte_set((0x30, 0x39)), g.new()
        g.define(digits, [], [digit, digits])
        integer = g.rule(g.literal(b"0"), [byte_set((0x31, 0x39)), digits])
        sign = g.rule([], g.literal(b"-"))
        self.integer = g.rule([sign, integer])
        fraction = g.rule([], [*g.literal(b"."), digit, digits])
        exponent = g.rule([], [byte_set(*b"eE"), g.rule([], [byte_set(*b"+-")]), digit, digits])
        self.number = g.rule([sign, integer, fraction, exponent])
        self.value = g.new()  # any JSON value (defined below: it is recursive)
        self.string = self.bounded_string(0, None)
        g.define(self.value, [self.free_object(self.value)], [self.array([], self.value, 0, None)], [self.string],
                 [self.number], g.literal(b"true"), g.literal(b"false"), g.literal(b"null"))

    # ------------------------------------------------------------ pieces
    def bounded_string(self, low: int, high: int | None) -> int:
        """'"' then low to high characters (None: any number) then '"'."""
        g = self.g
        if high is None:
            rest = g.new()
            g.define(rest, [], [self.char, rest])
        else:
            rest = g.rule([])
            for _ in range(high - low):
                rest = g.rule([], [self.char, rest])
        return g.rule([*g.literal(b'"'), *[self.char] * low, rest, *g.literal(b'"')])

    def key_except(self, names) -> int:
        """'"', characters without escapes, '"': any key but `names` (a free key beside listed
        properties: were it one of them, the object would hold that key twice). A trie of the
        names' bytes: a key may end where no name does, and leaves the trie at any other byte
        that may come there (then finishes its character and goes on freely)."""
        g = self.g
        rest = g.new()  # the key's other characters, then its quote
        g.define(rest, g.literal(b'"'), [self.plain_char, rest])
        trie: dict = {}
        for name in names:  # (a name that needs an escape cannot be written without one)
            if json.dumps(name, ensure_ascii=False)[1:-1] == name:
                node = trie
                for byte in name.encode():
                    node = node.setdefault(byte, {})
                node[None] = True  # a name ends here

        def after(byte: int, need: int) -> tuple[int, int, int]:
            """(continuation bytes still to come, the next one's range) after this byte."""
            if need:
                return need - 1, 0x80, 0xBF
            return (0, 0, 0) if byte < 0x80 else utf8_lead(byte)

        def rule(node: dict, need: int, low: int, high: int) -> int:
            """The key from a trie node on; need: continuation bytes of the character still to come,
            the next one in [low, high]."""
            alternatives = [] if need or None in node else [g.literal(b'"')]
            for byte, child in node.items():
                if byte is not None:
                    alternatives.append([byte_set(byte), rule(child, *after(byte, need))])
            # off the trie at any other byte: it finishes its character, then any characters (the
            # bytes with the same rest of a character in one alternative)
            leaving: dict[tuple, list[int]] = {}
            for byte in sorted(set(range(low, high + 1) if need else LEADING_BYTES) - set(node)):
                leaving.setdefault(after(byte, need), []).append(byte)
            for (more, next_low, next_high), bytes_ in leaving.items():
                alternatives.append([byte_set(*bytes_), *([byte_set((next_low, next_high))] if more else []),
                                     *[self.cont] * max(more - 1, 0), rest])
            return g.rule(*alternatives)

        return g.rule([*g.literal(b'"'), rule(trie, 0, 0, 0)])

    def free_object(self, values: int) -> int:
        """{ "key": value, ... } with any keys (each value of rule `values`)."""
        g = self.g
        member, more = g.rule([self.string, self.colon, values]), g.new()
        g.define(more, [], [*g.literal(b","), self.ws, member, more])
        return g.rule([*g.literal(b"{"), self.ws, *g.literal(b"}")],
                      [*g.literal(b"{"), self.ws, member, more, self.ws, *g.literal(b"}")])

    def array(self, prefix: list[int], items: int | None, low: int, high: int | None) -> int:
        """[ prefix[0], prefix[1], ..., then items (None: no more) ], low to high elements (None: any)."""
        g = self.g
        if items is None:
            high = len(prefix) if high is None else min(high, len(prefix))
        if high is not None and high < low:
            raise ValueError(f"minItems {low} is more than the {high} elements the array can have")
        unrolled = max(low, len(prefix)) if high is None else high
        if unrolled > MAX_UNROLL:
            raise ValueError(f"an array bound of {unrolled} elements is more than {MAX_UNROLL}")

        def element(k: int) -> int:
            return prefix[k] if k < len(prefix) else items

        # after[k]: k >= 1 elements written; a "]" may come once k >= low, another element while k < high
        close = [self.ws, *g.literal(b"]")]
        if high is None:  # past the unrolled ones, any number more: one looping rule
            after = g.new()
            g.define(after, close, [*g.literal(b","), self.ws, items, after])
        else:
            after = g.rule(close)
        for k in range(unrolled - 1, 0, -1):
            after = g.rule(*([close] if k >= low else []), [*g.literal(b","), self.ws, element(k), after])
        options = [[*g.literal(b"["), self.ws, *g.literal(b"]")]] if low == 0 else []
        if high is None or high > 0:
            options.append([*g.literal(b"["), self.ws, element(0), after])
        return g.rule(*options)

    def literal_value(self, value) -> list:
        return self.g.literal(json.dumps(value, ensure_ascii=False).encode())

    # ------------------------------------------------------------ schemas
    def compile(self, schema, where: str = "#", depth: int = 0) -> int:
        g = self.g
        if depth > MAX_NESTING:
            raise ValueError(f"schemas nested deeper than {MAX_NESTING}")
        if schema is True or schema == {}:
            return self.value
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: a schema must be an object or true, not {json.dumps(schema)[:40]}")
        unknown = sorted(set(schema) - KEYWORDS - ANNOTATIONS)
        if unknown:
            raise ValueError(f"{where}: the schema keyword '{unknown[0]}' is not supported (a reply cannot be held "
                             "to it here); remove it")
        if "$ref" in schema:
            beside = sorted(set(schema) - ANNOTATIONS - {"$ref"})
            if beside:
                raise ValueError(f"{where}: '{beside[0]}' beside $ref is not supported; move it into the referenced "
                                 "schema")
            return self.reference(schema["$ref"], where, depth)
        if "const" in schema or "enum" in schema:
            return g.rule(*[self.literal_value(v) for v in self.values(schema, where)])
        for key in ("anyOf", "oneOf", "allOf"):
            if key in schema:
                branches = schema[key]
                if not isinstance(branches, list) or not branches or key == "allOf" and len(branches) != 1:
                    raise ValueError(f"{where}/{key}: must be a non-empty array" +
                                     (" of one schema (allOf of several is not supported)" if key == "allOf" else ""))
                beside = {k: v for k, v in schema.items() if k != key and k not in ANNOTATIONS}
                return g.rule(*[[self.compile(self.merged(beside, b, f"{where}/{key}/{i}"), f"{where}/{key}/{i}",
                                              depth + 1)] for i, b in enumerate(branches)])
        kind = schema.get("type")
        if kind is None:  # what its keywords imply, or any value
            kind = "object" if "properties" in schema or "additionalProperties" in schema else \
                "array" if "items" in schema or "prefixItems" in schema else None
            if kind is None:
                return self.value
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or any(k not in TYPES for k in kinds):
            raise ValueError(f"{where}/type: {json.dumps(kind)[:60]} is not one of {', '.join(TYPES)}")
        return g.rule(*[[self.typed(k, schema, where, depth)] for k in kinds])

    @staticmethod
    def values(schema: dict, where: str) -> list:
        """An enum's or a const's values, those of its type where it gives one (a value of another
        type could not pass the schema)."""
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}/enum: must be a non-empty array")
        beside = sorted(set(schema) - ANNOTATIONS - {"const", "enum", "type"})
        if beside:
            raise ValueError(f"{where}: '{beside[0]}' beside an enum or const is not supported")
        if "enum" in schema and "const" in schema:
            values = [v for v in values if v in schema["enum"]]
        if "type" in schema:
            kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            values = [v for v in values if json_types(v) & set(kinds)]
        if not values:
            raise ValueError(f"{where}: no value of its enum or const can pass its type")
        return values

    @staticmethod
    def merged(beside: dict, branch, where: str):
        """An anyOf/oneOf/allOf branch with the keywords beside the combinator (both must hold)."""
        if branch is True or not beside:
            return beside or branch
        if not isinstance(branch, dict):
            return branch  # (compile refuses it)
        clash = sorted(k for k in beside if k in branch and branch[k] != beside[k])
        if clash:
            raise ValueError(f"{where}: its '{clash[0]}' differs from the one beside it, which is not supported")
        return {**beside, **branch}

    def reference(self, ref, where: str, depth: int) -> int:
        """The rule of a $ref, resolved in the document being compiled (built once per document)."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise ValueError(f"{where}/$ref: only references into this schema (#/...) are supported")
        target = self.document
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"{where}/$ref: {ref[:80]} points at nothing in the schema")
            target = target[part]
        return self.g.shared(("ref", id(self.document), ref),
                             lambda rule: self.g.define(rule, [self.compile(target, ref, depth + 1)]))

    def typed(self, kind: str, schema: dict, where: str, depth: int) -> int:
        g = self.g
        if kind == "string":
            low, high = self.bound(schema, "minLength", where, 0), self.bound(schema, "maxLength", where, None)
            if low == 0 and high is None:
                return self.string
            if high is not None and high < low or max(low, high or 0) > MAX_UNROLL:
                raise ValueError(f"{where}: string lengths {low}..{high} are not supported (at most {MAX_UNROLL})")
            return self.bounded_string(low, high)
        if kind in ("number", "integer"):
            return self.number if kind == "number" else self.integer
        if kind == "boolean":
            return g.rule(g.literal(b"true"), g.literal(b"false"))
        if kind == "null":
            return g.rule(g.literal(b"null"))
        if kind == "array":
            prefix = schema.get("prefixItems", [])
            if not isinstance(prefix, list):
                raise ValueError(f"{where}/prefixItems: must be an array of schemas")
            prefix_rules = [self.compile(s, f"{where}/prefixItems/{i}", depth + 1) for i, s in enumerate(prefix)]
            items = schema.get("items", True)
            item_rule = None if items is False else self.compile(items, f"{where}/items", depth + 1)
            low, high = self.bound(schema, "minItems", where, 0), self.bound(schema, "maxItems", where, None)
            return self.array(prefix_rules, item_rule, low, high)
        return self.object(schema, where, depth)

    def object(self, schema: dict, where: str, depth: int) -> int:
        g = self.g
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise ValueError(f"{where}: properties must be an object and required an array")
        missing = [name for name in required if name not in properties]
        if missing:
            raise ValueError(f"{where}/required: {str(missing[0])[:60]!r} is not among its properties")
        extra = schema.get("additionalProperties", not properties)
        extra_rule = None if extra is False else self.compile(extra, f"{where}/additionalProperties", depth + 1)
        members = [(g.rule([*self.literal_value(str(name)), self.colon,
                            self.compile(sub, f"{where}/properties/{name}", depth + 1)]),
                    name in required) for name, sub in properties.items()]
        free = None
        if extra_rule is not None:
            key = self.key_except(list(properties)) if properties else self.string
            free = g.rule([key, self.colon, extra_rule])
        # later[k]: at least one member written, properties k.. still to come (then free ones)
        later = g.new()
        if free is None:
            g.define(later, [])
        else:
            g.define(later, [], [*g.literal(b","), self.ws, free, later])
        # first[k]: nothing written yet, properties k.. still to come
        first = g.rule([]) if free is None else g.rule([], [free, later])
        for member, needed in reversed(members):
            later_k = g.rule([*g.literal(b","), self.ws, member, later], *([] if needed else [[later]]))
            first = g.rule([member, later], *([] if needed else [[first]]))
            later = later_k
        return g.rule([*g.literal(b"{"), self.ws, first, self.ws, *g.literal(b"}")])

    @staticmethod
    def bound(schema: dict, key: str, where: str, default):
        value = schema.get(key, default)
        if value is not default and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{where}/{key}: must be a non-negative integer")
        return value


NO_ARGUMENTS = {"type": "object", "additionalProperties": False}  # a function without parameters: {}


def json_types(value) -> set[str]:
    """The JSON Schema types a value has (an integral number is an integer and a number)."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, (int, float)):
        return {"number", "integer"} if float(value).is_integer() else {"number"}
    return {str: {"string"}, list: {"array"}, dict: {"object"}}.get(type(value), set())


def schema_grammar(schema) -> tuple[Grammar, int]:
    """(the grammar, its root rule) of replies valid under the schema; UserError, one line naming
    the keyword and its place, for a schema outside the subset above."""
    try:
        compiler = SchemaCompiler(schema)
        return compiler.g, compiler.compile(schema)
    except (ValueError, RecursionError) as e:
        reason = "it nests too deeply" if isinstance(e, RecursionError) else str(e)
        raise UserError(f"the JSON schema cannot hold a reply: {reason}") from None


def tool_calls_grammar(functions: dict[str, dict], parallel: bool = True) -> tuple[Grammar, int]:
    """(grammar, root) of a reply that calls tools (tool_choice "required"): a JSON array of one or
    more {"name": one of functions, "arguments": what its parameters schema allows}, or (not
    parallel) one such object. functions: name -> parameters schema (NO_ARGUMENTS for a function
    without); each schema's $refs resolve in that schema. UserError names the function whose
    schema is outside the subset."""
    compiler = SchemaCompiler(None)
    g, calls = compiler.g, []
    for name, parameters in functions.items():
        compiler.document = parameters
        try:
            arguments = compiler.compile(parameters)
        except (ValueError, RecursionError) as e:
            reason = "it nests too deeply" if isinstance(e, RecursionError) else str(e)
            raise UserError(f"the parameters of tool {name!r} cannot hold a call: {reason}") from None
        calls.append([g.rule([*g.literal(b'{"name": '), *compiler.literal_value(name),
                              *g.literal(b', "arguments": '), arguments, *g.literal(b"}")])])
    call = g.rule(*calls)
    return g, compiler.array([], call, 1, None) if parallel else call
