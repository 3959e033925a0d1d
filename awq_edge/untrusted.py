"""Reading folders we did not write: engines, exports and checkpoints are untrusted input.

They get copied from elsewhere, edited, truncated, corrupted. Everything the runtime and the
exporter read from them goes through the checks here, so that bad input ends in one
`UserError` line that names the file, never in a traceback, a file outside the folder, or an
allocation sized by a number someone typed:

- plain_name: every file a folder's metadata names is a plain name inside that folder;
- read_json: a bounded JSON object from a file, or one line saying what is wrong;
- Fields: typed, range-checked reads of a JSON object's keys;
- file_record / check_file_records: each listed file's size and sha256, recorded at build
  time and checked on every load: small files are hashed whole, large ones by a sampled hash
  (fixed chunks spread over the file: a few ms for GBs); `verify` hashes everything.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import stat
from pathlib import Path

from .errors import UserError

# A plain file name: no separators, no leading dot (no "..", no hidden files), printable ASCII.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")
MAX_JSON_BYTES = 64 << 20        # manifest, export.json, configs: far below this
SMALL_FILE_BYTES = 16 << 20      # hashed whole on every load (~30 ms at most)
SAMPLE_CHUNKS = 256              # large files: this many chunks, evenly spread, first and last included
SAMPLE_CHUNK_BYTES = 64 << 10    # 16 MiB read per large file, whatever its size
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MISSING = object()

# What a model's metadata may claim: far above any model we run, far below sizes that would let
# a header field size an allocation on its own (each is also checked against the files).
MAX_LAYERS, MAX_HEADS, MAX_HEAD_DIM, MAX_HIDDEN = 1024, 1024, 1024, 1 << 17
MAX_VOCAB, MAX_INTERMEDIATE, MAX_POSITIONS = 1 << 22, 1 << 20, 1 << 24


def plain_name(name, where: str, fix: str) -> str:
    """NAME if it is a plain file name (it then can only mean a file inside the folder)."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise UserError(f"{where} names the file {str(name)[:80]!r}, which is not a plain file name inside "
                        f"the folder; {fix}")
    return name


def read_json(path: Path, fix: str) -> dict:
    """The JSON object in PATH (at most MAX_JSON_BYTES), or a one-line UserError naming the file."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise UserError(f"{path} is {path.stat().st_size} bytes, too large for a JSON settings file; {fix}")
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{path} cannot be read as JSON ({type(e).__name__}: {str(e)[:120]}); {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


class Fields:
    """Typed, range-checked reads of one JSON object; every failure names the file and the key.

        f = Fields(read_json(path, fix), str(path), fix)
        layers = f.int("num_layers", 1, MAX_LAYERS)
        window = f.int("sliding_window", 1, MAX_POSITIONS, default=None)   # absent or null -> None
        head = f.obj("lm_head_exact", optional=True)                      # a Fields, or None
    """

    def __init__(self, obj, where: str, fix: str):
        if not isinstance(obj, dict):
            raise UserError(f"{where} is a {type(obj).__name__}, not a JSON object; {fix}")
        self.raw, self.where, self.fix = obj, where, fix

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def _missing(self, key: str, default):
        if default is _MISSING:
            raise UserError(f"{self.where} has no {key}; {self.fix}")
        return default

    def _bad(self, key: str, value, wanted: str) -> UserError:
        try:
            shown = json.dumps(value)[:60]
        except (TypeError, ValueError):
            shown = type(value).__name__
        return UserError(f"{self.where}: {key} must be {wanted}, not {shown}; {self.fix}")

    def int(self, key: str, lo: int, hi: int, default=_MISSING):
        if not self.has(key):
            return self._missing(key, default)
        value = self.raw[key]
        if isinstance(value, float) and value % 1 == 0:  # JSON writers may print 4096.0 (inf % 1 is nan)
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self._bad(key, value, f"an integer in {lo}..{hi}")
        return value

    def float(self, key: str, lo: float, hi: float, default=_MISSING):
        if not self.has(key):
            return self._missing(key, default)
        value = self.raw[key]
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or not lo <= value <= hi):
            raise self._bad(key, value, f"a number in {lo:g}..{hi:g}")
        return float(value)

    def floats(self, key: str, n: int, lo: float, hi: float) -> list[float]:
        """A list of exactly n numbers, each in lo..hi (LongRoPE's per-frequency factors)."""
        value = self.raw.get(key)
        if (not isinstance(value, list) or len(value) != n
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           and lo <= v <= hi for v in value)):
            raise self._bad(key, value, f"a list of {n} numbers in {lo:g}..{hi:g}")
        return [float(v) for v in value]

    def str(self, key: str, choices=None, default=_MISSING):
        if not self.has(key):
            return self._missing(key, default)
        value = self.raw[key]
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self._bad(key, value, f"one of {', '.join(choices)}" if choices else "a string")
        return value

    def bool(self, key: str, default=_MISSING):
        if not self.has(key):
            return self._missing(key, default)
        value = self.raw[key]
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def obj(self, key: str, optional: bool = False) -> "Fields | None":
        if not self.has(key):
            return self._missing(key, None if optional else _MISSING)
        value = self.raw[key]
        if not isinstance(value, dict):
            raise self._bad(key, value, "a JSON object")
        return Fields(value, f"{self.where} {key}", self.fix)


