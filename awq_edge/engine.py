"""The runtime: load an engine directory, generate and stream text, multi-turn chat. No torch.

    from awq_edge import Engine
    engine = Engine.load("smollm2.engine", max_memory="1GiB")
    print(engine.generate("Name three colors.", temperature=0))
    chat = engine.chat()
    for piece in chat.stream("Hi!"):
        print(piece, end="")

One engine holds one KV cache (batch 1), allocated once by the backend for the planned
context. The engine remembers which token ids the cache holds (`cached_ids`), so a new
prompt that starts with them (the next chat turn, or the same system prompt) only feeds
the tokens after the common prefix; everything else is rewound.

Backends (same interface: forward(ids) -> logits of the last id, rewind(position),
position, max_context, vocab_size, kv_bytes()): awq_edge.backend_ort.OrtBackend for the
CPU, awq_edge.cuda_backend.CudaBackend and awq_edge.trt_backend.TrtBackend for GPU engines
(imported only when needed). A backend with `run_ahead` set also has sample_and_feed: the
token and the logits after feeding it, the feeding step queued before the token is read back
(docs/cuda.md, "Decode runs ahead").
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .engine_dir import ExportInfo, check_files, read_decoder_info, read_export_info, read_manifest
from .errors import UserError
from .json_reply import JsonReply, reply_constraint
from .memory import PREFILL_CHUNK, MemoryPlan, format_size, parse_size, peak_rss_bytes, plan_memory
from .sampling import (DeviceLogits, Sampler, SamplingSettings, adjusted_logits, sampling_with_defaults,
                       token_logprobs)
from .tokenizer import StreamDecoder, Tokenizer, check_template_kwargs


# ---------------------------------------------------------------- the memory plan and the backend

def _native_kernels_fast() -> bool:
    """Whether the native CPU step has a SIMD GEMV here (True when that cannot be known: no
    compiler; the backend then says why native decode is off)."""
    from . import cpu_native

    try:
        return cpu_native.has_simd_kernel()
    except Exception:  # noqa: BLE001 - no compiler, a failed build: OrtBackend reports it
        return True


def engine_plan(manifest: dict, info, max_memory=None, max_context: int | None = None,
                at_load: bool = True, native_decode: bool = False) -> MemoryPlan:
    """The memory plan from checked facts: info is engine_dir's ExportInfo (ONNX engines) or
    DecoderInfo (native engines); both give weight_bytes, kv_bytes_per_token,
    max_position_embeddings and workspace(context).

    The cap: --max-memory, else the smaller of the cap the engine was built with and this
    machine's default for the device (at_load; at build time, the device profile's), never
    the build host's. --max-memory above what this machine has is refused at load. The
    context: the most that fits, at most the built one unless --max-context asks for another
    (a GPU engine's built context is a hard limit: its shapes were fixed at build).
    native_decode (CPU engines): the native step reads the weights from the mapped file beside
    ONNX Runtime's own (prepacked) copy, so they count twice, and the cache through its own bf16
    copy beside ORT's float32 one (cpu_native.py), so the KV counts one and a half times."""
    from .devices import resolve

    device = resolve(manifest["device"])
    built = dict(manifest.get("memory_plan") or {})
    if device.name != manifest["device"]:  # built for a family (`orin`): its cap was the smallest variant's
        built.pop("cap", None)
    if isinstance(max_memory, str):
        max_memory = parse_size(max_memory)
    default_cap = device.default_cap_here() if at_load else device.default_memory_bytes()
    if max_memory and at_load:
        here = device.memory_here()
        if here and max_memory > here:
            raise UserError(f"--max-memory {format_size(max_memory)} is more than this machine has for "
                            f"{device.name} ({format_size(here)}); give a cap it can hold")
    positions = info.max_position_embeddings
    if built.get("context") and (max_context is None or manifest.get("backend") == "trt"):
        positions = min(positions, built["context"])
        if max_context is not None and max_context > positions:
            raise UserError(f"--max-context {max_context} is more than the {positions} tokens this GPU engine was "
                            "built for; rebuild it with a larger --max-context")
    native = native_decode and manifest.get("backend") == "ort"
    # (Qwen3.5's delta-net states, float32: an ONNX engine's read, written and kept; a cuda engine's, kept and spare)
    delta = getattr(info, "delta_net", None) or getattr(getattr(info, "spec", None), "delta", None)
    weights = info.weight_bytes * (2 if native else 1) + (3 * 4 * len(delta.layers) * delta.state_elems if delta else 0)
    kv_per_token = info.kv_bytes_per_token + (info.kv_bytes_per_token // 2 if native else 0)
    return plan_memory(weights, kv_per_token, device, max_memory=max_memory,
                       default_cap=min(c for c in (built.get("cap"), default_cap) if c),
                       max_context=max_context, max_position_embeddings=positions, workspace=info.workspace)


def open_backend(path: Path, manifest: dict, info, plan: MemoryPlan, threads: int | None = None,
                 spin: bool = True, native_decode: bool = False):
    if manifest["backend"] == "cuda":
        from .cuda_backend import CudaBackend

        return CudaBackend(path, manifest, info, max_context=plan.context)
    if manifest["backend"] == "trt":
        try:
            from .trt_backend import TrtBackend
        except ImportError as e:
            raise UserError(f"this is a TensorRT engine ({manifest['device']}) but the TensorRT backend "
                            f"cannot be imported ({e}); run it on the device it was built for") from None
        return TrtBackend(path, manifest, max_context=plan.context)
    try:
        from .backend_ort import OrtBackend
    except ImportError as e:
        raise UserError(f"the ONNX Runtime backend cannot be imported ({e}); pip install onnxruntime") from None
    return OrtBackend(path, max_context=plan.context, threads=threads, info=info, spin=spin,
                      native_decode=native_decode)


# ---------------------------------------------------------------- generation

MAX_TOP_LOGPROBS = 20  # alternatives kept per token (OpenAI's top_logprobs limit)


def check_top_logprobs(top: int) -> None:
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise UserError(f"logprobs must be 0..{MAX_TOP_LOGPROBS} (the top alternatives kept), got {top}")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0      # prompt tokens already in the KV cache (not fed again)
    new_tokens: int = 0         # tokens sampled
    ttft_s: float = 0.0         # prompt in -> first token chosen (prefill + one sampling step)
    prefill_s: float = 0.0
    decode_s: float = 0.0       # first token chosen -> last token chosen
    finish_reason: str = ""     # eos | stop | length | context_full | cancelled | interrupted

    @property
    def prefill_tok_s(self) -> float:
        fed = self.prompt_tokens - self.reused_tokens
        return fed / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s}


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _stop_holdback(text: str, stops: list[str]) -> int:
    """How many chars at the end of text could be the start of a stop string (held back while streaming)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class Engine:
    def __init__(self, path: Path, manifest: dict, export: ExportInfo, tokenizer: Tokenizer, backend,
                 plan: MemoryPlan):
        self.path = path
        self.manifest = manifest
        self.export = export
        self.tokenizer = tokenizer
        self.backend = backend
        self.plan = plan
        self.cached_ids: list[int] = []   # the ids whose K/V the backend holds, in order
        self.last_stats = GenerationStats()
        self.last_logprobs: list[tuple] = []  # (token, logprob, top alternatives): stream_ids' logprobs

    @classmethod
    def load(cls, path, max_memory=None, max_context: int | None = None, threads: int | None = None,
             verify: bool = False, spin: bool = True, native_decode: bool | None = None) -> "Engine":
        """Check the engine dir and the memory plan first, then load (the plan refuses before any big allocation).

        native_decode (CPU engines): one-token steps on our own kernels (awq_edge/cpu_native.py),
        prefill in ONNX Runtime. None (the default): on when the plan with the weights counted
        twice gives the same context, else off; True: on (its plan); False: ONNX Runtime decodes.
        Where the kernels cannot run (no C compiler, a graph they do not cover) ONNX Runtime
        decodes anyway; engine.backend.decode_path says which decodes and why."""
        path = Path(path)
        manifest = read_manifest(path)
        files = check_files(path, manifest["files"], full_hash=verify)
        if manifest["backend"] == "cuda":
            from .cuda_backend import find_gpu

            find_gpu(manifest)  # no GPU here, or another arch: one line, before anything is read
            export = read_decoder_info(path, files)
        else:
            export = read_export_info(path, files, graph=manifest["backend"] == "ort")
        native = bool(native_decode) and manifest["backend"] == "ort"
        plan = engine_plan(manifest, export, max_memory, max_context, native_decode=native)
        declined = None
        if native_decode is None and manifest["backend"] == "ort":
            try:
                doubled = engine_plan(manifest, export, max_memory, max_context, native_decode=True)
                native = doubled.context == plan.context
            except UserError:  # the second copy does not fit the cap at all
                native = False
            if not native:
                declined = "onnxruntime (native decode off: its second copy of the weights would shrink the context)"
            elif not _native_kernels_fast():
                native = False
                declined = ("onnxruntime (native decode off: no SIMD kernel for this CPU, and plain C is slower than "
                            "ONNX Runtime; --native-decode forces it)")
            else:
                plan = doubled
        tokenizer = Tokenizer(path, export.config, files)
        backend = open_backend(path, manifest, export, plan, threads, spin, native)
        if declined:
            backend.decode_path = declined
        return cls(path, manifest, export, tokenizer, backend, plan)

    @property
    def context(self) -> int:
        return self.backend.max_context

    @property
    def position(self) -> int:
        return self.backend.position

    def reset(self) -> None:
        self.backend.rewind(0)
        self.cached_ids = []

    def rewind(self, position: int) -> None:
        """Keep the first `position` cached tokens and drop the rest (the server keeps only the
        part of the cache that a fresh prefill would compute the same: docs/server.md), or fewer:
        a model with delta nets keeps its last prefill's end at most (backend.position says)."""
        self.backend.rewind(position)  # (a backend with Qwen3.5's states may keep less: backend_ort.py)
        del self.cached_ids[self.backend.position:]

    def chat(self, system: str | None = None, template_kwargs: dict | None = None) -> "Chat":
        return Chat(self, system, template_kwargs)

    # ------------------------------------------------------------ prompts
    def prompt_ids(self, prompt, system: str | None = None, chat_template: bool = True,
                   template_kwargs: dict | None = None) -> list[int]:
        """A string (wrapped as one user message when the model has a chat template) or a list of messages.
        template_kwargs: more variables for the chat template, e.g. {"enable_thinking": False} (Qwen3)."""
        if isinstance(prompt, (list, tuple)):
            return self.tokenizer.encode(self.tokenizer.render_chat(list(prompt), template_kwargs=template_kwargs))
        if not isinstance(prompt, str):
            raise UserError(f"prompt must be a string or a list of messages, not {type(prompt).__name__}")
        if chat_template and self.tokenizer.chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return self.tokenizer.encode(self.tokenizer.render_chat(messages, template_kwargs=template_kwargs))
        return self.tokenizer.encode((system + "\n" if system else "") + prompt, add_special_tokens=True)

    # ------------------------------------------------------------ generation
    def sampling(self, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, logit_bias: dict | None = None) -> SamplingSettings:
        """The settings a generation uses: what is given, else what the model's generation_config.json
        recommends (with do_sample), else temperature 0.7, top_k 50, top_p 0.95, repetition penalty 1.
        presence_penalty, frequency_penalty, logit_bias: OpenAI's (sampling.adjusted_logits), off by default."""
        return sampling_with_defaults(self.tokenizer.sampling, seed, temperature=temperature, top_k=top_k,
                                      top_p=top_p, repetition_penalty=repetition_penalty,
                                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                      logit_bias=logit_bias)

    def generate(self, prompt, max_new_tokens: int = 256, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, system: str | None = None,
                 chat_template: bool = True, cancel: Callable[[], bool] | None = None,
                 template_kwargs: dict | None = None, json_object: bool = False, json_schema=None,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logit_bias: dict | None = None) -> str:
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                   seed, stop, system, chat_template, cancel, template_kwargs, json_object,
                                   json_schema, presence_penalty, frequency_penalty, logit_bias))

    def stream(self, prompt, max_new_tokens: int = 256, temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
               stop: str | Sequence[str] | None = None, system: str | None = None,
               chat_template: bool = True, cancel: Callable[[], bool] | None = None,
               template_kwargs: dict | None = None, json_object: bool = False,
               json_schema=None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               logit_bias: dict | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are chosen. Bad values fail here, before the first piece.
        Sampling settings left None are the model's or ours (Engine.sampling); template_kwargs as
        in prompt_ids. presence_penalty, frequency_penalty (each in [-2, 2]) and logit_bias ({token
        id: bias in [-100, 100]}) are OpenAI's: sampling.adjusted_logits.

        cancel: called once per token (from the generating thread); when it returns True the
        reply ends there with finish_reason "cancelled". Pass `event.is_set` of a
        threading.Event to stop a generation from another thread.

        json_object: the reply is one JSON object (awq_edge/json_reply.py); it ends where the
        object closes (finish_reason "stop"), or unfinished at max_new_tokens ("length").
        json_schema: a JSON Schema (a dict) the reply is held to (awq_edge/json_schema.py: the
        subset taken; another is refused here, in one line); it ends where a whole value is."""
        sampler = Sampler(self.sampling(temperature, top_k, top_p, repetition_penalty, seed, presence_penalty,
                                        frequency_penalty, logit_bias))
        ids = self.prompt_ids(prompt, system, chat_template, template_kwargs)
        return self.stream_ids(ids, sampler, max_new_tokens, stop, cancel=cancel, json_object=json_object,
                               json_schema=json_schema)

    def stream_ids(self, ids: list[int], sampler: Sampler, max_new_tokens: int,
                   stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
                   reuse_cache: bool = False, cancel: Callable[[], bool] | None = None,
                   json_object: bool = False, json_schema=None, logprobs: int | None = None) -> Iterator[str]:
        """The prompt as token ids; ignore_eos keeps going past EOS (benchmarks); cancel,
        json_object and json_schema as in stream(). logprobs: keep each chosen token's log
        probability and the top `logprobs` alternatives' in last_logprobs (a list of (token,
        logprob, [(id, logprob), ...]) that grows as tokens are chosen; the end-of-sequence token
        is not in it), from the model's raw logits (sampling.token_logprobs).

        reuse_cache: keep the cached tokens the prompt starts with (Chat does). Off for one-shot
        prompts: the same prompt then always gives the same text, because a prompt that is half
        in the cache is computed in different chunks, and ORT's int8-compute MatMulNBits gives
        slightly different logits for a 1-token step than for a many-token step."""
        if max_new_tokens < 0:
            raise UserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
        if not ids:
            raise UserError("the prompt is empty")
        if len(ids) >= self.context:
            raise UserError(f"the prompt is {len(ids)} tokens but the context holds {self.context} "
                            "(one more is needed for the reply); shorten it or raise --max-context/--max-memory")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        if logprobs is not None:
            check_top_logprobs(logprobs)
        past = next((t for t in sampler.settings.logit_bias if t >= self.backend.vocab_size), None)
        if past is not None:
            raise UserError(f"logit_bias names token {past}, past the vocabulary ({self.backend.vocab_size} tokens)")
        eos_ids = set() if ignore_eos else self.tokenizer.eos_ids
        constraint = reply_constraint(self.tokenizer.token_bytes(), eos_ids, json_object, json_schema) \
            if json_object or json_schema is not None else None  # (a bad schema fails here, the cache kept)
        if not reuse_cache:
            self.reset()
        return self._run(list(ids), sampler, max_new_tokens, stops, eos_ids, cancel, constraint, logprobs)

    def prompt_logprobs(self, ids: list[int], top: int, cancel: Callable[[], bool] | None = None) -> list[tuple]:
        """Each prompt token's (token, log probability given the tokens before it, the top `top`
        alternatives), as last_logprobs has them; the first token's is (token, None, None). The
        graphs return the last row's logits only, so the prompt is fed a token at a time from an
        empty cache (a decode step each), which is emptied again after. None when cancelled."""
        if not ids or len(ids) > self.context:
            raise UserError(f"the prompt is {len(ids)} tokens; the context holds {self.context}")
        check_top_logprobs(top)
        self.reset()
        entries = [(ids[0], None, None)]
        try:
            for token, after in zip(ids, ids[1:]):
                if cancel is not None and cancel():
                    return None
                entries.append((after, *token_logprobs(self._forward([token]), after, top)))
        finally:
            self.reset()
        return entries

    def _forward(self, ids: Sequence[int]):
        logits = self.backend.forward(ids)
        self.cached_ids.extend(int(i) for i in ids)  # only after the backend took them
        return logits

    def _prefill(self, ids: list[int]):
        """Feed what the cache lacks of ids (chunked), return the logits after the last one."""
        if len(self.cached_ids) != self.backend.position:  # out of step (e.g. interrupted): start over
            self.cached_ids = []
        keep = min(_common_prefix(self.cached_ids, ids), len(ids) - 1)  # feed >= 1 id to get logits
        self.backend.rewind(keep)
        keep = self.backend.position  # (what it kept: less, where its states cannot go back there)
        del self.cached_ids[keep:]
        logits = None
        for start in range(keep, len(ids), PREFILL_CHUNK):
            logits = self._forward(ids[start:start + PREFILL_CHUNK])
        return logits, keep

    def _sample(self, sampler: Sampler, logits, seen: list[int], prompt_length: int, feed: bool,
                constraint: JsonReply | None = None):
        """(the next token, None), or where the backend runs decode ahead (the cuda backend) and
        feed is asked: (the token, the logits after feeding it), the step that feeds it queued on
        the GPU before the token is read back, so it runs while the host handles this token.
        Under a constraint (JSON mode) the host chooses, from logits copied off the GPU; with
        OpenAI's adjustments (logit_bias, presence or frequency penalty) too, from the adjusted ones.
        seen: the prompt's tokens (the first prompt_length), then those chosen so far."""
        if sampler.settings.adjusts_logits:
            logits = adjusted_logits(logits, sampler.settings, seen[prompt_length:])
        if constraint is not None:
            return constraint.choose(logits, sampler.settings, seen, sampler.draw()), None
        if feed and getattr(self.backend, "run_ahead", False) and isinstance(logits, DeviceLogits):
            token, fed_logits = self.backend.sample_and_feed(logits.ptr, sampler.settings, seen, sampler.draw())
            self.cached_ids.append(token)
            return token, fed_logits
        return sampler(logits, seen), None

    def _unfeed(self, fed_logits) -> None:
        """Take back the step that fed the last token (it ended the reply: it is not kept)."""
        if fed_logits is not None:
            self.rewind(self.backend.position - 1)

    def _run(self, ids: list[int], sampler: Sampler, max_new_tokens: int, stops: list[str],
             eos_ids: set[int], cancel: Callable[[], bool] | None = None,
             constraint: JsonReply | None = None, logprobs: int | None = None) -> Iterator[str]:
        stats = GenerationStats(prompt_tokens=len(ids), finish_reason="interrupted")
        self.last_stats, self.last_logprobs = stats, []
        decoder = StreamDecoder(self.tokenizer)
        held = ""  # decoded text not yet yielded because it may be the start of a stop string
        t0 = time.perf_counter()
        logits, stats.reused_tokens = self._prefill(ids)
        stats.prefill_s = time.perf_counter() - t0
        seen = list(ids)
        t_first = None
        reason = "length"
        for step in range(max_new_tokens):
            if cancel is not None and cancel():
                reason = "cancelled"
                break
            # (the host needs each step's logits for a constraint or logprobs: no decode run ahead then)
            feed = step < max_new_tokens - 1 and self.backend.position < self.context and logprobs is None
            token, fed_logits = self._sample(sampler, logits, seen, len(ids), feed, constraint)
            if logprobs is not None and token not in eos_ids:
                self.last_logprobs.append((token, *token_logprobs(logits, token, logprobs)))
            stats.new_tokens += 1
            if t_first is None:
                t_first = time.perf_counter()
                stats.ttft_s = t_first - t0
            else:  # from the first token to this one: new_tokens - 1 steps (run ahead or not)
                stats.decode_s = time.perf_counter() - t_first
            if token in eos_ids:
                reason = "eos"
                self._unfeed(fed_logits)
                break
            seen.append(token)
            held += decoder.push(token)
            if constraint is not None:
                constraint.push(token)
            if stops:
                hit = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    held = held[:hit]
                    reason = "stop"
                    self._unfeed(fed_logits)
                    break
                cut = len(held) - _stop_holdback(held, stops)
                piece, held = held[:cut], held[cut:]
            else:
                piece, held = held, ""
            if piece:
                yield piece
            if constraint is not None and constraint.done:
                reason = "closed"  # the JSON value is whole
                break
            if step == max_new_tokens - 1:
                break  # no need to feed the last token
            if fed_logits is not None:
                logits = fed_logits
            elif self.backend.position >= self.context:
                reason = "context_full"
                break
            else:
                logits = self._forward([token])
        if reason != "stop":
            held += decoder.flush()
            hits = [i for i in (held.find(s) for s in stops) if i >= 0]
            if hits:
                held, reason = held[:min(hits)], "stop"
        stats.finish_reason = "stop" if reason == "closed" else reason
        if held:
            yield held


