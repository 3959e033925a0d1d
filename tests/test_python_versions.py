"""The package runs on the oldest Python pyproject.toml promises (JetPack 6 ships 3.10).

No such interpreter can be installed here, so vermin checks every module statically: each
standard-library module, function and syntax it finds must exist in that version."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERMIN = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())"]


def test_every_module_runs_on_the_minimum_python():
    pyproject = (ROOT / "pyproject.toml").read_text()
    minimum = re.search(r'requires-python\s*=\s*">=\s*(3\.\d+)"', pyproject).group(1)
    assert minimum == "3.10"  # what JetPack 6 ships; change both together
    result = subprocess.run([*VERMIN, f"-t={minimum}-", "--violations", "--no-tips",
                             "--eval-annotations", "awq_edge", "export", "devices"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_finds_a_newer_feature(tmp_path):
    """vermin does flag 3.11+ code (so the check above can fail)."""
    (tmp_path / "new.py").write_text("import tomllib\n")
    result = subprocess.run([*VERMIN, "-t=3.10-", "--violations", "--no-tips", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "tomllib" in result.stdout
