"""The long fuzz run: `./dev fuzz --minutes 30` (or `python -m tests.fuzz`).

Runs tests/fuzz/test_fuzz_rpcs.py randomized, each (RPC, kind) test for an equal share of the
time, against the same real servers as CI. Reproducers of any failure land in
<out>/failures/*.json, statuses in <out>/report.json, and hypothesis keeps failing inputs in
<out>/hypothesis so the next run tries them first. `--replay FILE` sends one saved reproducer
to fresh servers and judges the answer the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

from .corpus import RPCS

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="./dev fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="total time (default 30)")
    ap.add_argument("--rpc", action="append", choices=[r.name for r in RPCS],
                    help="fuzz only this RPC (repeatable; default every RPC)")
    ap.add_argument("--kind", choices=("structured", "bytes", "both"), default="both")
    ap.add_argument("--out", type=Path, help="reports and reproducers (default .fuzz/)")
    ap.add_argument("--replay", type=Path, metavar="FILE", help="replay one reproducer and stop")
    a, rest = ap.parse_known_args(argv)
    if a.out is not None:
        os.environ["SEQR_FUZZ_OUT"] = str(a.out.resolve())
    args = ["-q", "-p", "no:cacheprovider", *rest]
    if a.replay is not None:
        os.environ["SEQR_FUZZ_REPLAY"] = str(a.replay.resolve())
        return pytest.main([*args, f"{HERE / 'test_fuzz_rpcs.py'}::test_replayed_reproducer_gets_a_handler_status"])
    rpcs = a.rpc or [r.name for r in RPCS]
    kinds = ("structured", "bytes") if a.kind == "both" else (a.kind,)
    tests = [f"{HERE / 'test_fuzz_rpcs.py'}::{_test(k)}[{r}]" for k in kinds for r in rpcs]
    os.environ["SEQR_FUZZ_SECONDS"] = str(max(a.minutes * 60 / len(tests), 1.0))
    print(f"fuzzing {len(tests)} campaigns for {a.minutes:g} min ({float(os.environ['SEQR_FUZZ_SECONDS']):.0f} s each)",
          file=sys.stderr)
    return pytest.main([*args, *tests])


def _test(kind: str) -> str:
    return ("test_structured_requests_get_a_handler_status_and_leave_the_server_serving" if kind == "structured"
            else "test_mutated_request_bytes_get_a_handler_status_and_leave_the_server_serving")


if __name__ == "__main__":
    sys.exit(main())
