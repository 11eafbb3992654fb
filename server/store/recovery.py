"""Opening a store: manifest verification, rollback check, first initialisation, clean-up.

Runs before the store serves anything, inside the medium's writer lock (so no other process
commits meanwhile). The manifest is authenticated and checked against the rollback anchor
first; only then is anything deleted, so a tampered or replayed manifest can never make
recovery destroy live blobs. Clean-up removes leftovers of interrupted writes: temp files and
blobs the manifest does not reference (writes that crashed before their commit, and deletes
that crashed after it - finishing their crypto-shred).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from seqr_core.errors import FailedPreconditionError

from .anchor import Anchor, AnchorFile, check_manifest_against_anchor
from .envelope import parse_header
from .errors import RollbackError, TamperedBlobError
from .key_providers import KeyProvider
from .manifest import iter_refs, new_manifest, open_manifest, seal_manifest
from .medium import Medium, MediumWrite

__all__ = ["Recovered", "recover", "save_anchor", "verify_newer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recovered:
    """The verified manifest and what start-up recovery cleaned up."""

    manifest: dict[str, Any]
    manifest_key_id: str
    manifest_sha256: str
    removed_temp_files: int
    removed_orphan_blobs: int


def recover(
    *, medium: Medium, keys: KeyProvider, anchor_file: AnchorFile, create: bool, accept_unanchored: bool,
) -> Recovered:
    with medium.writing() as w:
        anchor = anchor_file.load()
        raw = w.read_manifest()
        if raw is None:
            manifest, raw = _initialise(w, medium, keys, anchor_file, anchor=anchor, create=create)
        else:
            manifest = open_manifest(raw, keys, anchor=anchor)
            check_manifest_against_anchor(
                anchor=anchor, store_id=manifest["store_id"], seq=manifest["seq"],
                manifest_sha256=hashlib.sha256(raw).hexdigest(), anchor_path=anchor_file.path,
                accept_unanchored=accept_unanchored,
            )
            # A crash between manifest and anchor writes leaves the anchor one commit behind;
            # on a shared medium other hosts' commits leave it further behind.
            save_anchor(anchor_file, manifest, raw)
        temps, orphans = w.sweep({ref["blob"] for ref in iter_refs(manifest)})
    temps += anchor_file.remove_orphan_temps()
    if temps or orphans:
        log.info("store recovery removed %d temp file(s) and %d unreferenced blob(s)", temps, orphans)
    key_id = parse_header(raw, what="MANIFEST")[0].key_id
    return Recovered(manifest, key_id, hashlib.sha256(raw).hexdigest(), temps, orphans)


def verify_newer(raw: bytes | None, *, keys: KeyProvider, anchor_file: AnchorFile, current: dict[str, Any],
                 current_sha256: str, medium: str) -> dict[str, Any] | None:
    """A manifest another process committed, verified as at open and newer than ``current``; None
    when it is ``current`` itself. Older, altered, foreign or missing raise IntegrityError."""
    if raw is None:
        raise RollbackError(f"the {medium} store's manifest has disappeared", field="manifest")
    digest = hashlib.sha256(raw).hexdigest()
    if digest == current_sha256:
        return None
    anchor = anchor_file.load()
    manifest = open_manifest(raw, keys, anchor=anchor)
    seq, have = manifest["seq"], current["seq"]
    if manifest["store_id"] != current["store_id"]:
        raise RollbackError("the manifest now belongs to a different store", field="store_id",
                            limit=current["store_id"], actual=manifest["store_id"])
    if seq < have:
        raise RollbackError("manifest is older than one this store already used (an old manifest was put back)",
                            field="manifest.seq", limit=have, actual=seq)
    if seq == have:
        raise TamperedBlobError("manifest has the current sequence number but different contents",
                                field="manifest.seq", actual=seq)
    check_manifest_against_anchor(anchor=anchor, store_id=manifest["store_id"], seq=seq, manifest_sha256=digest,
                                  anchor_path=anchor_file.path, accept_unanchored=True)
    return manifest


def save_anchor(anchor_file: AnchorFile, manifest: dict[str, Any], raw: bytes) -> None:
    key_id = parse_header(raw, what="MANIFEST")[0].key_id
    anchor_file.advance(Anchor(manifest["store_id"], manifest["seq"], key_id, hashlib.sha256(raw).hexdigest()))


def _initialise(
    w: MediumWrite, medium: Medium, keys: KeyProvider, anchor_file: AnchorFile, *, anchor: Anchor | None,
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
        raise FailedPreconditionError(f"no store in {medium.kind} {medium.location} (and create=False)",
                                      field="data_dir")
    w.prepare_empty()
    manifest = new_manifest(secrets.token_hex(16))
    # Anchor seq 0 first: if we crash before the manifest lands, the next open may start over.
    anchor_file.save(Anchor(manifest["store_id"], 0, keys.primary_key_id, ""))
    manifest["seq"] = 1
    raw = seal_manifest(manifest, keys)
    w.commit(raw, seq=1)
    save_anchor(anchor_file, manifest, raw)
    return manifest, raw
