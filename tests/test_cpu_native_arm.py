"""The native CPU kernels on Arm, where a Jetson's CPU fallback runs them, without an Arm machine:
plugins/cpu/ cross-compiled by zig's clang (the `ziglang` wheel) for an Orin's Cortex-A78AE (NEON
with the dot product: gemv_q4.c's sdot path, what `cc -mcpu=native` picks on an Orin), a Thor's
Neoverse-V3AE (the same, and the step's loops vectorized with SVE) and an Armv8.0 Cortex-A72 (no
dot product: the plain C path), without a warning, into bare static
executables (no libc, no OpenMP: one thread) that unicorn's aarch64 emulator (QEMU's CPU) runs:
the GEMV against the numpy twins the x86 paths meet in test_cpu_native.py, and whole decode
steps of tiny engines against the same steps on this machine's native build."""
from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from awq_edge import cpu_native
from conftest import TINY_FAMILIES
from native_helpers import elf_static_objects
from test_cpu_native import GEMV_SHAPES, random_weight

pytest.importorskip("ziglang", reason="the ziglang wheel (pip install -e '.[test]') cross-compiles for Arm")
unicorn = pytest.importorskip("unicorn", reason="the unicorn wheel (pip install -e '.[test]') runs Arm code")
from unicorn import arm64_const as arm  # noqa: E402

# name -> (clang -mcpu, what cpu_kernels_simd() reports there, unicorn's CPU)
# (zig's -mcpu names; unicorn's A72, A57 and A53 lack sdot; a Jetson Thor's Neoverse-V3AE has SVE2,
# with which clang vectorizes the step's loops, in 128-bit vectors as its own)
ARM_CPUS = {"orin": ("cortex_a78ae", "neon-dotprod", arm.UC_CPU_ARM64_MAX),
            "thor": ("neoverse_v3ae", "neon-dotprod", arm.UC_CPU_ARM64_MAX),
            "armv8.0": ("cortex_a72", "scalar", arm.UC_CPU_ARM64_A72)}
# the library's own flags but the host's CPU, OpenMP and the shared-object ones
FLAGS = [f for f in cpu_native.DEFAULT_FLAGS if f not in (cpu_native.NATIVE_CPU, "-fopenmp", "-shared", "-fPIC")]
# what a bare executable needs: the two libc calls the kernels make, and an entry point
HARNESS = r"""
#include <stddef.h>
void *memset(void *d, int c, size_t n) { unsigned char *p = d; while (n--) *p++ = (unsigned char)c; return d; }
void *memcpy(void *d, const void *s, size_t n) {
  unsigned char *p = d; const unsigned char *q = s; while (n--) *p++ = *q++; return d; }
void _start(void) {}
"""


