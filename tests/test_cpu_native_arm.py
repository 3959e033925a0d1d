"""The native CPU kernels on Arm, where a Jetson's CPU fallback runs them, without an Arm machine:
plugins/cpu/ cross-compiled by zig's clang (the `ziglang` wheel) for an Orin's Cortex-A78AE (NEON
with the dot product: gemv_q4.c's sdot path, what `cc -march=native` picks on an Orin) and for an
Armv8.0 Cortex-A72 (no dot product: the plain C path), then run in unicorn's aarch64 emulator
(QEMU's CPU) against the numpy twins the x86 paths meet in test_cpu_native.py. decode_step.c
(OpenMP and libm, which the bare executables here lack: not run) must compile for both without a
warning."""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from awq_edge import cpu_native
from native_helpers import elf_static_objects
from test_cpu_native import GEMV_SHAPES, random_weight

pytest.importorskip("ziglang", reason="the ziglang wheel (pip install -e '.[test]') cross-compiles for Arm")
unicorn = pytest.importorskip("unicorn", reason="the unicorn wheel (pip install -e '.[test]') runs Arm code")
from unicorn import arm64_const as arm  # noqa: E402

# name -> (clang -mcpu, what cpu_kernels_simd() reports there, unicorn's CPU)
# (zig's -mcpu names; unicorn's A72, A57 and A53 lack sdot)
ARM_CPUS = {"orin": ("cortex_a78ae", "neon-dotprod", arm.UC_CPU_ARM64_MAX),
            "armv8.0": ("cortex_a72", "scalar", arm.UC_CPU_ARM64_A72)}
# the library's own flags but -march=native, OpenMP and the shared-object ones
FLAGS = [f for f in cpu_native.DEFAULT_FLAGS if f not in ("-march=native", "-fopenmp", "-shared", "-fPIC")]
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
    """cpu name -> a static aarch64 executable of gemv_q4.c for that core (its ELF bytes)."""
    tmp = tmp_path_factory.mktemp("arm")
    (tmp / "harness.c").write_text(HARNESS)
    zig_cc(tmp, "-O2", "-ffreestanding", "-fno-builtin", "-c", str(tmp / "harness.c"), "-o", str(tmp / "harness.o"))
    built = {}
    for name, (mcpu, _, _) in ARM_CPUS.items():
        obj, exe = tmp / f"gemv_q4-{name}.o", tmp / f"gemv_q4-{name}"
        zig_cc(tmp, f"-mcpu={mcpu}", *FLAGS, "-Wall", "-Wextra", "-Werror", "-c",
               str(cpu_native.CPU_SOURCES / "gemv_q4.c"), "-o", str(obj))
        zig_cc(tmp, "-nostdlib", "-static", "-Wl,--no-gc-sections", str(obj), str(tmp / "harness.o"), "-o", str(exe))
        built[name] = exe.read_bytes()
    return built


class Arm64:
    """Functions of a static aarch64 executable called in unicorn: its PT_LOAD segments mapped at
    their addresses, arrays copied into a heap, arguments in x0-x7 and then on the stack (AAPCS64,
    integers and pointers only), run until the function returns to a stop address."""
    HEAP, STACK, STOP, PAGE = 0x4000_0000, 0x3000_0000, 0x2000_0000, 1 << 12

    def __init__(self, elf: bytes, cpu: int):
        self.uc = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
        self.uc.ctl_set_cpu_model(cpu)
        self.symbols = elf_static_objects(elf)[1]
        (phoff,) = struct.unpack_from("<Q", elf, 0x20)
        entry_size, count = struct.unpack_from("<HH", elf, 0x36)
        for i in range(count):
            kind, _, offset, vaddr, _, file_size, memory_size, _ = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * entry_size)
            if kind == 1:  # PT_LOAD
                first, end = vaddr // self.PAGE * self.PAGE, -(-(vaddr + memory_size) // self.PAGE) * self.PAGE
                self.uc.mem_map(first, end - first)
                self.uc.mem_write(vaddr, elf[offset:offset + file_size])
        self.uc.mem_map(self.HEAP, 64 << 20)
        self.uc.mem_map(self.STACK - (1 << 20), 1 << 20)
        self.uc.mem_map(self.STOP, self.PAGE)
        # FP and SIMD on at EL1 (CPACR_EL1.FPEN), else the first NEON instruction traps
        self.uc.reg_write(arm.UC_ARM64_REG_CPACR_EL1, self.uc.reg_read(arm.UC_ARM64_REG_CPACR_EL1) | 3 << 20)
        self.top = self.HEAP

    def put(self, array: np.ndarray) -> int:
        data = np.ascontiguousarray(array).tobytes()
        at, self.top = self.top, self.top + -(-max(len(data), 1) // 64) * 64
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


@pytest.mark.parametrize("cpu", ARM_CPUS)
def test_the_decode_step_compiles_for_arm_without_a_warning(tmp_path, cpu):
    mcpu = ARM_CPUS[cpu][0]
    for source in cpu_native.source_files():
        if source.suffix == ".c":
            zig_cc(tmp_path, f"-mcpu={mcpu}", *FLAGS, "-Wall", "-Wextra", "-Werror", "-c", str(source),
                   "-o", str(tmp_path / f"{source.stem}.o"))
