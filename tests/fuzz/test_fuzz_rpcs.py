"""Fuzzing stays on (issue 9 item 12): every RPC of Router and LibraryAdmin, structured
requests and mutated bytes, from every kind of caller, against real servers.

CI runs a fixed, derandomized number of cases per test (same inputs every run). The long run
(`./dev fuzz --minutes 30`) runs the same tests randomized for a share of the time each.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from .cases import cases
from .conftest import LEDGER, OUT, budget
from .corpus import RPCS
from .harness import load_reproducer

pytestmark = pytest.mark.fuzz
RPC_NAMES = [r.name for r in RPCS]


def campaign(fuzzer, rpc: str, kind: str) -> None:
    b = budget()
    strategy = cases(fuzzer.fw, next(r for r in RPCS if r.name == rpc), kind, max_string=b.max_string)

    def one_round(**kw) -> None:
        @settings(max_examples=b.examples, deadline=None, suppress_health_check=list(HealthCheck),
                  print_blob=True, **kw)
        @given(case=strategy)
        def run(case):
            fuzzer.check(rpc, case)
        run()

    if b.seconds is None:
        one_round(derandomize=True, database=None)
    else:
        end = time.monotonic() + b.seconds
        while time.monotonic() < end:
            one_round(derandomize=False, database=DirectoryBasedExampleDatabase(str(OUT / "hypothesis")))
    for server in fuzzer.servers.values():
        fuzzer.assert_alive(server)


@pytest.mark.parametrize("rpc", RPC_NAMES)
def test_structured_requests_get_a_handler_status_and_leave_the_server_serving(fuzzer, rpc):
    campaign(fuzzer, rpc, "structured")
    codes = {c for (r, c) in LEDGER.statuses if r == rpc}
    # Not a degenerate fuzz: valid seeds succeed and broken ones are refused.
    assert "OK" in codes and len(codes) >= 2, (rpc, sorted(codes))


@pytest.mark.parametrize("rpc", RPC_NAMES)
def test_mutated_request_bytes_get_a_handler_status_and_leave_the_server_serving(fuzzer, rpc):
    campaign(fuzzer, rpc, "bytes")


@pytest.mark.skipif(not os.environ.get("SEQR_FUZZ_REPLAY"), reason="only for `./dev fuzz --replay FILE`")
def test_replayed_reproducer_gets_a_handler_status(fuzzer):
    rpc, case = load_reproducer(Path(os.environ["SEQR_FUZZ_REPLAY"]))
    outcome = fuzzer.check(rpc, case)
    print(f"{rpc} from {case.server}/{case.principal}: {outcome.code if outcome else 'not sent (known issue)'}")
