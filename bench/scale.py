"""Fleet scale: one shared-A library at Llama-3-8B shapes, measured at N = 100, 1,000, 10,000.

32 layers × q, k, v, o (d_in 4096; d_out 4096 for q/o, 1024 for k/v), rank 16, one frozen A per
module from a seed — 128 modules. At each N: encrypted store size, cold startup and RSS of a
fresh process, put and delete p50/p99 at that N, Route p50 in-process and over gRPC (a real
`seqr serve`, the real client) for moments and projected inputs (T=128, all 128 modules, and
one layer's 4), beside what SpectR's N·r·d index would hold.

How the store is filled (the machine has ~60 GB of disk; a full fp32 PEFT upload at these
shapes is 54.5 MB, so 10,000 of them would be 545 GB):

* the first ``--real`` adapters (default 100) are real PEFT uploads through the manager —
  safetensors with the library's A and random B — parsed, QR-indexed and sealed like any put;
* the rest are filled in bulk through the store API (``put_adapters``, 250 per commit) with
  real sealed index objects of synthetic adapters (R drawn as the QR factor of a Gaussian B:
  Bartlett's decomposition) and a 100-byte stub in place of their PEFT files, which startup
  never reads. Store size is reported as measured, and with the stubs replaced by the
  measured size of a real upload (``store with full PEFT``, computed, not measured).

Puts and deletes at N are real uploads through the manager (then deleted again); so are the
one-module puts (0.4 MB) that show what a put costs besides the bytes and QRs of the adapter.

    .venv/bin/python bench/scale.py [--ns 100,1000,10000] [--work /tmp/seqr-scale] [--out bench/results/scale.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LIB, RANK, SEED, T = "llama3-8b", 16, 1234, 128


def signature():
    from seqr_core import llama_signature
    return llama_signature(base_model="meta-llama/Meta-Llama-3-8B", hidden=4096, intermediate=14336,
                           layers=32, heads=32, kv_heads=8)


def attention(sig) -> list[str]:
    return [m for m in sig.names if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


# ------------------------------------------------------------------ adapters
def real_files(rng, sig, shared_a, *, modules=None) -> dict[str, bytes]:
    """A PEFT upload as a trainer would write it (fp32): the library's A, random B (every
    shared-A module, or only ``modules``)."""
    from seqr_core import write_safetensors
    t = {}
    for m, A in shared_a.items():
        if modules is not None and m not in modules:
            continue
        t[f"base_model.model.{m}.lora_A.weight"] = A
        t[f"base_model.model.{m}.lora_B.weight"] = (rng.standard_normal((sig.spec(m).d_out, RANK)) * 0.02
                                                    ).astype(np.float32)
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "base_model_name_or_path": sig.base_model,
           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    return {"adapter_config.json": json.dumps(cfg).encode(), "adapter_model.safetensors": write_safetensors(t)}


def synthetic_index(rng, name: str, sig, shared_gram) -> bytes:
    """A sealed-ready index object of a synthetic shared-A adapter: R = the QR factor of a
    Gaussian s·B (Bartlett: χ diagonal, Gaussian upper triangle), stored as the service stores
    it (Gram weights of R, ‖ΔW‖_F² = tr(RᵀR·AAᵀ))."""
    from seqr_core.adapter_index import AdapterIndex, encode, gram_weights, sym_feat
    mods = tuple(sorted(shared_gram))
    R = np.zeros((len(mods), RANK, RANK))
    iu = np.triu_indices(RANK, 1)
    R[:, iu[0], iu[1]] = rng.standard_normal((len(mods), iu[0].size))
    d_out = np.array([sig.spec(m).d_out for m in mods])
    R[:, np.arange(RANK), np.arange(RANK)] = np.sqrt(rng.chisquare(d_out[:, None] - np.arange(RANK)))
    R *= 0.02 * 2.0                                          # std of B times the scale α/r
    w = gram_weights(R)                                      # (n, K)
    f2 = np.array([sym_feat(shared_gram[m]) @ w[k] for k, m in enumerate(mods)])
    return encode(AdapterIndex(name=name, upload_dtype="F32", modules=mods, ranks=(RANK,) * len(mods),
                               frob2=f2, gram=w.ravel(), own={}))


def requests(rng, shared_a) -> dict:
    """One prompt's projected z (T, r) and moments ZᵀZ/T (r, r) per module."""
    z, g = {}, {}
    for layer in range(32):
        x = rng.standard_normal((T, 4096)).astype(np.float32)
        for m in [m for m in shared_a if f".{layer}." in m]:
            zm = (x.astype(np.float64) @ shared_a[m].T.astype(np.float64))
            z[m], g[m] = zm.astype(np.float32), (zm.T @ zm / T).astype(np.float32)
    return {"projected": z, "moments": g}


