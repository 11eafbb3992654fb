"""The committed gRPC stubs are exactly what protoc generates from proto/ (never hand-edited)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_protos(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_stubs.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "seqr_router" / "v1").glob("*_pb2*"))
    committed = sorted(p.relative_to(ROOT / "stubs") for p in (ROOT / "stubs" / "seqr_router" / "v1").glob("*_pb2*"))
    assert fresh == committed, "stubs added or removed: run scripts/gen_stubs.py"
    drift = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (ROOT / "stubs" / p).read_bytes()]
    assert not drift, f"stubs differ from proto/ (run .venv/bin/python scripts/gen_stubs.py): {drift}"


def test_every_proto_has_a_package_matching_its_path():
    for proto in (ROOT / "proto" / "seqr_router" / "v1").glob("*.proto"):
        assert "package seqr_router.v1;" in proto.read_text(), proto
