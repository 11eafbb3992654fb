"""The PostgreSQL medium: sealed blobs and the sealed manifest in two tables.

Schema (created if absent, in the connection's ``search_path`` schema; one store per schema)::

    seqr_manifest(id = 1, seq bigint, sealed bytea, committed_at timestamptz)   -- one row
    seqr_blobs(name text primary key, sealed bytea, created_at timestamptz)

One commit is one transaction: take the store's advisory lock (writers on every replica
serialise on it), read the latest manifest, INSERT the new blobs, UPDATE the manifest row with a
compare-and-swap on ``seq``, ``pg_notify`` the commit number and COMMIT. Replaced blobs are
deleted right after, in their own transaction (retried with the next commit if the database went
away meanwhile; the next open sweeps any left). Replicas LISTEN for the notification and poll
``seq`` as a fallback.

What the database - and so a DBA, a backup or a replica of it - holds: ciphertext, plus per
row the sealed envelope header (commit number the object was written at, the KEK id, the
wrapped data key, the nonce), its size and timestamps; and the commit counter. Library and
adapter names, metadata, digests and weights are only inside sealed bytes. Deleted rows stay in
dead tuples until VACUUM and in WAL archives and backups: as for the directory store, rotate the
KEK and retire the old key to finish a crypto-shred.

Every database error is mapped to UnavailableError with what it means for the caller (the
routing snapshot keeps serving; a write was not applied, or - when the link died during COMMIT -
may have been: the followers' next refresh shows which).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import conninfo, sql

from seqr_core.errors import FailedPreconditionError, UnavailableError

from .envelope import parse_header
from .errors import MissingBlobError, TamperedBlobError

__all__ = ["PostgresMedium"]

log = logging.getLogger(__name__)

# Fail fast on a dead link rather than hang a thread: connect, keepalive and unacknowledged-send
# limits. Anything the DSN sets itself wins.
LINK_DEFAULTS = {"connect_timeout": "5", "keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "3",
                 "keepalives_count": "3", "tcp_user_timeout": "10000", "application_name": "seqr-router"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seqr_manifest (
    id smallint PRIMARY KEY CHECK (id = 1),
    seq bigint NOT NULL CHECK (seq > 0),
    sealed bytea NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS seqr_blobs (
    name text PRIMARY KEY CHECK (name ~ '^[0-9a-f]{32}$'),
    sealed bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- ciphertext does not compress: do not try
ALTER TABLE seqr_blobs ALTER COLUMN sealed SET STORAGE EXTERNAL;
"""
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('seqr-router:' || current_schema()))"


def redacted(dsn: str) -> str:
    """host:port/dbname of a DSN, for messages (never the password or other parameters)."""
    try:
        d = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    return f"{d.get('host', 'localhost')}:{d.get('port', '5432')}/{d.get('dbname', d.get('user', ''))}"


def unavailable(exc: psycopg.Error, where: str, consequence: str) -> UnavailableError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UnavailableError(f"the library database {where} is unavailable ({reason}); {consequence}",
                            field="store")


class _Link:
    """One lazily (re)connected connection, used by one thread at a time."""

    def __init__(self, dsn: str, where: str, *, autocommit: bool, settings: dict[str, str]):
        self._dsn, self._where, self._autocommit, self._settings = dsn, where, autocommit, settings
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None

    @contextmanager
    def use(self, consequence: str) -> Iterator[psycopg.Connection]:
        with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = self._connect()
                yield self._conn
            except psycopg.Error as exc:
                self._drop_if_broken()
                raise unavailable(exc, self._where, consequence) from exc

    def _connect(self) -> psycopg.Connection:
        self._drop()
        conn = psycopg.connect(self._dsn, autocommit=True)
        for name, value in self._settings.items():
            conn.execute(sql.SQL("SELECT set_config({}, {}, false)").format(sql.Literal(name), sql.Literal(value)))
        conn.autocommit = self._autocommit
        return conn

    def _drop_if_broken(self) -> None:
        if self._conn is not None and (self._conn.closed or self._conn.broken):
            self._drop()
        elif self._conn is not None and not self._autocommit:
            try:
                self._conn.rollback()
            except psycopg.Error:
                self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()


