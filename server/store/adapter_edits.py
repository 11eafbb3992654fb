"""Manifest edits that add adapters (with their derived objects) or replace derived objects.

Each function returns the ``edit(manifest, txn)`` that ``LibraryStore._mutate`` commits; blobs
are written through ``write_blob(txn, data, context)`` with the context that binds them to their
adapter, id and role (see manifest.adapter_context / adapter_object_context).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from seqr_core.errors import AlreadyExistsError

from .commit import Txn
from .manifest import adapter_context, adapter_object_context, find_adapter, writable_library
from .records import AdapterRecord, LibraryRecord, adapter_record, library_record

WriteBlob = Callable[[Txn, bytes, bytes], dict[str, Any]]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_adapters_edit(library: str, checked: list, write_blob: WriteBlob):
    """Add (name, files, meta, objects) adapters in order: next ids, one version step each."""

    def edit(manifest: dict[str, Any], txn: Txn) -> list[AdapterRecord]:
        lib = writable_library(manifest, library)
        out = []
        for name, files, meta, objects in checked:
            if name in lib["adapters"]:
                raise AlreadyExistsError(f"adapter {name!r} already exists in library {library!r}",
                                         field="adapter", actual=name)
            adapter_id = lib["next_adapter_id"]
            entry = {"adapter_id": adapter_id, "created_at": now(), "meta": meta, "files": {},
                     "sha256": {f: hashlib.sha256(d).hexdigest() for f, d in files.items()},
                     "size_bytes": sum(len(d) for d in files.values()), "objects": {}}
            for file_name, data in files.items():
                context = adapter_context(manifest["store_id"], library, name, adapter_id, file_name)
                entry["files"][file_name] = write_blob(txn, data, context)
            for role, data in objects.items():
                context = adapter_object_context(manifest["store_id"], library, name, adapter_id, role)
                entry["objects"][role] = write_blob(txn, data, context)
            lib["adapters"][name] = entry
            lib["next_adapter_id"] = adapter_id + 1
            lib["version"] += 1
            out.append(adapter_record(name, entry))
        return out

    return edit


def adapter_objects_edit(library: str, checked: dict, write_blob: WriteBlob):
    """Add or replace ({adapter: {role: bytes}}) derived objects; the version stays."""

    def edit(manifest: dict[str, Any], txn: Txn) -> LibraryRecord:
        lib = writable_library(manifest, library)
        for name, roles in checked.items():
            old = find_adapter(manifest, library, name)
            entry = {**old, "objects": dict(old.get("objects", {}))}
            for role, data in roles.items():
                if role in entry["objects"]:
                    txn.obsolete.append(entry["objects"][role]["blob"])
                context = adapter_object_context(manifest["store_id"], library, name, entry["adapter_id"], role)
                entry["objects"][role] = write_blob(txn, data, context)
            lib["adapters"][name] = entry
        return library_record(library, lib)

    return edit
