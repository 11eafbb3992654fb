"""Two real servers on 127.0.0.1:0 for the whole fuzz session, and the session's ledger.

``open``: no tokens file (every caller is admin); ``onnx``: the same with the onnxruntime
scoring backend. ``tokens``: a tokens file with an admin, a
route token restricted to ``shared-*`` adapters, and an admin restricted to ``shared-*``
adapters and libraries LIB and ``fz-*``; calls also come without a token and with a forged one.
Both hold LIB with every e2e test adapter. At the end the statuses seen per RPC are printed and
written to ``<out>/report.json`` (out: $SEQR_FUZZ_OUT, default ``.fuzz/`` in the repository).

How much to run comes from the environment (see ``python -m tests.fuzz --help``): by default a
fixed, derandomized budget sized for CI; SEQR_FUZZ_SECONDS turns each test into a randomized
run of that many seconds.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from seqr_server.auth import new_token_entry

from ..e2e.conftest import LIB, RANK, launch, populate, world  # noqa: F401 - world is a fixture
from .corpus import FuzzWorld
from .harness import FuzzServer, Fuzzer, Ledger
from .outcome import ROOT, Incidents

OUT = Path(os.environ.get("SEQR_FUZZ_OUT") or Path(ROOT) / ".fuzz")
PRINCIPALS = {
    "admin": dict(roles=["admin"]),
    "route-restricted": dict(roles=["route"], adapters=["shared-*"]),
    "admin-restricted": dict(roles=["admin"], adapters=["shared-*"], libraries=[LIB, "fz-*"]),
}
LEDGER = Ledger()


@dataclass(frozen=True)
class Budget:
    examples: int                  # per test (CI) or per round (long run)
    seconds: float | None          # long run: time per test; None: one derandomized campaign
    max_string: int                # longest string/bytes a structured case draws


def budget() -> Budget:
    seconds = os.environ.get("SEQR_FUZZ_SECONDS")
    if seconds:
        return Budget(examples=100, seconds=float(seconds), max_string=1 << 20)
    return Budget(examples=int(os.environ.get("SEQR_FUZZ_EXAMPLES", "80")), seconds=None, max_string=1 << 16)


@pytest.fixture(scope="session")
def fuzzer(world, tmp_path_factory):
    fw = FuzzWorld.from_world(world, lib=LIB, rank=RANK)
    root = tmp_path_factory.mktemp("fuzz")
    tokens, entries = {}, []
    for name, kw in PRINCIPALS.items():
        tokens[name], entry = new_token_entry(name=name, **kw)
        entries.append(entry)
    (root / "tokens.json").write_text(json.dumps({"tokens": entries}))
    open_h = launch(root / "open")
    onnx_h = launch(root / "onnx", backend="onnx")
    secured = launch(root / "tokens", tokens_file=root / "tokens.json")
    for h in (open_h, onnx_h):
        populate(h, world).close()
    populate(secured, world, token=tokens["admin"]).close()
    servers = {"open": FuzzServer("open", open_h.target, {"open": None}, admin="open", handles=open_h),
               "onnx": FuzzServer("onnx", onnx_h.target, {"open": None}, admin="open", handles=onnx_h),
               "tokens": FuzzServer("tokens", secured.target, {**tokens, "anonymous": None},
                                    admin="admin", handles=secured)}
    with Incidents() as incidents:
        yield Fuzzer(servers, fw, incidents=incidents, ledger=LEDGER, out_dir=OUT / "failures")
    for s in servers.values():
        s.close()
        t0 = time.monotonic()
        s.handles.stop(grace=1.0)
        # A fuzzed server must still shut down within its grace (issue 9 item 6 hung here).
        assert time.monotonic() - t0 < 1.0 + 10, f"{s.name}: stop took {time.monotonic() - t0:.1f} s"


def pytest_terminal_summary(terminalreporter) -> None:
    if not LEDGER.statuses:
        return
    doc = LEDGER.to_json()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(doc, indent=1))
    tr = terminalreporter
    tr.section("fuzz: statuses per RPC")
    for rpc, codes in doc["statuses"].items():
        seconds = doc["call_seconds"].get(rpc, 0.0)
        tr.write_line(f"{rpc:16} {sum(codes.values()):6d} calls {seconds:7.1f} s  "
                      + " ".join(f"{c}={n}" for c, n in sorted(codes.items())))
    for what in ("known_issues", "not_sent"):
        for k, n in doc[what].items():
            tr.write_line(f"{what}: {k} x{n}")
    tr.write_line(f"report: {OUT / 'report.json'}")
