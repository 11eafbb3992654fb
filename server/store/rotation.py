"""Online KEK rotation: re-seal every stored object under the primary key-encryption key.

The key id is part of each blob's authenticated header, so moving a data key to a new KEK means
re-sealing the blob: decrypt in memory, seal again with a fresh data key and nonce, write a new
blob file. All of it lands in one manifest commit; until then readers keep using the old blobs,
and after it the old blobs are unlinked, so no object references the old key id any more and the
operator can retire it. Cost is one read + one write of every object not yet under the primary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from seqr_core.errors import FailedPreconditionError

from .key_providers import KeyProvider
from .manifest import iter_blob_refs

__all__ = ["reseal_all", "select_primary"]


def select_primary(keys: KeyProvider, key_id: str | None) -> str:
    """The key id to rotate to; makes it the provider's primary when the provider can do that."""
    if key_id is None:
        return keys.primary_key_id
    if key_id not in keys.key_ids():
        raise FailedPreconditionError(
            f"key provider does not hold key {key_id!r}; add it before rotating", field="key_id", actual=key_id
        )
    if keys.primary_key_id != key_id:
        set_primary = getattr(keys, "set_primary", None)
        if set_primary is None:
            raise FailedPreconditionError(
                f"{type(keys).__name__} cannot change its primary key; make {key_id!r} primary in the provider",
                field="key_id",
            )
        set_primary(key_id)
    return key_id


def reseal_all(
    manifest: dict[str, Any],
    *,
    target: str,
    read: Callable[[dict[str, Any], bytes, str], bytes],
    write: Callable[[bytes, bytes], dict[str, Any]],
    obsolete: list[str],
) -> dict[str, Any]:
    """Re-seal, one object at a time (bounded memory), every blob not yet under ``target``."""
    resealed = current = 0
    for ref, context, what in iter_blob_refs(manifest):
        if ref["key_id"] == target:
            current += 1
            continue
        data = read(ref, context, what)
        obsolete.append(ref["blob"])
        ref.update(write(data, context))
        resealed += 1
    return {"primary_key_id": target, "resealed": resealed, "already_current": current,
            "manifest_seq": manifest["seq"]}
