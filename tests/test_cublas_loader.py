"""Where the cuda backend looks for cuBLAS (awq_edge/cublas.py), without a GPU: the toolkit and
the installed nvidia wheels, never the working directory; a machine without it, or
AWQ_EDGE_CUBLAS=0, gets a reason (prefill then runs awq-edge's own GEMM)."""
from __future__ import annotations

from pathlib import Path

import pytest

from awq_edge import cublas


def fake_library(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an ELF file")
    return path


def test_the_wheels_and_the_toolkit_are_searched_but_not_the_working_directory(tmp_path, monkeypatch):
    wheel = fake_library(tmp_path / "site" / "nvidia" / "cu13" / "lib" / "libcublas.so.13")
    toolkit = fake_library(tmp_path / "cuda" / "lib64" / "libcublas.so.12")
    planted = fake_library(tmp_path / "work" / "nvidia" / "cublas" / "lib" / "libcublas.so.12")
    monkeypatch.setattr(cublas.site, "getsitepackages", lambda: [str(tmp_path / "site")])
    monkeypatch.setattr(cublas.site, "getusersitepackages", lambda: str(tmp_path / "user"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.syspath_prepend("")  # as `python -m` puts the working directory first
    found = cublas.library_candidates()
    assert str(wheel) in found and str(toolkit) in found
    paths = [Path(name) for name in found if "/" in name]  # (bare names: the loader's own search)
    assert all(p.is_absolute() and not p.resolve().is_relative_to(planted.parents[3]) for p in paths), found


def test_no_cublas_or_turned_off_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(cublas, "library_candidates",
                        lambda: [str(fake_library(tmp_path / "libcublas.so.13")), "libcublas-that-is-not-here.so"])
    with pytest.raises(cublas.CublasUnavailable, match="libcublas not found"):
        cublas.load_cublas(None, 0, 0)
    monkeypatch.setenv("AWQ_EDGE_CUBLAS", "0")
    with pytest.raises(cublas.CublasUnavailable, match="AWQ_EDGE_CUBLAS=0"):
        cublas.load_cublas(None, 0, 0)
