"""No caller, authenticated or not, can hold serving capacity it is not using (DESIGN §4).

The attacks are the ones that starved the synchronous server: calls whose request never
arrives, idle RouteStreams, and undecodable stream messages. Each test holds the stalled calls
open on real connections to a real server while a legitimate caller works beside them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading

import grpc
import pytest

from seqr_client import RouterClient
from seqr_server.auth import new_token_entry
from seqr_router.v1 import router_pb2

from .conftest import LIB, activations, populate

ROUTE = "/seqr_router.v1.Router/Route"
STREAM = "/seqr_router.v1.Router/RouteStream"
HEALTH = "/grpc.health.v1.Health/Check"


def _tokens(tmp_path, **principals) -> tuple[dict, object]:
    tokens, entries = {}, []
    for name, kw in principals.items():
        tokens[name], e = new_token_entry(name=name, **kw)
        entries.append(e)
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": entries}))
    return tokens, path


async def _stall(target: str, *, calls: int, connections: int, method: str, token: str | None,
                 hold: asyncio.Event, opened: list) -> list[grpc.StatusCode | None]:
    """Open ``calls`` calls over ``connections`` separate connections; none sends a message
    until ``hold`` is set (then they just end). Returns each call's final code."""
    chans = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                        ("grpc.channel_id", i)])
             for i in range(connections)]
    md = (("authorization", f"Bearer {token}"),) if token else ()

    async def never():
        await hold.wait()
        return
        yield  # pragma: no cover - makes this an async generator that sends nothing

    async def one(i: int):
        call = chans[i % connections].stream_stream(method, request_serializer=None,
                                                    response_deserializer=None)(never(), metadata=md)
        opened.append(call)
        try:
            async for _ in call:
                pass
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()

    try:
        return await asyncio.gather(*(one(i) for i in range(calls)))
    finally:
        for ch in chans:
            await ch.close()


class Attack:
    """Runs ``_stall`` on its own loop thread so the test's synchronous client works beside it."""

    def __init__(self, target: str, **kw):
        self.loop = asyncio.new_event_loop()
        self.hold = asyncio.Event()
        self.opened: list = []
        self.codes: list | None = None
        self._t = threading.Thread(target=self._run, args=(target, kw), daemon=True)
        self._t.start()

    def _run(self, target, kw):
        asyncio.set_event_loop(self.loop)
        self.hold = asyncio.Event()
        self.codes = self.loop.run_until_complete(_stall(target, hold=self.hold, opened=self.opened, **kw))

    def wait_open(self, n: int) -> None:
        ev = threading.Event()
        for _ in range(3000):
            if len(self.opened) >= n:
                return
            ev.wait(0.01)
        raise AssertionError(f"only {len(self.opened)} of {n} calls opened")

    def finish(self) -> list:
        self.loop.call_soon_threadsafe(self.hold.set)
        self._t.join(60)
        assert not self._t.is_alive()
        return self.codes


def _health(target: str) -> str:
    with RouterClient(target, timeout=5) as c:
        return c.health()


def test_stalled_calls_without_a_token_are_refused_and_block_nobody(world, start_server, tmp_path):
    tokens, path = _tokens(tmp_path, admin=dict(roles=["admin"]), host=dict(roles=["route"]))
    h = start_server(tmp_path / "d", tokens_file=path, workers=2)
    populate(h, world, token=tokens["admin"]).close()
    # 16 on one connection starved the old server's whole pool; here 400 over 20 connections.
    attack = Attack(h.target, calls=400, connections=20, method=ROUTE, token=None)
    attack.wait_open(400)
    assert _health(h.target) == "SERVING"
    with RouterClient(h.target, token=tokens["host"], timeout=5) as c:
        assert c.route(LIB, activations(world)).best is not None
    codes = attack.finish()
    # Refused from their metadata alone: they never sent a message, and got UNAUTHENTICATED.
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}


