"""Where a moments Route spends the server's CPU: cProfile of the event-loop thread of a real server.

A `seqr serve` server runs in this process (create_server, the load bench's library: N=100
shared-A adapters on 60 modules); a client in a separate process (so it does not share this
process's GIL) sends pre-serialised moments requests over gRPC at a fixed concurrency. Small
moments Routes are answered on the event loop (RouterService.Route_inline), so profiling that
one thread with a CPU clock (time.thread_time) sees the whole server-side path of such a
request: grpc.aio's handler, the dispatcher (auth, admission, bounded read), decode, scoring,
the response and metrics. Prints the top functions and CPU ms per request.

    .venv/bin/python bench/route_profile.py [--requests 3000] [--concurrency 8] [--top 30]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench")]

import load as L  # noqa: E402  (bench/load.py: the synthetic library and requests)
from seqr_client import RouterClient  # noqa: E402
from seqr_client.wire import add_inputs  # noqa: E402
from seqr_core import SharedARecipe, generate_shared_a  # noqa: E402
from seqr_router.v1 import router_pb2  # noqa: E402


def library(adapters: int):
    rng = np.random.default_rng(0)
    sig = L.signature()
    shared_a = {m: generate_shared_a(SharedARecipe(seed=L.SEED), module=m, rank=L.RANK, d_in=sig.spec(m).d_in)
                for m in L.qv_modules(sig)}
    files, dirs = L.make_adapters(adapters, sig, shared_a, rng)
    templates = [L.make_request(t, dirs, shared_a, rng) for t in rng.choice(adapters, 8, replace=False)]
    payloads = []
    for tpl in templates:
        req = router_pb2.RouteRequest(library=L.LIB)
        add_inputs(req, moments=tpl["moments"], tokens=L.T)
        payloads.append(req.SerializeToString())
    return sig, shared_a, files, payloads


def client(target: str, adapters: int, requests: int, concurrency: int) -> int:
    """The client process: warm up, then ``requests`` Routes; prints the wall time."""
    payloads = library(adapters)[3]
    r = asyncio.run(L.run_cell(target, payloads, concurrency=concurrency, seconds=0.0, min_requests=200,
                               server_pids=[]))                                   # warm-up
    print("ready", flush=True)
    sys.stdin.readline()                                                          # the profiler is on
    r = asyncio.run(L.run_cell(target, payloads, concurrency=concurrency, seconds=0.0,
                               min_requests=requests, server_pids=[]))
    print(f"done {r['requests']} {r['errors']} {r['rps']:.1f}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--sort", default="tottime", choices=("tottime", "cumulative"))
    ap.add_argument("--client", metavar="TARGET", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.client:
        return client(a.client, a.adapters, a.requests, a.concurrency)

    from threadpoolctl import threadpool_limits

    from seqr_server.app import create_server
    from seqr_server.config import ServerConfig

    threadpool_limits(limits=1, user_api="blas")     # as `seqr serve`
    sig, shared_a, files, _ = library(a.adapters)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ServerConfig(listen="127.0.0.1:0", data_dir=Path(tmp) / "data", metrics_port=None, demo=False)
        _, h = create_server(cfg)
        h.start()
        assert h.wait_ready(120), h.load_error
        try:
            with RouterClient(h.target, timeout=120) as c:
                c.create_library(L.LIB, signature=sig, shared_a_seed=L.SEED, shared_a_rank=L.RANK,
                                 shared_a_modules=list(shared_a))
                for name, f in files:
                    c.put_adapter_files(f, name=name, library=L.LIB)
            proc = subprocess.Popen([sys.executable, __file__, "--client", h.target, "--adapters", str(a.adapters),
                                     "--requests", str(a.requests), "--concurrency", str(a.concurrency)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "ready"
            prof = cProfile.Profile(time.thread_time)      # CPU of the loop thread only
            h.loop.call(_on_loop(prof.enable), timeout=10)
            c0 = time.process_time()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            done = proc.stdout.readline().split()
            cpu_all = time.process_time() - c0
            h.loop.call(_on_loop(prof.disable), timeout=10)
            proc.wait()
        finally:
            h.stop(grace=1.0)
    n = int(done[1])
    stats = pstats.Stats(prof, stream=(buf := io.StringIO()))
    loop_cpu = stats.total_tt
    stats.sort_stats(a.sort).print_stats(a.top)
    print(buf.getvalue())
    print(f"requests {n} (errors {done[2]}), {done[3]} RPS; server process CPU {cpu_all / n * 1e3:.3f} ms/req, "
          f"of which the profiled loop thread {loop_cpu / n * 1e3:.3f} ms/req (profiler overhead included)")
    return 0


def _on_loop(fn):
    async def run():
        fn()
    return run()


if __name__ == "__main__":
    sys.exit(main())
