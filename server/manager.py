"""The library manager: owns the store and the immutable index snapshots routing reads.

Readers take ``self._libs`` (one reference, swapped whole) and keep the snapshot they got, so
routing never waits for an admin write. Writers serialise on one lock and do, in order:
parse and validate (outside the lock where possible), dry-run the change on the current
snapshot, write the store (durable on return), then swap in the new snapshot at the store's
version. Anything that can fail fails before the store is written, so nothing is half applied
and the index version always equals the store's library version.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np

from seqr_core import (AdapterEntry, CalibrationStats, LibraryIndex, ModuleInput, RouteOptions,
                       merge_into, parse_peft_adapter, route)
from seqr_core.adapters import check_adapter_name
from seqr_core.stacked import stacked
from seqr_core.errors import AlreadyExistsError, NotFoundError, SeqrError, UnavailableError

from . import library_objects as lo
from .store import ConflictError, MissingBlobError
from .auth import Principal
from .metrics import Metrics

log = logging.getLogger("seqr.manager")


@dataclass(frozen=True)
class LibraryState:
    """One library as routing sees it: the index snapshot and the store record it came from."""

    spec: lo.LibrarySpec
    index: LibraryIndex
    records: Mapping[str, object]            # adapter name -> store AdapterRecord
    names_by_id: Mapping[int, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.index.version

    def visible_entries(self, principal: Principal) -> list[AdapterEntry]:
        return [e for e in self.index.adapters if principal.may_use_adapter(e.name)]

    def entry(self, name: str, principal: Principal, *, field: str = "adapter") -> AdapterEntry:
        # Hidden adapters raise the very error an absent one does (same type, text and field).
        if not principal.may_use_adapter(name):
            return self.without_adapters().entry(name, field=field)
        return self.index.entry(name, field=field)

    def without_adapters(self) -> LibraryIndex:
        """This library as it would be with no adapters: what a caller who may see none gets."""
        idx = self.index
        return LibraryIndex.create(name=idx.name, signature=idx.signature, shared_a=idx.shared_a,
                                   version=idx.version)


def _state(spec: lo.LibrarySpec, index: LibraryIndex, records) -> LibraryState:
    recs = {r.name: r for r in records}
    return LibraryState(spec=spec, index=index, records=MappingProxyType(recs),
                        names_by_id=MappingProxyType({e.adapter_id: e.name for e in index.adapters}))


class LibraryManager:
    def __init__(self, store, *, metrics: Metrics | None = None,
                 on_change: Callable[[LibraryIndex], object] | None = None):
        self._store = store
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

    def get(self, name: str, principal: Principal, *, field: str = "library") -> LibraryState:
        if not self._loaded.is_set():
            raise UnavailableError("the service is still loading its libraries; retry shortly")
        if self._stale is not None:
            raise UnavailableError(self._stale, field="store")
        libs = self._libs
        if name in libs and principal.may_see_library(name):
            return libs[name]
        if name in self._failed and principal.may_see_library(name):
            raise self._failed[name]
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
        self._loaded.set()
        log.info("libraries loaded", extra={"libraries": len(libs), "failed": len(failed),
                                            "adapters": sum(len(s.index.adapters) for s in libs.values())})

    def _rebuild(self, name: str) -> LibraryState:
        rec = self._store.library(name)
        spec = lo.spec_from_store(name, rec.meta, self._store.read_library_object(name, lo.SHARED_A))
        items = []
        for ar in rec.adapters:                      # adapter id order
            parsed = parse_peft_adapter(self._store.read_adapter_files(name, ar.name), name=ar.name,
                                        signature=spec.signature)
            items.append((parsed.adapter, ar.adapter_id, parsed.upload_dtype))
        index, _ = spec.empty_index(version=rec.version).add_adapters(items, version=rec.version)
        raw = self._store.read_library_object(name, lo.CALIBRATION)
        if raw is not None:
            ids = {e.name: e.adapter_id for e in index.adapters}
            index = index.with_calibration(lo.decode_calibration(raw, ids), version=rec.version)
        return _state(spec, index, rec.adapters)

    def warm(self) -> None:
        """Route one small synthetic request per library so first real calls pay no lazy setup."""
        rng = np.random.default_rng(0)
        for s in self._libs.values():
            mods = sorted({m for e in s.index.adapters for m in e.adapter.factors})
            if not mods:
                continue
            inputs = {m: ModuleInput("activations", rng.standard_normal(
                (1, s.index.signature.spec(m).d_in)).astype(np.float32), 1) for m in mods}
            route(s.index, inputs, RouteOptions())

    # ------------------------------------------------------------------ writes
    def create_library(self, spec: lo.LibrarySpec) -> LibraryState:
        check_adapter_name(spec.name, field="name")
        spec.empty_index(version=1)                  # validates shared A against the signature
        with self._write:
            self._check_open()
            if spec.name in self._libs or spec.name in self._failed:
                raise AlreadyExistsError(f"library {spec.name!r} already exists", field="name",
                                         actual=spec.name)
            rec = self._store.create_library(spec.name, meta=spec.store_meta(), objects=spec.objects())
            state = _state(spec, spec.empty_index(version=rec.version), rec.adapters)
            self._swap(state)
        log.info("library created", extra={"library": spec.name, "version": state.version,
                                           "modules": len(spec.signature.modules),
                                           "shared_a_modules": len(spec.shared_a)})
        return state

    def put_adapter(self, library: str, name: str, files: dict[str, bytes], meta: Mapping[str, str],
                    principal: Principal) -> tuple[LibraryState, AdapterEntry]:
        check_adapter_name(name, field="header.name")
        sig = self.get_for_write(library, principal, field="header.library").index.signature
        parsed = parse_peft_adapter(files, name=name, signature=sig)   # CPU-heavy: outside the lock
        with self._write:
            self._check_open()
            cur = self.get(library, principal, field="header.library")
            predicted = self._store.library(library).next_adapter_id
            dry, entry = cur.index.add_adapter(parsed.adapter, adapter_id=predicted,
                                               upload_dtype=parsed.upload_dtype)
            rec = self._store.put_adapter(library, name, files=files, meta={
                "user": dict(meta), "upload_dtype": parsed.upload_dtype, "kind": entry.kind,
                "base_model": parsed.base_model})
            lib = self._store.library(library)
            if rec.adapter_id == predicted and lib.version == cur.version + 1:
                state = _state(cur.spec, dry.with_version(lib.version), lib.adapters)
            else:   # another process committed to this library meanwhile: build what was committed
                state = self._rebuild(library)
            entry = state.index.entry(name)
            self._swap(state)
        log.info("adapter stored", extra={"library": library, "adapter": name, "adapter_id": rec.adapter_id,
                                          "kind": entry.kind, "version": state.version})
        return state, state.index.entry(name)

    def delete_adapter(self, library: str, name: str, principal: Principal) -> tuple[LibraryState, AdapterEntry]:
        self.get_for_write(library, principal, adapter=name)
        with self._write:
            self._check_open()
            cur = self.get(library, principal)
            entry = cur.entry(name, principal, field="name")
            dry, _ = cur.index.remove_adapter(name)
            lib = self._store.delete_adapter(library, name)
            state = (_state(cur.spec, dry.with_version(lib.version), lib.adapters)
                     if lib.version == cur.version + 1 else self._rebuild(library))
            self._swap(state)
        if self._metrics:
            self._metrics.adapter_deleted(library, name)
        log.info("adapter deleted", extra={"library": library, "adapter": name,
                                           "adapter_id": entry.adapter_id, "version": state.version})
        return state, entry

    def store_calibration(self, library: str, basis: LibraryIndex, fresh: CalibrationStats,
                          principal: Principal) -> tuple[LibraryState, list[str]]:
        """Store stats fitted on snapshot ``basis``; adapters replaced since then are dropped."""
        for _ in range(3):
            try:
                return self._store_calibration(library, basis, fresh, principal)
            except ConflictError:       # another process changed the library: merge into its state
                self.refresh()
        return self._store_calibration(library, basis, fresh, principal)

    def _store_calibration(self, library: str, basis: LibraryIndex, fresh: CalibrationStats,
                           principal: Principal) -> tuple[LibraryState, list[str]]:
        with self._write:
            self._check_open()
            cur = self.get(library, principal)
            now_ids = {e.name: e.adapter_id for e in cur.index.adapters}
            then_ids = {e.name: e.adapter_id for e in basis.adapters}
            for n in list(fresh.adapters):
                if now_ids.get(n) != then_ids.get(n):
                    fresh = fresh.without(n)
            merged = merge_into(cur.index, fresh)
            # Stats merge into what this snapshot holds: refused if another process changed the
            # library since (the caller retries on the refreshed snapshot) - never a lost update.
            lib = self._store.put_library_object(library, lo.CALIBRATION, lo.encode_calibration(merged, now_ids),
                                                 if_version=cur.version)
            state = _state(cur.spec, cur.index.with_calibration(merged, version=lib.version), lib.adapters)
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

    def _swap(self, state: LibraryState) -> None:
        libs = dict(self._libs)
        libs[state.name] = state
        self._libs = MappingProxyType(libs)     # one reference assignment: readers see old or new
        self._stamps[state.name] = self._store.library_stamps().get(state.name)
        self._changed(state)

    def _changed(self, s: LibraryState) -> None:
        if self._metrics:
            self._metrics.library_changed(s.name, version=s.version, adapters=len(s.index.adapters))
        if self._on_change is not None and s.index.adapters:    # nothing to score without adapters
            self._on_change(s.index)


    # ------------------------------------------------------------------ following (replicas)
    def refresh(self) -> list[str]:
        """Adopt commits other processes made: rebuild every library whose stored state differs
        from the one served and swap them in together. Returns the libraries that changed.

        A library that cannot be rebuilt (damaged, or its blobs raced away and the store has not
        moved) keeps serving its last good snapshot; one that never loaded answers its error."""
        with self._write:
            self._check_open()
            self._store.refresh()
            return self._sync()

    def get_for_write(self, name: str, principal: Principal, *, field: str = "library",
                      adapter: str | None = None) -> LibraryState:
        """get(), but a library (or adapter) this replica has not seen yet is first looked up in a
        shared store: a client may have created it through another replica a moment ago."""
        try:
            state = self.get(name, principal, field=field)
            if adapter is not None:
                state.entry(adapter, principal, field="name")
            return state
        except NotFoundError:
            if not self._store.shared:
                raise
        self.refresh()
        return self.get(name, principal, field=field)

    def set_stale(self, reason: str | None) -> None:
        """Refuse reads with UNAVAILABLE ``reason`` (a replica past its staleness budget), or stop."""
        self._stale = reason

    def _sync(self) -> list[str]:
        stamps = self._store.library_stamps()
        libs, failed = dict(self._libs), dict(self._failed)
        changed = []
        for name in [n for n in libs if n not in stamps] + [n for n in failed if n not in stamps]:
            libs.pop(name, None)
            failed.pop(name, None)
            changed.append(name)
        for name, stamp in stamps.items():
            if self._stamps.get(name) == stamp and (name in libs or name in failed):
                continue
            try:
                libs[name] = self._rebuild_latest(name, libs.get(name))
                failed.pop(name, None)
                self._stamps[name] = self._store.library_stamps().get(name)
                self._sync_errors.pop(name, None)
                changed.append(name)
            except SeqrError as e:
                if self._sync_errors.get(name) != (stamp, str(e)):
                    self._sync_errors[name] = (stamp, str(e))
                    log.error("library could not follow the store; serving its last good snapshot",
                              extra={"library": name, "error": str(e), "code": e.code, "has_snapshot": name in libs})
                if name not in libs:
                    failed[name] = e
        if changed:
            self._libs, self._failed = MappingProxyType(libs), MappingProxyType(failed)
            for name in changed:
                if name in libs:
                    self._changed(libs[name])
                elif self._metrics:
                    self._metrics.library_removed(name)
        return changed

    def _rebuild_latest(self, name: str, cur: LibraryState | None) -> LibraryState:
        """The library as stored now; retried while a blob went missing because the store moved on."""
        for _ in range(5):
            try:
                return self._catch_up(name, cur)
            except MissingBlobError:
                if not self._store.refresh():
                    raise
        return self._catch_up(name, cur)

    def _catch_up(self, name: str, cur: LibraryState | None) -> LibraryState:
        """Like _rebuild, but reusing ``cur``'s parsed adapters: a stored adapter never changes (ids
        are never reused), so a follower parses only the added ones - catching up costs the
        change, not the library."""
        built = self._stamps.get(name)
        stamp = self._store.library_stamps().get(name)
        if cur is None or built is None or stamp is None or built[0] != stamp[0]:   # new or re-created
            return self._rebuild(name)
        rec = self._store.library(name)
        stored = {(a.name, a.adapter_id) for a in rec.adapters}
        index = cur.index
        for e in cur.index.adapters:
            if (e.name, e.adapter_id) not in stored:
                index, _ = index.remove_adapter(e.name)
                if self._metrics:
                    self._metrics.adapter_deleted(name, e.name)
        have = {e.name for e in index.adapters}
        items = []
        for ar in rec.adapters:                      # adapter id order, as _rebuild
            if ar.name not in have:
                parsed = parse_peft_adapter(self._store.read_adapter_files(name, ar.name), name=ar.name,
                                            signature=cur.spec.signature)
                items.append((parsed.adapter, ar.adapter_id, parsed.upload_dtype))
        if items:
            index, _ = index.add_adapters(items, version=rec.version)
        raw = self._store.read_library_object(name, lo.CALIBRATION)
        if raw is not None:
            ids = {e.name: e.adapter_id for e in index.adapters}
            index = index.with_calibration(lo.decode_calibration(raw, ids), version=rec.version)
        elif index.calibration is not None:
            return self._rebuild(name)
        index = index.with_version(rec.version)
        stacked(index)        # build routing's tables here, not in the first request after the swap
        return _state(cur.spec, index, rec.adapters)
