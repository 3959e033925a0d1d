"""Helpers for tests that edit engine, export and checkpoint folders (no tests here).

- linked_copy: a copy whose files are hard links (cheap for GB-sized weights);
- rewrite: replace one file of such a copy (the link is broken first: the original stays as it was);
- resign: update a folder's listing (manifest.json or export.json `files`) to an edited file, as a
  hostile editor would, so that the field checks themselves must catch the edit, not the hashes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from awq_edge.untrusted import file_record


def linked_copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        os.link(f, dst / f.name)
    return dst


def rewrite(path: Path, data: bytes) -> None:
    if path.exists():
        path.unlink()
    path.write_bytes(data)


def edit_json(path: Path, edit) -> None:
    """rewrite(path) with edit(data) applied to its JSON (edit changes data in place)."""
    data = json.loads(path.read_text())
    edit(data)
    rewrite(path, json.dumps(data, indent=2).encode())


def resign(folder: Path, listing: str, name: str) -> None:
    """Record the edited file NAME in the folder's listing (manifest.json or export.json)."""
    if name == listing or not (folder / name).is_file():
        return
    data = json.loads((folder / listing).read_text())
    files = data.get("files")
    if isinstance(files, dict):
        files[name] = file_record(folder / name)
        rewrite(folder / listing, json.dumps(data, indent=2).encode())
