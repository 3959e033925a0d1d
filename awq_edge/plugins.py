"""Building the CUDA kernels and the TensorRT plugin library from plugins/ (no torch, no GPU needed to build).

Builds are cached by a hash of the plugin sources:
    <cache_dir>/plugins/<source hash>/sm_XX/libawq_edge_trt_plugins.so   (cmake, needs TensorRT headers)
    <cache_dir>/plugins/<source hash>/sm_XX/libawq_edge_w4a16.so         (nvcc only, for tests/benchmarks)
A changed source gives a new hash, hence a fresh build; an engine's manifest records the hash
of the plugin library it was built with.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import UserError

PLUGINS_DIR = Path(__file__).resolve().parent.parent / "plugins"
KERNEL_LIBRARY = "libawq_edge_w4a16.so"
TRT_PLUGIN_LIBRARY = "libawq_edge_trt_plugins.so"
# JetPack and the Debian packages put TensorRT here; TENSORRT_ROOT comes first.
SYSTEM_TENSORRT_INCLUDES = ("/usr/include/aarch64-linux-gnu", "/usr/include/x86_64-linux-gnu", "/usr/include")


def _require_sources() -> Path:
    if not (PLUGINS_DIR / "CMakeLists.txt").is_file():
        raise UserError(f"plugin sources not found at {PLUGINS_DIR}; building GPU engines needs an awq-edge "
                        "source checkout (git clone, then pip install -e .)")
    return PLUGINS_DIR


def source_files() -> list[Path]:
    root = _require_sources()
    patterns = ("CMakeLists.txt", "kernels/*.cu", "kernels/*.cuh", "kernels/*.h", "trt/*.cpp", "trt/*.h")
    return sorted({p for pattern in patterns for p in root.glob(pattern)})


def source_hash() -> str:
    """16 hex digits over every plugin source (path and content)."""
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.relative_to(PLUGINS_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def arch_number(gpu_arch: str) -> str:
    """'sm_89' -> '89'."""
    number = gpu_arch.removeprefix("sm_")
    if not number.isdigit():
        raise ValueError(f"not a GPU arch: {gpu_arch!r} (expected sm_NN)")
    return number


def find_nvcc() -> str | None:
    candidates = [os.environ.get("NVCC", "nvcc")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(str(Path(root) / "bin" / "nvcc"))
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    return None


@functools.lru_cache(maxsize=None)  # (build_cubins keys its cache by it, the engine's manifest records it)
def nvcc_release(nvcc: str) -> str:
    """'13.0' for an nvcc whose --version says "release 13.0": the CUDA version its cubins need
    of the driver that loads them (a driver older than the toolkit refuses them)."""
    proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    found = re.search(r"release (\d+\.\d+)", proc.stdout)
    if proc.returncode != 0 or found is None:
        raise UserError(f"{nvcc} --version does not say its release; point NVCC at a CUDA toolkit's nvcc")
    return found.group(1)


def cuda_major(version: str) -> int:
    """'12.6' -> 12: what a driver must support of the cubins' CUDA (any minor of it loads them)."""
    return int(version.split(".")[0])


def cuda_include_dir() -> Path | None:
    """The directory with cuda_fp16.h and cuda_runtime_api.h, for host-only compiles."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = find_nvcc()
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    roots.append("/usr/local/cuda")
    for root in roots:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return Path(root) / "include"
    return None


def tensorrt_include_dir() -> Path | None:
    root = os.environ.get("TENSORRT_ROOT")
    candidates = ([str(Path(root) / "include")] if root else []) + list(SYSTEM_TENSORRT_INCLUDES)
    for candidate in candidates:
        if (Path(candidate) / "NvInferRuntime.h").is_file():
            return Path(candidate)
    return None


def _cache_root() -> Path:
    from .data import cache_dir

    return cache_dir() / "plugins"


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"{what} failed ({tail[0][:300]}); rerun `{' '.join(cmd)}` to see the full log")


def _publish(build: Path, final: Path) -> None:
    """Move a finished build into place; a concurrent build that got there first wins."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        build.rename(final)
    except OSError:
        shutil.rmtree(build, ignore_errors=True)
        if not final.is_dir():
            raise


def build_kernel_library(gpu_arch: str) -> Path:
    """libawq_edge_w4a16.so for one arch, built with nvcc directly (cached)."""
    arch = arch_number(gpu_arch)
    final = _cache_root() / source_hash() / f"sm_{arch}-kernels"
    library = final / KERNEL_LIBRARY
    if library.is_file():
        return library
    nvcc = find_nvcc()
    if nvcc is None:
        raise UserError("nvcc not found; install the CUDA toolkit or set NVCC / CUDA_HOME")
    final.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    kernels = sorted(str(p) for p in (PLUGINS_DIR / "kernels").glob("*.cu"))
    _run([nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "-gencode",
          f"arch=compute_{arch},code=sm_{arch}", "-I", str(PLUGINS_DIR / "kernels"),
          "-o", str(build / KERNEL_LIBRARY), *kernels], "building the W4A16 kernels with nvcc")
    _publish(build, final)
    return library


# The kernel files the cuda backend launches through the driver API (their C-named __global__
# entry points), one cubin each: awq_edge/cuda_backend.py loads them by these names.
CUBIN_SOURCES = ("gemv_w4a16", "gemm_w4a16", "attention", "sample", "head_top_k", "decoder_ops",
                 "decode_step", "moe", "delta_net")


