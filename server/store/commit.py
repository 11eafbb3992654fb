"""The commit protocol: the only code that changes a store's medium after open.

A mutation is a :class:`Txn` inside one serialised medium write: it seals its new blobs and
stages them, then :meth:`Committer.commit` seals the new manifest and hands it to the medium
(the commit point: a MANIFEST rename, or a database COMMIT), advances the rollback anchor, lets
the caller publish the new state in memory, and finally shreds the blobs the mutation replaced
or deleted. Only then does the caller acknowledge.

Until the medium's commit has succeeded, an error leaves the old state in force and the medium
removes the staged blobs. A failure to advance the anchor after the commit fail-stops the store:
the anchor must never lag what was acknowledged.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from seqr_core.errors import UnavailableError

from .anchor import AnchorFile
from .durable_io import DurableIO
from .envelope import parse_header, seal
from .key_providers import KeyProvider
from .manifest import ManifestEncoder, seal_manifest
from .medium import Medium, MediumWrite
from .recovery import save_anchor

__all__ = ["Committer", "Txn"]


@dataclass
class Txn:
    """One mutation in progress: its object version, the medium write, blobs it makes obsolete."""

    version: int
    write: MediumWrite
    obsolete: list[str] = field(default_factory=list)


class Committer:
    def __init__(self, *, medium: Medium, keys: KeyProvider, io: DurableIO, anchor_file: AnchorFile):
        self._medium = medium
        self._keys = keys
        self._io = io
        self._anchor = anchor_file
        self._encoder = ManifestEncoder()   # reuses unchanged adapter entries' JSON across commits

    def write_blob(self, txn: Txn, data: bytes, context: bytes) -> dict[str, Any]:
        """Seal ``data`` for ``context`` at the transaction's version; returns its manifest reference."""
        name = secrets.token_hex(16)
        sealed = seal(data, keys=self._keys, context=context, version=txn.version)
        txn.write.put_blob(name, sealed)
        key_id = parse_header(sealed, what="new blob")[0].key_id
        return {"blob": name, "version": txn.version, "key_id": key_id, "size": len(data)}

    def commit(self, manifest: dict[str, Any], txn: Txn, *, publish: Callable[[bytes], None]) -> None:
        """Make ``manifest`` durable, then ``publish(sealed manifest)`` it, then shred obsolete blobs."""
        raw = seal_manifest(manifest, self._keys, encoder=self._encoder)
        txn.write.commit(raw, seq=manifest["seq"])
        self.anchor(manifest, raw)
        publish(raw)
        txn.write.shred(txn.obsolete)

    def anchor(self, manifest: dict[str, Any], raw: bytes) -> None:
        try:
            save_anchor(self._anchor, manifest, raw)
        except UnavailableError as exc:
            raise self._io.fail_stop(f"rollback anchor update failed after commit: {exc.message}") from exc
