"""Per-principal storage quotas: how many libraries and adapters a caller may own, and how many bytes.

A tokens-file entry may carry ``"quota": {"adapters": 50, "bytes": 1073741824, "libraries": 5}``
(every key optional; absent means unlimited). Ownership is recorded, not inferred: CreateLibrary
and PutAdapter store the caller's principal name in the library's or adapter's (encrypted)
store meta, and a principal's usage is what the store holds under its name - adapters (and
their uploaded bytes) and libraries (and their shared-A bytes). Globs would be ambiguous (two
principals' globs can overlap, an unrestricted admin's match everything), and recording the
owner keeps usage right when an ACL changes. Consequences, documented in the README: the
account is the principal *name* (tokens sharing a name share it; renaming an entry starts a new
account), deleting an adapter frees its share, and data stored before quotas existed, or by an
open server, belongs to no quota account.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

from seqr_core.errors import InvalidArgumentError, LimitExceededError

from .store import LibraryRecord

OWNER = "owner"          # key of the owning principal's name in library and adapter store meta
SHARED_A_ROLE = "shared_a"


@dataclass(frozen=True)
class Usage:
    libraries: int = 0
    adapters: int = 0
    bytes: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.libraries + other.libraries, self.adapters + other.adapters, self.bytes + other.bytes)


@dataclass(frozen=True)
class Quota:
    """Limits on what one principal may own; None means unlimited."""

    libraries: int | None = None
    adapters: int | None = None
    bytes: int | None = None

    @classmethod
    def parse(cls, doc: object, *, field: str) -> "Quota | None":
        """The tokens-file ``quota`` object (None when absent), validated."""
        if doc is None:
            return None
        names = [f.name for f in fields(cls)]
        if not isinstance(doc, dict) or not set(doc) <= set(names):
            raise InvalidArgumentError(f"must be an object with keys among {names}", field=field,
                                       actual=sorted(doc) if isinstance(doc, dict) else type(doc).__name__)
        for k, v in doc.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidArgumentError("must be a non-negative integer", field=f"{field}.{k}", actual=v)
        return cls(**doc)

    def to_json(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def check(self, *, owner: str, usage: Usage, adding: Usage) -> None:
        """Refuse (RESOURCE_EXHAUSTED naming the limit) when ``usage + adding`` exceeds a limit."""
        after = usage + adding
        for f in fields(self):
            limit, grows = getattr(self, f.name), getattr(adding, f.name)
            if limit is not None and grows and getattr(after, f.name) > limit:
                raise LimitExceededError(f"principal {owner!r} would exceed its {f.name} quota",
                                         field=f"quota.{f.name}", limit=limit, actual=getattr(after, f.name))


def usage_of(owner: str, libraries: Iterable[LibraryRecord]) -> Usage:
    """What ``owner`` holds in the store: its libraries (with shared A) and its adapters."""
    total = Usage()
    for lib in libraries:
        if lib.meta.get(OWNER) == owner:
            total += Usage(libraries=1, bytes=lib.object_sizes.get(SHARED_A_ROLE, 0))
        for a in lib.adapters:
            if a.meta.get(OWNER) == owner:
                total += Usage(adapters=1, bytes=a.size_bytes)
    return total
