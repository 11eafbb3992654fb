"""The data-directory medium: sealed blobs as files, ``MANIFEST`` as the commit point.

Layout::

    <data_dir>/MANIFEST           sealed manifest - the single commit point
    <data_dir>/LOCK               flock: exclusive for a lone store, shared for a process group
    <data_dir>/WRITER             flock serialising commits (shared mode only)
    <data_dir>/blobs/<hex>.blob   one sealed blob per stored object version (random names)

A commit writes its blobs (temp file, fsync, rename), fsyncs the blob directory, then writes
``MANIFEST`` the same way and fsyncs the data directory: that rename is the commit point.

*Exclusive* (the default): one store instance holds ``LOCK`` exclusively for its lifetime, so a
second process (or a second instance) is refused. *Shared* (``seqr serve --processes N``): every
process holds ``LOCK`` shared - an exclusive opener is still refused - and a commit holds
``WRITER`` for its duration, re-reading ``MANIFEST`` first, so any process may write and none
loses another's update. Readers learn of other processes' commits by polling ``MANIFEST``'s
inode/mtime/size (a rename always changes the inode).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from seqr_core.errors import FailedPreconditionError, UnavailableError

from .durable_io import DurableIO, is_temp_name
from .errors import MissingBlobError
from .manifest import MANIFEST_NAME, is_blob_name

__all__ = ["BLOBS_DIR", "BLOB_SUFFIX", "DirectoryMedium"]

log = logging.getLogger(__name__)

BLOBS_DIR = "blobs"
BLOB_SUFFIX = ".blob"
LOCK_NAME = "LOCK"
WRITER_NAME = "WRITER"


def _flock(path: Path, how: int, *, what: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, how)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise FailedPreconditionError(what, field="data_dir") from None
        raise
    return fd


class DirectoryMedium:
    kind = "directory"

    def __init__(self, data_dir: Path, io: DurableIO, *, shared: bool = False):
        self.data_dir = data_dir
        self.blobs_dir = data_dir / BLOBS_DIR
        self.shared = shared
        self.location = str(data_dir.resolve())      # AnchorFile names a directory this way too
        self._io = io
        how = "exclusively by another store instance" if shared else "by another store instance"
        self._lock_fd: int | None = _flock(
            data_dir / LOCK_NAME, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB,
            what=f"data directory {data_dir} is already open {how}")
        self._closed = threading.Event()

    # ------------------------------------------------------------------ reads
    def blob_file(self, name: str) -> Path:
        return self.blobs_dir / f"{name}{BLOB_SUFFIX}"

    def read_manifest(self) -> bytes | None:
        try:
            return (self.data_dir / MANIFEST_NAME).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UnavailableError(f"cannot read {self.data_dir / MANIFEST_NAME}: {exc.strerror}",
                                   field="data_dir") from exc

    def read_blob(self, name: str, what: str) -> bytes:
        path = self.blob_file(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise MissingBlobError(f"{what}: blob {path.name} is missing from {self.blobs_dir}") from None
        except OSError as exc:
            raise UnavailableError(f"{what}: cannot read {path}: {exc.strerror}", field=str(path)) from exc

    def head(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.data_dir / MANIFEST_NAME)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def wait(self, timeout: float) -> bool:
        # No cross-process signal: followers poll head() (a stat) after this returns.
        self._closed.wait(timeout)
        return False

    # ------------------------------------------------------------------ writes
    @contextmanager
    def writing(self) -> Iterator[_DirectoryWrite]:
        fd = _flock(self.data_dir / WRITER_NAME, fcntl.LOCK_EX, what="") if self.shared else None
        w = _DirectoryWrite(self)
        try:
            yield w
        except BaseException:
            w.discard()
            raise
        finally:
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        self._closed.set()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class _DirectoryWrite:
    def __init__(self, medium: DirectoryMedium):
        self._m = medium
        self._io = medium._io
        self._written: list[Path] = []
        self._committed = False

    def read_manifest(self) -> bytes | None:
        return self._m.read_manifest()

    def put_blob(self, name: str, sealed: bytes) -> None:
        path = self._m.blob_file(name)
        self._written.append(path)
        self._io.write_file(path, sealed, sync_dir=False)  # one directory fsync per commit

    def commit(self, raw: bytes, *, seq: int) -> None:
        if self._written:
            self._io.fsync_dir(self._m.blobs_dir)
        self._io.write_file(self._m.data_dir / MANIFEST_NAME, raw)
        self._committed = True

    def shred(self, names: Iterable[str]) -> None:
        names = list(names)
        for name in names:
            self._io.unlink(self._m.blob_file(name))
        if names:
            self._io.fsync_dir(self._m.blobs_dir)

    def discard(self) -> None:
        """Remove this write's blobs. After a fail-stop, hands off: the manifest may already
        reference them, and the next open sorts it out."""
        if self._committed or self._io.broken is not None:
            return
        for path in self._written:
            self._io.unlink(path)

    def prepare_empty(self) -> None:
        blobs = self._m.blobs_dir
        blobs.mkdir(mode=0o700, exist_ok=True)
        if any(is_blob_name(Path(e.name).stem) for e in os.scandir(blobs) if e.name.endswith(BLOB_SUFFIX)):
            raise FailedPreconditionError(
                f"{blobs} holds blobs but there is no MANIFEST; refusing to initialise over them", field="data_dir"
            )
        self._io.fsync_dir(self._m.data_dir)

    def sweep(self, referenced: set[str]) -> tuple[int, int]:
        self._m.blobs_dir.mkdir(mode=0o700, exist_ok=True)
        blob_temps, orphans = _clean_blob_dir(self._m.blobs_dir, referenced, self._io)
        return _remove_temp_files(self._m.data_dir, self._io) + blob_temps, orphans


def _remove_temp_files(directory: Path, io: DurableIO) -> int:
    found = [Path(e.path) for e in os.scandir(directory) if is_temp_name(e.name)]
    for path in found:
        io.unlink(path)
    if found:
        io.fsync_dir(directory)
    return len(found)


def _clean_blob_dir(blobs: Path, referenced: set[str], io: DurableIO) -> tuple[int, int]:
    """One scan of the blob directory: remove temp files and unreferenced blobs; returns both counts."""
    temps, orphans = [], []
    for entry in os.scandir(blobs):
        name = entry.name
        if is_temp_name(name):
            temps.append(Path(entry.path))
        elif name.endswith(BLOB_SUFFIX) and is_blob_name(name[: -len(BLOB_SUFFIX)]):
            if name[: -len(BLOB_SUFFIX)] not in referenced:
                orphans.append(Path(entry.path))
        else:
            log.warning("ignoring unexpected file %s in the blob directory", entry.path)
    for path in temps + orphans:
        io.unlink(path)
    if temps or orphans:
        io.fsync_dir(blobs)
    return len(temps), len(orphans)
