"""The library manager: owns the store and the immutable index snapshots routing reads.

Readers take ``self._libs`` (one reference, swapped whole) and keep the snapshot they got, so
routing never waits for an admin write. Writers serialise on one lock and do, in order:
parse and validate (outside the lock where possible), dry-run the change on the current
snapshot, write the store (durable on return), then swap in the new snapshot at the store's
version. Anything that can fail fails before the store is written (quotas included), so
nothing is half applied and the index version always equals the store's library version.

Damaged stored adapters are quarantined at load and whenever a later read finds them damaged
(quarantine.py): the library keeps serving the rest. Callers are told view versions (views.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

import numpy as np

from seqr_core import (AdapterEntry, AdapterIndex, CalibrationStats, LibraryIndex, ModuleInput, MomentPool,
                       RouteOptions, derived_stats, merge_into, parse_peft_adapter, route)
from seqr_core.calibration import derived_for
from seqr_core.adapters import check_adapter_name
from seqr_core.errors import AlreadyExistsError, IntegrityError, NotFoundError, SeqrError, UnavailableError
from seqr_core.peft_io import ParsedAdapter

from . import adapter_updates as updates
from . import library_objects as lo
from . import stored_index as stored
from .audit import NO_AUDIT
from .auth import Principal
from .metrics import Metrics
from .quarantine import Damage, LibraryDamage, guarded
from .quotas import OWNER, Usage, usage_of
from .store import AdapterRecord, LibraryRecord
from .views import ChangeLog, view_version

log = logging.getLogger("seqr.manager")
_LOAD_CHUNK = 32                     # adapters per append while loading (bounds peak memory)


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


def _state(spec: lo.LibrarySpec, index: LibraryIndex, record: LibraryRecord,
           damage: LibraryDamage = LibraryDamage(), pool: MomentPool | None = None) -> LibraryState:
    """The state for ``index``; shared-A adapters without statistics get them from ``pool``."""
    recs = {r.name: r for r in record.adapters}
    cal = derived_stats(index, pool)
    if cal is not index.calibration:
        index = index.with_calibration(cal, version=index.version)
    return LibraryState(spec=spec, index=index, record=record, damage=damage, records=MappingProxyType(recs),
                        names_by_id=MappingProxyType({e.adapter_id: e.name for e in index.adapters}),
                        changes=ChangeLog.of(record), pool=pool)


def _same_factors(a: AdapterEntry | None, b: AdapterEntry | None) -> bool:
    """Whether two entries are one upload: an entry object is shared by every snapshot (and
    restricted view) until its adapter is deleted or replaced, which makes a new entry."""
    return a is not None and a is b


class LibraryManager:
    def __init__(self, store, *, metrics: Metrics | None = None,
                 on_change: Callable[[LibraryIndex], object] | None = None, audit=None):
        self._store = store
        self.audit = audit if audit is not None else NO_AUDIT    # server/audit.py: writes fail closed
        self._metrics = metrics
        self._on_change = on_change          # e.g. the onnx backend builds sessions for new snapshots
        self._libs: Mapping[str, LibraryState] = MappingProxyType({})
        self._failed: Mapping[str, SeqrError] = MappingProxyType({})
        self._write = threading.Lock()
        self._loaded = threading.Event()
        self._closed = False

    # ------------------------------------------------------------------ reads (lock-free)
    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    def peek(self, name: str) -> LibraryState | None:
        """The current snapshot of ``name`` without any access check: for sizing work only,
        never for answering a caller."""
        return self._libs.get(name)

    def get(self, name: str, principal: Principal, *, field: str = "library") -> LibraryState:
        if not self._loaded.is_set():
            raise UnavailableError("the service is still loading its libraries; retry shortly")
        libs = self._libs
        if name in libs and principal.may_see_library(name):
            return libs[name]
        if name in self._failed and principal.may_see_library(name):
            raise _failure(self._failed[name], principal, name, field=field)
        raise NotFoundError(f"no library {name!r}", field=field, actual=name)

    def names(self) -> list[str]:
        """Every library, loaded or failed (for startup decisions, not for callers)."""
        return sorted({*self._libs, *self._failed})

    def list(self, principal: Principal) -> list[LibraryState]:
        if not self._loaded.is_set():
            raise UnavailableError("the service is still loading its libraries; retry shortly")
        return [s for n, s in sorted(self._libs.items()) if principal.may_see_library(n)]

    # ------------------------------------------------------------------ startup
    def load(self) -> None:
        """Rebuild every library's index from the store (adapters, calibration, version)."""
        libs, failed = {}, {}
        for name in self._store.list_libraries():
            try:
                libs[name] = self._rebuild(name)
            except SeqrError as e:
                # One damaged library must not take the others down; it answers with its error.
                log.error("library failed to load", extra={"library": name, "error": str(e),
                                                           "code": e.code})
                failed[name] = e
        with self._write:
            self._libs, self._failed = MappingProxyType(libs), MappingProxyType(failed)
        for s in libs.values():
            self._changed(s)
        if self._metrics:
            for name in failed:
                self._metrics.library_failed(name)
        self._loaded.set()
        log.info("libraries loaded", extra={"libraries": len(libs), "failed": len(failed),
                                            "adapters": sum(len(s.index.adapters) for s in libs.values()),
                                            "quarantined": sum(len(s.damage.adapters) for s in libs.values())})

    def _rebuild(self, name: str) -> LibraryState:
        """A library from its stored index objects; PEFT files are parsed only for adapters
        without a current one (then that index is stored, so the next start reads it)."""
        rec = self._store.library(name)
        spec = lo.spec_from_store(name, rec.meta, self._store.read_library_object(name, lo.SHARED_A))
        empty = spec.empty_index(version=rec.version)
        index, chunk, derived, why, damage = empty.reserve(len(rec.adapters)), [], {}, {}, LibraryDamage()
        for ar in rec.adapters:                      # adapter id order
            got = guarded(lambda ar=ar: stored.load_index(self._store, name, ar, empty), library=name,
                          what=f"adapter {ar.name!r}")
            if isinstance(got, Damage):
                damage = damage.with_adapter(ar.name, got)
                continue
            ai, fresh, reason = got
            chunk.append((ai, ar.adapter_id))
            if fresh is not None:
                derived[ar.name] = {lo.INDEX: fresh}
                why[reason] = why.get(reason, 0) + 1
            if len(chunk) == _LOAD_CHUNK:            # columns in place; the objects are dropped
                index, _ = index.add_indexed(chunk, version=rec.version)
                chunk = []
        index, _ = index.add_indexed(chunk, version=rec.version)
        if derived:
            log.info("adapters re-parsed from their PEFT files", extra={"library": name, "adapters": len(derived),
                                                                       "reasons": why})
            stored.store_derived(self._store, name, derived)
        raw = guarded(lambda: self._store.read_library_object(name, lo.CALIBRATION), library=name,
                      what=lo.CALIBRATION)
        if isinstance(raw, Damage):
            damage = LibraryDamage(damage.adapters, MappingProxyType({lo.CALIBRATION: raw}))
        elif raw is not None:
            ids = {e.name: e.adapter_id for e in index.adapters}
            index = index.with_calibration(lo.decode_calibration(raw, ids), version=rec.version)
        pool = guarded(lambda: self._read_moments(name), library=name, what=lo.MOMENTS)
        if isinstance(pool, Damage):
            damage = LibraryDamage(damage.adapters, MappingProxyType({**damage.objects, lo.MOMENTS: pool}))
            pool = None
        return _state(spec, index, rec, damage, pool)

    def _read_moments(self, library: str) -> MomentPool | None:
        raw = self._store.read_library_object(library, lo.MOMENTS)
        return None if raw is None else lo.decode_moments(raw)

    def warm(self) -> None:
        """Route one small synthetic request per library so first real calls pay no lazy setup."""
        rng = np.random.default_rng(0)
        for s in self._libs.values():
            mods = [m for m in s.index.signature.names if s.index.module_ids(m).size]
            if not mods:
                continue
            inputs = {m: ModuleInput("activations", rng.standard_normal(
                (1, s.index.signature.spec(m).d_in)).astype(np.float32), 1) for m in mods}
            route(s.index, inputs, RouteOptions())

    def scrub(self, library: str | None = None) -> dict[str, list[str]]:
        """Re-read every routable adapter's stored files (all libraries, or one) and quarantine
        those that no longer authenticate; returns the newly quarantined names per library.

        Reads run outside the writer lock; each finding is applied under it to the state current
        by then. Meant for a periodic or operator-triggered check of the data at rest.
        """
        found: dict[str, list[str]] = {}
        for name in ([library] if library is not None else sorted(self._libs)):
            state = self._libs.get(name)
            for e in state.index.adapters if state is not None else ():
                got = guarded(lambda e=e: stored.authenticate(self._store, name, e.name), library=name,
                              what=f"adapter {e.name!r}")
                if isinstance(got, Damage) and self._quarantine(name, e.name, got):
                    found.setdefault(name, []).append(e.name)
        return found

    # ------------------------------------------------------------------ writes
    def create_library(self, spec: lo.LibrarySpec, *, principal: Principal | None = None) -> LibraryState:
        """Create an empty library; ``principal`` becomes its owner and its quota applies."""
        check_adapter_name(spec.name, field="name")
        spec.empty_index(version=1)                  # validates shared A against the signature
        objects = spec.objects()
        meta = spec.store_meta() if principal is None else {**spec.store_meta(), OWNER: principal.name}
        with self.audit.mutation(principal=principal, action="CreateLibrary", library=spec.name), self._write:
            self._check_open()
            if spec.name in self._libs or spec.name in self._failed:
                raise AlreadyExistsError(f"library {spec.name!r} already exists", field="name",
                                         actual=spec.name)
            self._check_quota(principal, Usage(libraries=1, bytes=len(objects.get(lo.SHARED_A, b""))))
            rec = self._store.create_library(spec.name, meta=meta, objects=objects)
            state = _state(spec, spec.empty_index(version=rec.version), rec)
            self._swap(state)
        log.info("library created", extra={"library": spec.name, "version": state.version,
                                           "modules": len(spec.signature.modules),
                                           "shared_a_modules": len(spec.shared_a)})
        return state

    def check_quota(self, principal: Principal, *, adapters: int = 0, nbytes: int = 0) -> None:
        """Early refusal (before an upload's bytes are read); put_adapter checks again under the lock."""
        self._check_quota(principal, Usage(adapters=adapters, bytes=nbytes))

    def put_adapter(self, library: str, name: str, files: dict[str, bytes], meta: Mapping[str, str],
                    principal: Principal, *, allow_general: bool = False,
                    replace: bool = False) -> tuple[LibraryState, AdapterEntry]:
        """Store a new adapter, or with ``replace`` a new version of a visible one (adapter_updates.py)."""
        check_adapter_name(name, field="header.name")
        base = self.get(library, principal, field="header.library").index
        parsed = parse_peft_adapter(files, name=name, signature=base.signature)   # CPU-heavy: outside the lock
        ai = base.index_adapter(parsed.adapter, upload_dtype=parsed.upload_dtype)  # (the QR, too)
        with self.audit.mutation(principal=principal, action="ReplaceAdapter" if replace else "PutAdapter",
                                 library=library, adapter=name), self._write:
            self._check_open()
            cur = self.get(library, principal, field="header.library")
            if replace:
                state = self._replace(cur, parsed, ai, files, meta, principal, allow_general=allow_general)
                return state, state.index.entry(name)
            if name in cur.damage.adapters:   # the index no longer holds it; the store still does
                raise AlreadyExistsError(f"adapter {name!r} already exists (quarantined as damaged: "
                                         "delete it first)", field="adapter.name", actual=name)
            self._check_quota(principal, Usage(adapters=1, bytes=sum(len(d) for d in files.values())))
            _, predicted = self._store.library_head(library)
            # A shared-A adapter gets its statistics from the library's pooled moments with its
            # columns (derived_for), so the snapshot need not rebuild every adapter's.
            dry, (entry,) = cur.index.add_indexed([(ai, predicted)], stats=derived_for(ai, cur.pool))
            lo.check_adapter_kind(cur.spec, entry, allow_general=allow_general)
            rec = self._store.put_adapter(library, name, files=files, objects={lo.INDEX: lo.encode_index(ai)}, meta={
                "user": dict(meta), "upload_dtype": parsed.upload_dtype, "kind": entry.kind,
                "base_model": parsed.base_model, OWNER: principal.name})
            lib = stored.record_after(self._store, cur.record, put=rec)
            if rec.adapter_id == predicted:
                new = dry.with_version(lib.version)
            else:   # cannot happen while we are the store's only writer; stay correct anyway
                new, _ = cur.index.add_indexed([(ai, rec.adapter_id)], version=lib.version,
                                               stats=derived_for(ai, cur.pool))
            state = _state(cur.spec, new, lib, cur.damage, cur.pool)
            self._swap(state)
        entry = state.index.entry(name)
        log.info("adapter stored", extra={"library": library, "adapter": name, "adapter_id": rec.adapter_id,
                                          "kind": entry.kind, "version": state.version})
        return state, entry

    def _replace(self, cur: LibraryState, parsed: ParsedAdapter, ai: AdapterIndex, files: dict[str, bytes],
                 meta: Mapping[str, str], principal: Principal, *, allow_general: bool) -> LibraryState:
        """Swap in a new version under the old id; with the writer lock held."""
        name = parsed.adapter.name
        old = updates.replaced_record(cur, name, principal)
        self._check_quota(principal, updates.replacement_usage(old, principal, sum(len(d) for d in files.values())))
        dry, entry = cur.index.replace_indexed(ai, adapter_id=old.adapter_id, stats=derived_for(ai, cur.pool))
        lo.check_adapter_kind(cur.spec, entry, allow_general=allow_general)
        rec = self._store.put_adapter(cur.name, name, files=files, replace=True,
                                      objects={lo.INDEX: lo.encode_index(ai)},
                                      library_objects=updates.calibration_objects(cur, name), meta={
                                          "user": dict(meta), "upload_dtype": parsed.upload_dtype,
                                          "kind": entry.kind, "base_model": parsed.base_model,
                                          OWNER: principal.name})
        lib = stored.record_after(self._store, cur.record, put=rec)
        state = _state(cur.spec, dry.with_version(lib.version), lib, cur.damage.without_adapter(name), cur.pool)
        self._swap(state)
        log.info("adapter replaced", extra={"library": cur.name, "adapter": name, "adapter_id": rec.adapter_id,
                                            "adapter_version": rec.version, "version": state.version})
        return state

    def delete_adapter(self, library: str, name: str, principal: Principal) -> tuple[LibraryState, AdapterRecord]:
        """Delete (crypto-shred) an adapter, quarantined ones included; returns its store record."""
        with self.audit.mutation(principal=principal, action="DeleteAdapter", library=library, adapter=name), \
                self._write:
            self._check_open()
            cur = self.get(library, principal)
            if name in cur.damage.adapters and principal.may_use_adapter(name):
                index, damage = cur.index, cur.damage.without_adapter(name)
            else:
                cur.entry(name, principal, field="name")
                (index, _), damage = cur.index.remove_adapter(name), cur.damage
            self._store.delete_adapter(library, name, record=False)
            lib = stored.record_after(self._store, cur.record, gone=name)
            state = _state(cur.spec, index.with_version(lib.version), lib, damage, cur.pool)
            self._swap(state)
        if self._metrics:
            self._metrics.adapter_deleted(library, name)
        gone = cur.records[name]
        log.info("adapter deleted", extra={"library": library, "adapter": name,
                                           "adapter_id": gone.adapter_id, "version": state.version})
        return state, gone

    def store_calibration(self, library: str, basis: LibraryIndex, fresh: CalibrationStats,
                          principal: Principal, *, pool: MomentPool | None = None) -> tuple[LibraryState, list[str]]:
        """Store stats fitted on snapshot ``basis``; adapters replaced since then are dropped.

        ``pool`` (the stream's pooled moments) replaces the library's on the modules it covers,
        in the same commit; shared-A adapters without streamed stats are derived from the result."""
        with self.audit.mutation(principal=principal, action="Calibrate", library=library), self._write:
            self._check_open()
            cur = self.get(library, principal)
            now_ids = {e.name: e.adapter_id for e in cur.index.adapters}
            # Parsed factors are shared between snapshots (and the traffic learner's own basis)
            # until their adapter is deleted or replaced (a replace keeps the id), so their
            # identity says "the same adapter the stats came from".
            now, then = {e.name: e for e in cur.index.adapters}, {e.name: e for e in basis.adapters}
            for n in list(fresh.adapters):
                if not _same_factors(now.get(n), then.get(n)):
                    fresh = fresh.without(n)
            old = cur.index.calibration
            base = cur.index.with_calibration(old.streamed() if old is not None else None, version=cur.version)
            merged = merge_into(base, replace(fresh, calibrated_at=time.time()))
            objects = {lo.CALIBRATION: lo.encode_calibration(merged, now_ids)}
            new_pool, damage = cur.pool, cur.damage.without_object(lo.CALIBRATION)
            if pool is not None and pool.modules:
                new_pool = pool if cur.pool is None else cur.pool.replacing(pool)
                objects[lo.MOMENTS] = lo.encode_moments(new_pool)
                damage = damage.without_object(lo.MOMENTS)
            lib = self._store.put_library_objects(library, objects)
            # A quarantined calibration (or moments) object is replaced by this one.
            state = _state(cur.spec, cur.index.with_calibration(merged, version=lib.version), lib,
                           damage, new_pool)
            self._swap(state)
        names = sorted(fresh.adapters)
        log.info("calibration stored", extra={"library": library, "sequences": fresh.sequences,
                                              "adapters": len(names), "version": state.version})
        return state, names

    def close(self) -> None:
        """Wait for any in-flight write, then close the store. Later writes are UNAVAILABLE."""
        with self._write:
            if not self._closed:
                self._closed = True
                self._store.close()

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError("the service is shutting down")

    def _check_quota(self, principal: Principal | None, adding: Usage) -> None:
        """Call with the writer lock held, so usage cannot change before the write."""
        if principal is None or principal.quota is None:
            return
        principal.quota.check(owner=principal.name, usage=usage_of(principal.name, self._records()),
                              adding=adding)

    def _records(self) -> Iterator[LibraryRecord]:
        """The store record of every library, failed ones included (they still hold data)."""
        yield from (s.record for s in self._libs.values())
        yield from (self._store.library(n) for n in self._failed)

    def _quarantine(self, library: str, name: str, damage: Damage) -> bool:
        """Set a routable adapter aside after a read found its stored data damaged."""
        with self._write:
            cur = self._libs.get(library)
            if cur is None or name not in cur.index.names:
                return False                          # deleted (or already quarantined) meanwhile
            index, _ = cur.index.remove_adapter(name, version=cur.version)
            self._swap(_state(cur.spec, index, cur.record, cur.damage.with_adapter(name, damage), cur.pool))
            return True

    def _swap(self, state: LibraryState) -> None:
        libs = dict(self._libs)
        libs[state.name] = state
        self._libs = MappingProxyType(libs)     # one reference assignment: readers see old or new
        self._changed(state)

    def _changed(self, s: LibraryState) -> None:
        if self._metrics:
            self._metrics.library_changed(s.name, version=s.version, adapters=len(s.index.adapters),
                                          damaged=len(s.damage.adapters), degraded=bool(s.damage),
                                          calibration=s.index.calibration)
        if self._on_change is not None and s.index.adapters:    # nothing to score without adapters
            self._on_change(s.index)


def _failure(err: SeqrError, principal: Principal, library: str, *, field: str) -> SeqrError:
    """A library that failed to load answers with its error; a caller with adapter globs gets
    the same code without the detail, which may name adapters hidden from it."""
    if principal.unrestricted:
        return err
    return type(err)(f"library {library!r} cannot be loaded: its stored data is damaged or unreadable "
                     "(see the server log)", field=field, actual=library)
