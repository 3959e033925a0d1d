"""The memory plan: how much context fits under a memory cap, decided before anything is loaded.

    total = weights + kv_per_token x context + workspace + runtime_overhead  <=  cap

- weights: bytes of the graph's initializers (export.json `weight_bytes`).
- kv_per_token: K and V of every layer for one token (export.json `kv_bytes_per_token`).
- workspace: activations of one prefill chunk (the engine never feeds more than
  PREFILL_CHUNK tokens at once, so this does not grow with the prompt).
- runtime_overhead: what the process costs besides the model: Python, numpy, ONNX Runtime,
  tokenizers, the session's own arena and the transient copy of small tensors while the
  session is created. Measured on the CPU (docs/runtime.md, "Memory plan"); an estimate on GPUs.

The context is the largest that fits, capped by the model's max positions and by the
user's --max-context. If even the weights plus MIN_CONTEXT tokens do not fit, the plan is
refused with a one-line error that says by how much it is short.
No torch, no onnxruntime here: this runs before anything is loaded.
"""
from __future__ import annotations

import re
from pathlib import Path
from dataclasses import asdict, dataclass

from .errors import UserError

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
MIN_CONTEXT = 256      # a plan that cannot hold this many tokens is useless for chat
PREFILL_CHUNK = 256    # the engine feeds long prompts in chunks of this many tokens

# Measured on the CPU by benchmarks/runtime_overhead.py (x86-64, ORT 1.32, Python 3.11,
# SmolLM2-135M, default int4 head; benchmarks/results/runtime_overhead-20261202-152642.json):
# the imported runtime with the tokenizer loaded peaks at 96 MiB RSS; loaded with a 512-token
# context and after 200 generated tokens, at weights + 127 MiB, of which 78 MiB is neither
# the KV cache nor the workspace the plan counts. Rounded up, with margin.
CPU_RUNTIME_OVERHEAD = 128 * MIB
# On GPUs the CUDA context and TensorRT runtime cost about this much host+device memory
# (unified on Jetson). Not measured here (no GPU on the dev machine): an estimate.
GPU_RUNTIME_OVERHEAD = 512 * MIB

_UNITS = {"": GIB, "b": 1, "k": KIB, "kb": KIB, "kib": KIB, "m": MIB, "mb": MIB, "mib": MIB,
          "g": GIB, "gb": GIB, "gib": GIB, "t": GIB << 10, "tb": GIB << 10, "tib": GIB << 10}


def parse_size(text: str | int | float) -> int:
    """'6GB', '512MiB', '2G', '1.5' (a bare number is GiB) -> bytes. Powers of two throughout."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise UserError(f"cannot read memory size {text!r}; write e.g. 6GB, 512MiB, 2G or 1.5 (GiB)")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise UserError(f"memory size {text!r} must be more than zero")
    return size


def format_size(n: int) -> str:
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.0f} MiB"


@dataclass
class MemoryPlan:
    cap: int                # bytes the engine may use
    weights: int
    kv_per_token: int
    context: int            # tokens the KV cache holds
    kv_bytes: int           # kv_per_token x context, allocated once at load
    workspace: int
    runtime_overhead: int
    total: int              # weights + kv_bytes + workspace + runtime_overhead (<= cap)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"cap {format_size(self.cap)}: weights {format_size(self.weights)} + KV {format_size(self.kv_bytes)} "
                f"({self.context} tokens x {self.kv_per_token / KIB:.0f} KiB) + workspace {format_size(self.workspace)} "
                f"+ runtime {format_size(self.runtime_overhead)} = {format_size(self.total)}")


def workspace_bytes(hidden_size: int, intermediate_size: int, vocab_size: int, num_heads: int,
                    context: int, all_logits: bool = False, mamba_heads: int = 0) -> int:
    """Activations of one PREFILL_CHUNK-token step, float32, with a 2x margin for ORT's temporaries.

    Per token: a few hidden-size vectors (residual, norm, q/k/v/o), the MLP's gate/up/act
    (3 x intermediate), attention scores over the whole context per head, a Mamba-2's decays and
    scores over the chunk per head (four at once: export/delta_net.mamba_chunk), and the logits
    (every position when the graph returns all of them, otherwise one row)."""
    per_token = (8 * hidden_size + 3 * intermediate_size + num_heads * context + 4 * mamba_heads * PREFILL_CHUNK
                 + (vocab_size if all_logits else 0))
    return 2 * 4 * (PREFILL_CHUNK * per_token + vocab_size)


def plan_memory(weight_bytes: int, kv_bytes_per_token: int, device, max_memory: int | None = None,
                max_context: int | None = None, max_position_embeddings: int = 4096,
                workspace=None, runtime_overhead: int | None = None, default_cap: int | None = None) -> MemoryPlan:
    """The largest context that fits under the cap, or a UserError saying how much is missing.

    device: an awq_edge.devices.Device (its default cap and CPU/GPU overhead) or a device name.
    workspace: bytes, or a function context -> bytes (attention scores grow with the context).
    default_cap: the cap without --max-memory (default: the device profile's).
    """
    if isinstance(device, str):
        from .devices import resolve

        device = resolve(device)
    cap = int(max_memory) if max_memory else (default_cap or device.default_memory_bytes())
    flag = "--max-memory" if max_memory else f"the default cap of {device.name} here"
    if runtime_overhead is None:
        runtime_overhead = GPU_RUNTIME_OVERHEAD if device.is_gpu else CPU_RUNTIME_OVERHEAD
    if max_context is not None and max_context < 1:
        raise UserError(f"--max-context must be at least 1 (got {max_context})")
    workspace_of = workspace if callable(workspace) else (lambda _ctx: int(workspace or 0))

    def total(ctx: int) -> int:
        return weight_bytes + kv_bytes_per_token * ctx + workspace_of(ctx) + runtime_overhead

    wanted = min(max_position_embeddings, max_context or max_position_embeddings)
    floor = min(MIN_CONTEXT, wanted)
    if total(floor) > cap:
        need = total(floor)
        raise UserError(f"needs {format_size(need)} for weights ({format_size(weight_bytes)}) + {floor} tokens of "
                        f"context + runtime but {flag} is {format_size(cap)}: short by {format_size(need - cap)}; "
                        "raise --max-memory or use a smaller model")
    # total() grows with the context: binary search the largest that fits.
    lo, hi = floor, wanted
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(mid) <= cap:
            lo = mid
        else:
            hi = mid - 1
    context = lo
    if max_context is not None and context < max_context and max_context <= max_position_embeddings:
        raise UserError(f"--max-context {max_context} does not fit under {flag} of {format_size(cap)} "
                        f"(at most {context} tokens fit: {format_size(total(max_context) - cap)} short); "
                        "lower --max-context or raise --max-memory")
    return MemoryPlan(cap=cap, weights=weight_bytes, kv_per_token=kv_bytes_per_token, context=context,
                      kv_bytes=kv_bytes_per_token * context, workspace=workspace_of(context),
                      runtime_overhead=runtime_overhead, total=total(context))


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: Linux carries that over from the parent
    through fork + exec, so a process started by a big parent reports the parent's peak."""
    import resource
    import sys

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
