"""Real `seqr serve` processes for the tests that need one (kill -9, process groups)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    host: str
    port: int
    pids: list[int]                                  # the serving processes (children of a group)
    metrics_port: int | None = None
    lines: list[dict] = field(default_factory=list)  # every JSON log line so far

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def logged(self, msg: str) -> list[dict]:
        return [d for d in list(self.lines) if d.get("msg") == msg]

    def routes_served(self) -> float:
        """Route calls this (single) process answered OK, from its /metrics."""
        import urllib.request
        text = urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('seqr_rpcs_total{') and 'Router/Route"' in line and 'code="OK"' in line)

    def kill9(self, pid: int | None = None) -> None:
        os.kill(pid or self.proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve(args: list[str], *, cwd: Path, env: dict | None = None, timeout: float = 120, host: str = "127.0.0.1",
          wrap=lambda argv: argv) -> ServeProcess:
    """Start `seqr serve ARGS` (JSON logs) on ``host`` and wait for it - or its whole group - to
    serve. ``wrap`` turns the command line into one that runs elsewhere (a network namespace)."""
    cmd = wrap([sys.executable, "-m", "seqr_cli", "serve", "--listen", f"{host}:0", "--metrics-port", "off",
                "--metrics-host", host, "--log-level", "info", *args])
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True)
    group = "--processes" in args
    sp = ServeProcess(proc, host, 0, [])
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            doc = json.loads(line) if line.startswith("{") else {"msg": line.rstrip()}
            sp.lines.append(doc)
            if doc.get("msg") == "listening" and not sp.port:
                sp.port, sp.metrics_port = doc["port"], doc.get("metrics_port")
            if doc.get("msg") == "serving" and (doc.get("logger") == "seqr.group") == group:
                sp.pids = doc.get("pids", [proc.pid])
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()   # keeps draining: a full pipe blocks the server
    if not ready.wait(timeout) or not sp.pids or proc.poll() is not None:
        sp.stop()
        raise RuntimeError(f"seqr serve did not start: {sp.lines[-5:]}")
    return sp
