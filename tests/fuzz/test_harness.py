"""The fuzz's oracles catch what they are for. A plain gRPC server (not ours) plays a broken
Router: it answers INTERNAL or UNKNOWN, a status without our error details, hangs, or returns
bytes that are no RouteResponse; each must
fail the run and leave a reproducer that loads back to the same case. And a server that has
gone away fails the liveness check."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from seqr_router.v1 import router_pb2

from .cases import Case
from .corpus import route_seeds
from .harness import FuzzServer, Fuzzer, Ledger, load_reproducer
from .outcome import Incidents

pytestmark = pytest.mark.fuzz


def _internal(req, ctx):
    ctx.abort(grpc.StatusCode.INTERNAL, "internal error (incident 0123456789ab; see the server log)")


def _unknown(req, ctx):
    raise RuntimeError("a handler that escaped its error mapping")


def _bare(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no library; a status without google.rpc.Status details")


def _hang(req, ctx):
    threading.Event().wait(3)
    return router_pb2.RouteResponse().SerializeToString()


def _garbage(req, ctx):
    return b"\xff\xff\xff\xff"


@pytest.fixture
def broken_router(request):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "seqr_router.v1.Router", {"Route": grpc.unary_unary_rpc_method_handler(request.param)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield server, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.parametrize("broken_router, problem", [
    (_internal, "status INTERNAL"), (_unknown, "status UNKNOWN"), (_hang, "status DEADLINE_EXCEEDED"),
    (_garbage, "does not decode as RouteResponse"), (_bare, "not a handler's answer")],
    indirect=["broken_router"], ids=["internal", "unknown", "hang", "garbage", "bare-status"])
def test_a_bad_answer_fails_the_run_and_saves_a_loadable_reproducer(fuzzer, broken_router, problem, tmp_path):
    _, target = broken_router
    fs = FuzzServer("open", target, {"open": None}, admin="open")
    ledger = Ledger()
    f = Fuzzer({"open": fs}, fuzzer.fw, incidents=Incidents(), ledger=ledger, out_dir=tmp_path, timeout_s=1.0)
    case = Case("open", "open", (route_seeds(fuzzer.fw)[0].SerializeToString(),))
    with pytest.raises(AssertionError, match=problem):
        f.check("Route", case)
    (saved,) = tmp_path.glob("Route-*.json")
    assert load_reproducer(saved) == ("Route", case)
    assert ledger.failures == [str(saved)]
    fs.close()


@pytest.mark.parametrize("broken_router", [_garbage], indirect=True)
def test_a_server_that_stopped_fails_the_liveness_check(fuzzer, broken_router):
    server, target = broken_router
    fs = FuzzServer("open", target, {"open": None}, admin="open")
    f = Fuzzer({"open": fs}, fuzzer.fw, incidents=Incidents(), ledger=Ledger(), out_dir=fuzzer.out_dir)
    server.stop(0).wait()
    with pytest.raises(AssertionError, match="stopped serving"):
        f.assert_alive(fs, route=False)
    fs.close()
