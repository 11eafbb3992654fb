"""Replicas on PostgreSQL: propagation and faults, with real `seqr serve` processes.

Starts a private PostgreSQL (scripts/postgres.sh) and three replicas on it (each with its own
rollback anchor, as on separate hosts; replica 3 reaches the database through a TCP proxy the
bench can cut). The library is the load bench's: N synthetic shared-A adapters on 60 modules.

* propagation: an adapter PUT through replica 1; from its acknowledgement until replicas 2 and
  3 each *route* on the new version (probed with moments requests every few ms);
* kill -9 of a replica under load: one channel round-robin over the three replicas, retrying
  Route on UNAVAILABLE (seqr_client's defaults), counting failed Route calls;
* PostgreSQL restarted under load: failed routes, what writes get while it is down, and how
  long until a write succeeds and every replica serves it;
* replica 3 cut off: how long until it reports out of sync (health seqr.replica), routes it
  serves stale and with which version, NOT_SERVING past --max-staleness, catch-up after heal.

    .venv/bin/python bench/replicas.py                # -> bench/out/replicas.md (+ .json); --out to refresh results/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import load as L  # noqa: E402  (bench/load.py: the synthetic library and requests)
from seqr_client import RouterClient, SeqrError  # noqa: E402
from seqr_core import SharedARecipe, generate_shared_a  # noqa: E402
from seqr_server.store import init_key_file  # noqa: E402
from tests.postgres import SCRIPT, Proxy, free_port  # noqa: E402


class Replica:
    def __init__(self, index: int, root: Path, key: Path, dsn: str, budget: float):
        self.index, self.root, self.key, self.dsn, self.budget = index, root, key, dsn, budget
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> "Replica":
        home = self.root / f"host{self.index}"
        cmd = [sys.executable, "-m", "seqr_cli", "serve", "--listen", "127.0.0.1:0", "--metrics-port", "off",
               "--no-demo", "--key-file", str(self.key), "--data-dir", str(home / "data"),
               "--anchor-dir", str(home / "anchors"), "--store-dsn", self.dsn, "--poll-interval", "1",
               "--max-staleness", str(self.budget), "--log-level", "info"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=self.root)
        self.followed: list[dict] = []     # the replica's "followed the store" lines (ms, cpu_ms)
        for line in self.proc.stderr:
            doc = json.loads(line) if line.startswith("{") else {}
            if doc.get("msg") == "listening":
                self.port = doc["port"]
                break

        def drain() -> None:
            for line in self.proc.stderr:
                doc = json.loads(line) if line.startswith("{") else {}
                if doc.get("msg") == "followed the store":
                    self.followed.append(doc)
        threading.Thread(target=drain, daemon=True).start()
        with RouterClient(self.target, timeout=60) as c:
            until(lambda: c.health() == "SERVING", 120)
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def until(pred, timeout: float = 60.0, step: float = 0.005) -> float | None:
    """Seconds until ``pred()`` held, or None after ``timeout``."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            if pred():
                return time.perf_counter() - t0
        except SeqrError:
            pass
        time.sleep(step)
    return None


def pct(xs, q) -> float:
    return float(np.percentile(np.array(xs) * 1e3, q)) if xs else float("nan")


