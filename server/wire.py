"""Wire messages <-> core types: tensors, module inputs, route options, decisions.

Everything a request carries is checked here against the server's Limits before the core
sees it; the core then checks it against the library (shapes, forms, finiteness).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from seqr_core import Decision, ModuleInput, Normalisation, RouteOptions
from seqr_core.errors import InvalidArgumentError, LimitExceededError
from seqr_router.v1 import router_pb2, tensor_pb2

from .config import Limits

DT = tensor_pb2.DType
_IN_DTYPES = {DT.F32: np.dtype("<f4"), DT.F16: np.dtype("<f2"), DT.BF16: np.dtype("<u2")}
_F32, _BF16, _MOMENTS = int(DT.F32), int(DT.BF16), int(router_pb2.MOMENTS)   # enum attributes are slow
_FORMS = {router_pb2.ACTIVATIONS: "activations", router_pb2.PROJECTED: "projected",
          router_pb2.MOMENTS: "moments"}
_METHODS = {0: "seqr", router_pb2.SEQR: "seqr", router_pb2.EXACT: "exact",
            router_pb2.SPECTR: "spectr", router_pb2.ARROW: "arrow", router_pb2.LAG: "lag"}
_GRAN = {0: "sequence", router_pb2.SEQUENCE: "sequence", router_pb2.TOKEN: "token"}
_AGG = {0: "mean", router_pb2.MEAN: "mean", router_pb2.VOTE: "vote"}
_N = router_pb2.Normalisation
_KINDS = {0: "activation", _N.NONE: "none", _N.FROBENIUS: "frobenius",
          _N.ACTIVATION: "activation", _N.ZSCORE: "zscore"}
_ZGRAN = {0: "adapter_module", _N.ADAPTER_MODULE: "adapter_module", _N.ADAPTER: "adapter"}
_TRANSFORMS = {0: "e", _N.E: "e", _N.SQRT: "sqrt", _N.LOG: "log"}


def _enum(table: Mapping[int, str], value: int, field: str) -> str:
    if value not in table:
        raise InvalidArgumentError("unknown enum value", field=field, actual=value)
    return table[value]


def input_form(value: int, *, field: str) -> str:
    """InputForm enum -> the core's form name ("activations" | "projected" | "moments")."""
    return _enum(_FORMS, value, field)


def _well_formed(t: tensor_pb2.Tensor, max_tokens: int) -> np.ndarray | None:
    """The common case in one test, or None (decode_tensor then names what is wrong). A request
    carries up to ~60 small moments: every attribute read and call here costs per tensor."""
    dtype = t.dtype
    dt = _IN_DTYPES.get(dtype)
    shape = t.shape
    if dt is not None and len(shape) == 2:
        rows, cols, data = shape[0], shape[1], t.data
        if 0 < rows <= max_tokens and cols > 0 and len(data) == rows * cols * dt.itemsize:
            raw = np.frombuffer(data, dtype=dt).reshape(rows, cols)
            if dtype == _F32:
                return raw                       # zero-copy
            if dtype == _BF16:
                return (raw.astype(np.uint32) << 16).view(np.float32)
            return raw.astype(np.float32)
    return None


