"""The committed protocol code must be exactly what `make proto` generates."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "proto" / "bnservice" / "v1"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_committed_code_matches_fresh_generation(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    fresh_dir = tmp_path / "bnservice" / "v1"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir()}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir() if p.name in fresh}
    assert sorted(fresh) == sorted(committed), "generated files missing from proto/bnservice/v1"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{stale} differ from a fresh generation; run `make proto` and commit"


@pytest.mark.parametrize("suffix", ["_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"])
def test_every_proto_has_generated_code(suffix: str) -> None:
    for proto in GENERATED.glob("*.proto"):
        assert (GENERATED / (proto.stem + suffix)).exists()
