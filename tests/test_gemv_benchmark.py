"""benchmarks/gemv.py without a GPU: one line on stderr and a non-zero exit, no results file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from awq_edge.cuda_runtime import find_gpus

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gemv.py"


@pytest.mark.skipif(bool(find_gpus()), reason="this machine has a GPU: run the benchmark itself")
def test_gemv_benchmark_without_gpu_exits_with_one_line(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no NVIDIA GPU found" in proc.stderr
    assert not out.exists()
