"""Rollback anchor: the store's last committed manifest sequence number, kept outside the data dir.

Authenticated encryption proves a manifest was written by someone holding the KEK, but not that
it is the *latest* one: an old, perfectly valid MANIFEST (or a whole old copy of the data
directory) could be put back. The anchor records ``(store id, seq, key id, sha256 of MANIFEST)``
after every commit, in a directory the attacker of the data directory is assumed not to control
(by default next to the key file). On open the manifest must be at least as new as the anchor.

One anchor file per store location (a data directory's resolved path, or a database's
host/port/name/schema), named by a hash of it, so a store that is wiped or swapped for a
different store at the same place is noticed too. Moving a data directory therefore needs
``accept_unanchored=True`` once (see LibraryStore.open). Several processes of one host may share
an anchor (``seqr serve --processes``, replicas): :meth:`AnchorFile.advance` only ever moves it
forward, under a lock.

Commit order is manifest first, anchor second; a crash in between leaves the anchor exactly one
sequence number behind, which open accepts and repairs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from seqr_core.errors import FailedPreconditionError, IntegrityError

from .durable_io import DurableIO, is_temp_name
from .errors import RollbackError

__all__ = ["Anchor", "AnchorFile", "check_manifest_against_anchor", "resolve_anchor_dir"]

_FORMAT = 1


@dataclass(frozen=True)
class Anchor:
    store_id: str
    seq: int
    key_id: str
    manifest_sha256: str


class AnchorFile:
    """Reads and durably writes the anchor of one data directory."""

    def __init__(self, anchor_dir: Path, location: str | os.PathLike[str], io: DurableIO):
        self._dir = anchor_dir
        # A path names a data directory (resolved); a string any other store (a database).
        location = location if isinstance(location, str) else str(Path(location).resolve())
        self._location = location
        digest = hashlib.sha256(location.encode("utf-8")).hexdigest()[:24]
        self.path = anchor_dir / f"{digest}.anchor"
        self._io = io

    def prepare(self) -> None:
        """Create the anchor directory (0700) and make sure we can write there."""
        try:
            if not self._dir.is_dir():
                self._dir.mkdir(mode=0o700, parents=True)
                self._io.fsync_dir(self._dir.parent)
        except OSError as exc:
            raise FailedPreconditionError(
                f"cannot create rollback anchor directory {self._dir}: {exc.strerror}; pass anchor_dir=",
                field="anchor_dir",
            ) from exc
        if not os.access(self._dir, os.W_OK | os.X_OK):
            raise FailedPreconditionError(
                f"rollback anchor directory {self._dir} is not writable; pass a writable anchor_dir=",
                field="anchor_dir",
            )

    def load(self) -> Anchor | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            return Anchor(
                store_id=str(doc["store_id"]),
                seq=int(doc["seq"]),
                key_id=str(doc["key_id"]),
                manifest_sha256=str(doc["manifest_sha256"]),
            )
        except (ValueError, KeyError, TypeError):
            raise FailedPreconditionError(f"rollback anchor {self.path} is corrupt", field="anchor") from None

    def save(self, anchor: Anchor) -> None:
        doc = {"format": _FORMAT, "data_dir": self._location, **asdict(anchor)}
        self._io.write_file(self.path, json.dumps(doc, indent=2).encode("utf-8"), mode=0o600)

    def advance(self, anchor: Anchor) -> None:
        """Save ``anchor`` unless the file already records this store at the same or a later commit.

        Processes sharing the anchor commit and follow in any order; the lock makes read-compare-
        write atomic so the anchor never moves backwards."""
        fd = os.open(self._dir / f"{self.path.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            cur = self.load()
            if cur is None or cur.store_id != anchor.store_id or cur.seq < anchor.seq:
                self.save(anchor)
        finally:
            os.close(fd)

    def remove_orphan_temps(self) -> int:
        """Remove temp files an interrupted anchor write left behind; returns how many."""
        prefix = f".{self.path.name}."
        removed = 0
        for entry in os.scandir(self._dir):
            if entry.name.startswith(prefix) and is_temp_name(entry.name):
                self._io.unlink(Path(entry.path))
                removed += 1
        return removed


def check_manifest_against_anchor(
    *, anchor: Anchor | None, store_id: str, seq: int, manifest_sha256: str, anchor_path: Path,
    accept_unanchored: bool,
) -> None:
    """Refuse a manifest that is older than (or different from) what the anchor last recorded."""
    if anchor is None:
        if not accept_unanchored:
            raise FailedPreconditionError(
                f"the data directory has a manifest but no rollback anchor at {anchor_path}; if the store was "
                "moved or the anchor directory changed, open it once with accept_unanchored=True",
                field="anchor",
            )
        return
    if anchor.store_id != store_id:
        raise RollbackError(
            "MANIFEST belongs to a different store than the one anchored for this directory",
            field="store_id",
            limit=anchor.store_id,
            actual=store_id,
        )
    if seq < anchor.seq:
        raise RollbackError(
            "MANIFEST is older than the last committed one (an old manifest was replayed)",
            field="manifest.seq",
            limit=anchor.seq,
            actual=seq,
        )
    if seq == anchor.seq and manifest_sha256 != anchor.manifest_sha256:
        raise IntegrityError(
            "MANIFEST has the anchored sequence number but different contents", field="manifest.seq", actual=seq
        )


def resolve_anchor_dir(data_dir: Path, provider_dir: Path | None, override: str | os.PathLike[str] | None) -> Path:
    """Explicit ``anchor_dir`` > the key provider's (key file's) > ``<data_dir>.anchor`` beside the data."""
    if override is not None:
        return Path(override).absolute()
    if provider_dir is not None:
        return Path(provider_dir).absolute()
    return data_dir.with_name(data_dir.name + ".anchor")
