"""Load test: an asyncio gRPC client against a local `seqr serve`, in each input form.

Library: N=100 synthetic shared-A adapters on 60 modules (q_proj/v_proj of a 30-layer,
hidden-576 Llama: SmolLM2-135M's shapes), r=8, uploaded through PutAdapter like real ones.
Requests: 128-token prompts whose hidden states light up one adapter each (8 templates),
sent as activations (8.8 MB), projected (246 KB) or moments (15 KB). For each form and
concurrency 1, 8, 32 it reports RPS, p50/p99 latency, errors, and the ratio of the gRPC p50
to the in-process seqr_core.route time of the same request (what the wire and server add).

    .venv/bin/python bench/load.py                      # table to stdout + bench/out/load.md
    .venv/bin/python bench/load.py --server seqr,sync   # `seqr serve` (grpc.aio) beside the old
                                                        # synchronous transport (bench/sync_server.py)
    .venv/bin/python bench/load.py --forms moments --processes 1,2   # `seqr serve --processes N`

Server CPU per request is measured from /proc/<pid>/stat (utime + stime) of every server process
(a group's parent and members) over each cell. The client spreads its calls over one
connection per worker (at least 8), so a process group's members all get work.

The server runs in its own process (as in production); client and server share this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from threadpoolctl import threadpool_limits

from seqr_client import RouterClient, channel_options
from seqr_client.wire import add_inputs
from seqr_core import (LibraryIndex, ModuleInput, RouteOptions, SharedARecipe, generate_shared_a,
                       llama_signature, parse_peft_adapter, route, write_safetensors)
from seqr_router.v1 import router_pb2

ROOT = Path(__file__).resolve().parent.parent
LIB, SEED, RANK, T = "bench", 2025, 8, 128
FORMS = ("moments", "projected", "activations")


# ------------------------------------------------------------------------- synthetic library
def signature():
    return llama_signature(base_model="bench/smollm2-shapes", hidden=576, intermediate=1536, layers=30,
                           heads=9, kv_heads=3)


def qv_modules(sig) -> list[str]:
    return [m.name for m in sig.modules if m.name.endswith(("q_proj", "v_proj"))]


def make_adapters(n: int, sig, shared_a: dict, rng) -> tuple[list[tuple[str, dict]], dict]:
    """PEFT files of n shared-A adapters; each B has one strong direction u (what lights it up)."""
    out, dirs = [], {}
    for k in range(n):
        tensors, dirs[k] = {}, {}
        for m, A in shared_a.items():
            d_out = sig.spec(m).d_out
            u = rng.standard_normal(RANK)
            u /= np.linalg.norm(u)
            w = rng.standard_normal(d_out) / np.sqrt(d_out)
            B = 0.02 * (rng.standard_normal((d_out, RANK)) / np.sqrt(d_out) + 3.0 * np.outer(w, u))
            tensors[f"base_model.model.{m}.lora_A.weight"] = A
            tensors[f"base_model.model.{m}.lora_B.weight"] = B.astype(np.float32)
            dirs[k][m] = u
        cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["q_proj", "v_proj"]}
        out.append((f"a{k:03d}", {"adapter_config.json": json.dumps(cfg).encode(),
                                  "adapter_model.safetensors": write_safetensors(tensors)}))
    return out, dirs


def make_request(target: int, dirs: dict, shared_a: dict, rng) -> dict[str, dict]:
    """Hidden states (per layer, shared by q and v) whose projections point along ``target``'s u."""
    layers = sorted({int(m.split(".")[2]) for m in shared_a})
    acts, proj, mom = {}, {}, {}
    for layer in layers:
        q, v = f"model.layers.{layer}.self_attn.q_proj", f"model.layers.{layer}.self_attn.v_proj"
        M = np.vstack([shared_a[q], shared_a[v]]).astype(np.float64)             # (2r, d)
        c = rng.standard_normal((T, 1)) * 3.0
        z = np.hstack([c * dirs[target][q], c * dirs[target][v]]) + 0.3 * rng.standard_normal((T, 2 * RANK))
        x = np.linalg.lstsq(M, z.T, rcond=None)[0].T + 0.01 * rng.standard_normal((T, M.shape[1]))
        x = x.astype(np.float32)
        for m in (q, v):
            acts[m] = x
            zm = x.astype(np.float64) @ shared_a[m].T.astype(np.float64)
            proj[m] = zm.astype(np.float32)
            mom[m] = (zm.T @ zm / T).astype(np.float32)
    return {"activations": acts, "projected": proj, "moments": mom}


