"""The durable commit protocol: the only code that changes the data directory after open.

A mutation is a :class:`Txn`: it seals and writes its new blobs (temp file, fsync, rename), then
:meth:`Committer.commit` fsyncs the blob directory, writes the new MANIFEST (temp, fsync, rename,
directory fsync - the commit point), advances the rollback anchor, lets the caller publish the new
state in memory, and finally unlinks the blobs the mutation replaced or deleted (the crypto-shred)
and fsyncs the directory again. Only then does the caller acknowledge.

Until the MANIFEST rename has succeeded, a write or rename error leaves the old state in force and
:meth:`Committer.discard` removes the new blobs (fsync errors fail-stop at once, see durable_io).
Once the rename has happened, any error fail-stops the store: disk may be ahead of memory, and the
next open reconciles the two.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqr_core.errors import UnavailableError

from .anchor import AnchorFile
from .durable_io import DurableIO
from .envelope import parse_header, seal
from .key_providers import KeyProvider
from .manifest import MANIFEST_NAME, ManifestEncoder, seal_manifest
from .recovery import BLOB_SUFFIX, BLOBS_DIR, save_anchor

__all__ = ["Committer", "Txn"]


@dataclass
class Txn:
    """One mutation in progress: its object version, blobs written so far, blobs it makes obsolete."""

    version: int
    written: list[Path] = field(default_factory=list)
    obsolete: list[str] = field(default_factory=list)


class Committer:
    def __init__(self, *, data_dir: Path, keys: KeyProvider, io: DurableIO, anchor_file: AnchorFile):
        self._data_dir = data_dir
        self.blobs_dir = data_dir / BLOBS_DIR
        self._keys = keys
        self._io = io
        self._anchor = anchor_file
        self._encoder = ManifestEncoder()   # reuses unchanged adapter entries' JSON across commits

    def blob_file(self, name: str) -> Path:
        return self.blobs_dir / f"{name}{BLOB_SUFFIX}"

    def write_blob(self, txn: Txn, data: bytes, context: bytes) -> dict[str, Any]:
        """Seal ``data`` for ``context`` at the transaction's version; returns its manifest reference."""
        name = secrets.token_hex(16)
        sealed = seal(data, keys=self._keys, context=context, version=txn.version)
        path = self.blob_file(name)
        txn.written.append(path)
        self._io.write_file(path, sealed, sync_dir=False)  # one directory fsync per commit
        key_id = parse_header(sealed, what="new blob")[0].key_id
        return {"blob": name, "version": txn.version, "key_id": key_id, "size": len(data)}

    def commit(self, manifest: dict[str, Any], txn: Txn, *, publish: Callable[[str], None]) -> None:
        """Make ``manifest`` durable, then ``publish(manifest_key_id)`` it, then shred obsolete blobs."""
        if txn.written:
            self._io.fsync_dir(self.blobs_dir)
        raw = seal_manifest(manifest, self._keys, encoder=self._encoder)
        self._io.write_file(self._data_dir / MANIFEST_NAME, raw)
        try:
            save_anchor(self._anchor, manifest, raw)
        except UnavailableError as exc:
            raise self._io.fail_stop(f"rollback anchor update failed after commit: {exc.message}") from exc
        publish(parse_header(raw, what="MANIFEST")[0].key_id)
        for name in txn.obsolete:
            self._io.unlink(self.blob_file(name))
        if txn.obsolete:
            self._io.fsync_dir(self.blobs_dir)

    def discard(self, txn: Txn) -> None:
        """Remove an uncommitted transaction's blobs. After a fail-stop, hands off: the manifest may
        already reference them, and the next open sorts it out."""
        if self._io.broken is not None:
            return
        for path in txn.written:
            self._io.unlink(path)
