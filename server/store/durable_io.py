"""Crash-safe file writes, with failpoints for tests.

A file is written as: create a hidden temp file next to it (``O_EXCL``, mode 0600), write it all,
``fsync`` it, ``os.replace`` it over the target, then ``fsync`` the directory so the rename itself is
durable. Only ciphertext is ever handed to this module; plaintext never reaches a temp file.

Failure policy (why): after a failed ``fsync`` the kernel may already have dropped the dirty pages
and a retry can report success for data that never reached the disk (the PostgreSQL "fsyncgate"
lesson). So any fsync or directory-fsync error makes this object *broken* for good: every later
call raises :class:`FailStopError` and recovery happens by restarting from what is on disk. Errors
while writing or renaming a temp file leave the target untouched; they are reported as
``UnavailableError`` and the temp file is removed.

Failpoints: :class:`FailPoints` lets a test make the next matching step (``write``, ``fsync``,
``rename``, ``dir_fsync``, ``unlink``) raise an ``OSError`` or run an action (for example SIGKILL the
process). The ``write`` point fires after half of the data is written, so a kill leaves a partial
temp file behind, as a real crash would.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from seqr_core.errors import AlreadyExistsError, UnavailableError

from .errors import FailStopError

__all__ = ["POINTS", "TMP_SUFFIX", "DurableIO", "FailPointHit", "FailPoints", "is_temp_name"]

POINTS = ("write", "fsync", "rename", "dir_fsync", "unlink")
TMP_SUFFIX = ".tmp"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temp files (hidden, ``.tmp`` suffix)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


@dataclass(frozen=True)
class FailPointHit:
    """What a failpoint sees: the step, the final target path, and the temp file if there is one."""

    point: str
    target: Path
    temp: Path | None = None


@dataclass
class _Armed:
    point: str
    where: Callable[[Path], bool] | None
    error: OSError | None
    action: Callable[[FailPointHit], None] | None
    remaining: int


class FailPoints:
    """Test hooks into :class:`DurableIO`; inert unless armed."""

    def __init__(self) -> None:
        self._armed: list[_Armed] = []
        self._lock = threading.Lock()

    def arm(
        self,
        point: str,
        *,
        where: Callable[[Path], bool] | None = None,
        error: OSError | None = None,
        action: Callable[[FailPointHit], None] | None = None,
        times: int = 1,
    ) -> None:
        """On the next ``times`` hits of ``point`` whose target matches ``where``: run ``action``,
        then raise ``error`` (either may be None)."""
        if point not in POINTS:
            raise ValueError(f"unknown failpoint {point!r}; choose from {POINTS}")
        with self._lock:
            self._armed.append(_Armed(point, where, error, action, times))

    def disarm(self) -> None:
        with self._lock:
            self._armed.clear()

    def fire(self, hit: FailPointHit) -> None:
        armed = self._take(hit)
        if armed is None:
            return
        if armed.action is not None:
            armed.action(hit)
        if armed.error is not None:
            raise armed.error

    def _take(self, hit: FailPointHit) -> _Armed | None:
        with self._lock:
            for armed in self._armed:
                if armed.point == hit.point and (armed.where is None or armed.where(hit.target)):
                    armed.remaining -= 1
                    if armed.remaining <= 0:
                        self._armed.remove(armed)
                    return armed
        return None


class DurableIO:
    """Temp-file + fsync + rename + directory-fsync writes; fail-stop after any fsync error."""

    def __init__(self, *, failpoints: FailPoints | None = None):
        self._failpoints = failpoints or FailPoints()
        self._broken: str | None = None

    @property
    def broken(self) -> str | None:
        """Why the store stopped, or None while healthy."""
        return self._broken

    def check(self) -> None:
        if self._broken is not None:
            raise FailStopError(f"store stopped after an I/O failure ({self._broken}); restart the process to recover")

    def fail_stop(self, reason: str) -> FailStopError:
        """Stop for good; returns the error to raise."""
        if self._broken is None:
            self._broken = reason
        return FailStopError(f"store stopped after an I/O failure ({self._broken}); restart the process to recover")

    def write_file(self, path: Path, data: bytes, *, mode: int = 0o600, sync_dir: bool = True) -> None:
        """Atomically replace ``path`` with ``data``; durable on return (with ``sync_dir``)."""
        self.check()
        temp = self._write_temp(path, data, mode)
        try:
            self._failpoints.fire(FailPointHit("rename", path, temp))
            os.replace(temp, path)
        except OSError as exc:
            _remove_quietly(temp)
            raise UnavailableError(f"cannot rename into {path}: {exc.strerror or exc}", field=str(path)) from exc
        if sync_dir:
            self.fsync_dir(path.parent)

    def create_file_exclusive(self, path: Path, data: bytes, *, mode: int = 0o600) -> None:
        """Durably create ``path``; fails if it exists (hard link is atomic and never overwrites)."""
        self.check()
        temp = self._write_temp(path, data, mode)
        try:
            os.link(temp, path)
        except FileExistsError:
            raise AlreadyExistsError(f"{path} already exists; refusing to overwrite it", field=str(path)) from None
        finally:
            _remove_quietly(temp)
        self.fsync_dir(path.parent)

    def fsync_dir(self, directory: Path) -> None:
        self.check()
        try:
            self._failpoints.fire(FailPointHit("dir_fsync", directory))
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self.fail_stop(f"fsync of directory {directory} failed: {exc.strerror or exc}") from exc

    def unlink(self, path: Path) -> None:
        """Remove ``path`` (already gone is fine); errors stop the store, since a shred is then incomplete."""
        self.check()
        try:
            self._failpoints.fire(FailPointHit("unlink", path))
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self.fail_stop(f"cannot remove {path}: {exc.strerror or exc}") from exc

    def _write_temp(self, path: Path, data: bytes, mode: int) -> Path:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            self._write_all(fd, data, path, temp)
            self._fsync(fd, path, temp)
        except UnavailableError:
            os.close(fd)
            _remove_quietly(temp)
            raise
        os.close(fd)
        return temp

    def _write_all(self, fd: int, data: bytes, path: Path, temp: Path) -> None:
        view = memoryview(data)
        half = len(view) // 2
        try:
            _write_fully(fd, view[:half])
            self._failpoints.fire(FailPointHit("write", path, temp))
            _write_fully(fd, view[half:])
        except OSError as exc:
            raise UnavailableError(f"cannot write {path}: {exc.strerror or exc}", field=str(path)) from exc

    def _fsync(self, fd: int, path: Path, temp: Path) -> None:
        try:
            self._failpoints.fire(FailPointHit("fsync", path, temp))
            os.fsync(fd)
        except OSError as exc:
            raise self.fail_stop(f"fsync of {path} failed: {exc.strerror or exc}") from exc


def _write_fully(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        view = view[written:]


def _remove_quietly(path: Path) -> None:
    # Best effort: a leftover temp file is harmless (recovery removes it) and never holds plaintext.
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