# ------------------------------------------------------------------------- server process
def start_server(data_dir: Path, kind: str, *, processes: int = 1,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int, list[int]]:
    """`seqr serve` (kind "seqr", with ``extra`` flags) or the old sync transport, in its own process;
    returns it, its port and the pids of all its processes (a group's parent and members)."""
    env = {**os.environ, "SEQR_METRICS_PORT": "off", "SEQR_LOG_LEVEL": "warning"}
    if kind == "seqr":
        cmd = [sys.executable, "-m", "seqr_cli", "serve", "--listen", "127.0.0.1:0", "--no-demo",
               "--data-dir", str(data_dir), "--log-level", "info", "--processes", str(processes), *extra]
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "sync_server.py"), "--data-dir", str(data_dir)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=data_dir.parent)
    port, pids = None, [proc.pid]
    for line in proc.stderr:
        doc = json.loads(line) if line.startswith("{") else {}
        port = port or doc.get("port")
        if doc.get("msg") == "serving" and (processes == 1 or doc.get("logger") == "seqr.group"):
            pids += doc.get("pids", [])
            break
    # Keep draining its log: a full pipe would block the server's writes (and its event loop).
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    if port is None:
        proc.kill()
        raise SystemExit("server did not start")
    return proc, port, pids


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (live processes only), from /proc."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])        # utime, stime (fields 14, 15 of stat)
    return total / tick


# ------------------------------------------------------------------------- load
async def run_cell(target: str, payloads: list[bytes], *, concurrency: int, seconds: float,
                   min_requests: int, server_pids: list[int]) -> dict:
    # One connection per worker (at least 8): a process group's members each get connections.
    opts = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=opts) for _ in range(max(8, concurrency))]
    try:
        # Pre-serialised requests: the client spends its CPU on the wire, not on protobuf.
        calls = [ch.unary_unary("/seqr_router.v1.Router/Route", request_serializer=None,
                                response_deserializer=router_pb2.RouteResponse.FromString) for ch in channels]
        for call in calls:
            await call(payloads[0], timeout=120)                 # warm the connections
        lat, errors, done = [], 0, 0
        t_end = time.perf_counter() + seconds

        async def worker(w: int):
            nonlocal errors, done
            i, call = w, calls[w % len(calls)]
            while time.perf_counter() < t_end or done < min_requests:
                t0 = time.perf_counter()
                try:
                    await call(payloads[i % len(payloads)], timeout=120)
                    lat.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError:
                    errors += 1
                done += 1
                i += concurrency

        t0, cpu0, own0 = time.perf_counter(), cpu_seconds(server_pids), time.process_time()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu, own = cpu_seconds(server_pids) - cpu0, time.process_time() - own0
    finally:
        for ch in channels:
            await ch.close()
    ms = np.array(lat) * 1e3
    return {"requests": done, "errors": errors, "rps": len(lat) / wall,
            "server_cpu_ms": cpu / max(done, 1) * 1e3, "client_cpu_ms": own / max(done, 1) * 1e3,
            "p50": float(np.percentile(ms, 50)) if lat else float("nan"),
            "p99": float(np.percentile(ms, 99)) if lat else float("nan")}


