"""The README's admin commands run as pasted, after its Quickstart example."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _block_after(heading: str, language: str) -> str:
    section = README.read_text().split(heading, 1)[1]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match is not None, heading
    return match.group(1)


def test_admin_cli_section_runs_after_the_quickstart(fresh_server, tmp_path: Path) -> None:
    (quickstart,) = [
        b
        for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
        if 'batch_norm_2d("stem.bn"' in b
    ]
    quickstart = quickstart.replace("127.0.0.1:50051", fresh_server.address)
    run = subprocess.run([sys.executable, "-c", quickstart], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    outputs = []
    for line in _block_after("### Admin CLI", "sh").splitlines():
        words = shlex.split(line, comments=True)
        assert words[0] == ".venv/bin/bnserver", line
        command = [sys.executable, "-m", "bnserver.cli", *words[1:]]
        done = subprocess.run(
            [*command, "--address", fresh_server.address],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert done.returncode == 0, (line, done.stderr)
        outputs.append(done.stdout)
    listed = outputs[0].splitlines()
    assert listed[0].split()[:4] == ["NAME", "KIND", "CHANNELS", "MODE"]
    assert [row.split()[0] for row in listed[1:]] == ["stem.bn"]
    assert "running_mean" in outputs[1]
    assert (tmp_path / "stem.npz").exists() and (tmp_path / "stem-torch.npz").exists()
    assert outputs[-1].strip() == "deleted stem.bn"