def zig_cc(tmp, *args: str) -> None:
    """zig's clang for aarch64 Linux, its caches under tmp (a fresh one costs no libc build: -nostdlib)."""
    env = {**os.environ, "ZIG_GLOBAL_CACHE_DIR": str(tmp / "zig-cache"), "ZIG_LOCAL_CACHE_DIR": str(tmp / "zig-cache")}
    proc = subprocess.run([sys.executable, "-m", "ziglang", "cc", "-target", "aarch64-linux-musl", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def arm_executables(tmp_path_factory) -> dict[str, bytes]:
    """cpu name -> a static aarch64 executable of plugins/cpu/*.c for that core (its ELF bytes)."""
    tmp = tmp_path_factory.mktemp("arm")
    (tmp / "harness.c").write_text(HARNESS)
    zig_cc(tmp, "-O2", "-ffreestanding", "-fno-builtin", "-c", str(tmp / "harness.c"), "-o", str(tmp / "harness.o"))
    built = {}
    for name, (mcpu, _, _) in ARM_CPUS.items():
        objects = []
        for source in cpu_native.source_files():
            if source.suffix == ".c":
                objects.append(str(tmp / f"{source.stem}-{name}.o"))
                zig_cc(tmp, f"-mcpu={mcpu}", *FLAGS, "-Wall", "-Wextra", "-Werror", "-c", str(source),
                       "-o", objects[-1])
        exe = tmp / f"cpu-kernels-{name}"
        zig_cc(tmp, "-nostdlib", "-static", "-Wl,--no-gc-sections", *objects, str(tmp / "harness.o"), "-o", str(exe))
        built[name] = exe.read_bytes()
    return built


class Arm64:
    """Functions of a static aarch64 executable called in unicorn: its PT_LOAD segments mapped at
    their addresses, arrays copied into a heap, arguments in x0-x7 and then on the stack (AAPCS64,
    integers and pointers only), run until the function returns to a stop address."""
    HEAP, STACK, STOP, PAGE, HEAP_BYTES = 0x4000_0000, 0x3000_0000, 0x2000_0000, 1 << 12, 256 << 20

    def __init__(self, elf: bytes, cpu: int):
        self.uc = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
        self.uc.ctl_set_cpu_model(cpu)
        self.symbols = elf_static_objects(elf)[1]
        (phoff,) = struct.unpack_from("<Q", elf, 0x20)
        entry_size, count = struct.unpack_from("<HH", elf, 0x36)
        for i in range(count):
            header = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * entry_size)
            kind, _, offset, vaddr, _, file_size, memory_size, _ = header
            if kind == 1:  # PT_LOAD
                first, end = vaddr // self.PAGE * self.PAGE, -(-(vaddr + memory_size) // self.PAGE) * self.PAGE
                self.uc.mem_map(first, end - first)
                self.uc.mem_write(vaddr, elf[offset:offset + file_size])
        self.uc.mem_map(self.HEAP, self.HEAP_BYTES)
        self.uc.mem_map(self.STACK - (1 << 20), 1 << 20)
        self.uc.mem_map(self.STOP, self.PAGE)
        # FP and SIMD on at EL1 (CPACR_EL1.FPEN), else the first NEON instruction traps; on the
        # `max` core SVE too (CPACR_EL1.ZEN, CPTR_EL3.EZ) in 128-bit vectors (ZCR_ELx.LEN 0)
        self.uc.reg_write(arm.UC_ARM64_REG_CPACR_EL1, self.uc.reg_read(arm.UC_ARM64_REG_CPACR_EL1) | 3 << 20)
        if cpu == arm.UC_CPU_ARM64_MAX:
            self.uc.reg_write(arm.UC_ARM64_REG_CPACR_EL1, self.uc.reg_read(arm.UC_ARM64_REG_CPACR_EL1) | 3 << 16)
            self.uc.reg_write(arm.UC_ARM64_REG_CP_REG, (1, 1, 3, 6, 2, 1 << 8))  # (crn, crm, op0, op1, op2, value)
            for el in (6, 4, 0):  # ZCR_EL3, ZCR_EL2, ZCR_EL1
                self.uc.reg_write(arm.UC_ARM64_REG_CP_REG, (1, 2, 3, el, 0, 0))
        self.top = self.HEAP

    def put(self, array) -> int:
        """A copy of array (or bytes) in the heap: its address there."""
        data = array if isinstance(array, bytes) else np.ascontiguousarray(array).tobytes()
        at, self.top = self.top, self.top + -(-max(len(data), 1) // 64) * 64
        assert self.top <= self.HEAP + self.HEAP_BYTES, "the emulated heap is full"
        self.uc.mem_write(at, data)
        return at

    def get(self, at: int, dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.uc.mem_read(at, np.dtype(dtype).itemsize * count), dtype).copy()

    def call(self, name: str, *args: int) -> int:
        for i, value in enumerate(args[:8]):
            self.uc.reg_write(arm.UC_ARM64_REG_X0 + i, value)
        sp = self.STACK - 4096
        for i, value in enumerate(args[8:]):
            self.uc.mem_write(sp + 8 * i, struct.pack("<q", value))
        self.uc.reg_write(arm.UC_ARM64_REG_SP, sp)
        self.uc.reg_write(arm.UC_ARM64_REG_LR, self.STOP)
        self.uc.emu_start(self.symbols[name], self.STOP, timeout=60_000_000)
        assert self.uc.reg_read(arm.UC_ARM64_REG_PC) == self.STOP, f"{name} did not return within a minute"
        return self.uc.reg_read(arm.UC_ARM64_REG_X0)

    def string(self, at: int) -> str:
        data = bytes(self.uc.mem_read(at, 64))
        return data[:data.index(b"\0")].decode()


@pytest.mark.parametrize("cpu", ARM_CPUS)
@pytest.mark.parametrize("n,k,group", GEMV_SHAPES)
def test_gemv_on_arm_matches_its_numpy_twin(arm_executables, cpu, n, k, group):
    """quantize_act_q8 gives the twin's bytes; gemv_q4 its sums (the same integers, float order
    aside) and, on the Orin's core, through the sdot path."""
    _, simd, model = ARM_CPUS[cpu]
    emu = Arm64(arm_executables[cpu], model)
    assert emu.string(emu.call("cpu_kernels_simd")) == simd
    rng = np.random.default_rng(n * k + group)
    _, _, _, t = random_weight(rng, n, k, group)
    x = (rng.standard_normal(k) * rng.choice([1e-3, 1.0, 50.0], k)).astype(np.float32)
    x[rng.integers(0, k)] = 0.0
    blocks, act = -(-k // group), cpu_native.act_bytes(k, group)
    x8, x_scale, x_sum = (emu.put(np.zeros(act, np.int8)), emu.put(np.zeros(blocks, np.float32)),
                          emu.put(np.zeros(blocks, np.int32)))
    emu.call("quantize_act_q8", emu.put(x), k, group, x8, x_scale, x_sum)
    got = (emu.get(x8, np.int8, act), emu.get(x_scale, np.float32, blocks), emu.get(x_sum, np.int32, blocks))
    for got_part, want_part in zip(got, cpu_native.quantize_act_q8_reference(x, group)):
        assert np.array_equal(got_part, want_part)
    y = emu.put(np.full(n, np.nan, np.float32))
    emu.call("gemv_q4", emu.put(t["B"]), emu.put(t["scales"]), emu.put(t["zero_points"]), n, k, group,
             x8, x_scale, x_sum, y)
    twin = cpu_native.gemv_q4_reference(t["B"], t["scales"], t["zero_points"], x, k, group)
    assert np.abs(emu.get(y, np.float32, n) - twin).max() <= 1e-5 * np.abs(twin).max()


class ArmDecoder:
    """A NativeDecoder's state (cpu_native.py: weights, activations, scratch, both caches, its
    cpu_model and op records) copied into an Arm64 emulator, every pointer moved to the copy it
    points into; step() runs decode_step there as NativeDecoder.step does here."""

    def __init__(self, emu: Arm64, native):
        self.emu, self.native, self.regions = emu, native, []
        rows = native.model.max_context
        kv_bytes = native.spec.kv_heads * rows * native.spec.head_dim * 4  # ORT's float32 cache of a layer
        for array in [*native.arrays.values(), *native.buffers.values(), *native.scratch.values(), *native.mirrors]:
            self.regions.append((array.ctypes.data, array.nbytes, emu.put(array)))
        for cache in (*native.caches[0], *native.caches[1]):
            self.regions.append((cache, kv_bytes, emu.put(ctypes.string_at(cache, kv_bytes))))
        model = native.model.__class__.from_buffer_copy(native.model)
        for field, pointers in (("k_cache", native.caches[0]), ("v_cache", native.caches[1]),
                                ("k_mirror", native.mirror_pointers[0]), ("v_mirror", native.mirror_pointers[1])):
            setattr(model, field, emu.put(np.array([self.moved(p) for p in pointers], np.uint64)))
        for field in ("x8", "x_scale", "x_sum", "scores", "top_ids", "top_logits"):
            setattr(model, field, self.moved(getattr(model, field)))
        program = (native.program._type_ * len(native.program)).from_buffer_copy(native.program)
        for op in program:
            for field in ("x", "out", "residual", "w0", "w1", "w2", "bias", "w_norm", "table", "cos", "sin"):
                setattr(op, field, self.moved(getattr(op, field)))
        self.model, self.program = emu.put(bytes(model)), emu.put(bytes(program))

    def moved(self, pointer: int | None) -> int:
        """Where a host pointer's bytes are in the emulator (NULL stays NULL)."""
        if not pointer:
            return 0
        for start, size, there in self.regions:
            if start <= pointer < start + size:
                return there + pointer - start
        raise AssertionError(f"a pointer into no copied buffer: {pointer:#x}")

    def step(self, token: int, position: int) -> np.ndarray:
        native, emu = self.native, self.emu
        emu.call("decode_step", self.model, self.program, len(native.ops), token, position, 0)
        logits = emu.get(self.moved(native.buffers["logits"].ctypes.data), np.float32, native.spec.vocab)
        top_ids = emu.get(self.moved(native.scratch["top_ids"].ctypes.data), np.int64, native.top_k)
        logits[top_ids] = emu.get(self.moved(native.scratch["top_logits"].ctypes.data), np.float32, native.top_k)
        return logits


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_decode_steps_on_arm_match_this_machines(arm_executables, model_type, smollm2_dir, tmp_path):
    """A tiny engine of each family (q/k norms, biases, sandwich norms, GELU, sliding windows,
    soft-caps) prefilled by ONNX Runtime here, then 6 native decode steps on each Arm core and
    here from that state: the same logits to float rounding (the GEMV's integers are the same on
    every path; the float sums' order is not), the same argmax."""
    from awq_edge.backend_ort import OrtBackend
    from awq_edge.export import export_checkpoint
    from test_export_helpers import tiny_checkpoint

    extra = {"query_pre_attn_scalar": 64} if model_type.startswith("gemma") else {}
    ckpt = tiny_checkpoint(tmp_path, model_type, smollm2_dir, hidden_size=128, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, **extra)
    backend = OrtBackend(export_checkpoint(ckpt, tmp_path / "ort", "ort"), max_context=32, threads=2,
                         native_decode=True)
    ids = np.random.default_rng(3).integers(0, 256, 12 + 6).tolist()
    backend.forward(ids[:12])  # (ONNX Runtime's prefill, copied into the bf16 cache)
    on_arm = {cpu: ArmDecoder(Arm64(arm_executables[cpu], ARM_CPUS[cpu][2]), backend.native) for cpu in ARM_CPUS}
    for position, token in enumerate(ids[12:], start=12):
        here = backend.native.step(token, position)
        for cpu, decoder in on_arm.items():
            there = decoder.step(token, position)
            error = np.linalg.norm(there - here) / np.linalg.norm(here)
            assert error < 1e-3 and there.argmax() == here.argmax(), (cpu, position, error)
