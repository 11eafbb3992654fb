"""A real PostgreSQL for the tests: one private cluster per test session (scripts/postgres.sh),
a fresh database per test, and a TCP proxy that can cut a replica's link to it.

Without PostgreSQL binaries the tests that need it skip with the reason - unless
SEQR_REQUIRE_POSTGRES=1 (set by .ci/run), where a missing PostgreSQL is a failure.
"""

from __future__ import annotations

import atexit
import os
import secrets
import select
import shutil
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "postgres.sh"
DATABASE = "seqr_tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    dir: Path
    port: int

    def dsn(self, schema: str | None = None, *, host: str = "127.0.0.1", port: int | None = None,
            **params: str) -> str:
        """Connection string; with ``schema``, a store in that schema of the tests' database."""
        if schema is not None:
            params = {"options": f"-csearch_path={schema}", **params}
        extra = "".join(f" {k}={v}" for k, v in params.items())
        return f"host={host} port={port or self.port} user=postgres dbname={DATABASE}{extra}"

    def sql(self, statement: str, *args, schema: str | None = None):
        import psycopg
        with psycopg.connect(self.dsn(schema), autocommit=True) as conn:
            cur = conn.execute(statement, args or None)
            return cur.fetchall() if cur.description else None

    def new_schema(self) -> str:
        """A fresh, empty schema: one store (much cheaper than a database per test)."""
        name = f"t_{secrets.token_hex(6)}"
        self.sql(f"CREATE SCHEMA {name}")
        return name

    def drop_schema(self, name: str) -> None:
        self.sql(f"DROP SCHEMA IF EXISTS {name} CASCADE")

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([str(SCRIPT), "stop", str(self.dir), mode], check=True, capture_output=True)

    def start(self) -> None:
        out = subprocess.run([str(SCRIPT), "start", str(self.dir), str(self.port)], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"postgres did not start: {out.stderr}")


_cluster: Cluster | None = None
_lock = threading.Lock()


def _skip_or_fail(reason: str):
    if os.environ.get("SEQR_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"SEQR_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
    pytest.skip(f"{reason} (scripts/postgres.sh install; SEQR_REQUIRE_POSTGRES=1 makes this a failure)")


def cluster() -> Cluster:
    """The session's cluster, started on first use and stopped when the test process exits."""
    global _cluster
    with _lock:
        if _cluster is not None:
            return _cluster
        if subprocess.run([str(SCRIPT), "bindir"], capture_output=True).returncode != 0:
            _skip_or_fail("PostgreSQL binaries (initdb, pg_ctl) were not found")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            _skip_or_fail("psycopg is not installed")
        root = Path(tempfile.mkdtemp(prefix="seqr-pg-"))
        c = Cluster(root, free_port())
        c.start()
        subprocess.run([str(SCRIPT), "psql", str(root), "-c", f"CREATE DATABASE {DATABASE}"], check=True,
                       capture_output=True)

        def teardown() -> None:
            subprocess.run([str(SCRIPT), "stop", str(root), "immediate"], capture_output=True)
            shutil.rmtree(root, ignore_errors=True)

        atexit.register(teardown)
        _cluster = c
        return c


class Proxy:
    """A TCP proxy 127.0.0.1:port -> target that can be cut like a network link.

    ``cut()`` stops forwarding and holds every connection open without a byte passing (a
    partition, not a reset: the far side only notices by its own timeouts); new connections are
    accepted and held the same way. ``down()`` closes every connection and refuses new ones (the
    database went away). ``heal()`` closes what is held and forwards again."""

    def __init__(self, target_port: int, *, bind: str = "127.0.0.1"):
        self._target = target_port
        self._srv = socket.create_server((bind, 0))
        self.port = self._srv.getsockname()[1]
        self._cut = threading.Event()
        self._down = threading.Event()
        self._stop = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket | None]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="pg-proxy").start()

    def cut(self) -> None:
        self._cut.set()

    def down(self) -> None:
        self._down.set()
        self._close_all()

    def heal(self) -> None:
        self._close_all()
        self._cut.clear()
        self._down.clear()

    def _close_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                if s is not None:
                    s.close()

    def close(self) -> None:
        self._stop.set()
        self._srv.close()
        self.heal()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            if self._down.is_set():
                client.close()
                continue
            upstream = None
            if not self._cut.is_set():
                try:
                    upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
                except OSError:
                    client.close()
                    continue
            with self._lock:
                self._pairs.append((client, upstream))
            if upstream is not None:
                threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([a, b], [], [], 0.1)
            except (OSError, ValueError):
                return
            if self._cut.is_set():
                self._stop.wait(0.1)        # hold: nothing passes either way
                continue
            for s in ready:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    a.close()
                    b.close()
                    return
                try:
                    (b if s is a else a).sendall(data)
                except OSError:
                    a.close()
                    b.close()
                    return
