"""Regenerate the committed protocol code in proto/bnservice/v1.

Usage: python scripts/gen_protos.py [--out DIR]

Writes *_pb2.py, *_pb2_grpc.py and their .pyi stubs (mypy-protobuf) next to
the .proto files, or into DIR (tests/test_generated_code.py generates into a
temporary directory and compares). Never edit the output by hand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = Path("bnservice") / "v1"
INIT = '"""Generated protocol modules for bnservice.v1 (see scripts/gen_protos.py)."""\n'


def generate(out: Path) -> None:
    """Run protoc over every .proto of the package and write the result under `out`."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    bindir = str(Path(sys.executable).parent)
    env_path = os.environ.get("PATH", "")
    # protoc finds the mypy-protobuf plugins on PATH; they live beside this interpreter.
    os.environ["PATH"] = bindir + os.pathsep + env_path
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        try:
            code = protoc.main(args)
        finally:
            os.environ["PATH"] = env_path
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        target = out / PACKAGE
        target.mkdir(parents=True, exist_ok=True)
        for produced in sorted((Path(tmp) / PACKAGE).iterdir()):
            shutil.copyfile(produced, target / produced.name)
        (target / "__init__.py").write_text(INIT)
        (target / "py.typed").write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