def decode_tensor(t: tensor_pb2.Tensor, *, field: str, limits: Limits) -> np.ndarray:
    """A request tensor as a 2-D float32 array (zero-copy for F32)."""
    fast = _well_formed(t, limits.max_tokens)
    if fast is not None:
        return fast
    if t.dtype not in _IN_DTYPES:
        raise InvalidArgumentError("dtype must be F32, F16 or BF16", field=f"{field}.dtype",
                                   limit="F32|F16|BF16", actual=DT.Name(t.dtype) if t.dtype in DT.values() else t.dtype)
    shape = tuple(int(s) for s in t.shape)
    if len(shape) != 2 or min(shape) < 1:
        raise InvalidArgumentError("shape must be 2-D with positive dimensions", field=f"{field}.shape",
                                   limit="(rows>=1, cols>=1)", actual=shape)
    if shape[0] > limits.max_tokens:
        raise LimitExceededError("too many tokens (rows)", field=f"{field}.shape[0]",
                                 limit=limits.max_tokens, actual=shape[0])
    dt = _IN_DTYPES[t.dtype]
    want = shape[0] * shape[1] * dt.itemsize
    if len(t.data) != want:
        raise InvalidArgumentError("byte length does not match shape and dtype", field=f"{field}.data",
                                   limit=want, actual=len(t.data))
    raw = np.frombuffer(t.data, dtype=dt).reshape(shape)
    if t.dtype == DT.BF16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def encode_tensor(a: np.ndarray) -> tensor_pb2.Tensor:
    """Response tensors: float64 -> F64, integers -> I64, float32 -> F32."""
    a = np.asarray(a)
    if a.dtype.kind in "iu":
        a, dt = a.astype("<i8", copy=False), DT.I64
    elif a.dtype == np.float32:
        a, dt = a.astype("<f4", copy=False), DT.F32
    else:
        a, dt = a.astype("<f8", copy=False), DT.F64
    return tensor_pb2.Tensor(dtype=dt, shape=list(a.shape), data=np.ascontiguousarray(a).tobytes())


def _moments_batch(given: dict, inputs, max_tokens: int) -> dict[str, ModuleInput] | None:
    """The usual model-host request in one conversion: every input a moments matrix of one F32
    r×r shape in its own tensor. Their bytes become one (M, r, r) array and each module a view
    of it (per-tensor numpy calls cost more than the scoring); anything else - or anything
    wrong, so that the general path names the field - returns None."""
    if len(given) != len(inputs):
        return None
    modules, tokens, datas = [], [], []
    shape = None
    for mi in inputs:
        t = given.get(mi.tensor)
        if t is None or mi.form != _MOMENTS or mi.tokens < 1 or t.dtype != _F32:
            return None
        s = t.shape
        if shape is None:
            shape = tuple(s)
            if len(shape) != 2 or shape[0] != shape[1] or not 0 < shape[0] <= max_tokens:
                return None
            nbytes = shape[0] * shape[1] * 4
        elif len(s) != 2 or s[0] != shape[0] or s[1] != shape[1]:
            return None
        data = t.data
        if len(data) != nbytes:
            return None
        modules.append(mi.module)
        tokens.append(mi.tokens)
        datas.append(data)
    if len(set(modules)) != len(modules) or "" in modules or len({mi.tensor for mi in inputs}) != len(inputs):
        return None
    views = list(np.frombuffer(b"".join(datas), dtype=np.float32).reshape(len(datas), *shape))
    return {m: ModuleInput(form="moments", data=v, tokens=n) for m, v, n in zip(modules, views, tokens)}


def decode_inputs(tensors: Mapping[str, tensor_pb2.Tensor], inputs, *, limits: Limits) -> dict[str, ModuleInput]:
    """RouteRequest/CalibrateRequest tensors + inputs -> {module: ModuleInput}."""
    if len(inputs) > limits.max_modules:
        raise LimitExceededError("too many module inputs", field="inputs", limit=limits.max_modules,
                                 actual=len(inputs))
    if len(tensors) > limits.max_tensors:
        raise LimitExceededError("too many tensors", field="tensors", limit=limits.max_tensors,
                                 actual=len(tensors))
    if not inputs:
        raise InvalidArgumentError("at least one module input is required", field="inputs",
                                   limit=">=1", actual=0)
    given = dict(tensors.items())           # one pass over the map, not a lookup per input
    batch = _moments_batch(given, inputs, limits.max_tokens)
    if batch is not None:
        return batch
    decoded: dict[str, np.ndarray] = {}
    out: dict[str, ModuleInput] = {}
    max_tokens = limits.max_tokens
    for i, mi in enumerate(inputs):
        module, name, f = mi.module, mi.tensor, mi.form
        if not module:
            raise InvalidArgumentError("module is required", field=f"inputs[{i}].module")
        if module in out:
            raise InvalidArgumentError("module given twice", field=f"inputs[{i}].module", actual=module)
        form = _FORMS.get(f) or input_form(f, field=f"inputs[{i}].form")
        data = decoded.get(name)
        if data is None:
            t = given.get(name)
            if t is None:
                raise InvalidArgumentError("references a tensor that is not in the request",
                                           field=f"inputs[{i}].tensor", actual=name)
            data = _well_formed(t, max_tokens)
            if data is None:
                data = decode_tensor(t, field=f"tensors[{name}]", limits=limits)
            decoded[name] = data
        tokens = (mi.tokens or 1) if f == _MOMENTS else data.shape[0]
        if tokens < 1:
            raise InvalidArgumentError("tokens must be >= 1", field=f"inputs[{i}].tokens", actual=mi.tokens)
        out[module] = ModuleInput(form=form, data=data, tokens=tokens)
    unused = sorted(set(given) - set(decoded)) if len(decoded) != len(given) else None
    if unused:
        raise InvalidArgumentError("tensors not referenced by any input", field="tensors",
                                   actual=unused[:8])
    return out


