"""Opening a data directory: exclusive lock, manifest verification, rollback check, clean-up.

Runs before the store serves anything. The manifest is authenticated and checked against the
rollback anchor first; only then is anything deleted, so a tampered or replayed manifest can never
make recovery destroy live blobs. Clean-up removes temp files from interrupted writes and blob
files the manifest does not reference (writes that crashed before their commit, and deletes that
crashed after it - finishing their crypto-shred).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqr_core.errors import FailedPreconditionError

from .anchor import Anchor, AnchorFile, check_manifest_against_anchor
from .durable_io import DurableIO, is_temp_name
from .envelope import parse_header
from .errors import RollbackError
from .key_providers import KeyProvider
from .manifest import MANIFEST_NAME, is_blob_name, iter_refs, new_manifest, open_manifest, seal_manifest

__all__ = ["BLOBS_DIR", "BLOB_SUFFIX", "Recovered", "lock_data_dir", "recover", "save_anchor"]

log = logging.getLogger(__name__)

BLOBS_DIR = "blobs"
BLOB_SUFFIX = ".blob"
LOCK_NAME = "LOCK"


@dataclass(frozen=True)
class Recovered:
    """The verified manifest and what start-up recovery cleaned up."""

    manifest: dict[str, Any]
    manifest_key_id: str
    removed_temp_files: int
    removed_orphan_blobs: int


def lock_data_dir(data_dir: Path) -> int:
    """Take an exclusive advisory lock so two processes never write one store; returns the fd."""
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise FailedPreconditionError(
                f"data directory {data_dir} is already open by another store instance", field="data_dir"
            ) from None
        raise
    return fd


def recover(
    *, data_dir: Path, keys: KeyProvider, io: DurableIO, anchor_file: AnchorFile, create: bool,
    accept_unanchored: bool,
) -> Recovered:
    anchor = anchor_file.load()
    raw = _read_manifest(data_dir)
    if raw is None:
        manifest, raw = _initialise(data_dir, keys, io, anchor_file, anchor=anchor, create=create)
    else:
        (data_dir / BLOBS_DIR).mkdir(mode=0o700, exist_ok=True)
        manifest = open_manifest(raw, keys, anchor=anchor)
        digest = hashlib.sha256(raw).hexdigest()
        check_manifest_against_anchor(
            anchor=anchor, store_id=manifest["store_id"], seq=manifest["seq"], manifest_sha256=digest,
            anchor_path=anchor_file.path, accept_unanchored=accept_unanchored,
        )
        if anchor is None or manifest["seq"] > anchor.seq:
            # A crash between manifest and anchor writes leaves the anchor one commit behind.
            save_anchor(anchor_file, manifest, raw)
    blob_temps, orphans = _clean_blob_dir(data_dir / BLOBS_DIR, manifest, io)
    temps = _remove_temp_files(data_dir, io) + anchor_file.remove_orphan_temps() + blob_temps
    if temps or orphans:
        log.info("store recovery removed %d temp file(s) and %d unreferenced blob(s)", temps, orphans)
    key_id = parse_header(raw, what="MANIFEST")[0].key_id
    return Recovered(manifest, key_id, temps, orphans)


def save_anchor(anchor_file: AnchorFile, manifest: dict[str, Any], raw: bytes) -> None:
    key_id = parse_header(raw, what="MANIFEST")[0].key_id
    anchor_file.save(Anchor(manifest["store_id"], manifest["seq"], key_id, hashlib.sha256(raw).hexdigest()))


def _read_manifest(data_dir: Path) -> bytes | None:
    try:
        return (data_dir / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        return None


def _initialise(
    data_dir: Path, keys: KeyProvider, io: DurableIO, anchor_file: AnchorFile, *, anchor: Anchor | None,
    create: bool,
) -> tuple[dict[str, Any], bytes]:
    """Create an empty store. An anchor at seq 0 means a previous creation never committed."""
    if anchor is not None and anchor.seq > 0:
        raise RollbackError(
            f"MANIFEST is missing but the rollback anchor {anchor_file.path} records commit {anchor.seq}; "
            "the store was deleted or replaced (remove the anchor only if you mean to start over)",
            field="manifest",
            limit=anchor.seq,
        )
    if not create:
        raise FailedPreconditionError(f"no store in {data_dir} (and create=False)", field="data_dir")
    blobs = data_dir / BLOBS_DIR
    blobs.mkdir(mode=0o700, exist_ok=True)
    if any(is_blob_name(Path(e.name).stem) for e in os.scandir(blobs) if e.name.endswith(BLOB_SUFFIX)):
        raise FailedPreconditionError(
            f"{blobs} holds blobs but there is no MANIFEST; refusing to initialise over them", field="data_dir"
        )
    io.fsync_dir(data_dir)
    manifest = new_manifest(secrets.token_hex(16))
    # Anchor seq 0 first: if we crash before the manifest lands, the next open may start over.
    anchor_file.save(Anchor(manifest["store_id"], 0, keys.primary_key_id, ""))
    manifest["seq"] = 1
    raw = seal_manifest(manifest, keys)
    io.write_file(data_dir / MANIFEST_NAME, raw)
    save_anchor(anchor_file, manifest, raw)
    return manifest, raw


def _remove_temp_files(directory: Path, io: DurableIO) -> int:
    found = [Path(e.path) for e in os.scandir(directory) if is_temp_name(e.name)]
    for path in found:
        io.unlink(path)
    if found:
        io.fsync_dir(directory)
    return len(found)


def _clean_blob_dir(blobs: Path, manifest: dict[str, Any], io: DurableIO) -> tuple[int, int]:
    """One scan of the blob directory: remove temp files and unreferenced blobs; returns both counts."""
    referenced = {ref["blob"] for ref in iter_refs(manifest)}
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