class PostgresMedium:
    kind = "postgres"
    shared = True

    def __init__(self, dsn: str, *, lock_timeout_s: float = 30.0, statement_timeout_s: float = 120.0):
        d = conninfo.conninfo_to_dict(dsn)
        dsn = conninfo.make_conninfo(dsn, **{k: v for k, v in LINK_DEFAULTS.items() if k not in d})
        self._where = redacted(dsn)
        settings = {"lock_timeout": f"{int(lock_timeout_s * 1000)}ms",
                    "statement_timeout": f"{int(statement_timeout_s * 1000)}ms",
                    # a writer cut off mid-transaction must not hold the store's lock for long
                    "idle_in_transaction_session_timeout": f"{int(statement_timeout_s * 1000)}ms"}
        self._writer = _Link(dsn, self._where, autocommit=False, settings=settings)
        self._reader = _Link(dsn, self._where, autocommit=True, settings=settings)
        self._listener = _Link(dsn, self._where, autocommit=True, settings={})
        self._closed = threading.Event()
        self._pending_shred: set[str] = set()
        with self._writer.use("the store cannot be opened") as conn:
            conn.execute(_LOCK)
            if conn.execute("SELECT to_regclass('seqr_blobs') IS NULL OR to_regclass('seqr_manifest') IS NULL"
                            ).fetchone()[0]:
                conn.execute(_SCHEMA)      # once: ALTER TABLE would wait for every reader
            schema = conn.execute("SELECT current_schema()").fetchone()[0]
            conn.commit()
        self.schema = schema
        self.location = f"postgresql://{self._where}?schema={schema}"
        self._channel = f"seqr_commit_{schema}"[:63]
        self._listening_on: psycopg.Connection | None = None
        with self._listener.use("the store cannot be opened") as conn:
            self._listen(conn)

    # ------------------------------------------------------------------ reads
    def read_manifest(self) -> bytes | None:
        with self._reader.use("routing continues on the last snapshot") as conn:
            return _manifest_row(conn)

    def read_blob(self, name: str, what: str) -> bytes:
        with self._reader.use("routing continues on the last snapshot") as conn:
            row = conn.execute("SELECT sealed FROM seqr_blobs WHERE name = %s", [name]).fetchone()
        if row is None:
            raise MissingBlobError(f"{what}: blob {name} is missing from the database")
        return bytes(row[0])

    def head(self) -> int | None:
        with self._reader.use("routing continues on the last snapshot") as conn:
            row = conn.execute("SELECT seq FROM seqr_manifest WHERE id = 1").fetchone()
        return None if row is None else int(row[0])

    def wait(self, timeout: float) -> bool:
        """Until a commit is NOTIFYed or ``timeout``; a broken link just waits (the poll reports it)."""
        try:
            with self._listener.use("") as conn:
                self._listen(conn)
                return any(True for _ in conn.notifies(timeout=timeout, stop_after=1))
        except UnavailableError:
            self._closed.wait(timeout)
            return False

    def _listen(self, conn: psycopg.Connection) -> None:
        # On every new connection: a commit between two connections is caught by the poll.
        if self._listening_on is not conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self._listening_on = conn

    # ------------------------------------------------------------------ writes
    @contextmanager
    def writing(self) -> Iterator[_PostgresWrite]:
        with self._writer.use("the write was not applied") as conn:
            conn.execute(_LOCK)
            w = _PostgresWrite(self, conn)
            try:
                yield w
            except BaseException:
                if not w.committed:
                    _rollback_quietly(conn)     # also releases the advisory lock
                raise
            conn.commit()      # open-time sweeps after the commit; a no-op otherwise

    def close(self) -> None:
        self._closed.set()
        for link in (self._listener, self._reader, self._writer):
            link.close()


class _PostgresWrite:
    def __init__(self, medium: PostgresMedium, conn: psycopg.Connection):
        self._m, self._conn = medium, conn
        self._base: int | None = None
        self.committed = False

    def read_manifest(self) -> bytes | None:
        raw = _manifest_row(self._conn)
        self._base = None if raw is None else parse_header(raw, what="MANIFEST")[0].version
        return raw

    def put_blob(self, name: str, sealed: bytes) -> None:
        self._conn.execute("INSERT INTO seqr_blobs (name, sealed) VALUES (%s, %b)", [name, sealed])

    def commit(self, raw: bytes, *, seq: int) -> None:
        c = self._conn
        if self._base is None:
            c.execute("INSERT INTO seqr_manifest (id, seq, sealed) VALUES (1, %s, %b)", [seq, raw])
        elif c.execute("UPDATE seqr_manifest SET seq = %s, sealed = %b, committed_at = now() "
                       "WHERE id = 1 AND seq = %s", [seq, raw, seq - 1]).rowcount != 1:
            raise UnavailableError("the manifest row changed under the store's lock (a writer that does not take "
                                   "it?); the write was not applied", field="store")
        c.execute("SELECT pg_notify(%s, %s)", [self._m._channel, str(seq)])
        try:
            c.commit()
        except psycopg.OperationalError as exc:
            raise unavailable(exc, self._m._where, "the link died during COMMIT, so the write may or may not have "
                                                   "been applied: list before retrying") from exc
        self.committed = True

    def shred(self, names: Iterable[str]) -> None:
        pending = self._m._pending_shred
        pending.update(names)
        if not pending:
            return
        try:
            self._conn.execute("DELETE FROM seqr_blobs WHERE name = ANY(%s)", [sorted(pending)])
            self._conn.commit()
        except psycopg.Error as exc:
            # Committed already: the blobs are unreferenced ciphertext; the next commit retries.
            _rollback_quietly(self._conn)
            log.warning("could not delete replaced blobs yet", extra={"blobs": len(pending), "error": str(exc)})
            return
        pending.clear()

    def prepare_empty(self) -> None:
        if self._conn.execute("SELECT EXISTS (SELECT 1 FROM seqr_blobs)").fetchone()[0]:
            raise FailedPreconditionError(f"schema {self._m.schema} holds blobs but no manifest; refusing to "
                                          "initialise over them", field="store")

    def sweep(self, referenced: set[str]) -> tuple[int, int]:
        cur = self._conn.execute("DELETE FROM seqr_blobs WHERE NOT (name = ANY(%s))", [sorted(referenced)])
        return 0, cur.rowcount


def _rollback_quietly(conn: psycopg.Connection) -> None:
    if conn.closed or conn.broken:
        return
    try:
        conn.rollback()
    except psycopg.Error:
        pass     # the link notices a broken connection on its next use


def _manifest_row(conn: psycopg.Connection) -> bytes | None:
    row: Any = conn.execute("SELECT seq, sealed FROM seqr_manifest WHERE id = 1").fetchone()
    if row is None:
        return None
    raw = bytes(row[1])
    if parse_header(raw, what="MANIFEST")[0].version != row[0]:
        raise TamperedBlobError("the manifest row's seq column disagrees with its sealed header", field="manifest.seq",
                                actual=row[0])
    return raw
