"""Regenerate the Python gRPC stubs from proto/ into stubs/ (or into --out DIR).

    .venv/bin/python scripts/gen_stubs.py            # rewrite stubs/seqr_router/v1/*_pb2*.py
    .venv/bin/python scripts/gen_stubs.py --out DIR  # write elsewhere (the drift test does this)

The generated files are committed, so installing the project needs no protoc; the test
tests/server/test_stub_drift.py regenerates into a temp dir and fails if they differ.
Generated code is never edited by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_DIR = PROTO_ROOT / "seqr_router" / "v1"
STUBS_ROOT = ROOT / "stubs"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpcio-tools) for every proto; return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rels = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *rels]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return sorted((out_root / "seqr_router" / "v1").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=STUBS_ROOT, help="output root (default: stubs/)")
    args = ap.parse_args(argv)
    for p in generate(args.out):
        print(p.relative_to(args.out) if p.is_relative_to(args.out) else p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
