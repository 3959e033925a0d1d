"""docs/api.md's complete example, run as it is written there (with the test engine's path)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_the_complete_example_in_docs_api_md_runs(engine_dir):
    text = DOC.read_text(encoding="utf-8")
    example = re.search(r"## A complete example.*?```python\n(.*?)```", text, re.S).group(1)
    assert '"engines/smollm2"' in example
    code = example.replace('"engines/smollm2"', repr(str(engine_dir)))
    code += "\nimport sys\nassert 'torch' not in sys.modules, 'the runtime imported torch'\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "context 2048 tokens; cap 1.00 GiB" in out
    assert "[48 tokens at" in out
    cancelled = re.search(r"\[cancelled after (\d+) tokens: (\w+)\]", out)
    assert cancelled.group(2) == "cancelled" and 10 <= int(cancelled.group(1)) < 100, out
    reused, prompt = map(int, re.search(r"\[(\d+) of (\d+) prompt tokens were in the cache\]", out).groups())
    assert 0 < reused < prompt, out  # turn 2 fed only its own message