def core_time(index: LibraryIndex, req: dict, form: str, repeats: int) -> float:
    inputs = {m: ModuleInput(form, a, T) for m, a in req.items()}
    route(index, inputs, RouteOptions())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        route(index, inputs, RouteOptions())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--seconds", type=float, default=6.0, help="per cell")
    ap.add_argument("--min-requests", type=int, default=16, help="per cell, even past --seconds")
    ap.add_argument("--server", default="seqr",
                    help="comma list of transports, run one after the other on the same store: "
                         "seqr (`seqr serve`, grpc.aio) and/or sync (the old transport, bench/sync_server.py)")
    ap.add_argument("--processes", default="1",
                    help="comma list: run `seqr serve --processes N` for each N, one after the other")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "load.md",
                    help="where to write the table (bench/results/load.md refreshes the committed one)")
    a = ap.parse_args(argv)
    # Same BLAS setting as `seqr serve` (1 thread per request) for the in-process core column.
    threadpool_limits(limits=1, user_api="blas")
    rng = np.random.default_rng(0)
    sig = signature()
    recipe = SharedARecipe(seed=SEED)
    shared_a = {m: generate_shared_a(recipe, module=m, rank=RANK, d_in=sig.spec(m).d_in) for m in qv_modules(sig)}
    adapters, dirs = make_adapters(a.adapters, sig, shared_a, rng)
    templates = [make_request(t, dirs, shared_a, rng) for t in rng.choice(a.adapters, 8, replace=False)]

    # the same index in-process, for the core-time column
    index = LibraryIndex.create(name=LIB, signature=sig, shared_a=shared_a).add_adapters(
        [(parse_peft_adapter(f, name=n, signature=sig).adapter, i, "F32") for i, (n, f) in enumerate(adapters)])[0]

    rows = []
    kinds = [(k, int(n)) for k in a.server.split(",") for n in (a.processes.split(",") if k == "seqr" else ["1"])]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        proc, port, _ = start_server(data_dir, "seqr")       # populate through the real API
        t0 = time.perf_counter()
        with RouterClient(f"127.0.0.1:{port}", timeout=120) as c:
            c.create_library(LIB, signature=sig, shared_a_seed=SEED, shared_a_rank=RANK,
                             shared_a_modules=list(shared_a))
            for name, files in adapters:
                c.put_adapter_files(files, name=name, library=LIB)
        print(f"uploaded {len(adapters)} adapters in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        proc.terminate()
        proc.wait()
        for kind, nproc in kinds:
            proc, port, pids = start_server(data_dir, kind, processes=nproc)
            target = f"127.0.0.1:{port}"
            try:
                for form in a.forms.split(","):
                    payloads = []
                    for tpl in templates:
                        req = router_pb2.RouteRequest(library=LIB)
                        add_inputs(req, **{"inputs" if form == "activations" else form: tpl[form]}, tokens=T)
                        payloads.append(req.SerializeToString())
                    ct = core_time(index, templates[0][form], form, repeats=3 if form == "activations" else 20)
                    for conc in (int(x) for x in a.concurrency.split(",")):
                        r = asyncio.run(run_cell(target, payloads, concurrency=conc, seconds=a.seconds,
                                                 min_requests=a.min_requests, server_pids=pids))
                        row = {"server": kind, "processes": nproc, "form": form, "kb": len(payloads[0]) / 1024, "concurrency": conc,
                               **r, "core_ms": ct, "ratio": r["p50"] / ct}
                        rows.append(row)
                        print(f"{kind:5s} x{nproc} {form:11s} c={conc:<3d} {r['rps']:8.1f} rps  p50 {r['p50']:8.2f} ms  "
                              f"p99 {r['p99']:8.2f} ms  errors {r['errors']}  core {ct:.2f} ms  "
                              f"server cpu {r['server_cpu_ms']:.2f} ms/req  client cpu {r['client_cpu_ms']:.2f} ms/req",
                              file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait()
    table = ["| server | processes | form | request | concurrency | requests | errors | RPS | p50 ms | p99 ms | core ms "
             "| p50/core | server CPU ms/req | client CPU ms/req |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['server']} | {r['processes']} | {r['form']} | {r['kb']:.0f} KB | {r['concurrency']} | "
                     f"{r['requests']} | {r['errors']} | {r['rps']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                     f"{r['core_ms']:.2f} | {r['ratio']:.2f} | {r['server_cpu_ms']:.2f} | {r['client_cpu_ms']:.2f} |")
    head = (f"server: {a.server}; N={a.adapters} shared-A adapters, 60 modules, d=576, r=8, T={T}; "
            f"{os.cpu_count()} CPUs; client and server on the same machine")
    text = head + "\n\n" + "\n".join(table) + "\n"
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
