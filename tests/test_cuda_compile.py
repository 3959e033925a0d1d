"""Compile checks that need no GPU: every kernel for Orin (sm_87), RTX 40xx (sm_89) and H100 (sm_90),
the CMake build of the kernel library, and the TensorRT glue when TensorRT headers are present.

Budget on a 2-core CI machine: ~30 s for the kernels (one nvcc call per arch, two in parallel),
~15 s for the CMake build (one arch).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from awq_edge import plugins

CHECK = plugins.PLUGINS_DIR / "check_compile.sh"
C_ABI = {"awq_w4a16_gemv", "awq_w4a16_gemm", "awq_w4a16_matmul", "awq_w4a16_status_string", "awq_sample_token",
         "awq_attention"}

needs_nvcc = pytest.mark.skipif(plugins.find_nvcc() is None, reason="nvcc not found: CUDA compile checks skipped")


@needs_nvcc
def test_kernels_compile_without_warnings_or_spills_for_sm87_sm89_sm90():
    proc = subprocess.run(["bash", str(CHECK), "kernels", "87", "89", "90"], capture_output=True, text=True,
                          env={**os.environ, "NVCC": plugins.find_nvcc()}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for arch in ("87", "89", "90"):
        assert f"ok   sm_{arch}" in proc.stdout


@needs_nvcc
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_builds_the_kernel_library_with_the_c_abi(tmp_path):
    build = tmp_path / "build"
    env = {k: v for k, v in os.environ.items() if k != "TENSORRT_ROOT"}  # kernels only: fast and always possible
    subprocess.run(["cmake", "-S", str(plugins.PLUGINS_DIR), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=89",
                    f"-DCMAKE_CUDA_COMPILER={plugins.find_nvcc()}"],
                   check=True, capture_output=True, env=env, timeout=300)
    subprocess.run(["cmake", "--build", str(build), "--target", "awq_edge_w4a16", "-j", "2"],
                   check=True, capture_output=True, timeout=600)
    library = build / plugins.KERNEL_LIBRARY
    assert library.is_file()
    if shutil.which("nm"):
        symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
        exported = {line.split()[-1] for line in symbols.splitlines() if line.strip()}
        assert C_ABI <= exported, f"missing exports: {C_ABI - exported}"


def test_trt_plugin_compiles_against_tensorrt_headers():
    include = plugins.tensorrt_include_dir()
    if include is None:
        pytest.skip("TensorRT headers not found (set TENSORRT_ROOT to a dir with include/NvInferRuntime.h): "
                    "TensorRT plugin compile check skipped")
    if shutil.which("g++") is None or plugins.cuda_include_dir() is None:
        pytest.skip("needs g++ and the CUDA headers for the TensorRT plugin compile check")
    proc = subprocess.run(["bash", str(CHECK), "trt"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TENSORRT_ROOT": str(include.parent),
                               "CUDA_HOME": str(plugins.cuda_include_dir().parent)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   trt" in proc.stdout, proc.stdout
