"""Manifest edits that add or replace adapters (with their derived objects) or replace derived objects.

Each function returns the ``edit(manifest, txn)`` that ``LibraryStore._mutate`` commits; blobs
are written through ``write_blob(txn, data, context)`` with the context that binds them to their
adapter, id and role (see manifest.adapter_context / adapter_object_context).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from seqr_core.errors import AlreadyExistsError, NotFoundError

from .commit import Txn
from .manifest import (adapter_context, adapter_object_context, adapter_refs, find_adapter, note_adapter_put,
                       object_context, writable_library)
from .records import AdapterRecord, LibraryRecord, adapter_record, library_record

WriteBlob = Callable[[Txn, bytes, bytes], dict[str, Any]]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _entry(manifest: dict[str, Any], txn: Txn, library: str, name: str, adapter_id: int, files: dict,
           meta: dict, objects: dict, write_blob: WriteBlob, *, version: int) -> dict[str, Any]:
    """A manifest entry for one adapter version, its files and objects written as blobs."""
    entry = {"adapter_id": adapter_id, "created_at": now(), "meta": meta, "files": {},
             "sha256": {f: hashlib.sha256(d).hexdigest() for f, d in files.items()},
             "size_bytes": sum(len(d) for d in files.values()), "objects": {}, "version": version}
    for file_name, data in files.items():
        context = adapter_context(manifest["store_id"], library, name, adapter_id, file_name)
        entry["files"][file_name] = write_blob(txn, data, context)
    for role, data in objects.items():
        context = adapter_object_context(manifest["store_id"], library, name, adapter_id, role)
        entry["objects"][role] = write_blob(txn, data, context)
    return entry


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
            entry = _entry(manifest, txn, library, name, adapter_id, files, meta, objects, write_blob, version=1)
            lib["adapters"][name] = entry
            lib["next_adapter_id"] = adapter_id + 1
            note_adapter_put(lib, name, entry)
            out.append(adapter_record(name, entry))
        return out

    return edit


def replace_adapter_edit(library: str, checked: tuple, library_objects: dict, write_blob: WriteBlob, *,
                         replace: bool):
    """Store one adapter — with ``replace``, a new version of an existing one under its id, whose
    old blobs become obsolete — and replace ``library_objects`` in the same commit."""
    name, files, meta, objects = checked

    def edit(manifest: dict[str, Any], txn: Txn) -> AdapterRecord:
        lib = writable_library(manifest, library)
        old = lib["adapters"].get(name)
        if replace and old is None:
            raise NotFoundError(f"adapter {name!r} does not exist in library {library!r}", field="adapter",
                                actual=name)
        if not replace and old is not None:
            raise AlreadyExistsError(f"adapter {name!r} already exists in library {library!r}",
                                     field="adapter", actual=name)
        adapter_id = old["adapter_id"] if replace else lib["next_adapter_id"]
        entry = _entry(manifest, txn, library, name, adapter_id, files, meta, objects, write_blob,
                       version=old.get("version", 1) + 1 if replace else 1)
        if replace:
            txn.obsolete.extend(ref["blob"] for ref in adapter_refs(old))
        for role, data in library_objects.items():
            if role in lib["objects"]:
                txn.obsolete.append(lib["objects"][role]["blob"])
            lib["objects"][role] = write_blob(txn, data, object_context(manifest["store_id"], library, role))
        lib["adapters"][name] = entry
        lib["next_adapter_id"] = max(lib["next_adapter_id"], adapter_id + 1)
        note_adapter_put(lib, name, entry)
        return adapter_record(name, entry)

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
