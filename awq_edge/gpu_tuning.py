"""What the cuda backend timed on a GPU, kept so that the next load runs the same kernels.

The backend times its decode GEMVs per linear role when it loads, and every prefill path for a
chunk size when it first uses one (cuda_backend.tune_decode_gemv, faster_prefill_graph). Timing
is noisy: two loads could choose differently where two kernels are close, and different kernels
sum in a different order, so a greedy reply could change between runs. So the choices are kept
in one small JSON file per GPU, kernels and model shape (tuning_key), under the cache folder's
`tuning/`; the next load reads them instead of timing again. Delete the file (or the folder) to
time again, e.g. after changing a Jetson's power mode.

The file is read as untrusted: one that is too big, does not parse, or names a role, kind, chunk
size or path this backend does not have is ignored (and timed over); writes go to a temporary
file renamed into place, and a folder that cannot be written (a read-only home) only means the
next load times again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .data import write_atomic
from .errors import UserError
from .untrusted import read_json

FORMAT = 2  # (2: the persistent step's choice, "step")
PREFILL_PATHS = ("cublas", "cublas_l2", "ours")  # (cuda_backend.faster_prefill_graph)


def tuning_key(**parts) -> str:
    """A file name for what the choices depend on: the GPU, the kernels, the shapes timed."""
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def read_tuning(path: Path, roles: dict[str, list], sizes: set[int], step_allowed: bool) -> dict | None:
    """{"gemv": {role: kind}, "prefill": {rows: path}, "prefetch": bool, "step": bool} from the file
    at `path` (prefetch: whether decode's GEMVs send the next weights toward L2; step: whether
    decode runs on the persistent step), or None when it is absent or not valid here: `roles`
    maps each role to the kinds it can run (every role must have one), `sizes` are the chunk
    sizes that may be timed, and the step may be chosen only where `step_allowed`."""
    try:
        data = read_json(path, "")  # (size-capped, any parse failure: a UserError)
    except UserError:
        return None
    if type(data.get("format")) is not int or data["format"] != FORMAT:
        return None
    gemv, prefill, prefetch = data.get("gemv"), data.get("prefill", {}), data.get("prefetch")
    if not isinstance(gemv, dict) or set(gemv) != set(roles) or not isinstance(prefill, dict):
        return None
    step = data.get("step")
    if not isinstance(prefetch, bool) or not isinstance(step, bool) or step and not step_allowed:
        return None
    if any(not isinstance(kind, str) or kind not in roles[role] for role, kind in gemv.items()):
        return None
    chosen = {}
    for rows, way in prefill.items():
        if not (rows.isascii() and rows.isdigit() and len(rows) < 6 and int(rows) in sizes and way in PREFILL_PATHS):
            return None
        chosen[int(rows)] = way
    return {"gemv": dict(gemv), "prefill": chosen, "prefetch": prefetch, "step": step}


def write_tuning(path: Path, gemv: dict[str, str], prefill: dict[int, str], prefetch: bool, step: bool) -> bool:
    """Keep the choices at `path` (whole or not at all); False when the folder cannot be written."""
    text = json.dumps({"format": FORMAT, "gemv": gemv, "prefill": {str(r): w for r, w in sorted(prefill.items())},
                       "prefetch": bool(prefetch), "step": bool(step)}, indent=1) + "\n"
    try:
        write_atomic(path, text)
    except OSError:
        return False
    return True
