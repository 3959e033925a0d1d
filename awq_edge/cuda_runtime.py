"""A few CUDA runtime and driver calls through ctypes: GPU discovery, device memory, streams, events.

No torch and no cuda-python at run time. Used by the TensorRT build/backend, the GPU
kernel tests and benchmarks/gemv.py. Importing this module never fails; the functions
that need a GPU raise CudaError (or return an empty list) when there is none.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
from dataclasses import dataclass

MEMCPY_HOST_TO_DEVICE = 1
MEMCPY_DEVICE_TO_HOST = 2
MEMCPY_DEVICE_TO_DEVICE = 3
CUDA_DEV_ATTR_L2_CACHE_SIZE = 38  # cudaDevAttrL2CacheSize
CUDA_DEV_ATTR_MULTIPROCESSOR_COUNT = 16  # cudaDevAttrMultiProcessorCount
_STREAM_CAPTURE_THREAD_LOCAL = 1  # cudaStreamCaptureModeThreadLocal
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
_CU_DEVICE_ATTRIBUTE_INTEGRATED = 18  # a Jetson's GPU: its memory is the board's, shared with the CPU


class CudaError(RuntimeError):
    pass


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    arch: str  # "sm_89"
    total_memory: int = 0  # bytes; 0 when unknown
    integrated: bool = False  # memory shared with the CPU (Jetson); False when unknown (nvidia-smi)


def _load_first(names: list[str]) -> ctypes.CDLL | None:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _libcuda() -> ctypes.CDLL | None:
    return _load_first(["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda") or "libcuda.so"])


def find_gpus() -> list[Gpu]:
    """NVIDIA GPUs visible to this process: the CUDA driver first, nvidia-smi as a fallback."""
    cuda = _libcuda()
    if cuda is not None and cuda.cuInit(0) == 0:
        count = ctypes.c_int(0)
        if cuda.cuDeviceGetCount(ctypes.byref(count)) == 0:
            gpus = []
            for i in range(count.value):
                dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
                name = ctypes.create_string_buffer(256)
                if cuda.cuDeviceGet(ctypes.byref(dev), i) != 0:
                    continue
                cuda.cuDeviceGetName(name, 256, dev)
                cuda.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
                cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
                total, integrated = ctypes.c_size_t(0), ctypes.c_int(0)
                cuda.cuDeviceTotalMem_v2(ctypes.byref(total), dev)
                cuda.cuDeviceGetAttribute(ctypes.byref(integrated), _CU_DEVICE_ATTRIBUTE_INTEGRATED, dev)
                gpus.append(Gpu(i, name.value.decode(errors="replace"), f"sm_{major.value}{minor.value}", total.value,
                                bool(integrated.value)))
            if gpus:
                return gpus
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total",
                                  "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        gpus = []
        for i, line in enumerate(l for l in out.splitlines() if l.strip()):
            name, cap, mib = (part.strip() for part in line.rsplit(",", 2))
            gpus.append(Gpu(i, name, "sm_" + cap.replace(".", ""), int(mib) << 20 if mib.isdigit() else 0))
        return gpus
    return []


class CudaRuntime:
    """The handful of libcudart calls the GPU code paths need."""

    def __init__(self) -> None:
        lib = _load_first(["libcudart.so", "libcudart.so.13", "libcudart.so.12",
                           ctypes.util.find_library("cudart") or "libcudart.so"])
        if lib is None:
            raise CudaError("libcudart not found (install the CUDA runtime or add it to LD_LIBRARY_PATH)")
        self.lib = lib
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                        ctypes.c_void_p]
        lib.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        lib.cudaStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cudaStreamDestroy.argtypes = [ctypes.c_void_p]
        lib.cudaEventCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cudaEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cudaEventSynchronize.argtypes = [ctypes.c_void_p]
        lib.cudaEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]
        lib.cudaEventDestroy.argtypes = [ctypes.c_void_p]
        lib.cudaStreamBeginCapture.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.cudaStreamEndCapture.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.cudaGraphInstantiate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_ulonglong]
        lib.cudaGraphLaunch.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cudaGraphDestroy.argtypes = [ctypes.c_void_p]
        lib.cudaGraphExecDestroy.argtypes = [ctypes.c_void_p]
        lib.cudaDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
        count = ctypes.c_int(0)
        if lib.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value == 0:
            raise CudaError("no CUDA device available to the CUDA runtime")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise CudaError(f"{what}: {self.lib.cudaGetErrorString(status).decode()} (cudaError {status})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), max(nbytes, 1)), f"cudaMalloc({nbytes})")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.check(self.lib.cudaFree(ptr), "cudaFree")

    def to_device(self, array) -> int:
        """Copy a contiguous numpy array to a new device buffer; returns the pointer."""
        ptr = self.malloc(array.nbytes)
        self.check(self.lib.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, MEMCPY_HOST_TO_DEVICE), "cudaMemcpy H2D")
        return ptr

    def to_host(self, ptr: int, out) -> None:
        self.check(self.lib.cudaMemcpy(out.ctypes.data, ptr, out.nbytes, MEMCPY_DEVICE_TO_HOST), "cudaMemcpy D2H")

    def copy_device(self, dst: int, src: int, nbytes: int, stream: int | None = None) -> None:
        self.check(self.lib.cudaMemcpyAsync(dst, src, nbytes, MEMCPY_DEVICE_TO_DEVICE, stream), "cudaMemcpyAsync D2D")

    def memset(self, ptr: int, byte: int, nbytes: int) -> None:
        self.check(self.lib.cudaMemset(ptr, byte, nbytes), "cudaMemset")

    def synchronize(self) -> None:
        self.check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return s.value

    def stream_synchronize(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def event(self) -> int:
        e = ctypes.c_void_p()
        self.check(self.lib.cudaEventCreate(ctypes.byref(e)), "cudaEventCreate")
        return e.value

    def record(self, event: int, stream: int | None = None) -> None:
        self.check(self.lib.cudaEventRecord(event, stream), "cudaEventRecord")

    def elapsed_ms(self, start: int, end: int) -> float:
        self.check(self.lib.cudaEventSynchronize(end), "cudaEventSynchronize")
        ms = ctypes.c_float()
        self.check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), start, end), "cudaEventElapsedTime")
        return ms.value

    def multiprocessor_count(self, device: int = 0) -> int:
        value = ctypes.c_int(0)
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(value), CUDA_DEV_ATTR_MULTIPROCESSOR_COUNT, device),
                   "cudaDeviceGetAttribute(multiprocessor count)")
        return value.value

    def l2_cache_bytes(self, device: int = 0) -> int:
        value = ctypes.c_int(0)
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(value), CUDA_DEV_ATTR_L2_CACHE_SIZE, device),
                   "cudaDeviceGetAttribute(L2 cache size)")
        return value.value

    def capture_graph(self, stream: int, enqueue) -> int:
        """Record the work enqueue() puts on `stream` (not the default stream) as an instantiated CUDA graph."""
        graph, exec_graph = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.lib.cudaStreamBeginCapture(stream, _STREAM_CAPTURE_THREAD_LOCAL), "cudaStreamBeginCapture")
        try:
            enqueue()
        finally:
            self.check(self.lib.cudaStreamEndCapture(stream, ctypes.byref(graph)), "cudaStreamEndCapture")
        try:
            self.check(self.lib.cudaGraphInstantiate(ctypes.byref(exec_graph), graph, 0), "cudaGraphInstantiate")
        finally:
            self.lib.cudaGraphDestroy(graph)  # the instantiated graph no longer needs it
        return exec_graph.value

    def launch_graph(self, exec_graph: int, stream: int) -> None:
        self.check(self.lib.cudaGraphLaunch(exec_graph, stream), "cudaGraphLaunch")

    def destroy_graph(self, exec_graph: int) -> None:
        self.check(self.lib.cudaGraphExecDestroy(exec_graph), "cudaGraphExecDestroy")


def seconds_per_call(drv, run, calls: int = 20, repeats: int = 5) -> float:
    """A GPU benchmark's timing: `calls` of run() back to back, host-timed from a synchronize to
    the next; the median over `repeats` of the seconds per call (run once first, to warm up)."""
    import time

    run()
    times = []
    for _ in range(repeats):
        drv.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        drv.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return sorted(times)[repeats // 2]


def benchmark_gpu(script: str):
    """The first GPU for a GPU benchmark script, once it is sure nvcc is there too (its kernels are
    compiled on the machine); else None, after one line on stderr saying what is missing."""
    import sys

    from . import plugins

    gpus = find_gpus()
    if not gpus:
        print(f"error: no NVIDIA GPU found; {script} runs on one", file=sys.stderr)
        return None
    if plugins.find_nvcc() is None:
        print(f"error: nvcc not found; {script} compiles the kernels on this machine", file=sys.stderr)
        return None
    return gpus[0]
