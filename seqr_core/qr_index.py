"""The QR index: what SEQR needs to route, held as per-adapter columns that grow in place.

For adapter i on module m with ΔW = s·B·A, thin QR s·B = Q·R gives ‖ΔW x‖ = ‖R·A·x‖, so only
R is kept (seqr_core.adapter_index; B is never held). Shared-A adapters (A equal to the
library's frozen A_m) go on the fast path: z = A_m·x once, then e_i = zᵀ(RᵢᵀRᵢ)z = feat(z)·wᵢ
for all i as one GEMM, wᵢ the float64 Gram weights of Rᵢ (K = r(r+1)/2 numbers — all of R
routing needs). Other adapters keep M_i = R_i·A_i (r×d, fp32) plus R_i and A_i for the float64
re-check — SpectR's cost, the same exact answer.

Layout (``Columns``, seqr_core.slots): one slot per adapter, in id order. Per module row of
the signature: present / shared / ‖ΔW‖_F² / ‖R‖_F² / ‖w‖; per group of shared-A modules of
one rank: W (modules, K, slots) float64 — the stacked table the batched paths multiply with,
and its fp32 copy for the fp32 kernel, built on first use. Adding an adapter writes its
columns (work ∝ that adapter); removing one masks its slot (compaction when half are dead);
replacing one (same id, same place in library order) writes the new version to a fresh slot and
masks the old. ``order`` maps library order to slots (ascending except after a replace, until
compaction writes slots in library order again).
Calibration constants live in a second set of columns, rebuilt only by ``with_calibration``.

Snapshots are immutable: every mutation returns a new LibraryIndex; a reader holding an old
snapshot keeps its answers. ``memo`` caches derived per-snapshot values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np

from .adapter_index import AdapterIndex, index_adapter
from .adapters import Adapter, check_adapter_name
from .errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from .signature import BaseModelSignature
from .slots import Columns
from .tables import (Layout, GeneralBlock, adapter_columns, cal_columns, cal_for, empty_columns, general_add,
                     general_insert, general_remove)

_COMPACT_MIN = 32


@functools.lru_cache(maxsize=64)
def triu_pairs(r: int) -> tuple[np.ndarray, np.ndarray]:
    """Upper-triangle index pairs of an r×r matrix (cached: read-only, shared by every caller)."""
    iu, ju = np.triu_indices(r)
    iu.setflags(write=False)
    ju.setflags(write=False)
    return iu, ju


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    adapter_id: int
    modules: tuple[str, ...]
    shared_modules: frozenset[str]
    rank: int
    upload_dtype: str = "F32"

    @property
    def kind(self) -> str:
        if len(self.shared_modules) == len(self.modules):
            return "shared_a"
        return "general" if not self.shared_modules else "mixed"


def _frozen_slots(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.int64)
    a.setflags(write=False)
    return a


def _entry(layout: Layout, ai: AdapterIndex, adapter_id: int) -> AdapterEntry:
    return AdapterEntry(name=ai.name, adapter_id=int(adapter_id), modules=layout.intern(ai.modules),
                        shared_modules=layout.intern(ai.shared_modules), rank=ai.rank,
                        upload_dtype=ai.upload_dtype)


@dataclass(frozen=True)
class LibraryIndex:
    """An immutable snapshot of one library's routing index."""

    name: str
    signature: BaseModelSignature
    version: int
    shared_a: Mapping[str, np.ndarray]
    layout: Layout
    adapters: tuple[AdapterEntry, ...]
    columns: Columns
    order: np.ndarray                                  # (N,) slot of each adapter, library order
    general: Mapping[str, GeneralBlock]
    calibration: object = None                         # seqr_core.calibration.CalibrationStats | None
    cal_columns: Columns | None = None
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def create(cls, *, name: str, signature: BaseModelSignature,
               shared_a: Mapping[str, np.ndarray] | None = None, version: int = 1) -> "LibraryIndex":
        sa = {}
        for m, A in (shared_a or {}).items():
            spec = signature.spec(m, field=f"shared_a.{m}")
            A = np.ascontiguousarray(A, dtype=np.float32)
            if A.ndim != 2 or A.shape[1] != spec.d_in or not np.isfinite(A).all():
                raise InvalidArgumentError("shared A must be finite (r, d_in)",
                                           field=f"shared_a.{m}", limit=spec.d_in, actual=A.shape)
            A.setflags(write=False)
            sa[m] = A
        layout = Layout.build(signature, sa)
        return cls(name=name, signature=signature, version=version, shared_a=MappingProxyType(sa),
                   layout=layout, adapters=(), columns=empty_columns(layout), order=_frozen_slots(np.zeros(0, np.int64)),
                   general=MappingProxyType({}))

    # --- lookups -----------------------------------------------------------------------
    def memo(self, key, build: Callable):
        """A value derived from this snapshot. Snapshots are immutable, so racing builders
        compute the same value; the first one stored wins (builds may nest: no lock held)."""
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo.setdefault(key, build())
        return hit

    @property
    def names(self) -> tuple[str, ...]:
        return self.memo("names", lambda: tuple(a.name for a in self.adapters))

    @property
    def slots(self) -> np.ndarray:
        """(N,) slot of each adapter, library order. Slots grow with library order except
        after a replace, which leaves a dead slot behind until compaction restores the order."""
        return self.order

    @property
    def compact(self) -> bool:
        """Every slot is live: per-slot arrays are already in library order (a replace leaves a
        dead slot, and compaction writes slots in library order, so no slot is out of order)."""
        return self.order.size == self.columns.n

    @property
    def ids(self) -> np.ndarray:
        def build():
            ids = np.array([a.adapter_id for a in self.adapters], dtype=np.int64)
            ids.setflags(write=False)
            return ids
        return self.memo("ids", build)

    def entry(self, name: str, *, field: str = "adapter") -> AdapterEntry:
        e = self.memo("by_name", lambda: {a.name: a for a in self.adapters}).get(name)
        if e is not None:
            return e
        raise NotFoundError(f"no adapter {name!r} in library {self.name!r}", field=field,
                            actual=name)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Library-order positions of adapter ids (ids grow with position)."""
        return np.searchsorted(self.ids, ids)

    def slots_of(self, ids: np.ndarray) -> np.ndarray:
        return self.slots[self.positions(ids)]

    def table(self, key: str) -> np.ndarray:
        """A per-slot table: ``present``/``shared``/``frob2``/``rf2``/``wnorm`` (modules, slots),
        ``W{g}`` (group modules, K, slots) float64, ``G{g}`` its fp32 copy."""
        return self.columns.derived(key) if key.startswith("G") else self.columns.view(key)

    def cal_table(self, key: str) -> np.ndarray:
        return self.cal_columns.view(key)

    def module_ids(self, module: str) -> np.ndarray:
        """Ids of the adapters targeting ``module`` (shared then general: ascending within each)."""
        def build():
            row = self.layout.row[module]
            s = self.slots[self.table("shared")[row, self.slots]]
            shared_ids = self.columns.view("ids")[s]
            g = self.general.get(module)
            return np.concatenate([shared_ids, g.ids if g is not None else np.zeros(0, np.int64)])
        return self.memo(("module_ids", module), build)

    # --- mutations ---------------------------------------------------------------------
    def index_adapter(self, adapter: Adapter, *, upload_dtype: str = "F32") -> AdapterIndex:
        """The index object of ``adapter`` for this library (validated against the signature)."""
        check_adapter_name(adapter.name)
        adapter.check_against(self.signature)
        return index_adapter(adapter, shared_a=self.shared_a, shared_gram=self.layout.shared_gram,
                             upload_dtype=upload_dtype)

    def add_adapter(self, adapter: Adapter, *, adapter_id: int, upload_dtype: str = "F32",
                    version: int | None = None) -> tuple["LibraryIndex", AdapterEntry]:
        """Returns (new snapshot, the entry added). Other adapters' columns are not touched."""
        new, entries = self.add_indexed([(self.index_adapter(adapter, upload_dtype=upload_dtype),
                                          adapter_id)], version=version)
        return new, entries[0]

    def add_adapters(self, items, *, version: int | None = None):
        """Bulk add of (adapter, adapter_id, upload_dtype) triples."""
        return self.add_indexed([(self.index_adapter(a, upload_dtype=dt), i) for a, i, dt in items],
                                version=version)

    def add_indexed(self, items, *, version: int | None = None,
                    stats: Mapping | None = None) -> tuple["LibraryIndex", tuple[AdapterEntry, ...]]:
        """Bulk add of (AdapterIndex, adapter_id) pairs: one append of their columns. All or
        nothing: any invalid item raises before the snapshot is built. ``stats``: calibration
        stats of added adapters (name -> AdapterStats, e.g. derived from pooled moments), written
        with their columns, so no ``with_calibration`` has to rebuild every adapter's."""
        by_name = self.memo("by_name", lambda: {a.name: a for a in self.adapters})
        fresh: set[str] = set()
        last = self.adapters[-1].adapter_id if self.adapters else -1
        for ai, adapter_id in items:
            check_adapter_name(ai.name)
            if ai.name in by_name or ai.name in fresh:
                raise AlreadyExistsError(f"adapter {ai.name!r} already exists",
                                         field="adapter.name", actual=ai.name)
            if adapter_id <= last:
                raise InvalidArgumentError("adapter ids must grow (ids are never reused)",
                                           field="adapter_id", limit=f">{last}", actual=adapter_id)
            self.layout.check(ai)
            fresh.add(ai.name)
            last = int(adapter_id)
        if not items:
            return self, ()
        entries = tuple(_entry(self.layout, ai, i) for ai, i in items)
        cols = adapter_columns(self.layout, [(ai, i) for ai, i in items])
        general = general_add(self.general, self.layout, items)
        cal, calibration = self._cal_appended([ai.name for ai, _ in items], stats)
        # The name map carries over (a dict copy, not a rebuild from every entry).
        memo = {"by_name": {**by_name, **{e.name: e for e in entries}}}
        n = self.columns.n
        new = replace(self, adapters=self.adapters + entries, columns=self.columns.append(cols),
                      order=_frozen_slots(np.concatenate([self.order, np.arange(n, n + len(items))])),
                      general=general, calibration=calibration, cal_columns=cal, _memo=memo,
                      version=self.version + 1 if version is None else version)
        if stats and cal is None:        # nothing calibrated yet: build every adapter's columns
            new = new.with_calibration(calibration, version=new.version)
        return new, entries

    def _cal_appended(self, names: list[str], stats: Mapping | None):
        """(calibration columns with ``names`` appended, calibration with their ``stats``)."""
        stats = {n: stats[n] for n in names if n in stats} if stats else {}
        calibration = self.calibration
        if stats:
            if calibration is None:
                from .calibration import CalibrationStats    # (calibration imports this module)
                calibration = CalibrationStats(adapters=MappingProxyType(stats))
            else:
                calibration = replace(calibration, adapters=MappingProxyType({**calibration.adapters, **stats}))
        if self.cal_columns is None:
            return None, calibration
        return self.cal_columns.append(cal_for(self.layout, [stats.get(n) for n in names])), calibration

    def reserve(self, total: int) -> "LibraryIndex":
        """This snapshot with room for ``total`` adapters' columns (before a bulk load in chunks)."""
        return replace(self, columns=self.columns.reserve(total), _memo={},
                       cal_columns=None if self.cal_columns is None else self.cal_columns.reserve(total))

    def remove_adapter(self, name: str, *, version: int | None = None) -> tuple["LibraryIndex", AdapterEntry]:
        """Returns (new snapshot, the entry removed); its calibration stats go with it."""
        entry = self.entry(name)
        pos = int(self.positions(np.array([entry.adapter_id]))[0])
        cal = self.calibration.without(name) if self.calibration is not None else None
        new = replace(self, adapters=self.adapters[:pos] + self.adapters[pos + 1:],
                      order=_frozen_slots(np.delete(self.order, pos)),
                      general=general_remove(self.general, entry), calibration=cal,
                      _memo={},
                      version=self.version + 1 if version is None else version)
        return new._compacted_if_sparse(), entry

    def replace_adapter(self, adapter: Adapter, *, adapter_id: int, upload_dtype: str = "F32",
                        version: int | None = None) -> tuple["LibraryIndex", AdapterEntry]:
        """Swap in a new version of adapter ``adapter.name`` under ``adapter_id``, at its place in
        library order (ids stay sorted). The old version, if present, must hold the same id; its
        calibration stats go with it (they describe the old factors). Returns (snapshot, new entry).
        """
        return self.replace_indexed(self.index_adapter(adapter, upload_dtype=upload_dtype),
                                    adapter_id=adapter_id, version=version)

    def replace_indexed(self, ai: AdapterIndex, *, adapter_id: int, version: int | None = None,
                        stats: Mapping | None = None) -> tuple["LibraryIndex", AdapterEntry]:
        """``replace_adapter`` from an index object. The new columns go to a fresh slot (older
        snapshots keep theirs); the old slot is left dead until compaction."""
        old = self.memo("by_name", lambda: {a.name: a for a in self.adapters}).get(ai.name)
        if old is not None and old.adapter_id != adapter_id:
            raise InvalidArgumentError("a replaced adapter keeps its id", field="adapter_id",
                                       limit=old.adapter_id, actual=adapter_id)
        base = self if old is None else self.remove_adapter(ai.name, version=self.version)[0]
        if adapter_id in set(base.ids.tolist()):
            raise AlreadyExistsError("adapter id already in use", field="adapter_id", actual=adapter_id)
        check_adapter_name(ai.name)
        self.layout.check(ai)
        entry = _entry(base.layout, ai, adapter_id)
        k = int(np.searchsorted(base.ids, adapter_id))
        n = base.columns.n
        cal, calibration = base._cal_appended([ai.name], stats)
        new = replace(base, adapters=base.adapters[:k] + (entry,) + base.adapters[k:],
                      columns=base.columns.append(adapter_columns(base.layout, [(ai, adapter_id)])),
                      order=_frozen_slots(np.insert(base.order, k, n)),
                      general=general_insert(base.general, base.layout, ai, adapter_id), calibration=calibration,
                      cal_columns=cal, _memo={}, version=self.version + 1 if version is None else version)
        if stats and cal is None:
            new = new.with_calibration(calibration, version=new.version)
        return new, entry

    def restricted(self, names) -> "LibraryIndex":
        """This snapshot with only the adapters ``names`` (library order kept, ids kept, the
        same entry objects), sharing its tables: e.g. to calibrate a few adapters alone."""
        keep = set(names)
        pos = np.array([k for k, a in enumerate(self.adapters) if a.name in keep], np.int64)
        adapters = tuple(self.adapters[k] for k in pos)
        general = self.general
        for e in self.adapters:
            if e.name not in keep:
                general = general_remove(general, e)
        cal = self.calibration
        if cal is not None:
            cal = type(cal)(adapters=MappingProxyType({n: s for n, s in cal.adapters.items() if n in keep}),
                            sequences=cal.sequences, calibrated_at=cal.calibrated_at)
        return replace(self, adapters=adapters, order=_frozen_slots(self.order[pos] if pos.size else
                                                                    np.zeros(0, np.int64)),
                       general=general, calibration=cal, _memo={})

    def _compacted_if_sparse(self) -> "LibraryIndex":
        dead = self.columns.n - self.order.size
        if dead > max(_COMPACT_MIN, self.columns.n // 2):
            return self._compacted()
        return self

    def _compacted(self) -> "LibraryIndex":
        keep = self.slots
        return replace(self, columns=self.columns.take(keep), order=_frozen_slots(np.arange(keep.size)),
                       cal_columns=None if self.cal_columns is None else self.cal_columns.take(keep),
                       _memo={})

    def with_calibration(self, stats, *, version: int | None = None) -> "LibraryIndex":
        cal = None if stats is None else cal_columns(self, stats)
        return replace(self, calibration=stats, cal_columns=cal, _memo={},
                       version=self.version + 1 if version is None else version)

    def with_version(self, version: int) -> "LibraryIndex":
        # Same tables, same derived values: the memo is shared (it holds nothing version-bound).
        return replace(self, version=version)

    def frob2(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, ‖ΔW‖_F²) of the adapters present on ``module``, shared then general."""
        ids = self.module_ids(module)
        return ids, self.table("frob2")[self.layout.row[module], self.slots_of(ids)]

    def nbytes(self, *, used: bool = True) -> int:
        """Bytes of the index arrays: of this snapshot's slots (``used``), or as allocated
        (spare capacity included; never-written capacity is not resident memory)."""
        cols = [self.columns] + ([self.cal_columns] if self.cal_columns is not None else [])
        n = sum(a.nbytes * (c.n / a.shape[-1] if used else 1.0) for c in cols for a in c.lineage.arrays.values())
        return int(n) + sum(g.nbytes for g in self.general.values())
