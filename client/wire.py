"""numpy <-> wire tensors, request building and response conversion (protobuf stays in here)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from seqr_router.v1 import admin_pb2, library_pb2, router_pb2, tensor_pb2

from . import results as R

DT = tensor_pb2.DType
_DECODE = {DT.F32: "<f4", DT.F16: "<f2", DT.F64: "<f8", DT.I64: "<i8"}
FORMS = {"activations": router_pb2.ACTIVATIONS, "projected": router_pb2.PROJECTED,
         "moments": router_pb2.MOMENTS}
METHODS = {"seqr": router_pb2.SEQR, "exact": router_pb2.EXACT, "spectr": router_pb2.SPECTR,
           "arrow": router_pb2.ARROW, "lag": router_pb2.LAG}
GRANULARITY = {"sequence": router_pb2.SEQUENCE, "token": router_pb2.TOKEN}
AGGREGATION = {"mean": router_pb2.MEAN, "vote": router_pb2.VOTE}
_N = router_pb2.Normalisation
KINDS = {"none": _N.NONE, "frobenius": _N.FROBENIUS, "activation": _N.ACTIVATION, "zscore": _N.ZSCORE}
ZGRAN = {"adapter_module": _N.ADAPTER_MODULE, "adapter": _N.ADAPTER}
TRANSFORMS = {"e": _N.E, "sqrt": _N.SQRT, "log": _N.LOG}
_KIND_NAMES = {library_pb2.SHARED_A: "shared_a", library_pb2.GENERAL: "general", library_pb2.MIXED: "mixed"}


def _pick(table: Mapping[str, int], value: str, what: str) -> int:
    if value not in table:
        raise ValueError(f"{what} must be one of {sorted(table)}, got {value!r}")
    return table[value]


def encode_tensor(a) -> tensor_pb2.Tensor:
    """float16 stays F16 (half the bytes); everything else is sent as float32."""
    a = np.asarray(a)
    if a.dtype == np.float16:
        a, dt = a.astype("<f2", copy=False), DT.F16
    else:
        a, dt = a.astype("<f4", copy=False), DT.F32
    return tensor_pb2.Tensor(dtype=dt, shape=list(a.shape), data=np.ascontiguousarray(a).tobytes())


def decode_tensor(t: tensor_pb2.Tensor) -> np.ndarray:
    if t.dtype == DT.BF16:
        raw = np.frombuffer(t.data, "<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(tuple(t.shape))
    return np.frombuffer(t.data, _DECODE[t.dtype]).reshape(tuple(t.shape)).copy()


def normalisation_msg(n) -> router_pb2.Normalisation:
    """"frobenius", "zscore/adapter/log" (the label a response reports) or an object with
    kind/granularity/transform attributes (e.g. seqr_core.Normalisation)."""
    if isinstance(n, str):
        parts = n.split("/")
        kind, gran, tr = parts[0], parts[1] if len(parts) > 1 else "adapter_module", parts[2] if len(parts) > 2 else "e"
    else:
        kind, gran, tr = n.kind, getattr(n, "granularity", "adapter_module"), getattr(n, "transform", "e")
    return router_pb2.Normalisation(kind=_pick(KINDS, kind, "normalisation"),
                                    granularity=_pick(ZGRAN, gran, "normalisation granularity"),
                                    transform=_pick(TRANSFORMS, tr, "normalisation transform"))


def route_options(*, top_k: int, method: str, normalisation, granularity: str, aggregation: str,
                  temperature: float, candidates, include_scores: bool, lag_k: int | None) -> router_pb2.RouteOptions:
    o = router_pb2.RouteOptions(method=_pick(METHODS, method, "method"),
                                normalisation=normalisation_msg(normalisation),
                                granularity=_pick(GRANULARITY, granularity, "granularity"),
                                aggregation=_pick(AGGREGATION, aggregation, "aggregation"),
                                top_k=top_k, temperature=temperature, include_scores=include_scores,
                                candidates=list(candidates or ()))
    if lag_k is not None:
        o.lag_k = lag_k
    return o


def add_inputs(msg, *, inputs=None, projected=None, moments=None, shared=None, tokens: int | None = None) -> None:
    """Fill ``msg.tensors`` / ``msg.inputs`` (RouteRequest or CalibrateRequest).

    Values are arrays, or names of arrays in ``shared``. The same array object given for
    several modules (q_proj and v_proj reading one hidden state) is sent once.
    """
    shared = dict(shared or {})
    for name, arr in shared.items():
        msg.tensors[name].CopyFrom(encode_tensor(arr))
    by_id: dict[int, str] = {}
    seen: set[str] = set()
    for form, group in (("activations", inputs), ("projected", projected), ("moments", moments)):
        for module, value in (group or {}).items():
            if module in seen:
                raise ValueError(f"module {module!r} given in two input forms")
            seen.add(module)
            if isinstance(value, str):
                if value not in shared:
                    raise ValueError(f"{module!r} references {value!r}, which is not in shared")
                ref = value
            else:
                ref = by_id.get(id(value))
                if ref is None:
                    ref = f"_t{len(by_id)}"
                    while ref in shared:
                        ref = "_" + ref
                    by_id[id(value)] = ref
                    msg.tensors[ref].CopyFrom(encode_tensor(value))
            mi = msg.inputs.add(module=module, form=FORMS[form], tensor=ref)
            if form == "moments" and tokens:
                mi.tokens = int(tokens)


def route_result(resp: router_pb2.RouteResponse) -> R.RouteResult:
    tokens = None
    if resp.HasField("tokens"):
        tokens = R.TokenChoices(adapter_ids=decode_tensor(resp.tokens.adapter_ids),
                                scores=decode_tensor(resp.tokens.scores))
    return R.RouteResult(
        choices=tuple(R.Choice(name=c.name, adapter_id=c.adapter_id, score=c.score, weight=c.weight)
                      for c in resp.choices),
        margin=resp.margin, library_version=resp.library_version, method=resp.method,
        normalisation=resp.normalisation, fallback=resp.fallback, rechecked=resp.rechecked,
        timings=R.Timings(resp.timings.decode_ms, resp.timings.score_ms, resp.timings.total_ms),
        tokens=tokens, scores={c.name: c.score for c in resp.scores})


def adapter_info(a: library_pb2.AdapterInfo) -> R.AdapterInfo:
    return R.AdapterInfo(name=a.name, adapter_id=a.adapter_id, kind=_KIND_NAMES.get(a.kind, "unknown"),
                         rank=a.rank, modules=tuple(a.modules), upload_dtype=a.upload_dtype,
                         created_at=a.created_at, sha256=dict(a.sha256), size_bytes=a.size_bytes,
                         meta=dict(a.meta), calibrated=a.calibrated,
                         status="damaged" if a.status == library_pb2.ADAPTER_DAMAGED else "ready",
                         damaged_reason=a.damaged_reason, version=a.version or 1)


def library_info(i: library_pb2.LibraryInfo) -> R.LibraryInfo:
    recipe = (R.SharedARecipe(seed=i.shared_a_recipe.seed, scheme=i.shared_a_recipe.scheme,
                              rng=i.shared_a_recipe.rng) if i.HasField("shared_a_recipe") else None)
    return R.LibraryInfo(
        name=i.name, version=i.version, base_model=i.signature.base_model,
        modules=tuple(R.ModuleInfo(m.name, m.d_in, m.d_out, m.shared_rank) for m in i.signature.modules),
        shared_a_recipe=recipe, adapters=tuple(adapter_info(a) for a in i.adapters),
        calibrated_adapters=tuple(i.calibration.adapters), calibration_sequences=i.calibration.sequences,
        meta=dict(i.meta), shared_a={m: decode_tensor(t) for m, t in i.shared_a.items()},
        degraded=i.degraded, damaged_objects=tuple(i.damaged_objects),
        background={m: decode_tensor(t) for m, t in i.background.items()}, shared_a_only=i.shared_a_only,
        pooled_sequences=i.calibration.pooled_sequences, derived_adapters=tuple(i.calibration.derived_adapters))


def signature(sig, base_model: str = "") -> library_pb2.Signature:
    """From a dict {"base_model", "modules": [[name, d_in, d_out], ...]}, a list of such
    triples, or an object with ``base_model`` and ``modules`` (name, d_in, d_out attributes)."""
    if isinstance(sig, Mapping):
        base_model, mods = sig.get("base_model", base_model), sig["modules"]
    elif hasattr(sig, "modules"):
        base_model, mods = getattr(sig, "base_model", base_model), [(m.name, m.d_in, m.d_out) for m in sig.modules]
    else:
        mods = sig
    return library_pb2.Signature(base_model=base_model, modules=[
        library_pb2.ModuleSpec(name=n, d_in=int(i), d_out=int(o)) for n, i, o in mods])


def create_library_request(name: str, *, signature_, base_model: str, shared_a_seed: int | None,
                           shared_a_rank: int, shared_a_modules, shared_a, meta) -> admin_pb2.CreateLibraryRequest:
    req = admin_pb2.CreateLibraryRequest(name=name, signature=signature(signature_, base_model),
                                         meta={str(k): str(v) for k, v in (meta or {}).items()})
    if shared_a_seed is not None and shared_a is not None:
        raise ValueError("give shared_a_seed or shared_a, not both")
    if shared_a_seed is not None:
        req.recipe.seed = int(shared_a_seed)
        req.shared_a_rank = int(shared_a_rank)
        req.shared_a_modules.extend(shared_a_modules or ())
    elif shared_a is not None:
        for m, A in shared_a.items():
            req.uploaded.modules[m].CopyFrom(encode_tensor(A))
    return req

