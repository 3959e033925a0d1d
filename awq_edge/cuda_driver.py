"""The CUDA driver API through ctypes: what the cuda backend needs, and nothing more.

libcuda is the NVIDIA driver itself, so a device needs no CUDA toolkit, no runtime library and
no compiler: kernels come as cubins (built with the engine), loaded with cuModuleLoadData and
launched with cuLaunchKernel. Every call's status is checked; a failure raises CudaError with
the driver's name for it.

    drv = Driver()                                   # device 0, its primary context, one stream
    module = drv.load_module(cubin_bytes)
    kernel = drv.function(module, "awq_embed")
    buf = drv.alloc(nbytes)
    drv.launch(kernel, grid=(S,), block=(256,), args=[ptr(ids), ptr(table), ptr(out), i32(hidden), ...])
    graph = drv.capture(lambda: ...launches...)      # a CUDA graph of the launches, replayed with drv.replay(graph)
    done = drv.event(); drv.record(done); drv.wait(done)  # the host waits for the stream up to a point
    a, b = drv.event(timing=True), drv.event(timing=True)  # ... and drv.elapsed(a, b): GPU seconds between
"""
from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

CU_STREAM_NON_BLOCKING = 1
CU_EVENT_DISABLE_TIMING = 2
CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE = 38
CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute (cuda.h): an id, padding to 8 bytes, a 64-byte value union."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint64 * 8)]


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuda.h), for cuLaunchKernelEx."""
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


class CudaError(RuntimeError):
    pass


def i32(v: int) -> ctypes.c_int:
    return ctypes.c_int(int(v))


def f32(v: float) -> ctypes.c_float:
    return ctypes.c_float(float(v))


def ptr(v: int) -> ctypes.c_uint64:
    """A device pointer argument (CUdeviceptr is 64 bits on every platform we run)."""
    return ctypes.c_uint64(int(v))


def load_libcuda():
    for name in ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


class Driver:
    def __init__(self, device_index: int = 0):
        lib = load_libcuda()
        if lib is None:
            raise CudaError("the NVIDIA driver (libcuda.so.1) is not installed")
        self.lib = lib
        u64 = ctypes.c_uint64
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(u64), ctypes.c_size_t]
        lib.cuMemFree_v2.argtypes = [u64]
        lib.cuMemcpyHtoD_v2.argtypes = [u64, ctypes.c_void_p, ctypes.c_size_t]
        lib.cuMemcpyHtoDAsync_v2.argtypes = [u64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, u64, ctypes.c_size_t]
        lib.cuMemcpyDtoHAsync_v2.argtypes = [ctypes.c_void_p, u64, ctypes.c_size_t, ctypes.c_void_p]
        lib.cuMemsetD8_v2.argtypes = [u64, ctypes.c_ubyte, ctypes.c_size_t]
        lib.cuMemsetD32_v2.argtypes = [u64, ctypes.c_uint, ctypes.c_size_t]
        lib.cuMemcpyDtoDAsync_v2.argtypes = [u64, u64, ctypes.c_size_t, ctypes.c_void_p]
        lib.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
        lib.cuLaunchKernel.argtypes = ([ctypes.c_void_p] + [ctypes.c_uint] * 7 +
                                       [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p])
        lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cuStreamBeginCapture_v2.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.cuStreamEndCapture.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.cuGraphInstantiateWithFlags.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_ulonglong]
        lib.cuGraphLaunch.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cuMemGetInfo_v2.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
        lib.cuDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
        lib.cuDeviceGetName.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        lib.cuDriverGetVersion.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.cuMemAllocHost_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cuEventCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        lib.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cuEventSynchronize.argtypes = [ctypes.c_void_p]
        lib.cuEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]
        lib.cuGraphDestroy.argtypes = [ctypes.c_void_p]
        lib.cuGraphExecDestroy.argtypes = [ctypes.c_void_p]
        self.check(lib.cuInit(0), "cuInit")
        self.device = ctypes.c_int()
        self.check(lib.cuDeviceGet(ctypes.byref(self.device), device_index), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        self.check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), self.device), "cuDevicePrimaryCtxRetain")
        self.check(lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        self.stream = ctypes.c_void_p()
        self.check(lib.cuStreamCreate(ctypes.byref(self.stream), CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        self.modules = []  # kept alive with the driver object
        self.launch_count = 0  # kernels launched (or captured) so far: benchmarks count a step's

    def check(self, status: int, what: str) -> None:
        if status != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(status, ctypes.byref(name))
            raise CudaError(f"{what} failed: {(name.value or b'?').decode()} ({status})")

    # ------------------------------------------------------------ memory
    def alloc(self, nbytes: int) -> int:
        out = ctypes.c_uint64()
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(out), max(int(nbytes), 1)), f"cuMemAlloc({nbytes})")
        return out.value

    def free(self, device_ptr: int) -> None:
        self.check(self.lib.cuMemFree_v2(device_ptr), "cuMemFree")

    def upload(self, device_ptr: int, array) -> None:
        """array (contiguous numpy) -> device, synchronous."""
        self.check(self.lib.cuMemcpyHtoD_v2(device_ptr, array.ctypes.data, array.nbytes), "cuMemcpyHtoD")

    def upload_async(self, device_ptr: int, array) -> None:
        """On the stream: ordered before the launches that follow (array must stay alive until then)."""
        self.check(self.lib.cuMemcpyHtoDAsync_v2(device_ptr, array.ctypes.data, array.nbytes, self.stream),
                   "cuMemcpyHtoDAsync")

    def download(self, array, device_ptr: int) -> None:
        """device -> array, after everything queued on the stream."""
        self.download_async(array, device_ptr)
        self.synchronize()

    def download_async(self, array, device_ptr: int) -> None:
        """device -> array on the stream, without waiting: array is a host_array (pageable memory would
        make the copy wait), to be read after waiting on an event recorded behind the copy."""
        self.check(self.lib.cuMemcpyDtoHAsync_v2(array.ctypes.data, device_ptr, array.nbytes, self.stream),
                   "cuMemcpyDtoHAsync")

    def host_array(self, count: int, dtype) -> np.ndarray:
        """A numpy array of count items in page-locked host memory, which copies on the stream read or
        write when they run, so the host neither waits for them nor may touch the array before they
        have (kept for the process's life: the backend makes a few small ones)."""
        nbytes = max(int(count) * np.dtype(dtype).itemsize, 1)
        address = ctypes.c_void_p()
        self.check(self.lib.cuMemAllocHost_v2(ctypes.byref(address), nbytes), f"cuMemAllocHost({nbytes})")
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address.value)).view(dtype)[:count]

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """device -> device on the stream (benchmarks time it: the bandwidth ceiling)."""
        self.check(self.lib.cuMemcpyDtoDAsync_v2(dst, src, nbytes, self.stream), "cuMemcpyDtoDAsync")

    def zero(self, device_ptr: int, nbytes: int) -> None:
        self.check(self.lib.cuMemsetD8_v2(device_ptr, 0, nbytes), "cuMemsetD8")

    def fill32(self, device_ptr: int, count: int, word: int) -> None:
        """count 32-bit words at device_ptr set to `word`."""
        self.check(self.lib.cuMemsetD32_v2(device_ptr, word, count), "cuMemsetD32")

    def l2_cache_bytes(self) -> int:
        value = ctypes.c_int()
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(value), CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, self.device),
                   "cuDeviceGetAttribute")
        return value.value

    def device_name(self) -> str:
        name = ctypes.create_string_buffer(256)
        self.check(self.lib.cuDeviceGetName(name, len(name), self.device), "cuDeviceGetName")
        return name.value.decode(errors="replace")

    def cuda_version(self) -> str:
        """The newest CUDA this driver supports ('12.6'): cubins from a newer nvcc it refuses."""
        value = ctypes.c_int()
        self.check(self.lib.cuDriverGetVersion(ctypes.byref(value)), "cuDriverGetVersion")
        return f"{value.value // 1000}.{value.value % 1000 // 10}"

    def multiprocessor_count(self) -> int:
        value = ctypes.c_int()
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(value), CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                                                 self.device), "cuDeviceGetAttribute")
        return value.value

    def memory_info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.check(self.lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
        return free.value, total.value

    # ------------------------------------------------------------ kernels
    def load_module(self, cubin: bytes):
        module = ctypes.c_void_p()
        image = ctypes.create_string_buffer(cubin, len(cubin))
        self.check(self.lib.cuModuleLoadData(ctypes.byref(module), image), "cuModuleLoadData")
        self.modules.append(module)
        return module

    def function(self, module, name: str):
        fn = ctypes.c_void_p()
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()), f"cuModuleGetFunction({name})")
        return fn

    def launch(self, fn, grid: tuple, block: tuple, args: list, shared_bytes: int = 0,
               programmatic: bool = False) -> None:
        """One kernel on the stream; args are ctypes values (ptr/i32/f32), in the kernel's order.
        programmatic: allowed to start before the previous kernel ends (sm_90: plugins/kernels/pdl.cuh)."""
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        self.launch_count += 1
        if not programmatic:
            self.check(self.lib.cuLaunchKernel(fn, *grid, *block, shared_bytes, self.stream, params, None),
                       "cuLaunchKernel")
            return
        attribute = LaunchAttribute(id=CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
        attribute.value[0] = 1  # programmaticStreamSerializationAllowed, an int at offset 0
        config = LaunchConfig(*grid, *block, shared_bytes, self.stream, ctypes.pointer(attribute), 1)
        self.check(self.lib.cuLaunchKernelEx(ctypes.byref(config), fn, params, None), "cuLaunchKernelEx")

    def synchronize(self) -> None:
        self.check(self.lib.cuStreamSynchronize(self.stream), "cuStreamSynchronize")

    def event(self, timing: bool = False) -> ctypes.c_void_p:
        """timing: the event keeps when it ran, for elapsed (a little slower to record)."""
        event = ctypes.c_void_p()
        self.check(self.lib.cuEventCreate(ctypes.byref(event), 0 if timing else CU_EVENT_DISABLE_TIMING),
                   "cuEventCreate")
        return event

    def record(self, event) -> None:
        """Mark the stream's current end: wait(event) returns once everything queued before it ran."""
        self.check(self.lib.cuEventRecord(event, self.stream), "cuEventRecord")

    def wait(self, event) -> None:
        self.check(self.lib.cuEventSynchronize(event), "cuEventSynchronize")

    def elapsed(self, start, end) -> float:
        """Seconds of GPU time between two timing events, both recorded and waited for."""
        ms = ctypes.c_float()
        self.check(self.lib.cuEventElapsedTime(ctypes.byref(ms), start, end), "cuEventElapsedTime")
        return ms.value / 1e3

    # ------------------------------------------------------------ graphs
    def capture(self, launches) -> ctypes.c_void_p:
        """The launches `launches()` makes on the stream, captured into an instantiated CUDA graph."""
        self.check(self.lib.cuStreamBeginCapture_v2(self.stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
                   "cuStreamBeginCapture")
        graph = ctypes.c_void_p()
        try:
            launches()
        finally:
            self.check(self.lib.cuStreamEndCapture(self.stream, ctypes.byref(graph)), "cuStreamEndCapture")
        executable = ctypes.c_void_p()
        try:
            self.check(self.lib.cuGraphInstantiateWithFlags(ctypes.byref(executable), graph, 0), "cuGraphInstantiate")
        finally:
            self.lib.cuGraphDestroy(graph)  # (the executable keeps what it needs)
        return executable

    def release(self, executable) -> None:
        """Free a captured graph that will not be replayed again."""
        self.check(self.lib.cuGraphExecDestroy(executable), "cuGraphExecDestroy")

    def replay(self, executable) -> None:
        self.check(self.lib.cuGraphLaunch(executable, self.stream), "cuGraphLaunch")
