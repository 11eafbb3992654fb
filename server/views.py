"""Per-caller view versions: a restricted caller's library version moves only with what it can see.

A library's version counts every commit, hidden adapters' uploads and deletions included, so
reporting it to a caller with adapter globs would tell it when (and how often) adapters it may
not see change. Instead every response reports the caller's *view version*: the library
version of the last change the caller can see - an upload or deletion of an adapter its globs
match, or a change to the whole library (creation, calibration). It is monotonic, equals the
library version for unrestricted callers, and two snapshots with the same view version give
that caller identical answers. The store records what each version changed (see
store/manifest.py), so view versions survive restarts.

Adapter ids are NOT per caller: they are the library's stable, never-reused ints that model
hosts hand to engines (vLLM's lora_int_id), and one engine may serve several tenants, so a
per-caller numbering could make two tenants' adapters collide. The gaps they leave are
documented in the README's security notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from seqr_core import Decision, LibraryIndex, RouteOptions
from seqr_core import route as core_route

from .auth import Principal
from .store import LibraryRecord


@dataclass(frozen=True)
class ChangeLog:
    """Which library version last changed the whole library, and each adapter name."""

    library: int
    adapters: Mapping[str, int]          # live or deleted adapter name -> version of its last change

    @classmethod
    def of(cls, rec: LibraryRecord) -> "ChangeLog":
        names = dict(rec.deleted)
        names.update((a.name, a.changed) for a in rec.adapters)
        return cls(library=rec.changed, adapters=MappingProxyType(names))

    def view_version(self, may_use: Callable[[str], bool]) -> int:
        return max([self.library, *(v for n, v in self.adapters.items() if may_use(n))])


def view_version(log: ChangeLog, principal: Principal, *, version: int, cache: dict) -> int:
    """``principal``'s view version of the snapshot at ``version`` that ``log`` describes.

    ``cache`` belongs to that snapshot; the view depends only on the caller's adapter globs.
    """
    if principal.unrestricted:
        return version
    key = principal.adapters
    got = cache.get(key)
    if got is None:
        got = cache[key] = log.view_version(principal.may_use_adapter)
    return got


def route_in_view(route_fn: Callable[[LibraryIndex, dict, RouteOptions], Decision], state, principal: Principal,
                  index: LibraryIndex, inputs: dict, options: RouteOptions) -> tuple[Decision, int]:
    """Route, and the version to report: the decision's own, or the caller's view version of it.

    A backend may answer from an older snapshot (the onnx backend while its new scorer warms).
    For a restricted caller that is fine while the snapshot already holds the caller's current
    view; when a change the caller can see came later, the answer is recomputed on the current
    snapshot (numpy, exact), so the reported view version always describes the answer given.
    """
    decision = route_fn(index, inputs, options)
    if principal.unrestricted:
        return decision, decision.version
    view = state.view_version(principal)
    if decision.version < view:
        decision = core_route(index, inputs, options)
    return decision, view
