"""The README's PyTorch example runs as pasted (against a server of its own)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_pytorch_example_runs_twice(fresh_server, tmp_path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (example,) = [b for b in blocks if "convert_batchnorm(model, client" in b]
    assert '"127.0.0.1:50051"' in example
    script = example.replace("127.0.0.1:50051", fresh_server.address)
    for _ in range(2):  # the server keeps the modules; a second run must work as well
        run = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
        )
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        losses = [float(line.split()[-1]) for line in lines[:3]]
        assert [line.split()[:2] for line in lines[:3]] == [["step", str(i)] for i in range(3)]
        assert losses[2] < losses[0]
        assert lines[3] == "torch.Size([16, 10])"
        assert lines[4] == "3"
        assert lines[5].startswith("BatchNorm2d('readme.extra', 8") and "momentum=None" in lines[5]
    assert (tmp_path / "model.pt").exists()