# ------------------------------------------------------------------ phases
def open_store(work: Path):
    from seqr_server.store import KeyFileProvider, LibraryStore
    return LibraryStore.open(work / "data", KeyFileProvider(work / "kek.json"))


def phase_load(work: Path, reps: int) -> dict:
    """In a fresh process: open + load (cold start), RSS, in-process Route p50."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    from seqr_core import ModuleInput, RouteOptions, route
    from seqr_server.auth import OPEN
    from seqr_server.manager import LibraryManager
    base = rss_mb()                   # interpreter and imports: the fixed base, not the index
    t0 = time.perf_counter()
    mgr = LibraryManager(open_store(work))
    mgr.load()
    startup = time.perf_counter() - t0
    idx = mgr.get(LIB, OPEN).index
    loaded = rss_mb()
    req = requests(np.random.default_rng(1), dict(idx.shared_a))
    out = {"adapters": len(idx.adapters), "startup_s": startup, "rss_base_mb": base, "rss_mb": loaded,
           "index_used_mb": idx.nbytes() / 2 ** 20, "index_alloc_mb": idx.nbytes(used=False) / 2 ** 20}
    layer0 = [m for m in req["moments"] if ".0." in m]
    for form in ("moments", "projected"):
        for scope, mods in (("all", list(req[form])), ("layer", layer0)):
            inputs = {m: ModuleInput(form, req[form][m], T) for m in mods}
            route(idx, inputs, RouteOptions())
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                route(idx, inputs, RouteOptions())
                ts.append(time.perf_counter() - t)
            out[f"route_{form}_{scope}_ms"] = pct(ts, 50)
    mgr.close()
    return out


def serve_and_route(work: Path, reps: int, req: dict) -> dict:
    """A real `seqr serve` on the store: time to SERVING, its RSS, Route p50 over gRPC."""
    from seqr_client import RouterClient
    env = {**os.environ, "SEQR_METRICS_PORT": "off"}
    cmd = [sys.executable, "-m", "seqr_cli", "serve", "--listen", "127.0.0.1:0", "--no-demo",
           "--data-dir", str(work / "data"), "--key-file", str(work / "kek.json"), "--log-level", "info",
           "--max-message-mb", "256"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    port, out = None, {}
    try:
        for line in proc.stderr:
            doc = json.loads(line) if line.startswith("{") else {}
            port = doc.get("port", port)
            if doc.get("msg") == "serving":
                out["serving_s"] = time.perf_counter() - t0
                break
        if port is None or "serving_s" not in out:
            raise SystemExit("server did not start")
        out["server_rss_mb"] = rss_mb(proc.pid)
        with RouterClient(f"127.0.0.1:{port}", timeout=600) as c:
            for form in ("moments", "projected"):
                kw = {form: req[form], "tokens": T if form == "moments" else None}
                c.route(LIB, **kw)
                ts = []
                for _ in range(reps):
                    t = time.perf_counter()
                    c.route(LIB, **kw)
                    ts.append(time.perf_counter() - t)
                out[f"grpc_{form}_ms"] = pct(ts, 50)
    finally:
        proc.terminate()
        proc.wait(60)
    return out


def put_delete(work: Path, n: int, sig, shared_a, rng) -> dict:
    """Real uploads at N (timed with their parts), then their deletes."""
    from seqr_core import parse_peft_adapter
    from seqr_server.auth import OPEN
    from seqr_server.manager import LibraryManager
    mgr = LibraryManager(open_store(work))
    mgr.load()
    puts, dels, parts = [], [], {"parse": [], "index": []}
    idx = mgr.get(LIB, OPEN).index
    for k in range(n):
        files = real_files(rng, sig, shared_a)
        t = time.perf_counter()
        p = parse_peft_adapter(files, name="probe", signature=sig)
        parts["parse"].append(time.perf_counter() - t)
        t = time.perf_counter()
        idx.index_adapter(p.adapter, upload_dtype=p.upload_dtype)
        parts["index"].append(time.perf_counter() - t)
        t = time.perf_counter()
        mgr.put_adapter(LIB, f"probe-{k}", files, {}, OPEN)
        puts.append(time.perf_counter() - t)
    # The same at N with a one-module upload (0.4 MB): what a put costs besides the adapter's
    # own bytes (hash, seal, write) and QRs — the part that could grow with N.
    small = []
    for k in range(n):
        files = real_files(rng, sig, shared_a, modules=list(shared_a)[:1])
        t = time.perf_counter()
        mgr.put_adapter(LIB, f"small-{k}", files, {}, OPEN)
        small.append(time.perf_counter() - t)
    for k in range(n):
        t = time.perf_counter()
        mgr.delete_adapter(LIB, f"probe-{k}", OPEN)
        dels.append(time.perf_counter() - t)
        mgr.delete_adapter(LIB, f"small-{k}", OPEN)
    mgr.close()
    rest = [w - a - b for w, a, b in zip(puts, parts["parse"], parts["index"])]
    return {"put_p50_ms": pct(puts, 50), "put_p99_ms": pct(puts, 99), "small_put_p50_ms": pct(small, 50),
            "small_put_p99_ms": pct(small, 99), "delete_p50_ms": pct(dels, 50),
            "delete_p99_ms": pct(dels, 99), "store_p50_ms": pct(rest, 50),
            **{f"{k}_p50_ms": pct(v, 50) for k, v in parts.items()}}


def store_bytes(work: Path) -> dict:
    store = open_store(work)
    try:
        rec = store.library(LIB)
        index = sum(store.blob_path(LIB, adapter=a.name, role="index").stat().st_size
                    for a in rec.adapters if "index" in a.objects)
        real = [a.size_bytes for a in rec.adapters if not a.meta.get("synthetic")]
    finally:
        store.close()
    total = sum(p.stat().st_size for p in (work / "data").rglob("*") if p.is_file())
    return {"store_mb": total / 2 ** 20, "index_objects_mb": index / 2 ** 20,
            "manifest_mb": (work / "data" / "MANIFEST").stat().st_size / 2 ** 20,
            "real_peft_mb": (float(np.mean(real)) / 2 ** 20) if real else float("nan"),
            "synthetic": sum(1 for a in rec.adapters if a.meta.get("synthetic"))}


# ------------------------------------------------------------------ orchestration
def grow(work: Path, target: int, *, real: int, sig, shared_a, gram, rng) -> list[float]:
    """Fill the library up to ``target`` adapters (real uploads first, then bulk synthetic)."""
    from seqr_core import write_safetensors
    from seqr_server.auth import OPEN
    from seqr_server.manager import LibraryManager
    store = open_store(work)
    have = len(store.library(LIB).adapters)
    fills = []
    if have < min(target, real):
        store.close()
        mgr = LibraryManager(open_store(work))
        mgr.load()
        for k in range(have, min(target, real)):
            files = real_files(rng, sig, shared_a)
            t = time.perf_counter()
            mgr.put_adapter(LIB, f"real-{k:05d}", files, {}, OPEN)
            fills.append(time.perf_counter() - t)
        mgr.close()
        store = open_store(work)
        have = len(store.library(LIB).adapters)
    stub = {"adapter_config.json": b'{"stub": "synthetic adapter: its index object is real"}',
            "adapter_model.safetensors": write_safetensors({})}
    batch = []
    for k in range(have, target):
        name = f"syn-{k:05d}"
        batch.append((name, stub, {"synthetic": True}, {"index": synthetic_index(rng, name, sig, gram)}))
        if len(batch) == 250 or k == target - 1:
            store.put_adapters(LIB, batch)
            batch = []
    store.close()
    return fills


def create(work: Path, sig) -> None:
    from seqr_core import SharedARecipe
    from seqr_server import library_objects as lo
    from seqr_server.config import Limits
    from seqr_server.manager import LibraryManager
    from seqr_server.store import init_key_file
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    init_key_file(work / "kek.json")
    mgr = LibraryManager(open_store(work))
    mgr.load()
    recipe = SharedARecipe(seed=SEED)
    mgr.create_library(lo.LibrarySpec(name=LIB, signature=sig, recipe=recipe, meta={},
                                      shared_a=lo.recipe_shared_a(sig, recipe, rank=RANK, modules=attention(sig),
                                                                          limits=Limits())))
    mgr.close()


def report(rows: list[dict], fills: list[float], sig) -> str:
    spectr_per = sum(RANK * sig.spec(m).d_in * 4 for m in attention(sig))       # fp32 S·Vᵀ rows
    out = ["Llama-3-8B attention shapes: 32 layers × q, k, v, o, d_in 4096, d_out 4096/1024, r 16 "
           f"(128 modules), one shared-A library, T = 128; one BLAS thread; 2-core shared machine "
           f"(load average {os.getloadavg()[0]:.1f} at the end of the run).", "",
           "| N | real / synthetic | index (used) | SpectR N·r·d | RSS − base | (RSS − base) / index | base RSS "
           "| store on disk | index objects | store with full PEFT (computed) | cold start (load) | `seqr serve` to SERVING "
           "| server RSS | put p50 / p99 | delete p50 / p99 |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    gb = (lambda mb: f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB")
    for w in rows:
        n, syn = w["adapters"], w["synthetic"]
        full = w["store_mb"] + syn * w["real_peft_mb"]
        out.append(f"| {n} | {n - syn} / {syn} | {gb(w['index_used_mb'])} | {gb(n * spectr_per / 2 ** 20)} | "
                   f"{gb(w['rss_mb'] - w['rss_base_mb'])} | {(w['rss_mb'] - w['rss_base_mb']) / w['index_used_mb']:.2f} | "
                   f"{w['rss_base_mb']:.0f} MB | {gb(w['store_mb'])} | {gb(w['index_objects_mb'])} | {gb(full)} | "
                   f"{w['startup_s']:.1f} s | {w['serving_s']:.1f} s | {gb(w['server_rss_mb'])} | "
                   f"{w['put_p50_ms']:.0f} / {w['put_p99_ms']:.0f} ms | {w['delete_p50_ms']:.0f} / {w['delete_p99_ms']:.0f} ms |")
    out += ["", "| N | Route in-process moments, 128 modules | projected, 128 | moments, 1 layer (4) | projected, 1 layer "
            "| Route over gRPC moments, 128 | projected, 128 | put p50: parse / QR index / seal + commit + swap "
            "| put p50 / p99, 1-module upload (0.4 MB) |",
            "|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for w in rows:
        out.append(f"| {w['adapters']} | {w['route_moments_all_ms']:.1f} ms | {w['route_projected_all_ms']:.1f} ms | "
                   f"{w['route_moments_layer_ms']:.2f} ms | {w['route_projected_layer_ms']:.2f} ms | "
                   f"{w['grpc_moments_ms']:.1f} ms | {w['grpc_projected_ms']:.1f} ms | "
                   f"{w['parse_p50_ms']:.0f} / {w['index_p50_ms']:.0f} / {w['store_p50_ms']:.0f} ms | "
                   f"{w['small_put_p50_ms']:.0f} / {w['small_put_p99_ms']:.0f} ms |")
    if fills:
        out += ["", f"Filling 0..{len(fills)} with real uploads: put p50 {pct(fills, 50):.0f} ms, p99 {pct(fills, 99):.0f} ms."]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="100,1000,10000")
    ap.add_argument("--real", type=int, default=100, help="real PEFT uploads before bulk synthetic ones")
    ap.add_argument("--puts", type=int, default=10, help="real puts (then deletes) timed at each N")
    ap.add_argument("--reps", type=int, default=30, help="Route calls per cell")
    ap.add_argument("--work", type=Path, default=Path("/tmp/seqr-scale"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--phase", default="main", choices=("main", "load"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase == "load":
        print(json.dumps(phase_load(a.work, a.reps)))
        return
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    from seqr_core import SharedARecipe, generate_shared_a
    sig = signature()
    shared_a = {m: generate_shared_a(SharedARecipe(seed=SEED), module=m, rank=RANK, d_in=4096) for m in attention(sig)}
    gram = {m: A.astype(np.float64) @ A.T.astype(np.float64) for m, A in shared_a.items()}
    rng = np.random.default_rng(0)
    req = requests(np.random.default_rng(1), shared_a)
    create(a.work, sig)
    rows, fills = [], []
    for n in [int(x) for x in a.ns.split(",")]:
        fills += grow(a.work, n, real=a.real, sig=sig, shared_a=shared_a, gram=gram, rng=rng)
        row = store_bytes(a.work)
        proc = subprocess.run([sys.executable, __file__, "--phase", "load", "--work", str(a.work), "--reps", str(a.reps)],
                              capture_output=True, text=True, check=True)
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        row.update(serve_and_route(a.work, a.reps, req))
        row.update(put_delete(a.work, a.puts, sig, shared_a, rng))
        rows.append(row)
        print(json.dumps(row), flush=True)
    text = report(rows, fills, sig)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
