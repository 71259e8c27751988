"""The README's SDK example runs as pasted (against a server of its own)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_quickstart_example_runs_twice(fresh_server) -> None:
    (example,) = [b for b in _python_blocks() if 'batch_norm_2d("stem.bn"' in b]
    assert '"127.0.0.1:50051"' in example
    script = example.replace("127.0.0.1:50051", fresh_server.address)
    for _ in range(2):  # state persists between runs; the example must not depend on a fresh server
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0].startswith("(8, 16, 32, 32) float32")
        mean, std = map(float, lines[0].split()[-2:])
        assert abs(mean) < 1e-5 and abs(std - 1) < 1e-4
        assert lines[-1] == "['head.bn', 'stem.bn']"
