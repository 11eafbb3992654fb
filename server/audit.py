"""The audit log: one append-only, hash-chained JSON line per security-relevant event (DESIGN §4).

Recorded: admin mutations (CreateLibrary, PutAdapter, DeleteAdapter, Calibrate) as an intent
before the store is touched and a result after; exports; key operations; authentication and
authorisation failures; reloads of the tokens file; the log's own open and close. Each record
says who (principal, peer), what (action, library, adapter), when (UTC) and the result (OK or
the status code). Never tokens, keys, weights or activations: records hold names, ids, codes
and numbers only, and every string is cut to 256 characters (see audit_chain.bounded).

Failure policy (fail closed): a mutation whose intent record cannot be written is refused with
UNAVAILABLE before the store is touched. After any failed write - disk full, I/O error, or the
file moved, replaced, deleted or changed by someone else - the log stops (fail-stop, like the
store): every later mutation is refused until the file is repaired and the server restarted,
because a chain cannot continue on a tail it no longer knows. Authentication failures are
refused whatever happens to their record, so their writes never raise; they are rate-limited
(a flood of bad tokens must not turn into a flood of fsyncs) and the next record counts what
was suppressed. One writer per file: the file is locked (flock) while open.

Every record is fsynced before ``record`` returns (measured by bench/audit_bench.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import threading
import time
import uuid
import weakref
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from seqr_core.errors import FailedPreconditionError, IntegrityError, SeqrError, UnavailableError

from .audit_chain import MAX_LINE, Head, bounded, line_digest, read_tail, seal, verify

__all__ = ["AuditLog", "NO_AUDIT", "NullAudit", "default_path", "open_audit", "verify"]

log = logging.getLogger("seqr.audit")

FIELD = "audit_log"
_FORBIDDEN_MODE = 0o037        # group write/exec and any access by others; 0600 and 0640 pass


def default_path(data_dir: str | os.PathLike[str]) -> Path:
    """``<data-dir>.audit.log``: beside the data directory, so restoring a backup of the data
    does not rewind the log (like the rollback anchor's ``<data-dir>.anchor/``)."""
    p = Path(data_dir).absolute()
    return p.with_name(p.name + ".audit.log")


def _who(principal: Any) -> str:
    if principal is None:
        return "system"
    return getattr(principal, "name", None) or str(principal)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Bucket:
    """Token bucket: ``rate`` events per second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.at = float(burst), clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def _open_file(path: Path) -> tuple[int, int, Head]:
    """(fd, size, head) of the log at ``path``: created 0600 if missing, locked, tail checked."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise FailedPreconditionError(f"cannot open the audit log {path}: {e.strerror}", field=FIELD) from None
    with ExitStack() as cleanup:
        cleanup.callback(os.close, fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FailedPreconditionError(f"the audit log {path} is not a regular file", field=FIELD)
        if st.st_mode & _FORBIDDEN_MODE:
            raise FailedPreconditionError(
                f"the audit log {path} has mode {stat.S_IMODE(st.st_mode):o}; use 600 (640 lets a log "
                "shipper's group read it)", field=FIELD, limit="0640", actual=oct(stat.S_IMODE(st.st_mode)))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FailedPreconditionError(f"the audit log {path} is in use by another process",
                                          field=FIELD) from None
        try:
            head = read_tail(fd, st.st_size)
        except ValueError as e:
            raise IntegrityError(f"the audit log {path} is damaged at its end ({e}); run `seqr audit verify "
                                 f"{path}`, keep the file as evidence and move it aside to start a new chain",
                                 field=FIELD) from None
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)                   # a log we just created survives a crash
        finally:
            os.close(dir_fd)
        cleanup.pop_all()
    return fd, st.st_size, head


class AuditLog:
    """Thread-safe writer of one audit log file. See the module doc for what and when."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True, auth_failures_per_s: float = 20.0,
                 auth_failure_burst: int = 100, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path).absolute()
        self._fsync = fsync
        self._lock = threading.Lock()
        self._fd, self._size, self.head = _open_file(self.path)
        self._finalizer = weakref.finalize(self, os.close, self._fd)   # releases the lock if never closed
        st = os.fstat(self._fd)
        self._ino = st.st_dev, st.st_ino
        self._failed: str | None = None
        self._closed = False
        self._bucket = _Bucket(auth_failures_per_s, auth_failure_burst, clock)
        self._suppressed = 0
        self.record({"event": "audit.open", "pid": os.getpid(), "resumed_at": self.head.seq})

    # ------------------------------------------------------------------ writing
    def record(self, event: dict) -> None:
        """Append ``event`` (bounded) with seq, prev, hash and ts; durable on return.
        Raises UnavailableError when it cannot be written (and from then on: fail-stop)."""
        body = bounded(dict(event))
        body["ts"] = _now()
        with self._lock:
            self._append(body)

    def note(self, event: dict) -> bool:
        """``record`` for events whose outcome does not depend on the log: logs, never raises."""
        try:
            self.record(event)
        except UnavailableError:
            return False                # _fail logged it
        return True

    @contextlib.contextmanager
    def mutation(self, *, principal: Any, action: str, library: str | None = None, adapter: str | None = None,
                 **details: Any) -> Iterator[dict]:
        """Around one change: an intent record first (UnavailableError if it cannot be written, so
        the change is refused before anything is touched), then a result record with the status
        code. The yielded dict's items go into the result record."""
        what = {"principal": _who(principal), "action": action, "library": library, "adapter": adapter, **details}
        what = {k: v for k, v in what.items() if v is not None}
        mid = uuid.uuid4().hex[:16]
        self.record({"event": "mutation", "phase": "intent", "id": mid, **what})
        t0, code, outcome = time.perf_counter(), "INTERNAL", {}
        try:
            yield outcome
            code = "OK"
        except SeqrError as e:
            code = e.code
            raise
        finally:
            # Never raises: the change already happened (or failed on its own); a lost result
            # record leaves the intent in the chain and stops the log for later changes.
            self.note({**outcome, "event": "mutation", "phase": "result", "id": mid, **what, "code": code,
                       "ms": round((time.perf_counter() - t0) * 1e3, 3)})

    def auth_failure(self, method: str, reason: str, peer: str | None, *, principal: Any = None,
                     code: str = "UNAUTHENTICATED") -> None:
        """Record a refused call (rate-limited; never raises: the call is refused either way)."""
        with self._lock:
            if not self._bucket.take():
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
        event = {"event": "auth.failure", "method": method, "code": code, "reason": reason, "peer": peer,
                 "principal": None if principal is None else _who(principal)}
        if suppressed:
            event["suppressed_before"] = suppressed
        self.note({k: v for k, v in event.items() if v is not None})

    def close(self) -> None:
        """Write a closing record (with any suppressed auth failures) and release the file."""
        with self._lock:
            if self._closed:
                return
            suppressed = self._suppressed
        self.note({"event": "audit.close", "suppressed_auth_failures": suppressed})
        with self._lock:
            self._closed = True
            self._finalizer()

    # ------------------------------------------------------------------ internals
    def _append(self, body: dict) -> None:
        if self._closed:
            raise UnavailableError("the audit log is closed (the server is shutting down)", field=FIELD)
        if self._failed is not None:
            raise UnavailableError(f"the audit log stopped after a failed write ({self._failed}); changes are "
                                   "refused until it is repaired and the server restarted", field=FIELD)
        line = seal(body, seq=self.head.seq + 1, prev=self.head.sha256)
        if len(line) >= MAX_LINE:
            raise TypeError(f"audit record of {len(line)} bytes; records are names and codes, not data")
        why = self._changed_underneath()
        if why:
            self._fail(why)
        try:
            written = os.write(self._fd, line + b"\n")
            if self._fsync:
                os.fsync(self._fd)
        except OSError as e:
            self._fail(f"write failed: {e.strerror}")
        if written != len(line) + 1:
            self._fail(f"short write ({written} of {len(line) + 1} bytes)")
        self._size += written
        self.head = Head(seq=self.head.seq + 1, sha256=line_digest(line))

    def _changed_underneath(self) -> str:
        """Why the file at our path is not the file we have been appending to ("" if it is)."""
        try:
            st = os.lstat(self.path)
        except OSError as e:
            return f"{self.path}: {e.strerror} (moved or deleted)"
        if (st.st_dev, st.st_ino) != self._ino:
            return f"{self.path} was replaced by another file"
        size = os.fstat(self._fd).st_size
        if size != self._size:
            return f"{self.path} was changed by another writer (size {size}, expected {self._size})"
        return ""

    def _fail(self, why: str) -> None:
        self._failed = why
        log.error("audit log failed; admin changes are refused until it is repaired and the server restarted",
                  extra={"audit_log": str(self.path), "error": why})
        raise UnavailableError(f"cannot write the audit log: {why}", field=FIELD)


class NullAudit:
    """The audit log when it is switched off: the same interface, recording nothing."""

    path = None
    head = Head()

    def record(self, event: dict) -> None:
        bounded(dict(event))            # the same refusals as the real log, so tests of callers hold

    def note(self, event: dict) -> bool:
        return True

    @contextlib.contextmanager
    def mutation(self, **what: Any) -> Iterator[dict]:
        yield {}

    def auth_failure(self, method: str, reason: str, peer: str | None, **kw: Any) -> None:
        return None

    def close(self) -> None:
        return None


NO_AUDIT = NullAudit()


def open_audit(config) -> AuditLog | NullAudit:
    """The server's audit log from its config (``audit`` off -> NullAudit, with a loud warning)."""
    if not config.audit:
        log.warning("AUDIT LOG OFF: admin changes, exports and refused calls are not recorded "
                    "(--audit-log off). Do not run like this in production.")
        return NO_AUDIT
    path = config.audit_log
    if path is None:     # beside the data directory, which a database store never creates
        path = default_path(config.data_dir)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    audit = AuditLog(path)
    log.info("audit log open", extra={"audit_log": str(audit.path), "seq": audit.head.seq})
    return audit
