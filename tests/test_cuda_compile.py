"""Compile checks that need no GPU: every kernel for Orin (sm_87), RTX 40xx (sm_89) and H100 (sm_90),
the CMake build of the kernel library, and the TensorRT glue when TensorRT headers are present.

On a 2-core CI machine the kernels' compile is the suite's largest item (one nvcc call per file and
arch, two at once; the PDL contract test reads the PTX it keeps rather than compiling again), then the CMake
build (one arch, PTX only: ptxas runs in the kernels' check).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from awq_edge import plugins

CHECK = plugins.PLUGINS_DIR / "check_compile.sh"
C_ABI = {"awq_w4a16_gemv", "awq_w4a16_gemm", "awq_w4a16_matmul", "awq_w4a16_status_string", "awq_sample_token",
         "awq_w4a16_read_only", "awq_w4a16_dequantize",
         "awq_attention"}

needs_nvcc = pytest.mark.skipif(plugins.find_nvcc() is None, reason="nvcc not found: CUDA compile checks skipped")


@pytest.fixture(scope="module")
def compiled_kernels(tmp_path_factory):
    """check_compile.sh for sm_87, sm_89 and sm_90, its PTX kept: (the finished process, PTX dir)."""
    ptx = tmp_path_factory.mktemp("ptx")
    proc = subprocess.run(["bash", str(CHECK), "kernels", "87", "89", "90"], capture_output=True, text=True,
                          env={**os.environ, "NVCC": plugins.find_nvcc(), "KEEP_PTX": str(ptx)}, timeout=600)
    return proc, ptx


@needs_nvcc
def test_kernels_compile_without_warnings_or_spills_for_sm87_sm89_sm90(compiled_kernels):
    proc, _ = compiled_kernels
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for arch in ("87", "89", "90"):
        assert f"ok   sm_{arch}" in proc.stdout


@needs_nvcc
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_builds_the_kernel_library_with_the_c_abi(tmp_path):
    build = tmp_path / "build"
    env = {k: v for k, v in os.environ.items() if k != "TENSORRT_ROOT"}  # kernels only: fast and always possible
    # (PTX only, "89-virtual": the kernels' own check runs ptxas for every arch)
    subprocess.run(["cmake", "-S", str(plugins.PLUGINS_DIR), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=89-virtual",
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


@needs_nvcc
def test_every_kernel_the_cuda_backend_launches_keeps_the_programmatic_launch_contract(compiled_kernels):
    """On sm_90 the cuda backend lets each kernel start before the previous one ends
    (plugins/kernels/pdl.cuh): a kernel that skipped griddepcontrol.wait would read activations
    still being written. Every kernel entry of every cubin source, compiled to PTX for sm_90, must
    wait, and must let the next one start, write nothing before the wait, and load nothing
    before it but the tensor-core GEMVs' and the GEMM's weights, scales and zeros, and the decode
    attention's position and older keys; for sm_89 there must be neither (no such
    instruction). The persistent step, whose blocks read what others wrote in the same launch,
    loads no activation through the read-only cache."""
    import re

    from awq_edge.cuda_backend import KERNELS_OF

    proc, ptx = compiled_kernels  # (the same nvcc flags as plugins.build_cubins: -std=c++17 -O3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ptx_texts = {(arch, name): (ptx / f"sm_{arch}" / f"{name}.ptx").read_text()
                 for arch in ("90", "89") for name in plugins.CUBIN_SOURCES}
    for arch, expect in (("90", True), ("89", False)):
        for name in plugins.CUBIN_SOURCES:
            text = ptx_texts[arch, name]
            if name == "decode_step":  # one kernel for a whole step: what one block wrote, another reads in
                # it, which the read-only cache (ld.global.nc) does not see; only the table's slots
                # and the position (u64) and the norms' weights (v4.f32) may go through it
                # (activations: pdl.cuh load_activation, from L2)
                through_nc = set(re.findall(r"\bld\.global\.nc[\w.]*", text))
                assert through_nc <= {"ld.global.nc.u64", "ld.global.nc.v4.f32"}, through_nc
            entries = dict(re.findall(r"\.entry (\w+)\((.*?)\n}\n", text, re.S))
            for kernel in KERNELS_OF[name]:
                body = entries[kernel]
                has = ("griddepcontrol.wait" in body, "griddepcontrol.launch_dependents" in body)
                assert has == (expect, expect), f"{kernel} sm_{arch}: wait, launch_dependents = {has}"
                if expect:  # the wait comes before the first load of anything but the weights
                    early = body[:body.index("griddepcontrol.wait")]
                    loads = re.findall(r"\b(?:ld\.global|cp\.async)[\w.]*", early)
                    writes = re.findall(r"\b(?:st\.global|atom|red)\.[\w.]*", early)
                    assert not writes, f"{kernel}: {sorted(set(writes))} before the wait"
                    # the tensor-core GEMVs (decode's, and prefill's for 2..32 rows) load their first
                    # weights (16-byte streaming loads) and their 2-byte scales and zeros before they
                    # wait; the GEMM copies its first 3 steps'
                    # weights (16 bytes a thread a step, or 2 words of 4 when K % 32 != 0: X's copies
                    # are 16 bytes too, so the count tells them apart) and loads their scales and zeros;
                    # the decode attention loads the position and the K/V rows of the keys before it
                    # (earlier steps', finished: a decode step is one graph launch; attention.cu);
                    # every other kernel loads nothing
                    tensor_core_gemv = kernel.startswith(("awq_gemv_tc_", "awq_gemv_mma"))
                    allowed = {"ld.global.cs.v4.u32", "ld.global.nc.u16"} if tensor_core_gemv else set()
                    if kernel.startswith("awq_attend_split_"):
                        allowed = {"ld.global.nc.u64", "ld.global.nc.v4.u32"}
                    if kernel.startswith("awq_gemm_"):
                        copy = "cp.async.cg.shared.global" if kernel.endswith("_v1") else "cp.async.ca.shared.global"
                        allowed = {"ld.global.nc.b16", copy}
                        assert loads.count(copy) == (3 if kernel.endswith("_v1") else 6), (kernel, loads)
                    assert set(loads) <= allowed, f"{kernel}: {sorted(set(loads) - allowed)} before the wait"


def test_every_driver_call_declares_its_argument_types():
    """cuda_driver.Driver's methods pass device pointers and sizes as Python ints, which ctypes
    would convert to a C int (an error, or a wrong value, past 2**31) unless the function's
    argtypes say otherwise: every `self.lib.<function>(` call has them. (Only the setup in
    __init__ calls `lib.` functions without, with ctypes objects or small ints.)"""
    import re

    from awq_edge import cuda_driver

    source = Path(cuda_driver.__file__).read_text()
    called = set(re.findall(r"self\.lib\.(\w+)\(", source))
    declared = set(re.findall(r"\blib\.(\w+)\.argtypes", source))
    assert called and not called - declared, sorted(called - declared)


@needs_nvcc
def test_the_launch_structs_match_cuda_h(tmp_path):
    """cuda_driver's ctypes CUlaunchConfig and CUlaunchAttribute (cuLaunchKernelEx) against the
    sizes and offsets the C compiler gives cuda.h's, and the attribute id."""
    import ctypes

    from awq_edge.cuda_driver import CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION as ID
    from awq_edge.cuda_driver import LaunchAttribute, LaunchConfig

    include = plugins.cuda_include_dir()
    if include is None or shutil.which("g++") is None:
        pytest.skip("needs g++ and cuda.h")
    fields = {"CUlaunchConfig": [f for f, _ in LaunchConfig._fields_],
              "CUlaunchAttribute": [f for f, _ in LaunchAttribute._fields_]}
    src = tmp_path / "layout.cpp"
    lines = ['#include <cstddef>', '#include <cstdio>', '#include <cuda.h>', 'int main() {',
             'printf("%d\\n", (int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION);']
    for struct, names in fields.items():
        lines.append(f'printf("%zu\\n", sizeof({struct}));')
        lines += [f'printf("%zu\\n", offsetof({struct}, {n}));' for n in names]
    src.write_text("\n".join(lines + ["}"]) + "\n")
    subprocess.run(["g++", "-I", str(include), "-o", str(tmp_path / "layout"), str(src)], check=True, timeout=120)
    got = [int(v) for v in subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True).stdout.split()]
    want = [ID]
    for cls in (LaunchConfig, LaunchAttribute):
        want += [ctypes.sizeof(cls)] + [getattr(cls, n).offset for n, _ in cls._fields_]
    assert got == want
