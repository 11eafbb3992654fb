"""Cost of the audit log: one record with and without fsync, one audited mutation (intent +
result, both fsynced), verifying a long chain, and what reloadable authentication adds per call.

    .venv/bin/python bench/audit_bench.py [--records 2000] [--dir /path/on/target/disk]

Prints a markdown table and writes it to bench/out/audit.md (git-ignored) or ``--out FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from seqr_server.audit import AuditLog
from seqr_server.audit_chain import verify
from seqr_server.auth import Authenticator, Principal, new_token_entry


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _event(i: int) -> dict:
    return {"event": "mutation", "phase": "intent", "id": f"{i:016x}", "principal": "ops",
            "action": "PutAdapter", "library": "prod-llama", "adapter": f"team-a-adapter-{i}"}


def _mutation(log: AuditLog, i: int) -> None:
    with log.mutation(principal="ops", action="PutAdapter", library="prod-llama", adapter=f"a{i}"):
        pass


def _raw_append(fd: int) -> None:
    os.write(fd, b"x" * 300 + b"\n")
    os.fsync(fd)


def run(root: Path, *, records: int) -> list[tuple[str, str]]:
    fd = os.open(root / "raw.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    raw = [_timed(lambda: _raw_append(fd)) for _ in range(records)]
    os.close(fd)
    rows = [(f"plain 300-byte append + fsync, same disk (p50 / p99, n={records})",
             f"{_percentile(raw, .5) * 1e3:.3f} ms / {_percentile(raw, .99) * 1e3:.3f} ms")]
    for fsync in (True, False):
        log = AuditLog(root / f"audit-{fsync}.log", fsync=fsync)
        t = [_timed(lambda i=i: log.record(_event(i))) for i in range(records)]
        rows.append((f"record, fsync={fsync} (p50 / p99, n={records})",
                     f"{_percentile(t, .5) * 1e3:.3f} ms / {_percentile(t, .99) * 1e3:.3f} ms"))
        if fsync:
            m = [_timed(lambda i=i: _mutation(log, i)) for i in range(records // 4)]
            rows.append((f"audited mutation overhead, intent + result (p50 / p99, n={records // 4})",
                         f"{_percentile(m, .5) * 1e3:.3f} ms / {_percentile(m, .99) * 1e3:.3f} ms"))
        log.close()
    path = root / "audit-True.log"
    lines = verify(path).records
    rows.append((f"verify {lines} records ({path.stat().st_size / 1024:.0f} KiB)",
                 f"{_timed(lambda: verify(path)) * 1e3:.1f} ms"))

    token, entry = new_token_entry(name="host", roles=["route"])
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [entry]}))
    md = [("authorization", f"Bearer {token}")]
    fixed = Authenticator({entry["sha256"]: Principal(name="host", roles=frozenset({"route"}))})
    for label, auth in (("fixed table", fixed),
                        ("reloadable file, 1 s poll", Authenticator.from_file(tokens))):
        n = 20000
        t = _timed(lambda: [auth.authenticate(md, "Router/Route") for _ in range(n)])
        rows.append((f"authenticate, {label} (mean of {n})", f"{t / n * 1e6:.2f} µs"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("out") / "audit.md",
                    help="where to write the table (bench/results/audit.md refreshes the committed one)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        rows = run(Path(d), records=a.records)
    text = "\n".join([f"seqr-router audit benchmark - Python {platform.python_version()}, {platform.machine()}",
                      "", "| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""])
    print(text)
    a.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
