"""What the manager reads and writes of an adapter's stored routing index, and the library record
it keeps after its own writes.

Startup loads each adapter's sealed index object (library_objects.INDEX) and never parses PEFT
files, except for an adapter whose index is missing (a store written before index objects) or of
another format: that one is parsed once and its index stored again (``store_derived``). Anything
unreadable raises for that adapter alone, and the manager quarantines it (quarantine.guarded).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import replace

from seqr_core import AdapterIndex, IndexFormatError, LibraryIndex, parse_peft_adapter
from seqr_core.errors import SeqrError

from . import library_objects as lo
from .store import AdapterRecord, LibraryRecord

log = logging.getLogger("seqr.manager")


def load_index(store, library: str, rec: AdapterRecord, empty: LibraryIndex) -> tuple[AdapterIndex, bytes | None, str]:
    """One adapter's index: (index object, its bytes if it had to be derived now, why)."""
    raw = store.read_adapter_object(library, rec.name, lo.INDEX) if lo.INDEX in rec.objects else None
    reason = "no stored index (store written before index objects)"
    if raw is not None:
        try:
            ai = lo.decode_index(raw, library=library, adapter=rec.name)
            empty.layout.check(ai)
            return ai, None, ""
        except IndexFormatError as e:
            reason = f"index format {e.actual} is not {e.limit}"
            log.debug("stale index format", extra={"library": library, "adapter": rec.name})
    parsed = parse_peft_adapter(store.read_adapter_files(library, rec.name), name=rec.name,
                                signature=empty.signature)
    ai = empty.index_adapter(parsed.adapter, upload_dtype=parsed.upload_dtype)
    return ai, lo.encode_index(ai), reason


def store_derived(store, library: str, derived: dict) -> None:
    """Persist re-derived index objects (one commit). Serving does not depend on it: if the
    store refuses, the next start derives them again."""
    try:
        store.put_adapter_objects(library, derived)
    except SeqrError as e:
        log.warning("could not store re-derived index objects", extra={"library": library,
                                                                      "error": str(e), "code": e.code})


def authenticate(store, library: str, name: str) -> None:
    """Read everything stored for one adapter, its files and its index object (a scrub)."""
    store.read_adapter_files(library, name)
    raw = store.read_adapter_object(library, name, lo.INDEX)
    if raw is not None:
        lo.decode_index(raw, library=library, adapter=name)


def record_after(store, before: LibraryRecord, *, put: AdapterRecord | None = None,
                 gone: str | None = None) -> LibraryRecord:
    """The library's record after the manager stored ``put`` (new or replacing its namesake) or
    deleted ``gone``: ``before`` with that one change, over the store's record without its
    adapters — what ``store.library`` builds, without copying every other adapter's entry. Call
    with the manager's writer lock held (no other write can come between)."""
    drop = gone if put is None else put.name
    adapters = [a for a in before.adapters if a.name != drop]
    if put is not None:
        adapters.insert(bisect.bisect([a.adapter_id for a in adapters], put.adapter_id), put)
    return replace(store.library(before.name, adapters=False), adapters=tuple(adapters))
