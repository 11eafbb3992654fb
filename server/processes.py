"""`seqr serve --processes N`: N server processes sharing one port, each a replica of one store.

Python serves one core per process (the GIL), so a host's cores are used by running several
servers on one port: the kernel spreads incoming connections over them (SO_REUSEPORT; only
processes of this group set it, so an unrelated server can still never share the port). Each
process is a full replica: it serves its own immutable snapshots, accepts admin writes and
follows the others' commits (see replica.py). With the data directory, the group shares it
(every process may write; commits serialise on a lock file and followers poll MANIFEST); with
PostgreSQL, every process is simply one more replica.

The parent owns no requests. It prepares the store once (create, recover, demo library),
reserves the port, starts the children, restarts any that dies, and on SIGTERM/SIGINT passes
the signal on and waits for them. Per child: metrics on ``--metrics-port + i`` when a port is
given, its own log lines (``replica`` field).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path

from . import demo, logs
from .audit import default_path
from .config import ServerConfig

log = logging.getLogger("seqr.group")

RESTART_BACKOFF_S = (1.0, 30.0)


@dataclass
class _Child:
    index: int
    process: mp.process.BaseProcess
    conn: Connection
    started: float
    ready: bool = False


def child_config(config: ServerConfig, index: int, port: int) -> ServerConfig:
    host = config.listen.rsplit(":", 1)[0]
    metrics = config.metrics_port
    return replace(config, listen=f"{host}:{port}", reuse_port=True, demo=False,
                   metrics_port=metrics + index if metrics else metrics,
                   audit_log=child_audit_log(config, index) if config.audit else None,
                   store=replace(config.store, shared=config.store.dsn is None))


def child_audit_log(config: ServerConfig, index: int) -> Path:
    """Each process keeps its own hash chain (one writer per file): ``<log>`` -> ``<stem>.p<i><suffix>``,
    e.g. ``data.audit.p1.log``. A change is recorded by the process that accepted it."""
    path = config.audit_log or default_path(config.data_dir)
    return path.with_name(f"{path.stem}.p{index}{path.suffix}")


def reserve_port(listen: str) -> tuple[socket.socket, int]:
    """Bind (without listening) a reuse-port socket: fixes the port for the children when it is 0,
    and fails early, naming the address, when a server outside the group holds it."""
    host, port = listen.rsplit(":", 1)
    host = host.strip("[]")
    family, kind, proto, _, addr = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(addr)
    return s, s.getsockname()[1]


def prepare_store(config: ServerConfig) -> None:
    """Create/recover the store and the demo library once, before the children share it."""
    from .app import key_provider
    from .manager import LibraryManager
    from .replica import open_store

    store = open_store(config, key_provider(config.keys, config.data_dir))
    try:
        demo_wanted = config.demo if config.demo is not None else config.keys.is_dev
        manager = LibraryManager(store)
        manager.load()
        if demo_wanted and not manager.names():
            demo.create_demo(manager)
            log.info("created the demo library", extra={"library": demo.NAME})
    finally:
        store.close()


def _die_with_parent() -> None:
    """Linux: SIGTERM this child when the parent dies, even by SIGKILL (no orphaned servers)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGTERM) != 0:      # PR_SET_PDEATHSIG
        log.warning("cannot tie this process to its parent", extra={"errno": ctypes.get_errno()})


def _child_main(config: ServerConfig, index: int, conn: Connection, log_level: str, json_logs: bool,
                parent: int) -> None:
    from .app import serve

    _die_with_parent()
    if os.getppid() != parent:     # the parent died before the line above
        raise SystemExit(1)
    logs.setup(log_level, json_format=json_logs, fields={"replica": index})

    def ready(handles) -> None:
        conn.send(("ready", os.getpid(), handles.metrics_port))

    raise SystemExit(serve(config, on_ready=ready))


def serve_group(config: ServerConfig, *, processes: int, log_level: str = "info", json_logs: bool = True) -> int:
    """Run ``processes`` servers on one port until SIGTERM/SIGINT; returns the exit code."""
    prepare_store(config)
    reserved, port = reserve_port(config.listen)
    ctx = mp.get_context("spawn")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    children: list[_Child] = []
    # SIGHUP (reload the tokens file) goes to every process; each reloads its own callers.
    signal.signal(signal.SIGHUP, lambda *_: [os.kill(c.process.pid, signal.SIGHUP) for c in children
                                              if c.process.pid is not None and c.process.exitcode is None])

    def start(index: int) -> _Child:
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child_main, name=f"seqr-serve-{index}", daemon=False,
                        args=(child_config(config, index, port), index, child_end, log_level, json_logs,
                              os.getpid()))
        p.start()
        child_end.close()
        return _Child(index, p, parent_end, time.monotonic())

    log.info("listening", extra={"listen": config.listen, "port": port, "processes": processes})
    children.extend(start(i) for i in range(processes))
    announced, backoff = False, {i: RESTART_BACKOFF_S[0] for i in range(processes)}
    restart_at: dict[int, float] = {}
    while not stop.is_set():
        ready = wait([c.conn for c in children if not c.ready] + [c.process.sentinel for c in children], timeout=0.2)
        for c in list(children):
            if c.conn in ready and not c.ready:
                try:
                    _, pid, metrics_port = c.conn.recv()
                    c.ready = True
                    log.info("process serving", extra={"replica": c.index, "pid": pid, "metrics_port": metrics_port})
                except EOFError:
                    pass              # it died before it was ready; its sentinel says so
            if c.process.sentinel in ready and not stop.is_set():
                code = c.process.exitcode
                log.error("server process exited; restarting it", extra={"replica": c.index, "exit_code": code,
                                                                          "restart_in_s": backoff[c.index]})
                children.remove(c)
                restart_at[c.index] = time.monotonic() + backoff[c.index]
                quick = time.monotonic() - c.started < 60
                backoff[c.index] = min(backoff[c.index] * 2, RESTART_BACKOFF_S[1]) if quick else RESTART_BACKOFF_S[0]
        for index, when in list(restart_at.items()):
            if time.monotonic() >= when:
                del restart_at[index]
                children.append(start(index))
        if not announced and len(children) == processes and all(c.ready for c in children):
            announced = True
            log.info("serving", extra={"port": port, "processes": processes,
                                       "pids": sorted(c.process.pid for c in children)})
    log.info("shutting down the process group", extra={"processes": len(children)})
    for c in children:
        if c.process.pid is not None and c.process.exitcode is None:
            os.kill(c.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + config.drain_s + config.grace_s + 15
    for c in children:
        c.process.join(max(0.0, deadline - time.monotonic()))
        if c.process.exitcode is None:
            log.error("server process did not stop; killing it", extra={"replica": c.index})
            c.process.kill()
            c.process.join(5)
    reserved.close()
    log.info("stopped")
    return 0 if all(c.process.exitcode == 0 for c in children) else 1