class Load:
    """Route calls from ``threads`` threads over one round-robin channel; counts failures."""

    def __init__(self, target: str, request: dict, threads: int = 6):
        self.client = RouterClient(target, timeout=30)
        self.request, self.ok, self.failed, self.errors = request, 0, 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.route(L.LIB, moments=self.request, tokens=L.T)
                self.ok += 1
            except SeqrError as e:
                self.failed += 1
                self.errors.append(f"{e.code}: {e}")

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self.client.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--writes", type=int, default=40, help="propagation samples")
    ap.add_argument("--budget", type=float, default=8.0, help="--max-staleness of replica 3 (cut off), seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "replicas.md",
                    help="where to write the table and its .json (bench/results/replicas.md refreshes the committed one)")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    sig = L.signature()
    shared_a = {m: generate_shared_a(SharedARecipe(seed=L.SEED), module=m, rank=L.RANK, d_in=sig.spec(m).d_in)
                for m in L.qv_modules(sig)}
    adapters, dirs = L.make_adapters(a.adapters + a.writes + 8, sig, shared_a, rng)
    request = L.make_request(0, dirs, shared_a, rng)["moments"]
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="seqr-replicas-") as tmp:
        root = Path(tmp)
        pg_dir, pg_port = Path(tempfile.mkdtemp(prefix="seqr-pg-")), free_port()   # the postgres user must reach it
        subprocess.run([str(SCRIPT), "start", str(pg_dir), str(pg_port)], check=True, capture_output=True)
        proxy = Proxy(pg_port)
        key = root / "kek.json"
        init_key_file(key)
        dsn = f"host=127.0.0.1 port={pg_port} user=postgres dbname=postgres"
        cut_dsn = (f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres tcp_user_timeout=3000 "
                   "keepalives_idle=2 keepalives_interval=1 keepalives_count=2")
        # Replicas 1 and 2 ride out the PostgreSQL restart within their budget; replica 3's short
        # budget shows NOT_SERVING in the cut-off scenario.
        reps = [Replica(0, root, key, dsn, 120.0), Replica(1, root, key, dsn, 120.0),
                Replica(2, root, key, cut_dsn, a.budget)]
        try:
            for r in reps:
                r.start()
            clients = [RouterClient(r.target, timeout=60) for r in reps]
            writer = clients[0]
            writer.create_library(L.LIB, signature=sig, shared_a_seed=L.SEED, shared_a_rank=L.RANK,
                                  shared_a_modules=list(shared_a))
            t0 = time.perf_counter()
            for name, files in adapters[: a.adapters]:
                writer.put_adapter_files(files, name=name, library=L.LIB)
            print(f"uploaded {a.adapters} adapters in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            v = writer.describe(L.LIB).version
            for c in clients[1:]:
                until(lambda c=c: c.route(L.LIB, moments=request, tokens=L.T).library_version == v, 120)
            spare = iter(adapters[a.adapters:])

            # ---- propagation
            lat: dict[int, list[float]] = {1: [], 2: []}
            for i in range(a.writes):
                name, files = next(spare)
                seen: dict[int, float] = {}

                def watch(k: int, want: int) -> None:
                    c = clients[k]
                    while k not in seen:
                        try:
                            if c.route(L.LIB, moments=request, tokens=L.T).library_version >= want:
                                seen[k] = time.perf_counter()
                        except SeqrError:
                            pass
                        time.sleep(0.01)      # probes cost the replicas CPU too: 10 ms resolution
                want = v + 1 + i
                ws = [threading.Thread(target=watch, args=(k, want)) for k in (1, 2)]
                for w in ws:
                    w.start()
                writer.put_adapter_files(files, name=name, library=L.LIB)
                acked = time.perf_counter()
                for w in ws:
                    w.join(30)
                for k in (1, 2):
                    lat[k].append(max(0.0, seen.get(k, float("inf")) - acked))
            allv = lat[1] + lat[2]
            work = [d for r in reps[1:] for d in r.followed[-a.writes:]]
            out["propagation"] = {"writes": a.writes, "p50_ms": pct(allv, 50), "p99_ms": pct(allv, 99),
                                  "max_ms": max(allv) * 1e3,
                                  "catch_up_ms_p50": float(np.median([d["ms"] for d in work])) if work else None,
                                  "catch_up_cpu_ms_p50": float(np.median([d["cpu_ms"] for d in work])) if work else None,
                                  **{f"replica{k + 1}": {"p50_ms": pct(x, 50), "p99_ms": pct(x, 99)}
                                     for k, x in lat.items()}}
            print(json.dumps(out["propagation"]), file=sys.stderr)
            v = writer.describe(L.LIB).version

            everyone = "ipv4:" + ",".join(r.target for r in reps)
            # ---- PostgreSQL restarted under load
            with Load(everyone, request) as load:
                time.sleep(2)
                t_down = time.perf_counter()
                subprocess.run([str(SCRIPT), "stop", str(pg_dir), "fast"], check=True, capture_output=True)
                refused = []
                name, files = next(spare)
                try:
                    writer.put_adapter_files(files, name=name, library=L.LIB)
                except SeqrError as e:
                    refused.append(f"{e.code}: {e}")
                time.sleep(3)
                routes_while_down = load.ok
                subprocess.run([str(SCRIPT), "start", str(pg_dir), str(pg_port)], check=True, capture_output=True)
                t_up = time.perf_counter()

                def write() -> bool:
                    try:
                        writer.put_adapter_files(files, name=name, library=L.LIB)
                        return True
                    except SeqrError as e:
                        return e.code == "ALREADY_EXISTS"
                to_write = until(write, 120, 0.1)
                v2 = writer.describe(L.LIB).version
                to_all = until(lambda: all(c.route(L.LIB, moments=request, tokens=L.T).library_version == v2
                                           for c in clients), 120)
                time.sleep(1)
            out["postgres_restart"] = {
                "routes": load.ok, "failed_routes": load.failed, "errors": load.errors[:3],
                "down_s": round(t_up - t_down, 2), "routes_while_down": routes_while_down,
                "write_while_down": refused[0] if refused else "(accepted?)",
                "first_write_after_restart_s": to_write, "all_replicas_serve_it_s": to_all}
            print(json.dumps(out["postgres_restart"]), file=sys.stderr)

            # ---- replica 3 cut off from PostgreSQL
            cut = clients[2]
            proxy.cut()
            t_cut = time.perf_counter()
            name, files = next(spare)
            writer.put_adapter_files(files, name=name, library=L.LIB)
            v3 = writer.describe(L.LIB).version
            to_out_of_sync = until(lambda: cut.health("seqr.replica") == "NOT_SERVING", 60)
            stale = cut.route(L.LIB, moments=request, tokens=L.T)
            to_not_serving = until(lambda: cut.health() == "NOT_SERVING", 120)
            try:
                cut.route(L.LIB, moments=request, tokens=L.T)
                refusal = "(served)"
            except SeqrError as e:
                refusal = f"{e.code}: {e}"
            proxy.heal()
            t_heal = time.perf_counter()
            caught = until(lambda: cut.route(L.LIB, moments=request, tokens=L.T).library_version == v3, 120)
            serving = until(lambda: cut.health() == "SERVING", 60)
            out["cut_off"] = {
                "budget_s": a.budget, "out_of_sync_after_s": to_out_of_sync,
                "stale_route_version": stale.library_version, "current_version": v3,
                "not_serving_after_cut_s": None if to_not_serving is None else to_out_of_sync + to_not_serving,
                "route_past_budget": refusal, "caught_up_after_heal_s": caught,
                "serving_after_heal_s": None if serving is None else (time.perf_counter() - t_heal),
                "cut_s": round(t_heal - t_cut, 2)}
            print(json.dumps(out["cut_off"]), file=sys.stderr)

            # ---- kill -9 under load
            with Load(everyone, request) as load:
                time.sleep(3)
                before = load.ok
                reps[1].proc.kill()
                time.sleep(5)
            out["kill9"] = {"routes": load.ok, "routes_after_kill": load.ok - before, "failed_routes": load.failed,
                            "errors": load.errors[:3]}
            print(json.dumps(out["kill9"]), file=sys.stderr)
            for c in clients:
                c.close()
        finally:
            for r in reps:
                r.stop()
            proxy.close()
            subprocess.run([str(SCRIPT), "stop", str(pg_dir), "immediate"], capture_output=True)
            shutil.rmtree(pg_dir, ignore_errors=True)
    p, r_, c_, k = out["propagation"], out["postgres_restart"], out["cut_off"], out["kill9"]
    load = os.getloadavg()[0]
    text = f"""Replicas on PostgreSQL ({subprocess.run([str(SCRIPT), 'bindir'], capture_output=True, text=True).stdout.strip()}): 3 `seqr serve` processes, N={a.adapters} shared-A adapters on 60 modules, {os.cpu_count()} CPUs shared by PostgreSQL, the replicas and the client (load average {load:.1f} at the end of the run).

| measurement | value |
|---|---|
| propagation, PUT on replica 1 -> replicas 2 and 3 route on it ({p['writes']} writes) | p50 {p['p50_ms']:.1f} ms, p99 {p['p99_ms']:.1f} ms, max {p['max_ms']:.1f} ms |
| a follower's catch-up per write (refresh, verify, parse, rebuild, swap): wall / CPU, median | {p['catch_up_ms_p50']:.1f} / {p['catch_up_cpu_ms_p50']:.1f} ms |
| propagation to replica 2 / replica 3 | p50 {p['replica2']['p50_ms']:.1f} / {p['replica3']['p50_ms']:.1f} ms, p99 {p['replica2']['p99_ms']:.1f} / {p['replica3']['p99_ms']:.1f} ms |
| kill -9 of a replica under load: failed Route calls | {k['failed_routes']} of {k['routes']} ({k['routes_after_kill']} after the kill) |
| PostgreSQL restarted under load: failed Route calls | {r_['failed_routes']} of {r_['routes']} ({r_['routes_while_down']} while it was down, {r_['down_s']} s) |
| write while PostgreSQL is down | {r_['write_while_down']} |
| first write accepted after PostgreSQL is back / every replica serves it | {r_['first_write_after_restart_s']:.2f} s / {r_['all_replicas_serve_it_s']:.2f} s |
| replica cut off: reports out of sync (health `seqr.replica`) after | {c_['out_of_sync_after_s']:.2f} s |
| replica cut off: still routes, on version | {c_['stale_route_version']} (current {c_['current_version']}) |
| replica cut off: NOT_SERVING after (budget {c_['budget_s']:g} s) | {c_['not_serving_after_cut_s']:.2f} s; Route then: {c_['route_past_budget']} |
| link restored: serves the current version after / SERVING after | {c_['caught_up_after_heal_s']:.2f} s / {c_['serving_after_heal_s']:.2f} s |
"""
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    (a.out.with_suffix(".json")).write_text(json.dumps(out, indent=2, default=str))
    return 0 if k["failed_routes"] == 0 and r_["failed_routes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
