"""The library manager: owns the store and the immutable index snapshots routing reads.

Readers take ``self._libs`` (one reference, swapped whole) and keep the snapshot they got, so
routing never waits for an admin write. Writers serialise on one lock and do, in order:
parse and validate (outside the lock where possible), dry-run the change on the current
snapshot, write the store (durable on return), then swap in the new snapshot at the store's
version. Anything that can fail fails before the store is written (quotas included), so
nothing is half applied and the index version always equals the store's library version.

Damaged stored adapters are quarantined at load and whenever a later read finds them damaged
(quarantine.py): the library keeps serving the rest. Callers are told view versions (views.py).

On a shared store (replicas: a process group's directory, or PostgreSQL) other processes
commit too. Every write then first brings the snapshots to the store's head and commits only
if the store is still there (compare-and-swap on the commit number), retrying on the new head
otherwise - so names, ids, quotas and merged statistics are always checked against the latest
state and no update is lost. Following the store between writes is following.py's.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, TypeVar

import numpy as np

from seqr_core import (AdapterEntry, AdapterIndex, CalibrationStats, LibraryIndex, ModuleInput, MomentPool,
                       RouteOptions, merge_into, parse_peft_adapter, route)
from seqr_core.calibration import derived_for
from seqr_core.adapters import check_adapter_name
from seqr_core.errors import AlreadyExistsError, NotFoundError, SeqrError, UnavailableError
from seqr_core.peft_io import ParsedAdapter

from . import adapter_updates as updates
from . import library_objects as lo
from . import stored_index as stored
from .audit import NO_AUDIT
from .auth import Principal
from .following import Following
from .library_state import LibraryState, library_state as _state, same_factors as _same_factors
from .metrics import Metrics
from .quarantine import Damage, LibraryDamage, guarded
from .quotas import OWNER, Usage, usage_of
from .store import AdapterRecord, ConflictError, LibraryRecord

__all__ = ["LibraryManager", "LibraryState"]

log = logging.getLogger("seqr.manager")
_LOAD_CHUNK = 32                     # adapters per append while loading (bounds peak memory)

_R = TypeVar("_R")
_WRITE_ATTEMPTS = 5     # commits by other replicas a write retries past before it gives up


class LibraryManager(Following):
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
        self._stamps: dict[str, object] = {}   # library -> store stamp its state was built from
        self._stale: str | None = None         # why this replica refuses reads (follower sets it)
        self._sync_errors: dict[str, tuple[object, str]] = {}

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
        if self._stale is not None:
            raise UnavailableError(self._stale, field="store")
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
        if self._stale is not None:
            raise UnavailableError(self._stale, field="store")
        return [s for n, s in sorted(self._libs.items()) if principal.may_see_library(n)]

    # ------------------------------------------------------------------ startup
    def load(self) -> None:
        """Rebuild every library's index from the store (adapters, calibration, version)."""
        libs, failed = {}, {}
        self._stamps = self._store.library_stamps()
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

    def _rebuild(self, name: str, *, transient: tuple[type[Exception], ...] = ()) -> LibraryState:
        """A library from its stored index objects; PEFT files are parsed only for adapters
        without a current one (then that index is stored, so the next start reads it). Damaged
        parts are quarantined (errors of the ``transient`` types propagate instead: a follower
        retries them at the store's new head)."""
        rec = self._store.library(name)
        spec = lo.spec_from_store(name, rec.meta, self._store.read_library_object(name, lo.SHARED_A))
        empty = spec.empty_index(version=rec.version)
        index, chunk, derived, why, damage = empty.reserve(len(rec.adapters)), [], {}, {}, LibraryDamage()
        for ar in rec.adapters:                      # adapter id order
            got = self._load_adapter(name, ar, empty, transient=transient)
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
            after = self._store.library(name)
            if after.version == rec.version:       # (the records now list the index objects)
                rec = after
        raw = guarded(lambda: self._store.read_library_object(name, lo.CALIBRATION), library=name,
                      what=lo.CALIBRATION, transient=transient)
        if isinstance(raw, Damage):
            damage = LibraryDamage(damage.adapters, MappingProxyType({lo.CALIBRATION: raw}))
        elif raw is not None:
            ids = {e.name: e.adapter_id for e in index.adapters}
            index = index.with_calibration(lo.decode_calibration(raw, ids), version=rec.version)
        pool = guarded(lambda: self._read_moments(name), library=name, what=lo.MOMENTS, transient=transient)
        if isinstance(pool, Damage):
            damage = LibraryDamage(damage.adapters, MappingProxyType({**damage.objects, lo.MOMENTS: pool}))
            pool = None
        return _state(spec, index, rec, damage, pool)

    def _read_moments(self, library: str) -> MomentPool | None:
        raw = self._store.read_library_object(library, lo.MOMENTS)
        return None if raw is None else lo.decode_moments(raw)

    def _load_adapter(self, library: str, ar: AdapterRecord, empty: LibraryIndex, *,
                      transient: tuple[type[Exception], ...] = ()) -> tuple[AdapterIndex, bytes | None, str] | Damage:
        """One stored adapter's index (stored_index.load_index: the index object, parsed from the
        PEFT files only when it has none); or the Damage that quarantines it (the library loads on).
        ``empty``: any snapshot of the library (its layout and signature)."""
        return guarded(lambda: stored.load_index(self._store, library, ar, empty),
                       library=library, what=f"adapter {ar.name!r}", transient=transient)


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

        def create(head: int | None) -> LibraryState:
            if spec.name in self._libs or spec.name in self._failed:
                raise AlreadyExistsError(f"library {spec.name!r} already exists", field="name",
                                         actual=spec.name)
            self._check_quota(principal, Usage(libraries=1, bytes=len(objects.get(lo.SHARED_A, b""))))
            rec = self._store.create_library(spec.name, meta=meta, objects=objects, if_seq=head)
            state = _state(spec, spec.empty_index(version=rec.version), rec)
            self._swap(state)
            return state

        with self.audit.mutation(principal=principal, action="CreateLibrary", library=spec.name):
            state = self._commit(create)
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
        base = self.get_for_write(library, principal, field="header.library").index
        parsed = parse_peft_adapter(files, name=name, signature=base.signature)   # CPU-heavy: outside the lock
        ai = base.index_adapter(parsed.adapter, upload_dtype=parsed.upload_dtype)  # (the Gram/QR, too)
        with self.audit.mutation(principal=principal, action="ReplaceAdapter" if replace else "PutAdapter",
                                 library=library, adapter=name):
            if replace:
                state = self._commit(lambda head: self._replace(
                    self.get(library, principal, field="header.library"), parsed, ai, files, meta, principal,
                    allow_general=allow_general, head=head))
                return state, state.index.entry(name)
            state, rec, entry = self._commit(lambda head: self._put_new(
                self.get(library, principal, field="header.library"), parsed, ai, files, meta, principal,
                allow_general=allow_general, head=head))
        log.info("adapter stored", extra={"library": library, "adapter": name, "adapter_id": rec.adapter_id,
                                          "kind": entry.kind, "version": state.version})
        return state, entry

    def _put_new(self, cur: LibraryState, parsed: ParsedAdapter, ai: AdapterIndex, files: dict[str, bytes],
                 meta: Mapping[str, str], principal: Principal, *, allow_general: bool, head: int | None):
        """Store a new adapter; with the writer lock held."""
        name, library = parsed.adapter.name, cur.name
        if name in cur.damage.adapters:   # the index no longer holds it; the store still does
            raise AlreadyExistsError(f"adapter {name!r} already exists (quarantined as damaged: "
                                     "delete it first)", field="adapter.name", actual=name)
        self._check_quota(principal, Usage(adapters=1, bytes=sum(len(d) for d in files.values())))
        _, predicted = self._store.library_head(library)
        # A shared-A adapter gets its statistics from the library's pooled moments with its
        # columns (derived_for), so the snapshot need not rebuild every adapter's.
        dry, (entry,) = cur.index.add_indexed([(ai, predicted)], stats=derived_for(ai, cur.pool))
        lo.check_adapter_kind(cur.spec, entry, allow_general=allow_general)
        rec = self._store.put_adapter(library, name, files=files, objects={lo.INDEX: lo.encode_index(ai)},
                                      if_seq=head, meta={
                                          "user": dict(meta), "upload_dtype": parsed.upload_dtype, "kind": entry.kind,
                                          "base_model": parsed.base_model, OWNER: principal.name})
        lib = stored.record_after(self._store, cur.record, put=rec)
        if rec.adapter_id == predicted:
            new = dry.with_version(lib.version)
        else:   # cannot happen: the commit is conditional on the head this snapshot is at
            new, _ = cur.index.add_indexed([(ai, rec.adapter_id)], version=lib.version,
                                           stats=derived_for(ai, cur.pool))
        state = _state(cur.spec, new, lib, cur.damage, cur.pool)
        self._swap(state)
        return state, rec, state.index.entry(name)

    def _replace(self, cur: LibraryState, parsed: ParsedAdapter, ai: AdapterIndex, files: dict[str, bytes],
                 meta: Mapping[str, str], principal: Principal, *, allow_general: bool,
                 head: int | None) -> LibraryState:
        """Swap in a new version under the old id; with the writer lock held."""
        name = parsed.adapter.name
        old = updates.replaced_record(cur, name, principal)
        self._check_quota(principal, updates.replacement_usage(old, principal, sum(len(d) for d in files.values())))
        dry, entry = cur.index.replace_indexed(ai, adapter_id=old.adapter_id, stats=derived_for(ai, cur.pool))
        lo.check_adapter_kind(cur.spec, entry, allow_general=allow_general)
        rec = self._store.put_adapter(cur.name, name, files=files, replace=True, if_seq=head,
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
        def delete(head: int | None) -> tuple[LibraryState, LibraryState]:
            cur = self.get(library, principal)
            if name in cur.damage.adapters and principal.may_use_adapter(name):
                index, damage = cur.index, cur.damage.without_adapter(name)
            else:
                cur.entry(name, principal, field="name")
                (index, _), damage = cur.index.remove_adapter(name), cur.damage
            self._store.delete_adapter(library, name, record=False, if_seq=head)
            lib = stored.record_after(self._store, cur.record, gone=name)
            state = _state(cur.spec, index.with_version(lib.version), lib, damage, cur.pool)
            self._swap(state)
            return cur, state

        with self.audit.mutation(principal=principal, action="DeleteAdapter", library=library, adapter=name):
            cur, state = self._commit(delete)
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
        with self.audit.mutation(principal=principal, action="Calibrate", library=library):
            state, fresh = self._commit(lambda head: self._calibrate(library, basis, fresh, principal, pool, head))
        names = sorted(fresh.adapters)
        log.info("calibration stored", extra={"library": library, "sequences": fresh.sequences,
                                              "adapters": len(names), "version": state.version})
        return state, names

    def _calibrate(self, library: str, basis: LibraryIndex, fresh: CalibrationStats, principal: Principal,
                   pool: MomentPool | None, head: int | None) -> tuple[LibraryState, CalibrationStats]:
        """Merge ``fresh`` into the current statistics and store them; with the writer lock held."""
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
        lib = self._store.put_library_objects(library, objects, if_seq=head)
        # A quarantined calibration (or moments) object is replaced by this one.
        state = _state(cur.spec, cur.index.with_calibration(merged, version=lib.version), lib,
                       damage, new_pool)
        self._swap(state)
        return state, fresh

    def close(self) -> None:
        """Wait for any in-flight write, then close the store. Later writes are UNAVAILABLE."""
        with self._write:
            if not self._closed:
                self._closed = True
                self._store.close()

    # ------------------------------------------------------------------ internals
    def _commit(self, write: Callable[[int | None], _R]) -> _R:
        """Run ``write(head)`` under the writer lock. On a shared store the snapshots are first
        brought to the store's head and ``head`` is that commit: the write's store call commits
        only if the store is still there (ConflictError otherwise, and ``write`` runs again on
        the new head). On a store this process owns alone, ``head`` is None (no condition)."""
        for attempt in range(_WRITE_ATTEMPTS):
            with self._write:
                self._check_open()
                head = None
                if self._store.shared:
                    try:
                        self._follow_locked()
                    except UnavailableError as e:     # the store is out of reach: say what it means here
                        raise UnavailableError(f"{e.message}; the write was not applied", field=e.field) from None
                    head = self._store.manifest_seq
                try:
                    return write(head)
                except ConflictError:
                    if attempt == _WRITE_ATTEMPTS - 1:
                        raise
                    log.info("another replica committed first; retrying on its commit", extra={"commit": head})
        raise AssertionError("unreachable")

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
            self._swap(_state(cur.spec, index, cur.record, cur.damage.with_adapter(name, damage), cur.pool),
                       committed=False)
            return True

    def _swap(self, state: LibraryState, *, committed: bool = True) -> None:
        """Publish ``state``; ``committed``: it is the store's state of the library right now
        (a write just made it), so a follower's next sync need not rebuild it."""
        libs = dict(self._libs)
        libs[state.name] = state
        self._libs = MappingProxyType(libs)     # one reference assignment: readers see old or new
        if committed:
            self._stamps[state.name] = self._store.library_stamps().get(state.name)
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