class Chat:
    """A multi-turn conversation on one engine. Earlier turns stay in the KV cache: each turn
    feeds only the template text after what the cache already holds."""

    def __init__(self, engine: Engine, system: str | None = None, template_kwargs: dict | None = None):
        if not engine.tokenizer.chat_template:
            raise UserError("this model has no chat template, so it cannot chat; use `awq-edge run`")
        self.engine = engine
        self.system = system
        self.template_kwargs = check_template_kwargs(template_kwargs)  # every turn's (Qwen3's enable_thinking)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self._ids: list[int] = []   # what this chat put in the engine's cache
        self._text = ""             # the text those ids encode

    @property
    def tokens(self) -> int:
        return len(self._ids)

    def send(self, content: str, **sampling) -> str:
        return "".join(self.stream(content, **sampling))

    def stream(self, content: str, max_new_tokens: int = 256, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
               seed: int | None = None, stop: str | Sequence[str] | None = None,
               cancel: Callable[[], bool] | None = None, json_object: bool = False,
               json_schema=None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               logit_bias: dict | None = None) -> Iterator[str]:
        sampler = Sampler(self.engine.sampling(temperature, top_k, top_p, repetition_penalty, seed, presence_penalty,
                                               frequency_penalty, logit_bias))
        messages = self.messages + [{"role": "user", "content": content}]
        text = self.engine.tokenizer.render_chat(messages, template_kwargs=self.template_kwargs)
        if self._text and text.startswith(self._text) and self.engine.cached_ids[:len(self._ids)] == self._ids:
            # Keep the exact ids the cache holds (the reply as sampled) and encode only the new text.
            ids = self._ids + self.engine.tokenizer.encode(text[len(self._text):])
        else:
            ids = self.engine.tokenizer.encode(text)
        if len(ids) >= self.engine.context:
            raise UserError(f"the conversation is {len(ids)} tokens and no longer fits in the context of "
                            f"{self.engine.context}; /reset (or chat.reset()) to start a new one")
        pieces = self.engine.stream_ids(ids, sampler, max_new_tokens, stop, reuse_cache=True, cancel=cancel,
                                        json_object=json_object, json_schema=json_schema)
        return self._record(messages, text, ids, pieces)

    def _record(self, messages, text, ids, pieces) -> Iterator[str]:
        reply = []
        try:
            for piece in pieces:
                reply.append(piece)
                yield piece
        finally:
            # Also after an interrupted reply: the conversation keeps what was said.
            self.messages = messages + [{"role": "assistant", "content": "".join(reply)}]
            cached = self.engine.cached_ids
            if cached[:len(ids)] == ids:
                self._ids = list(cached)
                self._text = text + self.engine.tokenizer.decode(cached[len(ids):], skip_special_tokens=False)
            else:
                self._ids, self._text = [], ""


