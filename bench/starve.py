"""Starvation and flood benchmark: what stalled and oversized callers cost everyone else.

A real `seqr serve` (own process, tokens file) holding the load benchmark's library (N=100
shared-A adapters, SmolLM2 shapes). A legitimate caller routes moments requests and health is
checked, first on an idle server, then while attackers hold calls open:

  unauth   1,000 Route calls with no token over 50 connections, whose request never arrives
  stream   1,000 idle RouteStreams from one route token over 50 connections (capped per principal)
  flood    32 concurrent unauthenticated 60 MB Route requests: the server's peak RSS growth

    .venv/bin/python bench/starve.py          # table to stdout and bench/out/starve.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from load import LIB, RANK, SEED, T, make_adapters, make_request, qv_modules, signature, start_server
from seqr_client import RouterClient
from seqr_client.wire import add_inputs
from seqr_core import SharedARecipe, generate_shared_a
from seqr_router.v1 import router_pb2
from seqr_server.auth import new_token_entry

ROOT = Path(__file__).resolve().parent.parent
ROUTE, STREAM = "/seqr_router.v1.Router/Route", "/seqr_router.v1.Router/RouteStream"
HEALTH = "/grpc.health.v1.Health/Check"


def start(data_dir: Path, tokens: Path) -> tuple[subprocess.Popen, str]:
    proc, port, _ = start_server(data_dir, "seqr", extra=("--tokens-file", str(tokens), "--max-message-mb", "64"))
    return proc, f"127.0.0.1:{port}"


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            vals[k] = int(v.split()[0])
    return vals["VmRSS"], vals["VmHWM"]


async def probe(target: str, token: str, payload: bytes, n: int) -> dict:
    """n health checks and n legitimate Route calls, one at a time; latencies in ms."""
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        health = ch.unary_unary(HEALTH, request_serializer=None, response_deserializer=None)
        route = ch.unary_unary(ROUTE, request_serializer=None, response_deserializer=None)
        md = (("authorization", f"Bearer {token}"),)
        await route(payload, metadata=md, timeout=30)
        hl, rl, errors = [], [], 0
        for _ in range(n):
            for fn, kw, out in ((health, {}, hl), (route, {"metadata": md}, rl)):
                t0 = time.perf_counter()
                try:
                    await fn(b"" if fn is health else payload, timeout=10, **kw)
                    out.append((time.perf_counter() - t0) * 1e3)
                except grpc.aio.AioRpcError:
                    errors += 1
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {"health_p50": pct(hl, 50), "health_p99": pct(hl, 99), "route_p50": pct(rl, 50),
            "route_p99": pct(rl, 99), "errors": errors}


async def stalled(target: str, *, calls: int, connections: int, method: str, token: str | None,
                  hold: asyncio.Event) -> list:
    chans = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(connections)]
    md = (("authorization", f"Bearer {token}"),) if token else ()

    async def never():
        await hold.wait()
        return
        yield  # noqa: unreachable - an async generator that never sends

    async def one(i):
        call = chans[i % connections].stream_stream(method, request_serializer=None,
                                                    response_deserializer=None)(never(), metadata=md)
        try:
            async for _ in call:
                pass
            return "OK"
        except grpc.aio.AioRpcError as e:
            return e.code().name

    try:
        return await asyncio.gather(*(one(i) for i in range(calls)))
    finally:
        for ch in chans:
            await ch.close()


async def flood(target: str, *, calls: int, mb: int) -> list:
    big = router_pb2.RouteRequest(library=LIB)
    big.tensors["x"].data = b"\0" * (mb << 20)
    payload = big.SerializeToString()
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 128 << 20)]) as ch:
        route = ch.unary_unary(ROUTE, request_serializer=None, response_deserializer=None)

        async def one():
            try:
                await route(payload, timeout=60)
                return "OK"
            except grpc.aio.AioRpcError as e:
                return e.code().name
        return await asyncio.gather(*(one() for _ in range(calls)))


async def under_attack(target, token, payload, n, attack) -> tuple[dict, dict]:
    hold = asyncio.Event()
    task = asyncio.ensure_future(attack(hold))
    await asyncio.sleep(2.0)                     # let every stalled call open
    res = await probe(target, token, payload, n)
    hold.set()
    codes = await task
    return res, {c: codes.count(c) for c in sorted(set(codes))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--stalled", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "starve.md",
                    help="where to write the table (bench/results/starve.md refreshes the committed one)")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    sig = signature()
    recipe = SharedARecipe(seed=SEED)
    shared_a = {m: generate_shared_a(recipe, module=m, rank=RANK, d_in=sig.spec(m).d_in) for m in qv_modules(sig)}
    adapters, dirs = make_adapters(a.adapters, sig, shared_a, rng)
    tpl = make_request(0, dirs, shared_a, rng)
    req = router_pb2.RouteRequest(library=LIB)
    add_inputs(req, moments=tpl["moments"], tokens=T)
    payload = req.SerializeToString()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens, entries = {}, []
        for name, roles in (("admin", ["admin"]), ("host", ["route"]), ("greedy", ["route"])):
            tokens[name], e = new_token_entry(name=name, roles=roles)
            entries.append(e)
        tok_path = Path(tmp) / "tokens.json"
        tok_path.write_text(json.dumps({"tokens": entries}))
        proc, target = start(Path(tmp) / "data", tok_path)
        try:
            with RouterClient(target, token=tokens["admin"], timeout=120) as c:
                c.create_library(LIB, signature=sig, shared_a_seed=SEED, shared_a_rank=RANK,
                                 shared_a_modules=list(shared_a))
                for name, files in adapters:
                    c.put_adapter_files(files, name=name, library=LIB)
            base = asyncio.run(probe(target, tokens["host"], payload, a.probes))
            rows.append(("idle server", base, {}))
            for label, method, tok in ((f"{a.stalled} stalled Route, no token", ROUTE, None),
                                       (f"{a.stalled} idle RouteStreams, one route token", STREAM, tokens["greedy"])):
                attack = lambda hold, m=method, t=tok: stalled(  # noqa: E731
                    target, calls=a.stalled, connections=a.connections, method=m, token=t, hold=hold)
                res, codes = asyncio.run(under_attack(target, tokens["host"], payload, a.probes, attack))
                rows.append((label, res, codes))
            rss0, _ = rss_kb(proc.pid)
            codes = asyncio.run(flood(target, calls=32, mb=60))
            rss1, hwm = rss_kb(proc.pid)
        finally:
            proc.terminate()
            proc.wait()
    lines = ["| situation | health p50 ms | health p99 ms | Route p50 ms | Route p99 ms | probe errors | attackers' codes |",
             "|---|---|---|---|---|---|---|"]
    for label, r, cds in rows:
        lines.append(f"| {label} | {r['health_p50']:.2f} | {r['health_p99']:.2f} | {r['route_p50']:.2f} | "
                     f"{r['route_p99']:.2f} | {r['errors']} | {', '.join(f'{k} {v}' for k, v in cds.items()) or '-'} |")
    flood_line = (f"32 concurrent unauthenticated 60 MB Route requests: {dict((c, codes.count(c)) for c in set(codes))}; "
                  f"server RSS {rss0 / 1024:.0f} MiB before, {rss1 / 1024:.0f} MiB after, peak (VmHWM) {hwm / 1024:.0f} MiB")
    head = (f"`seqr serve` (grpc.aio), tokens file; N={a.adapters} shared-A adapters, 60 modules, r=8, moments "
            f"requests; {a.probes} sequential health checks and Routes per row; {os.cpu_count()} CPUs shared "
            f"with the attackers and the prober")
    text = head + "\n\n" + "\n".join(lines) + "\n\n" + flood_line + "\n"
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
