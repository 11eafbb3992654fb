"""One library as routing sees it: an immutable snapshot (index, store record, quarantine).

The manager swaps these whole; readers keep the one they got. Built in one place
(:func:`library_state`) so every path - a write, a load, a replica catching up - derives the
same statistics for shared-A adapters from the library's pooled moments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from seqr_core import AdapterEntry, LibraryIndex, MomentPool, derived_stats
from seqr_core.errors import IntegrityError

from . import library_objects as lo
from .auth import Principal
from .quarantine import Damage, LibraryDamage
from .store import AdapterRecord, LibraryRecord
from .views import ChangeLog, view_version

__all__ = ["LibraryState", "library_state", "same_factors"]


@dataclass(frozen=True)
class LibraryState:
    """One library as routing sees it: the index snapshot and the store record it came from.

    ``index`` holds the routable adapters; ``damage`` the quarantined ones (still in the store,
    never routed) and quarantined library objects.
    """

    spec: lo.LibrarySpec
    index: LibraryIndex
    record: LibraryRecord
    damage: LibraryDamage = LibraryDamage()
    records: Mapping[str, AdapterRecord] = field(default_factory=dict)   # every stored adapter
    names_by_id: Mapping[int, str] = field(default_factory=dict)
    changes: ChangeLog = ChangeLog(library=0, adapters=MappingProxyType({}))
    pool: MomentPool | None = None       # pooled moments of the last (unrestricted) Calibrate
    _views: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.index.version

    def visible_entries(self, principal: Principal) -> list[AdapterEntry]:
        return [e for e in self.index.adapters if principal.may_use_adapter(e.name)]

    def visible_damage(self, principal: Principal) -> list[tuple[AdapterRecord, Damage]]:
        """Quarantined adapters the caller may see, in id order."""
        return sorted(((self.records[n], d) for n, d in self.damage.adapters.items()
                       if principal.may_use_adapter(n)), key=lambda rd: rd[0].adapter_id)

    def degraded_for(self, principal: Principal) -> bool:
        """Damage the caller may know of: a quarantined library object, or an adapter it can see."""
        return bool(self.damage.objects) or bool(self.visible_damage(principal))

    def view_version(self, principal: Principal) -> int:
        """The version this caller is told: moves only with changes it can see (views.py)."""
        return view_version(self.changes, principal, version=self.version, cache=self._views)

    def entry(self, name: str, principal: Principal, *, field: str = "adapter") -> AdapterEntry:
        # Hidden adapters raise the very error an absent one does (same type, text and field).
        if not principal.may_use_adapter(name):
            return self.without_adapters().entry(name, field=field)
        damage = self.damage.adapters.get(name)
        if damage is not None:
            raise IntegrityError(f"adapter {name!r} is quarantined: its stored data is damaged "
                                 f"({damage.code}); delete it and upload it again", field=field, actual=name)
        return self.index.entry(name, field=field)

    def without_adapters(self) -> LibraryIndex:
        """This library as it would be with no adapters: what a caller who may see none gets."""
        idx = self.index
        return LibraryIndex.create(name=idx.name, signature=idx.signature, shared_a=idx.shared_a,
                                   version=idx.version)


def library_state(spec: lo.LibrarySpec, index: LibraryIndex, record: LibraryRecord,
           damage: LibraryDamage = LibraryDamage(), pool: MomentPool | None = None) -> LibraryState:
    """The state for ``index``; shared-A adapters without statistics get them from ``pool``."""
    recs = {r.name: r for r in record.adapters}
    cal = derived_stats(index, pool)
    if cal is not index.calibration:
        index = index.with_calibration(cal, version=index.version)
    return LibraryState(spec=spec, index=index, record=record, damage=damage, records=MappingProxyType(recs),
                        names_by_id=MappingProxyType({e.adapter_id: e.name for e in index.adapters}),
                        changes=ChangeLog.of(record), pool=pool)


def same_factors(a: AdapterEntry | None, b: AdapterEntry | None) -> bool:
    """Whether two entries are one upload: an entry object is shared by every snapshot (restricted
    views and a follower's catch-up included) until its adapter is deleted or replaced, which
    makes a new entry."""
    return a is not None and a is b
