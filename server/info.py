"""LibraryInfo / AdapterInfo responses, filtered by what the caller may see."""

from __future__ import annotations

from seqr_core import AdapterEntry
from seqr_router.v1 import library_pb2

from .auth import Principal
from .manager import LibraryState
from .wire import encode_tensor

_KIND = {"shared_a": library_pb2.SHARED_A, "general": library_pb2.GENERAL, "mixed": library_pb2.MIXED}


def _strings(d) -> dict[str, str]:
    return {str(k): str(v) for k, v in (d or {}).items()}


def adapter_info(state: LibraryState, entry: AdapterEntry) -> library_pb2.AdapterInfo:
    rec = state.records.get(entry.name)
    cal = state.index.calibration
    info = library_pb2.AdapterInfo(
        name=entry.name, adapter_id=entry.adapter_id, kind=_KIND[entry.kind], rank=entry.rank,
        modules=list(entry.modules), upload_dtype=entry.upload_dtype,
        calibrated=cal is not None and cal.get(entry.name) is not None)
    if rec is not None:
        info.created_at = rec.created_at
        info.sha256.update(rec.sha256)
        info.size_bytes = rec.size_bytes
        info.meta.update(_strings(rec.meta.get("user")))
    return info


def library_info(state: LibraryState, principal: Principal, *, include_shared_a: bool = False,
                 include_adapters: bool = True) -> library_pb2.LibraryInfo:
    idx, spec = state.index, state.spec
    sig = library_pb2.Signature(base_model=idx.signature.base_model, modules=[
        library_pb2.ModuleSpec(name=m.name, d_in=m.d_in, d_out=m.d_out,
                               shared_rank=int(idx.shared_a[m.name].shape[0]) if m.name in idx.shared_a else 0)
        for m in idx.signature.modules])
    visible = state.visible_entries(principal)
    cal = idx.calibration
    info = library_pb2.LibraryInfo(
        name=state.name, version=idx.version, signature=sig, meta=_strings(spec.meta),
        calibration=library_pb2.CalibrationInfo(
            sequences=cal.sequences if cal is not None else 0,
            adapters=[e.name for e in visible if cal is not None and cal.get(e.name) is not None]))
    if spec.recipe is not None:
        info.shared_a_recipe.CopyFrom(library_pb2.SharedARecipe(
            seed=spec.recipe.seed, scheme=spec.recipe.scheme, rng=spec.recipe.rng))
    if include_adapters:
        info.adapters.extend(adapter_info(state, e) for e in visible)
    if include_shared_a:
        for m, A in idx.shared_a.items():
            info.shared_a[m].CopyFrom(encode_tensor(A))
    return info