# ---------------------------------------------------------------- benchmark

BENCH_TEXT = ("The history of computing is a story of machines that got smaller, cheaper and faster, "
              "and of people who found new things to do with them every time. ")


def bench_engine(engine: Engine, prompt_tokens: int = 128, new_tokens: int = 128, runs: int = 3) -> dict:
    """Greedy, batch 1, EOS ignored so every run decodes new_tokens. One warm-up run, then medians."""
    import statistics

    text_ids = engine.tokenizer.encode(BENCH_TEXT)
    ids = (text_ids * (prompt_tokens // len(text_ids) + 1))[:prompt_tokens]
    if prompt_tokens + new_tokens > engine.context:
        raise UserError(f"--prompt-tokens + --new-tokens = {prompt_tokens + new_tokens} is more than the context "
                        f"of {engine.context} tokens; lower them or raise --max-context")
    greedy = SamplingSettings(temperature=0.0)
    results = []
    for run in range(runs + 1):
        engine.reset()  # the whole prompt is prefilled every run
        for _ in engine.stream_ids(ids, Sampler(greedy), new_tokens, ignore_eos=True):
            pass
        if run > 0:
            results.append(engine.last_stats)
    return {
        "device": engine.manifest.get("device"),
        "backend": engine.manifest.get("backend", "ort"),
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs,
        "ttft_s": statistics.median(r.ttft_s for r in results),
        "prefill_tok_s": statistics.median(r.prefill_tok_s for r in results),
        "decode_tok_s": statistics.median(r.decode_tok_s for r in results),
        "peak_rss_bytes": peak_rss_bytes(),
        "context": engine.context,
        "plan_total_bytes": engine.plan.total, "cap_bytes": engine.plan.cap,
    }
