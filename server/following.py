"""How a library manager follows a store that other processes also write (replicas).

Mixed into :class:`~seqr_server.manager.LibraryManager`. On a shared store (a directory shared
by a process group, or PostgreSQL) every replica serves its own immutable snapshots and keeps
them at the store's latest commit: :meth:`refresh` (called by the replica's Follower, and by
every write before it checks anything) adopts the newer verified manifest and swaps in the
libraries whose stored state changed - all of them together, so a request is never scored on a
mix of versions.

Catching up costs the change, not the library: a stored adapter version never changes (ids are
never reused; an in-place replace bumps the adapter's version), so only added or replaced
adapters are loaded, from their sealed index objects (PEFT files are parsed only for an adapter
without one, and a follower does not store what it derives: the writer does). Quarantine follows the same rule: an adapter this replica found damaged
stays quarantined while the store holds that same version, and a new version (a repair) is
parsed afresh. Library objects (calibration, pooled moments) are re-read on every change, so
statistics another replica stored - a Calibrate, or traffic learning - reach this one too.
"""

from __future__ import annotations

import logging
from types import MappingProxyType

from seqr_core import LibraryIndex
from seqr_core.errors import NotFoundError, SeqrError

from . import library_objects as lo
from .auth import Principal
from .library_state import LibraryState, library_state
from .quarantine import Damage, LibraryDamage, guarded
from .store import AdapterRecord, MissingBlobError

log = logging.getLogger("seqr.manager")

__all__ = ["Following"]


class Following:
    """The replica half of LibraryManager (expects its ``_store``, ``_libs``, ``_failed``,
    ``_write``, ``_stamps``, ``_stale``, ``_sync_errors``, ``_metrics``)."""

    def refresh(self) -> list[str]:
        """Adopt commits other processes made; returns the libraries that changed.

        A library that cannot be rebuilt (its blobs raced away and the store has not moved, or
        its record is unreadable) keeps serving its last good snapshot; one that never loaded
        answers its error."""
        with self._write:
            self._check_open()
            return self._follow_locked()

    def get_for_write(self, name: str, principal: Principal, *, field: str = "library") -> LibraryState:
        """get(), but a library this replica has not seen yet is first looked up in a shared
        store: a client may have created it through another replica a moment ago."""
        try:
            return self.get(name, principal, field=field)
        except NotFoundError:
            if not self._store.shared:
                raise
        self.refresh()
        return self.get(name, principal, field=field)

    def set_stale(self, reason: str | None) -> None:
        """Refuse reads with UNAVAILABLE ``reason`` (a replica past its staleness budget), or stop."""
        self._stale = reason

    # ------------------------------------------------------------------ internals
    def _follow_locked(self) -> list[str]:
        """With the writer lock held: adopt the store's head, swap in what changed."""
        self._store.refresh()
        return self._sync()

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
        """The library as stored now. A blob that went missing while the store moved on (another
        process committed and crypto-shredded it) is a race, not damage: read again at the new
        head. Only when the store stands still is a missing blob quarantined, as at load."""
        for _ in range(5):
            try:
                return self._catch_up(name, cur, transient=(MissingBlobError,))
            except MissingBlobError:
                if not self._store.refresh():
                    break
        return self._catch_up(name, cur, transient=())

    def _catch_up(self, name: str, cur: LibraryState | None, *,
                  transient: tuple[type[Exception], ...]) -> LibraryState:
        """Like _rebuild, reusing ``cur``'s parsed adapters and quarantine findings for every
        adapter version the store still holds."""
        built = self._stamps.get(name)
        stamp = self._store.library_stamps().get(name)
        if cur is None or built is None or stamp is None or built[0] != stamp[0]:   # new or re-created
            return self._rebuild(name, transient=transient)
        rec = self._store.library(name)
        stored = {a.name: a for a in rec.adapters}
        index, damage = _drop_superseded(cur, stored, self._metrics, name)
        have = {e.name for e in index.adapters} | set(damage.adapters)
        top = max((e.adapter_id for e in index.adapters), default=-1)
        added, replaced = [], []
        for ar in rec.adapters:                      # adapter id order, as _rebuild
            if ar.name in have:
                continue
            got = self._load_adapter(name, ar, cur.index, transient=transient)
            if isinstance(got, Damage):
                damage = damage.with_adapter(ar.name, got)
            else:
                (added if ar.adapter_id > top else replaced).append((got[0], ar.adapter_id))
        for ai, adapter_id in replaced:              # a new version under an old id: at its place
            index, _ = index.replace_indexed(ai, adapter_id=adapter_id)
        if added:
            index, _ = index.add_indexed(added, version=rec.version)
        index, damage, pool = self._library_objects(name, index, damage, transient=transient)
        index = index.with_version(rec.version)
        state = library_state(cur.spec, index, rec, damage, pool)
        prebuild(state.index)   # build routing's tables here, not in the first request after the swap
        return state

    def _library_objects(self, name: str, index: LibraryIndex, damage: LibraryDamage, *,
                         transient: tuple[type[Exception], ...]) -> tuple[LibraryIndex, LibraryDamage, object]:
        """The stored calibration and pooled moments (either may be quarantined as damaged)."""
        objects = {r: d for r, d in damage.objects.items() if r not in (lo.CALIBRATION, lo.MOMENTS)}
        raw = guarded(lambda: self._store.read_library_object(name, lo.CALIBRATION), library=name,
                      what=lo.CALIBRATION, transient=transient)
        if isinstance(raw, Damage):
            objects[lo.CALIBRATION], raw = raw, None      # routed uncalibrated, as at load
        cal = None if raw is None else lo.decode_calibration(raw, {e.name: e.adapter_id for e in index.adapters})
        index = index.with_calibration(cal, version=index.version)
        pool = guarded(lambda: self._read_moments(name), library=name, what=lo.MOMENTS, transient=transient)
        if isinstance(pool, Damage):
            objects[lo.MOMENTS], pool = pool, None
        return index, LibraryDamage(damage.adapters, MappingProxyType(objects)), pool


def _drop_superseded(cur: LibraryState, stored: dict[str, AdapterRecord], metrics,
                     library: str) -> tuple[LibraryIndex, LibraryDamage]:
    """``cur`` without the adapters (and quarantine entries) whose stored version is gone."""
    def same(name: str) -> bool:
        old, new = cur.records.get(name), stored.get(name)
        return old is not None and new is not None and (old.adapter_id, old.version) == (new.adapter_id, new.version)

    index, damage = cur.index, cur.damage
    for e in cur.index.adapters:
        if not same(e.name):
            index, _ = index.remove_adapter(e.name)
            if metrics and e.name not in stored:
                metrics.adapter_deleted(library, e.name)
    for n in list(damage.adapters):
        if not same(n):
            damage = damage.without_adapter(n)
    return index, damage


def prebuild(index: LibraryIndex) -> None:
    """The fp32 copies of the Gram weight tables the per-token kernel reads (built once per
    lineage of snapshots and extended on every append, so this is cheap after the first)."""
    for g in range(len(index.layout.groups)):
        index.table(f"G{g}")
