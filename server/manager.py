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

from seqr_core import (AdapterEntry, AdapterIndex, CalibrationStats, IndexFormatError, LibraryIndex,
                       ModuleInput, RouteOptions, merge_into, parse_peft_adapter, route)
from seqr_core.adapters import check_adapter_name
from seqr_core.errors import AlreadyExistsError, NotFoundError, SeqrError, UnavailableError

from . import library_objects as lo
from .auth import Principal
from .metrics import Metrics

log = logging.getLogger("seqr.manager")
_LOAD_CHUNK = 32                     # adapters per append while loading (bounds peak memory)


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
    recs = records if isinstance(records, Mapping) else {r.name: r for r in records}
    return LibraryState(spec=spec, index=index, records=MappingProxyType(dict(recs)),
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

    # ------------------------------------------------------------------ reads (lock-free)
    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    def get(self, name: str, principal: Principal, *, field: str = "library") -> LibraryState:
        if not self._loaded.is_set():
            raise UnavailableError("the service is still loading its libraries; retry shortly")
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
        self._loaded.set()
        log.info("libraries loaded", extra={"libraries": len(libs), "failed": len(failed),
                                            "adapters": sum(len(s.index.adapters) for s in libs.values())})

    def _rebuild(self, name: str) -> LibraryState:
        """A library from its stored index objects; PEFT files are parsed only for adapters
        without a current one (then that index is stored, so the next start reads it)."""
        rec = self._store.library(name)
        spec = lo.spec_from_store(name, rec.meta, self._store.read_library_object(name, lo.SHARED_A))
        empty = spec.empty_index(version=rec.version)
        index, chunk, derived, why = empty.reserve(len(rec.adapters)), [], {}, {}
        for ar in rec.adapters:                      # adapter id order
            ai, fresh, reason = self._load_adapter(name, ar, empty)
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
            self._store_derived(name, derived)
        raw = self._store.read_library_object(name, lo.CALIBRATION)
        if raw is not None:
            ids = {e.name: e.adapter_id for e in index.adapters}
            index = index.with_calibration(lo.decode_calibration(raw, ids), version=rec.version)
        return _state(spec, index, rec.adapters)

    def _load_adapter(self, library: str, rec, empty: LibraryIndex) -> tuple[AdapterIndex, bytes | None, str]:
        """One adapter's index: (index object, its bytes if it had to be derived now, why).
        Raises for this adapter alone (damaged blob, unparsable files)."""
        raw = self._store.read_adapter_object(library, rec.name, lo.INDEX) if lo.INDEX in rec.objects else None
        reason = "no stored index (store written before index objects)"
        if raw is not None:
            try:
                ai = lo.decode_index(raw, library=library, adapter=rec.name)
                empty.layout.check(ai)
                return ai, None, ""
            except IndexFormatError as e:
                reason = f"index format {e.actual} is not {e.limit}"
                log.debug("stale index format", extra={"library": library, "adapter": rec.name})
        parsed = parse_peft_adapter(self._store.read_adapter_files(library, rec.name), name=rec.name,
                                    signature=empty.signature)
        ai = empty.index_adapter(parsed.adapter, upload_dtype=parsed.upload_dtype)
        return ai, lo.encode_index(ai), reason

    def _store_derived(self, library: str, derived: dict) -> None:
        """Persist re-derived index objects (one commit). Serving does not depend on it: if the
        store refuses, the next start derives them again."""
        try:
            self._store.put_adapter_objects(library, derived)
        except SeqrError as e:
            log.warning("could not store re-derived index objects", extra={"library": library,
                                                                          "error": str(e), "code": e.code})

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
        base = self.get(library, principal, field="header.library").index
        parsed = parse_peft_adapter(files, name=name, signature=base.signature)   # CPU-heavy: outside the lock
        ai = base.index_adapter(parsed.adapter, upload_dtype=parsed.upload_dtype)  # (the QR, too)
        with self._write:
            self._check_open()
            cur = self.get(library, principal, field="header.library")
            _, predicted = self._store.library_head(library)
            dry, entry = cur.index.add_indexed([(ai, predicted)])
            rec = self._store.put_adapter(library, name, files=files, objects={lo.INDEX: lo.encode_index(ai)},
                                          meta={"user": dict(meta), "upload_dtype": parsed.upload_dtype,
                                                "kind": entry[0].kind, "base_model": parsed.base_model})
            version, _ = self._store.library_head(library)
            if rec.adapter_id == predicted:
                new = dry.with_version(version)
            else:   # cannot happen while we are the store's only writer; stay correct anyway
                new, _ = cur.index.add_indexed([(ai, rec.adapter_id)], version=version)
            state = _state(cur.spec, new, {**cur.records, name: rec})
            self._swap(state)
        entry = state.index.entry(name)
        log.info("adapter stored", extra={"library": library, "adapter": name, "adapter_id": rec.adapter_id,
                                          "kind": entry.kind, "version": state.version})
        return state, entry

    def delete_adapter(self, library: str, name: str, principal: Principal) -> tuple[LibraryState, AdapterEntry]:
        with self._write:
            self._check_open()
            cur = self.get(library, principal)
            entry = cur.entry(name, principal, field="name")
            dry, _ = cur.index.remove_adapter(name)
            self._store.delete_adapter(library, name, record=False)
            version, _ = self._store.library_head(library)
            state = _state(cur.spec, dry.with_version(version), {n: r for n, r in cur.records.items() if n != name})
            self._swap(state)
        if self._metrics:
            self._metrics.adapter_deleted(library, name)
        log.info("adapter deleted", extra={"library": library, "adapter": name,
                                           "adapter_id": entry.adapter_id, "version": state.version})
        return state, entry

    def store_calibration(self, library: str, basis: LibraryIndex, fresh: CalibrationStats,
                          principal: Principal) -> tuple[LibraryState, list[str]]:
        """Store stats fitted on snapshot ``basis``; adapters replaced since then are dropped."""
        with self._write:
            self._check_open()
            cur = self.get(library, principal)
            now_ids = {e.name: e.adapter_id for e in cur.index.adapters}
            then_ids = {e.name: e.adapter_id for e in basis.adapters}
            for n in list(fresh.adapters):
                if now_ids.get(n) != then_ids.get(n):
                    fresh = fresh.without(n)
            merged = merge_into(cur.index, fresh)
            lib = self._store.put_library_object(library, lo.CALIBRATION,
                                                 lo.encode_calibration(merged, now_ids))
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
        self._changed(state)

    def _changed(self, s: LibraryState) -> None:
        if self._metrics:
            self._metrics.library_changed(s.name, version=s.version, adapters=len(s.index.adapters))
        if self._on_change is not None and s.index.adapters:    # nothing to score without adapters
            self._on_change(s.index)

