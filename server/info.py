"""LibraryInfo / AdapterInfo / summaries, filtered by what the caller may see.

Every version reported is the caller's view version (views.py); quarantined adapters appear
only to callers whose globs match them, and a library is ``degraded`` only for callers who may
know of its damage.
"""

from __future__ import annotations

import numpy as np

from seqr_core import AdapterEntry
from seqr_core.errors import FailedPreconditionError
from seqr_router.v1 import admin_pb2, library_pb2

from .auth import Principal
from .config import Limits
from .manager import LibraryState
from .quarantine import Damage
from .store import AdapterRecord
from .wire import encode_tensor

_KIND = {"shared_a": library_pb2.SHARED_A, "general": library_pb2.GENERAL, "mixed": library_pb2.MIXED}


def _strings(d) -> dict[str, str]:
    return {str(k): str(v) for k, v in (d or {}).items()}


def _record_fields(info: library_pb2.AdapterInfo, rec: AdapterRecord) -> None:
    info.created_at = rec.created_at
    info.version = rec.version
    info.sha256.update(rec.sha256)
    info.size_bytes = rec.size_bytes
    info.meta.update(_strings(rec.meta.get("user")))


def adapter_info(state: LibraryState, entry: AdapterEntry) -> library_pb2.AdapterInfo:
    rec = state.records.get(entry.name)
    cal = state.index.calibration
    info = library_pb2.AdapterInfo(
        name=entry.name, adapter_id=entry.adapter_id, kind=_KIND[entry.kind], rank=entry.rank,
        modules=list(entry.modules), upload_dtype=entry.upload_dtype,
        calibrated=cal is not None and cal.get(entry.name) is not None, status=library_pb2.ADAPTER_READY)
    if rec is not None:
        _record_fields(info, rec)
    return info


def damaged_adapter_info(rec: AdapterRecord, damage: Damage) -> library_pb2.AdapterInfo:
    """A quarantined adapter, from its store record alone (its files cannot be read)."""
    info = library_pb2.AdapterInfo(
        name=rec.name, adapter_id=rec.adapter_id, kind=_KIND.get(rec.meta.get("kind"), 0),
        upload_dtype=str(rec.meta.get("upload_dtype", "")), status=library_pb2.ADAPTER_DAMAGED,
        damaged_reason=damage.reason)
    _record_fields(info, rec)
    return info


def adapter_infos(state: LibraryState, principal: Principal) -> list[library_pb2.AdapterInfo]:
    """Every adapter the caller may see, routable or quarantined, in id order."""
    infos = [adapter_info(state, e) for e in state.visible_entries(principal)]
    infos += [damaged_adapter_info(r, d) for r, d in state.visible_damage(principal)]
    return sorted(infos, key=lambda i: i.adapter_id)


def library_info(state: LibraryState, principal: Principal, *, include_shared_a: bool = False,
                 include_adapters: bool = True, include_background: bool = False,
                 limits: Limits | None = None) -> library_pb2.LibraryInfo:
    idx, spec = state.index, state.spec
    sig = library_pb2.Signature(base_model=idx.signature.base_model, modules=[
        library_pb2.ModuleSpec(name=m.name, d_in=m.d_in, d_out=m.d_out,
                               shared_rank=int(idx.shared_a[m.name].shape[0]) if m.name in idx.shared_a else 0)
        for m in idx.signature.modules])
    visible = state.visible_entries(principal)
    cal = idx.calibration
    info = library_pb2.LibraryInfo(
        name=state.name, version=state.view_version(principal), signature=sig, meta=_strings(spec.meta),
        calibration=library_pb2.CalibrationInfo(
            sequences=cal.sequences if cal is not None else 0,
            adapters=[e.name for e in visible if cal is not None and cal.get(e.name) is not None],
            pooled_sequences=int(state.pool.sequences) if state.pool is not None else 0,
            derived_adapters=[e.name for e in visible if cal is not None and cal.get(e.name) is not None
                              and cal.get(e.name).derived]),
        degraded=state.degraded_for(principal), damaged_objects=sorted(state.damage.objects),
        shared_a_only=spec.shared_a_only)
    if spec.recipe is not None:
        info.shared_a_recipe.CopyFrom(library_pb2.SharedARecipe(
            seed=spec.recipe.seed, scheme=spec.recipe.scheme, rng=spec.recipe.rng))
    if include_adapters:
        info.adapters.extend(adapter_infos(state, principal))
    if include_shared_a:
        for m, A in idx.shared_a.items():
            info.shared_a[m].CopyFrom(encode_tensor(A))
    if include_background:
        for m, S in background(state, limits or Limits()).items():
            info.background[m].CopyFrom(encode_tensor(S.astype(np.float32)))
    return info


def background(state: LibraryState, limits: Limits) -> dict:
    """The library's pooled E[z zᵀ] per shared-A module; refused while it pools too few
    sequences to be an aggregate (min_background_sequences)."""
    n = int(state.pool.sequences) if state.pool is not None else 0
    if n < limits.min_background_sequences:
        raise FailedPreconditionError(
            f"library {state.name!r} has no background yet: its pooled moments cover {n} sequences, "
            f"the minimum is {limits.min_background_sequences} (run Calibrate with unlabeled traffic)",
            field="include_background", limit=limits.min_background_sequences, actual=n)
    return state.pool.background()


def library_summary(state: LibraryState, principal: Principal) -> admin_pb2.LibrarySummary:
    damaged = len(state.visible_damage(principal))
    return admin_pb2.LibrarySummary(
        name=state.name, version=state.view_version(principal), base_model=state.index.signature.base_model,
        adapters=len(state.visible_entries(principal)) + damaged, degraded=state.degraded_for(principal),
        damaged_adapters=damaged)


def list_adapters_response(state: LibraryState, principal: Principal) -> admin_pb2.ListAdaptersResponse:
    return admin_pb2.ListAdaptersResponse(adapters=adapter_infos(state, principal),
                                          library_version=state.view_version(principal))