def normalisation(n: router_pb2.Normalisation) -> Normalisation:
    return Normalisation(kind=_enum(_KINDS, n.kind, "options.normalisation.kind"),
                         granularity=_enum(_ZGRAN, n.granularity, "options.normalisation.granularity"),
                         transform=_enum(_TRANSFORMS, n.transform, "options.normalisation.transform"))


def route_options(o: router_pb2.RouteOptions, *, limits: Limits,
                  candidates: tuple[str, ...] | None) -> RouteOptions:
    """Proto options -> RouteOptions. ``candidates`` is the ACL-resolved list (None: all)."""
    top_k = int(o.top_k) if o.HasField("top_k") else 1
    if top_k < 1:
        raise InvalidArgumentError("top_k must be >= 1 (leave it unset for 1)", field="options.top_k",
                                   limit=">=1", actual=top_k)
    if top_k > limits.max_top_k:
        raise LimitExceededError("top_k above the server limit", field="options.top_k",
                                 limit=limits.max_top_k, actual=top_k)
    temperature = float(o.temperature) if o.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and temperature > 0):
        raise InvalidArgumentError("temperature must be finite and > 0", field="options.temperature",
                                   actual=temperature)
    lag_k = int(o.lag_k) if o.HasField("lag_k") else 4
    if lag_k < 1 or lag_k > limits.max_candidates:
        raise InvalidArgumentError("lag_k must be in [1, max_candidates]", field="options.lag_k",
                                   limit=limits.max_candidates, actual=lag_k)
    return RouteOptions(method=_enum(_METHODS, o.method, "options.method"),
                        normalisation=normalisation(o.normalisation),
                        granularity=_enum(_GRAN, o.granularity, "options.granularity"),
                        aggregation=_enum(_AGG, o.aggregation, "options.aggregation"),
                        top_k=top_k, temperature=temperature, candidates=candidates, lag_k=lag_k)


def route_response(d: Decision, *, names_by_id: Mapping[int, str], include_scores: bool,
                   timings: router_pb2.Timings) -> router_pb2.RouteResponse:
    resp = router_pb2.RouteResponse(
        choices=[router_pb2.Choice(name=c.name, adapter_id=c.adapter_id, score=c.score, weight=c.weight)
                 for c in d.choices],
        margin=d.margin, library_version=d.version, method=d.method, normalisation=d.normalisation,
        fallback=d.fallback, rechecked=d.rechecked, timings=timings)
    if d.tokens is not None:
        resp.tokens.adapter_ids.CopyFrom(encode_tensor(d.tokens.ids))
        resp.tokens.scores.CopyFrom(encode_tensor(d.tokens.scores))
    if include_scores:
        resp.scores.extend(router_pb2.Choice(name=names_by_id[int(i)], adapter_id=int(i), score=float(s))
                           for i, s in zip(d.candidate_ids, d.scores))
    return resp