def build_cubins(gpu_arch: str, progress: bool = False) -> dict[str, Path]:
    """name -> the cubin of plugins/kernels/<name>.cu for one arch (GPU code only: built on any
    host with nvcc, loaded on the device with cuModuleLoadData, whose driver must support the
    nvcc's release). Cached by source hash and release (NVCC=an older toolkit's nvcc builds for
    an older driver). progress: a bar over the files while nvcc compiles them (a minute or so)."""
    from tqdm import tqdm

    arch = arch_number(gpu_arch)
    nvcc = find_nvcc()
    if nvcc is None:
        raise UserError(f"nvcc not found: building a cuda engine compiles its kernels for {gpu_arch}; install the "
                        "CUDA toolkit on the build host (the device needs only the driver), or set NVCC / CUDA_HOME")
    release = nvcc_release(nvcc)
    final = _cache_root() / source_hash() / f"sm_{arch}-cubins-cuda{release}"
    cubins = {name: final / f"{name}.cubin" for name in CUBIN_SOURCES}
    if all(p.is_file() for p in cubins.values()):
        return cubins
    final.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    kernels = PLUGINS_DIR / "kernels"
    jobs = [subprocess.Popen([nvcc, "-std=c++17", "-O3", "-cubin", f"-arch=sm_{arch}", "-I", str(kernels),
                              "-o", str(build / f"{name}.cubin"), str(kernels / f"{name}.cu")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in CUBIN_SOURCES]
    with tqdm(total=len(jobs), desc=f"kernels sm_{arch}", unit="file", disable=not progress) as bar:
        for name, job in zip(CUBIN_SOURCES, jobs):
            out, _ = job.communicate()
            if job.returncode != 0:
                for other in jobs:
                    other.kill()
                shutil.rmtree(build, ignore_errors=True)
                tail = (out.strip().splitlines() or ["no output"])[-1]
                raise UserError(f"nvcc failed on plugins/kernels/{name}.cu for {gpu_arch} ({tail[:300]})")
            bar.update()
    _publish(build, final)
    return cubins


def build_trt_plugin_library(gpu_arch: str) -> Path:
    """libawq_edge_trt_plugins.so for one arch, built with cmake (cached by source hash)."""
    arch = arch_number(gpu_arch)
    final = _cache_root() / source_hash() / f"sm_{arch}"
    library = final / TRT_PLUGIN_LIBRARY
    if library.is_file():
        return library
    trt_include = tensorrt_include_dir()
    if trt_include is None:
        raise UserError("TensorRT headers (NvInferRuntime.h) not found; install TensorRT 10 development headers "
                        "(JetPack: nvidia-tensorrt-dev) or set TENSORRT_ROOT")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise UserError("cmake not found; install cmake >= 3.18 to build the TensorRT plugin")
    if find_nvcc() is None:
        raise UserError("nvcc not found; install the CUDA toolkit or set CUDA_HOME")
    final.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    work = build / "cmake"
    _run([cmake, "-S", str(PLUGINS_DIR), "-B", str(work), f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
          f"-DCMAKE_CUDA_COMPILER={find_nvcc()}", f"-DTENSORRT_ROOT={trt_include.parent}",
          "-DCMAKE_BUILD_TYPE=Release"], "configuring the TensorRT plugin (cmake)")
    _run([cmake, "--build", str(work), "-j", str(os.cpu_count() or 2)], "building the TensorRT plugin (cmake)")
    built = work / TRT_PLUGIN_LIBRARY
    if not built.is_file():
        raise UserError(f"cmake did not produce {TRT_PLUGIN_LIBRARY}; it found no TensorRT headers at {trt_include}")
    shutil.copy2(built, build / TRT_PLUGIN_LIBRARY)
    shutil.rmtree(work)
    _publish(build, final)
    return library


def load_kernels(gpu_arch: str):
    """The kernel library for this arch through ctypes (built first if needed), with argtypes set."""
    import ctypes

    lib = ctypes.CDLL(str(build_kernel_library(gpu_arch)))
    args = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4 + [ctypes.c_void_p]
    for name in ("awq_w4a16_gemv", "awq_w4a16_gemv_mma", "awq_w4a16_gemv_mma32", "awq_w4a16_gemv_tc",
                 "awq_w4a16_gemv_tc_persistent", "awq_w4a16_gemm", "awq_w4a16_matmul"):
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int
    for name in ("awq_w4a16_read_only", "awq_w4a16_dequantize"):  # (weights..., out, N, K, group_size, stream)
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_int
    lib.awq_w4a16_gemm_split_k.argtypes = args[:-1] + [ctypes.c_int] + [ctypes.c_void_p] * 3  # splits, partials, counters
    lib.awq_w4a16_gemm_split_k.restype = ctypes.c_int
    lib.awq_w4a16_status_string.argtypes = [ctypes.c_int]
    lib.awq_w4a16_status_string.restype = ctypes.c_char_p
    declare_sampler(lib)
    lib.awq_attention.argtypes = ([ctypes.c_void_p] * 10 + [ctypes.c_int] * 7 + [ctypes.c_float] * 2
                                  + [ctypes.c_void_p] * 2)  # status, stream
    lib.awq_attention.restype = ctypes.c_int
    return lib


def declare_sampler(lib) -> None:
    """argtypes of awq_sample_token (kernels/sample.h), in either library (both link it)."""
    import ctypes

    lib.awq_sample_token.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
                                     ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_void_p]
    lib.awq_sample_token.restype = ctypes.c_int
