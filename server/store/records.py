"""Immutable views of libraries and adapters handed to callers.

Built fresh from a manifest snapshot on each call; mutable fields (``meta``, ``sha256``) are deep
copies, so callers cannot change the store's state by editing a record.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["AdapterRecord", "LibraryRecord", "adapter_record", "library_record"]


@dataclass(frozen=True)
class AdapterRecord:
    """One stored adapter. ``sha256`` maps each uploaded file name to the digest of its plaintext."""

    name: str
    adapter_id: int
    created_at: str
    sha256: dict[str, str]
    meta: dict
    size_bytes: int
    changed: int = 0          # library version of its upload (0: stored before versions were kept)
    version: int = 1          # 1 at upload, +1 for every in-place replacement
    objects: tuple[str, ...] = ()      # roles of the adapter's derived objects (e.g. "index")


@dataclass(frozen=True)
class LibraryRecord:
    """One library at one version; ``objects`` are the role names of its library-level objects.

    ``changed`` is the last library version whose change concerns every adapter (creation, a
    library object written or removed); ``deleted`` maps names of deleted adapters to the version
    that deleted them. With each adapter's ``changed`` they say which version last changed what.
    """

    name: str
    version: int
    meta: dict
    next_adapter_id: int
    adapters: tuple[AdapterRecord, ...]
    objects: tuple[str, ...]
    changed: int = 0
    deleted: Mapping[str, int] = field(default_factory=dict)
    object_sizes: Mapping[str, int] = field(default_factory=dict)   # role -> plaintext bytes


def _copy_json(value: Any) -> Any:
    """A deep copy of validated JSON data (dicts, lists, scalars): several times faster than
    copy.deepcopy, which matters when a 10,000-adapter library lists its records."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value


def adapter_record(name: str, entry: dict[str, Any]) -> AdapterRecord:
    return AdapterRecord(
        name=name,
        adapter_id=entry["adapter_id"],
        created_at=entry["created_at"],
        sha256=dict(entry["sha256"]),
        meta=_copy_json(entry["meta"]),
        size_bytes=entry["size_bytes"],
        changed=entry.get("changed", 0),
        version=entry.get("version", 1),
        objects=tuple(sorted(entry.get("objects", {}))),
    )


def library_record(name: str, entry: dict[str, Any], *, adapters: bool = True) -> LibraryRecord:
    records = sorted(
        (adapter_record(adapter, value) for adapter, value in entry["adapters"].items()), key=lambda a: a.adapter_id
    ) if adapters else ()
    return LibraryRecord(
        name=name,
        version=entry["version"],
        meta=copy.deepcopy(entry["meta"]),
        next_adapter_id=entry["next_adapter_id"],
        adapters=tuple(records),
        objects=tuple(sorted(entry["objects"])),
        # A library stored before these were kept: everything counts as changed at its version.
        changed=entry.get("changed", entry["version"]),
        deleted=MappingProxyType(dict(entry.get("deleted", {}))),
        object_sizes=MappingProxyType({role: ref["size"] for role, ref in entry["objects"].items()}),
    )
