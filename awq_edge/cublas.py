"""cuBLAS's fp16 GEMM through ctypes: the cuda backend's long prefill chunks.

Our tensor-core GEMM (plugins/kernels/gemm_w4a16.cu) reached 0.23-0.47x cuBLAS fp16 from
M = 128 up on an H100 (benchmarks/README.md); dequantizing a slab of weight rows to fp16 and
handing it to cuBLAS costs one extra pass over the slab (in L2 when the slab fits), which at a
256-token chunk is small beside the GEMM. So a long prefill chunk runs that way when the machine
has cuBLAS (CUDA toolkits, JetPack and the `nvidia-cublas` wheel carry it), and our GEMM otherwise.

    blas = load_cublas(stream, workspace, workspace_bytes)   # or raises CublasUnavailable
    blas.gemm_wt(w, x, y, n=N, rows=M, k=K, ldc=N)           # y[M, :N] = x[M, K] @ w[N, K]^T, fp16

The enum values and the signatures are cublas_api.h's (CUDA 11 to 13); every status is checked.
cuBLAS runs on the context current on the calling thread: the driver's primary context, which
cuda_driver.Driver makes current.
"""
from __future__ import annotations

import ctypes
import glob
import os
import site
from pathlib import Path

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_16F = 2                 # cudaDataType (library_types.h)
CUBLAS_COMPUTE_32F = 68        # fp16 inputs, fp32 accumulation (as our GEMM)
CUBLAS_GEMM_DEFAULT = -1
LIBRARY_NAMES = ("libcublas.so.13", "libcublas.so.12", "libcublas.so")


class CublasUnavailable(RuntimeError):
    """No usable cuBLAS on this machine: the message says why (prefill then uses our GEMM)."""


def library_candidates() -> list[str]:
    """Where libcublas may be: the loader's path, the CUDA toolkit, the pip wheels (nvidia-cublas)."""
    found = list(LIBRARY_NAMES)
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        found += sorted(glob.glob(str(Path(root) / "lib64" / "libcublas.so*")))
        found += sorted(glob.glob(str(Path(root) / "targets" / "*" / "lib" / "libcublas.so*")))
    # the installed wheels: nvidia/cublas/lib (CUDA 12), nvidia/cu13/lib (CUDA 13). Site directories
    # only, never sys.path's relative entries: a library found in the working directory would run.
    for site_dir in [*site.getsitepackages(), site.getusersitepackages()]:
        for sub in ("nvidia/cublas/lib", "nvidia/cu*/lib"):
            found += sorted(glob.glob(str(Path(site_dir) / sub / "libcublas.so*")), reverse=True)
    return list(dict.fromkeys(name for name in found if "/" not in name or Path(name).is_absolute()))


class Cublas:
    def __init__(self, lib: ctypes.CDLL, stream, workspace: int, workspace_bytes: int):
        self.lib = lib
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cublasSetWorkspace_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.cublasDestroy_v2.argtypes = [ctypes.c_void_p]
        lib.cublasGemmEx.argtypes = ([ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int,   # A, Atype, lda
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int,   # B, Btype, ldb
                                      ctypes.c_void_p,                               # beta
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int,   # C, Ctype, ldc
                                      ctypes.c_int, ctypes.c_int])                   # compute type, algo
        self.handle = ctypes.c_void_p()
        self.check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.check(lib.cublasSetStream_v2(self.handle, stream), "cublasSetStream")
        # its scratch is ours (counted in the memory plan), not an allocation of its own
        self.check(lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(workspace), workspace_bytes),
                   "cublasSetWorkspace")
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)  # alpha, beta: host floats (compute 32F)

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise CublasUnavailable(f"{what} failed with cuBLAS status {status}")

    def gemm_wt(self, w: int, x: int, y: int, n: int, rows: int, k: int, ldc: int) -> None:
        """y[r, j] = sum_k x[r, k] * w[j, k] for r < rows, j < n (all fp16, row-major; rows of y
        ldc apart). In cuBLAS's column-major terms: y^T (n x rows, ld ldc) = w (k x n, ld k)^T
        times x^T (k x rows, ld k)."""
        self.check(self.lib.cublasGemmEx(self.handle, CUBLAS_OP_T, CUBLAS_OP_N, n, rows, k, ctypes.byref(self.one),
                                          ctypes.c_void_p(w), CUDA_R_16F, k, ctypes.c_void_p(x), CUDA_R_16F, k,
                                          ctypes.byref(self.zero), ctypes.c_void_p(y), CUDA_R_16F, ldc,
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "cublasGemmEx")

    def close(self) -> None:
        if self.handle:
            self.lib.cublasDestroy_v2(self.handle)
            self.handle = ctypes.c_void_p()


def load_cublas(stream, workspace: int, workspace_bytes: int) -> Cublas:
    """A cuBLAS handle on `stream` (a CUstream) with our workspace, or CublasUnavailable saying why.
    AWQ_EDGE_CUBLAS=0 turns it off (prefill then always runs our GEMM)."""
    if os.environ.get("AWQ_EDGE_CUBLAS", "1") == "0":
        raise CublasUnavailable("AWQ_EDGE_CUBLAS=0")
    refused = None
    for name in library_candidates():
        try:
            return Cublas(ctypes.CDLL(name), stream, workspace, workspace_bytes)
        except (OSError, AttributeError):  # not loadable, or too old to have cublasSetWorkspace_v2
            continue
        except CublasUnavailable as e:  # another version may suit this driver
            refused = CublasUnavailable(f"{Path(name).name}: {e}")
    raise refused or CublasUnavailable("libcublas not found (a CUDA toolkit, JetPack or the nvidia-cublas wheel "
                                       "has it)")