# ---------------------------------------------------------------- file records

def sha256_file(path: Path) -> str:
    """Hex sha256 of a whole file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sampled_sha256(path: Path) -> str:
    """sha256 over the file's size and SAMPLE_CHUNKS chunks at fixed, evenly spread offsets.

    Catches truncation, a different file of the same size, and corrupted regions larger than
    the chunk spacing (size / 256), in a few ms; a single flipped bit needs the full hash."""
    size = path.stat().st_size
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= SAMPLE_CHUNKS * SAMPLE_CHUNK_BYTES:
            digest.update(f.read())
            return digest.hexdigest()
        span = size - SAMPLE_CHUNK_BYTES
        for i in range(SAMPLE_CHUNKS):
            f.seek(span * i // (SAMPLE_CHUNKS - 1))
            digest.update(f.read(SAMPLE_CHUNK_BYTES))
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    """What a manifest records of one file: its size and sha256 (+ the sampled sha256 of a large one)."""
    record = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if record["size"] > SMALL_FILE_BYTES:
        record["sampled_sha256"] = sampled_sha256(path)
    return record


def check_file_records(folder: Path, files, where: str, fix: str, full_hash: bool = False) -> dict[str, dict]:
    """Every file in FILES (name -> file_record) is a plain, regular file in FOLDER with its size
    and hash; returns the records. Small files are hashed whole, large ones by their sampled
    hash, every file whole with full_hash (`--verify`)."""
    if not isinstance(files, dict) or not files:
        raise UserError(f"{where} lists no files; {fix}")
    checked = {}
    for name, entry in files.items():
        plain_name(name, where, fix)
        record = Fields(entry, f"{where} files.{name}", fix)
        size = record.int("size", 0, 1 << 50)
        digests = {key: record.str(key) for key in ("sha256", "sampled_sha256")
                   if key == "sha256" or size > SMALL_FILE_BYTES}
        if not all(_HEX64.fullmatch(d) for d in digests.values()):
            raise UserError(f"{where} files.{name}: a sha256 is not 64 hex digits; {fix}")
        path = folder / name
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise UserError(f"{folder} is incomplete: {name} is missing; {fix}") from None
        if not stat.S_ISREG(info.st_mode):  # a symlink could point anywhere
            raise UserError(f"{path} is not a regular file (a link or a folder); {fix}")
        if info.st_size != size:
            raise UserError(f"{folder} is corrupt: {name} is {info.st_size} bytes, {where} says {size}; {fix}")
        if full_hash or size <= SMALL_FILE_BYTES:
            if sha256_file(path) != digests["sha256"]:
                raise UserError(f"{folder} is corrupt: {name} does not match its sha256; {fix}")
        elif sampled_sha256(path) != digests["sampled_sha256"]:
            raise UserError(f"{folder} is corrupt: {name} does not match its sampled sha256; {fix}")
        checked[name] = {"size": size, **digests}
    return checked
