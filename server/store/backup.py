"""Backup and restore of a data directory: its sealed files, the anchor record and key ids, never keys.

A backup is one tar file (mode 0600)::

    MANIFEST                 the sealed manifest, as committed
    blobs/<hex>.blob         every blob that manifest references (still sealed)
    seqr-backup.json         index: store id, manifest seq and sha256, the key ids needed to read
                             it, the rollback anchor at backup time, sha256 and size of each file

Everything stays encrypted: the backup is as safe to store as the data directory, and useless
without the KEK (whose key ids the index lists, so a restore can say which key is missing).
Library and adapter names are sealed in the MANIFEST and never appear in the index.

Consistency without stopping the server: blobs are immutable and a commit unlinks blobs only
after its new MANIFEST is in place, so a copy is consistent when the MANIFEST read before copying
the blobs it references is still the current one afterwards; otherwise the copy is retried.
Every blob is authenticated while it is copied, so a backup never preserves tampered data.

Restore checks the tar (only regular files with expected names), every file's sha256, and that
the key provider holds every key id before it writes anything; it builds the directory beside
the target and renames it into place, anchors it for its new path, then opens it and
authenticates every blob. An existing anchor newer than the backup means the restore is a
rollback: refused unless ``accept_rollback`` (the operator's explicit decision).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tarfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from seqr_core.errors import FailedPreconditionError, IntegrityError, UnavailableError

from .anchor import AnchorFile, resolve_anchor_dir
from .durable_io import DurableIO
from .envelope import open_sealed, parse_header
from .errors import RollbackError, WrongKeyError
from .key_providers import KeyProvider
from .library_store import LibraryStore
from .manifest import MANIFEST_NAME, iter_blob_refs, open_manifest
from .directory import BLOB_SUFFIX, BLOBS_DIR

__all__ = ["BACKUP_FORMAT", "INDEX_NAME", "BackupSummary", "read_backup_index", "restore_backup", "write_backup"]

BACKUP_FORMAT = 1
INDEX_NAME = "seqr-backup.json"
_ATTEMPTS = 5
_MEMBER = re.compile(rf"^(?:{MANIFEST_NAME}|{BLOBS_DIR}/[0-9a-f]{{32}}{re.escape(BLOB_SUFFIX)})$")
_MAX_INDEX_BYTES = 64 << 20


@dataclass(frozen=True)
class BackupSummary:
    path: Path
    store_id: str
    manifest_seq: int
    key_ids: tuple[str, ...]
    files: int
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "store_id": self.store_id, "manifest_seq": self.manifest_seq,
                "key_ids": list(self.key_ids), "files": self.files, "bytes": self.bytes}


# ------------------------------------------------------------------------------------ backup

def write_backup(data_dir: str | os.PathLike[str], out: str | os.PathLike[str], keys: KeyProvider, *,
                 anchor_dir: str | os.PathLike[str] | None = None) -> BackupSummary:
    """Write a verified, consistent backup of ``data_dir`` to ``out`` (which must not exist)."""
    data = Path(data_dir).absolute()
    target = Path(out).absolute()
    if target.exists():
        raise FailedPreconditionError(f"{target} exists; refusing to overwrite a backup", field="out")
    if not (data / MANIFEST_NAME).is_file():
        raise FailedPreconditionError(f"no store in {data} (no {MANIFEST_NAME})", field="data_dir")
    anchor_file = AnchorFile(resolve_anchor_dir(data, keys.anchor_dir, anchor_dir), data, DurableIO())
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        for _ in range(_ATTEMPTS):
            index = _copy_once(data, temp, keys, anchor_file)
            if index is not None:
                break
        else:
            raise UnavailableError(f"the store kept changing during {_ATTEMPTS} backup attempts; retry when "
                                   "it is quieter", field="data_dir", limit=_ATTEMPTS)
        with open(temp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(temp, target)
        DurableIO().fsync_dir(target.parent)
    finally:
        temp.unlink(missing_ok=True)
    return BackupSummary(target, index["store_id"], index["manifest_seq"], tuple(index["key_ids"]),
                         len(index["files"]), sum(f["size"] for f in index["files"].values()))


def _copy_once(data: Path, temp: Path, keys: KeyProvider, anchor_file: AnchorFile) -> dict[str, Any] | None:
    """One attempt; None when a commit happened meanwhile (the caller retries)."""
    raw = (data / MANIFEST_NAME).read_bytes()
    manifest = open_manifest(raw, keys, anchor=anchor_file.load())
    files: dict[str, dict[str, Any]] = {}
    key_ids = {parse_header(raw, what=MANIFEST_NAME)[0].key_id}
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, files, MANIFEST_NAME, raw)
        for ref, context, what in iter_blob_refs(manifest):
            name = f"{BLOBS_DIR}/{ref['blob']}{BLOB_SUFFIX}"
            if name in files:
                continue
            try:
                blob = (data / name).read_bytes()
            except FileNotFoundError:
                return None          # unlinked by a commit after our MANIFEST read
            open_sealed(blob, keys=keys, context=context, what=what, expected_version=ref["version"],
                        expected_key_id=ref["key_id"])
            key_ids.add(ref["key_id"])
            _add(tar, files, name, blob)
        if (data / MANIFEST_NAME).read_bytes() != raw:
            return None
        anchor = anchor_file.load()
        index = {"format": BACKUP_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "store_id": manifest["store_id"], "manifest_seq": manifest["seq"],
                 "manifest_sha256": hashlib.sha256(raw).hexdigest(), "key_ids": sorted(key_ids),
                 "anchor": None if anchor is None else {"store_id": anchor.store_id, "seq": anchor.seq,
                                                        "key_id": anchor.key_id,
                                                        "manifest_sha256": anchor.manifest_sha256},
                 "libraries": len(manifest["libraries"]), "files": files}
        _add(tar, {}, INDEX_NAME, json.dumps(index, indent=2, sort_keys=True).encode())
    return index


def _add(tar: tarfile.TarFile, files: dict[str, dict[str, Any]], name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o600
    tar.addfile(info, io.BytesIO(data))
    files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


# ----------------------------------------------------------------------------------- restore

def read_backup_index(backup: str | os.PathLike[str]) -> dict[str, Any]:
    """The index of a backup after checking every member against it (DATA_LOSS on any mismatch)."""
    with tarfile.open(backup, mode="r:") as tar:
        return _checked_index(tar)[0]


def restore_backup(backup: str | os.PathLike[str], data_dir: str | os.PathLike[str], keys: KeyProvider, *,
                   anchor_dir: str | os.PathLike[str] | None = None, accept_rollback: bool = False) -> dict[str, Any]:
    """Restore ``backup`` into ``data_dir`` (absent or empty); returns what was restored and verified."""
    target = Path(data_dir).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FailedPreconditionError(f"{target} is not empty; restore into a new or empty directory",
                                      field="data_dir")
    io_ = DurableIO()
    with tarfile.open(backup, mode="r:") as tar:
        index, members = _checked_index(tar)
        missing = sorted(set(index["key_ids"]) - set(keys.key_ids()))
        if missing:
            raise WrongKeyError(f"the key provider lacks key(s) {missing} this backup is sealed under; "
                                "restore with the key file (or KMS) the store used", field="key_id", actual=missing)
        anchor_file = AnchorFile(resolve_anchor_dir(target, keys.anchor_dir, anchor_dir), target, io_)
        _check_rollback(anchor_file, index, accept_rollback=accept_rollback)
        staging = target.with_name(f".{target.name}.restore-{secrets.token_hex(6)}")
        staging.mkdir(mode=0o700, parents=True)
        try:
            (staging / BLOBS_DIR).mkdir(mode=0o700)
            for name, member in members.items():
                io_.write_file(staging / name, _read(tar, member), sync_dir=False)
            io_.fsync_dir(staging / BLOBS_DIR)
            io_.fsync_dir(staging)
            if target.exists():
                target.rmdir()
            os.replace(staging, target)
            io_.fsync_dir(target.parent)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    if accept_rollback:
        anchor_file.path.unlink(missing_ok=True)
    with LibraryStore.open(target, keys, create=False, anchor_dir=anchor_dir, accept_unanchored=True) as store:
        checked = store.verify()
        libraries = len(store.list_libraries())
    if checked["failed"]:
        raise IntegrityError(f"restored store failed verification: {checked['failed'][:3]}", field="backup")
    return {"data_dir": str(target), "store_id": index["store_id"], "manifest_seq": index["manifest_seq"],
            "libraries": libraries, "blobs_verified": checked["checked"], "key_ids": index["key_ids"]}


def _checked_index(tar: tarfile.TarFile) -> tuple[dict[str, Any], dict[str, tarfile.TarInfo]]:
    """Members by name, each a regular file with an expected name whose sha256 matches the index."""
    members: dict[str, tarfile.TarInfo] = {}
    for m in tar.getmembers():
        if not m.isfile() or m.name in members or not (m.name == INDEX_NAME or _MEMBER.match(m.name)):
            raise IntegrityError("backup holds an unexpected or duplicate member", field="backup", actual=m.name[:200])
        members[m.name] = m
    if INDEX_NAME not in members or members[INDEX_NAME].size > _MAX_INDEX_BYTES:
        raise IntegrityError(f"not a seqr backup: {INDEX_NAME} is missing or too large", field="backup")
    try:
        index = json.loads(_read(tar, members.pop(INDEX_NAME)))
        files, fmt = index["files"], index["format"]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"backup index {INDEX_NAME} is not valid", field="backup") from None
    if fmt != BACKUP_FORMAT:
        raise FailedPreconditionError("unsupported backup format", field="format", limit=BACKUP_FORMAT, actual=fmt)
    if set(files) != set(members) or MANIFEST_NAME not in members:
        raise IntegrityError("backup members do not match its index", field="backup",
                             actual=sorted(set(files) ^ set(members))[:5])
    for name, member in members.items():
        digest = hashlib.sha256(_read(tar, member)).hexdigest()
        if digest != files[name].get("sha256"):
            raise IntegrityError("backup file does not match its checksum", field=name, actual=digest)
    if hashlib.sha256(_read(tar, members[MANIFEST_NAME])).hexdigest() != index.get("manifest_sha256"):
        raise IntegrityError("backup MANIFEST does not match the recorded manifest hash", field=MANIFEST_NAME)
    return index, members


def _check_rollback(anchor_file: AnchorFile, index: dict[str, Any], *, accept_rollback: bool) -> None:
    anchor = anchor_file.load()
    if anchor is None or accept_rollback:
        return
    if anchor.store_id != index["store_id"] or anchor.seq > index["manifest_seq"]:
        raise RollbackError(
            f"the rollback anchor {anchor_file.path} records a newer (or another) store at this path; restoring "
            "would roll it back. Restore into a new directory, or pass --accept-rollback if that is the intent",
            field="data_dir", limit=anchor.seq, actual=index["manifest_seq"])


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    if f is None:
        raise IntegrityError("backup member is not a regular file", field=member.name)
    return f.read()
