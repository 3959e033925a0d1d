"""Device profiles: one TOML file per device in this folder (the single device table).

Installed as `awq_edge.devices`. A profile gives the GPU arch, total and default
usable memory, memory bandwidth and notes; the memory planner and the engine
builders read them from here and nowhere else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError  # noqa: TID252  (awq_edge.devices -> awq_edge.errors)
from ..plugins import arch_number  # noqa: TID252

try:
    import tomllib  # novermin (3.11+; on 3.10 the same parser comes from PyPI, below)
except ModuleNotFoundError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

GIB = 1 << 30
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Device:
    name: str
    title: str
    family: str  # "orin" groups the Jetson variants behind `--device orin`
    gpu_arch: str  # "sm_87", "sm_89", or "" for the CPU
    total_memory_gib: float  # 0: this machine's RAM, read at run time
    usable_memory_gib: float  # default memory cap
    memory_bandwidth_gbs: float
    unified_memory: bool
    notes: str
    match_model: str = ""  # substring of /proc/device-tree/model (Jetson)
    match_gpu_name: str = ""  # substring of the nvidia-smi GPU name
    stock_driver_cuda: int = 0  # the CUDA major of the device's stock driver (JetPack 6: 12); 0: updated freely

    @property
    def is_gpu(self) -> bool:
        return bool(self.gpu_arch)

    def default_memory_bytes(self) -> int:
        """The memory cap used when the user gives none, by the profile (a build for another device)."""
        if self.usable_memory_gib:
            return int(self.usable_memory_gib * GIB)
        return int(host_memory_bytes() * _CPU_FRACTION.get(self.name, 0.5))

    def memory_here(self) -> int | None:
        """What this machine has for the device: its RAM for the CPU and unified-memory boards
        (Jetson), the GPU's own memory for a discrete GPU of this arch; None when none is found."""
        if not self.is_gpu or self.unified_memory:
            return host_memory_bytes()
        from ..cuda_runtime import find_gpus  # noqa: TID252

        sizes = [g.total_memory for g in find_gpus() if g.arch == self.gpu_arch and g.total_memory]
        return max(sizes) if sizes else None

    def default_cap_here(self) -> int:
        """The default cap when an engine is loaded on this machine: the profile's share of the
        memory actually here (a 24 GB profile's engine on an 8 GB GPU of the same arch gets a
        cap that fits 8 GB), never more than the profile's own cap."""
        cap, here = self.default_memory_bytes(), self.memory_here()
        if here and self.total_memory_gib:
            cap = min(cap, int(here * self.usable_memory_gib / self.total_memory_gib))
        return cap


_CPU_FRACTION: dict[str, float] = {}


def _load(path: Path) -> Device:
    raw = tomllib.loads(path.read_text())
    fraction = raw.pop("usable_memory_fraction", None)
    if fraction is not None:
        _CPU_FRACTION[raw["name"]] = float(fraction)
    raw.setdefault("usable_memory_gib", 0)
    return Device(**raw)


def all_devices() -> dict[str, Device]:
    return {d.name: d for d in sorted((_load(p) for p in _HERE.glob("*.toml")), key=lambda d: d.name)}


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _jetson_model() -> str:
    try:
        return Path("/proc/device-tree/model").read_text().strip("\x00\n ")
    except OSError:
        return ""


def _gpus():
    """This machine's NVIDIA GPUs (cuda_runtime.Gpu: name, arch, memory; the driver, else nvidia-smi)."""
    from ..cuda_runtime import find_gpus  # noqa: TID252

    return find_gpus()


# The kernels' oldest arch: cp.async and mma.sync m16n8k16 (plugins/kernels) are Ampere's.
MIN_GPU_ARCH = 80
UNLISTED_GPU = "gpu"  # `--device gpu`: this machine's GPU, listed or not