def test_one_callers_idle_streams_are_capped_and_others_still_route(world, start_server, tmp_path):
    tokens, path = _tokens(tmp_path, admin=dict(roles=["admin"]), greedy=dict(roles=["route"]),
                           host=dict(roles=["route"]))
    h = start_server(tmp_path / "d", tokens_file=path, workers=2,
                     limits=_limits(max_calls_per_principal=8))
    populate(h, world, token=tokens["admin"]).close()
    attack = Attack(h.target, calls=40, connections=4, method=STREAM, token=tokens["greedy"])
    attack.wait_open(40)
    assert _health(h.target) == "SERVING"
    with RouterClient(h.target, token=tokens["host"], timeout=5) as c:
        for _ in range(3):
            assert c.route(LIB, activations(world)).best is not None
    codes = attack.finish()
    # 8 idle streams were admitted (they end cleanly); the other 32 were refused at once.
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 32
    assert codes.count(grpc.StatusCode.OK) == 8


def test_a_request_that_never_arrives_is_dropped_after_the_read_timeout(world, start_server, tmp_path):
    h = start_server(tmp_path / "d", limits=_limits(read_timeout_s=0.5))
    populate(h, world).close()
    attack = Attack(h.target, calls=4, connections=1, method=ROUTE, token=None)
    attack.wait_open(4)
    # Nobody releases the calls: the server ends them itself.
    attack._t.join(30)
    assert attack.codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 4


def test_undecodable_messages_are_invalid_argument(world, start_server, tmp_path):
    h = start_server(tmp_path / "d")
    populate(h, world).close()
    with grpc.insecure_channel(h.target) as ch:
        stream = ch.stream_stream(STREAM, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as ei:
            list(stream(iter([b"\xff\xff\xff"]), timeout=10))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        unary = ch.unary_unary(ROUTE, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as ei:
            unary(b"\xff\xff\xff", timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request" in ei.value.details()


def _limits(**kw):
    from dataclasses import replace

    from seqr_server.config import Limits
    return replace(Limits(max_message_bytes=8 << 20, max_tokens=256), **kw)


@pytest.mark.slow
def test_sigterm_stops_the_server_after_undecodable_and_idle_streams(tmp_path):
    env = {**os.environ, "SEQR_METRICS_PORT": "off"}
    proc = subprocess.Popen([sys.executable, "-m", "seqr_cli", "serve", "--listen", "127.0.0.1:0",
                             "--data-dir", str(tmp_path / "d"), "--no-demo", "--grace", "2"],
                            env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        port = None
        for line in proc.stderr:
            doc = json.loads(line) if line.startswith("{") else {}
            port = doc.get("port", port)
            if doc.get("msg") == "serving":
                break
        assert port, "server did not start"
        target = f"127.0.0.1:{port}"
        ch = grpc.insecure_channel(target)
        stream = ch.stream_stream(STREAM, request_serializer=None, response_deserializer=None)
        for _ in range(20):           # 20 of these made the old server's stop() wait forever
            with pytest.raises(grpc.RpcError):
                list(stream(iter([b"\xff\xff\xff"]), timeout=10))
        attack = Attack(target, calls=20, connections=2, method=STREAM, token=None)
        attack.wait_open(20)
        proc.send_signal(signal.SIGTERM)
        # grace 2 s + drain 0: the process must be gone well within that plus start-up slack.
        assert proc.wait(timeout=30) == 0
        ch.close()
        attack.finish()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_moments_answered_on_the_loop_equal_those_answered_in_the_pool(world, populated, monkeypatch):
    """Small moments requests are scored on the event loop (a pool hop costs more than they do);
    the answer must not depend on where it was computed."""
    from seqr_server import router_service

    from .conftest import moments
    h, client = populated
    req = moments(world)
    assert h.manager.peek(LIB) is not None
    shared = list(world.shared_names)                # moments serve shared-A adapters only
    on_loop = client.route(LIB, moments=req, top_k=3, include_scores=True, candidates=shared)
    monkeypatch.setattr(router_service, "INLINE_MAX_BYTES", 0)     # every request to the pool
    in_pool = client.route(LIB, moments=req, top_k=3, include_scores=True, candidates=shared)
    assert [(c.name, c.score) for c in on_loop.choices] == [(c.name, c.score) for c in in_pool.choices]
    assert on_loop.library_version == in_pool.library_version