def unlisted_gpu_profile(gpu) -> Device:
    """A profile for a GPU the table does not list (an RTX 3090, an A100, an RTX 5080, a Jetson
    Thor...), from what its driver reports: its arch and memory, and a default cap near the
    listed profiles' rule of thumb: a discrete GPU's memory less max(1.5 GiB, 8%) for the CUDA
    context and the display; a Jetson's (integrated: the board's memory, shared with the CPU) less
    max(2.5 GiB, 15%) for the system too. No bandwidth (unknown)."""
    total = gpu.total_memory / GIB
    reserve = max(2.5, 0.15 * total) if gpu.integrated else max(1.5, 0.08 * total)
    return Device(name=UNLISTED_GPU, title=f"{gpu.name} (not in the device table)", family=UNLISTED_GPU,
                  gpu_arch=gpu.arch, total_memory_gib=round(total, 2), usable_memory_gib=round(total - reserve, 2),
                  memory_bandwidth_gbs=0, unified_memory=gpu.integrated,
                  notes="This machine's GPU, read from its driver.", match_gpu_name=gpu.name)


def detect() -> Device:
    """The profile that matches this machine: a Jetson by its model, a listed GPU by its name, an
    unlisted GPU of a supported arch (MIN_GPU_ARCH on) by what its driver reports
    (unlisted_gpu_profile); the CPU profile when there is none of these."""
    devices = all_devices()
    model = _jetson_model()
    if "Orin" in model:
        # Variants share a model string; memory size tells them apart.
        gib = host_memory_bytes() / GIB
        candidates = [d for d in devices.values() if d.match_model and d.match_model in model]
        if candidates:
            return min(candidates, key=lambda d: abs(d.total_memory_gib - gib))
    gpus = _gpus()
    for gpu in gpus:
        for d in devices.values():
            if d.match_gpu_name and d.match_gpu_name in gpu.name:
                return d
    supported = [g for g in gpus if int(arch_number(g.arch)) >= MIN_GPU_ARCH and g.total_memory]
    return unlisted_gpu_profile(supported[0]) if supported else devices["cpu"]


def profile_for_arch(gpu_arch: str) -> Device | None:
    """This machine's profile when its GPU has that arch, else the largest profile of the arch
    (benchmarks and GPU tests build for the GPU they find, named or not); None if none has it."""
    here = detect()
    if here.is_gpu and here.gpu_arch == gpu_arch:
        return here
    same_arch = [d for d in all_devices().values() if d.gpu_arch == gpu_arch]
    return max(same_arch, key=lambda d: d.total_memory_gib) if same_arch else None


def resolve(name: str) -> Device:
    """A device name, a family (`orin`) or `gpu` (this machine's GPU, listed or not) -> one
    profile, or a UserError naming the choices."""
    devices = all_devices()
    if name in devices:
        return devices[name]
    if name == UNLISTED_GPU:
        return this_gpu()
    family = [d for d in devices.values() if d.family == name]
    if not family:
        raise UserError(f"unknown device {name!r}; choose one of: {', '.join(['orin', UNLISTED_GPU, *devices])}")
    here = detect()
    if here.family == name:
        return here
    raise UserError(
        f"--device {name} has several variants and none was found on this machine; "
        f"name one: {', '.join(d.name for d in family)}"
    )


def this_gpu() -> Device:
    """`--device gpu`: this machine's GPU as detect() finds it, or a UserError saying why there is none."""
    here = detect()
    if here.is_gpu:
        return here
    gpus = _gpus()
    if not gpus:
        raise UserError("device gpu (this machine's GPU): no NVIDIA GPU found here (neither its driver nor "
                        "nvidia-smi answers); build for --device cpu, or for a device `awq-edge devices` lists")
    gpu = gpus[0]
    if int(arch_number(gpu.arch)) < MIN_GPU_ARCH:
        raise UserError(f"device gpu (this machine's GPU): {gpu.name} is {gpu.arch}, and the cuda kernels need "
                        f"sm_{MIN_GPU_ARCH} (Ampere) or newer; use --device cpu")
    raise UserError(f"device gpu (this machine's GPU): its driver does not say how much memory {gpu.name} has; "
                    "build for a device `awq-edge devices` lists")
