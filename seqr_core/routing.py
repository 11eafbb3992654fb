"""Routing decisions: inputs + options -> ranked adapter choices, exact w.r.t. float64.

One pipeline for every backend: ``plan`` (validate, resolve candidates and the effective
normalisation) -> scores and bounds (``numpy_scores`` here; the ONNX backend supplies its
own) -> ``decide`` (rank; the candidates whose order or top-k membership the bounds leave in
doubt are re-scored in float64 from the index, so the returned ranking equals the float64
ranking; ties break by adapter id, older first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from . import baselines as BL
from . import energies as E
from .batched import sequence_scores, token_scores
from .errors import FailedPreconditionError, InvalidArgumentError
from .normalise import (Normalisation, check_adapter_level_modules, combine, fallback_text, targeted,
                        uncalibrated)
from .qr_index import LibraryIndex
from .ranking import exact_rank, order, token_ranks

METHODS = ("seqr", "exact", "spectr", "arrow", "lag")
GRANULARITY = ("sequence", "token")
AGGREGATION = ("mean", "vote")


@dataclass(frozen=True)
class RouteOptions:
    method: str = "seqr"
    normalisation: Normalisation = Normalisation()
    granularity: str = "sequence"
    aggregation: str = "mean"
    top_k: int = 1
    temperature: float = 1.0
    candidates: tuple[str, ...] | None = None
    lag_k: int = 4
    verify: bool = True

    def __post_init__(self) -> None:
        for f, val, ok in (("method", self.method, METHODS), ("granularity", self.granularity, GRANULARITY),
                           ("aggregation", self.aggregation, AGGREGATION)):
            if val not in ok:
                raise InvalidArgumentError(f"must be one of {ok}", field=f"options.{f}", actual=val)
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise InvalidArgumentError("top_k must be >= 1", field="top_k", limit=">=1", actual=self.top_k)
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise InvalidArgumentError("temperature must be finite and > 0", field="temperature",
                                       actual=self.temperature)
        if self.lag_k < 1:
            raise InvalidArgumentError("lag_k must be >= 1", field="lag_k", actual=self.lag_k)
        if self.method == "arrow" and self.normalisation.kind != "none":
            raise InvalidArgumentError("arrow scores |v₁ᵀx| are scale-free; use normalisation none",
                                       field="normalisation.kind", limit="none",
                                       actual=self.normalisation.kind)


@dataclass(frozen=True)
class Choice:
    name: str
    adapter_id: int
    score: float
    weight: float


@dataclass(frozen=True)
class TokenDecisions:
    ids: np.ndarray      # (T, k) adapter ids, -1 where fewer than k candidates
    scores: np.ndarray   # (T, k)
    bounds: np.ndarray | None = None   # (T,) every token-t score is within ±bounds[t] of float64


@dataclass(frozen=True)
class Decision:
    choices: tuple[Choice, ...]
    margin: float
    version: int
    method: str
    normalisation: str
    fallback: str
    rechecked: int
    candidate_ids: np.ndarray      # (N,) adapters considered, library order
    scores: np.ndarray             # (N,) their sequence scores (NaN: no supplied module)
    tokens: TokenDecisions | None = None
    bounds: np.ndarray | None = None   # (N,) |scores − float64 score| ≤ bounds (0: re-checked)


def _module_dims(index: LibraryIndex) -> dict:
    """{module: (d_in, shared-A rank or 0)}, per snapshot."""
    return index.memo("dims", lambda: {m: (d, index.layout.rank(m)) for m, d in index.layout.d_in.items()})


def check_inputs(index: LibraryIndex, inputs: Mapping[str, E.ModuleInput]) -> dict[str, E.ModuleInput]:
    """Validate shapes, forms and values; return float32 copies. Names the offending field."""
    if not inputs:
        raise InvalidArgumentError("at least one module input is required", field="inputs",
                                   limit=">=1", actual=0)
    dims = _module_dims(index)
    out, T = {}, None
    for m, inp in sorted(inputs.items()):
        form, data = inp.form, inp.data
        d_in, r = dims.get(m, (None, 0))
        if d_in is None:
            raise InvalidArgumentError(f"unknown module for base model {index.signature.base_model!r}",
                                       field=f"inputs.{m}", actual=m)
        if form not in E.FORMS:
            raise InvalidArgumentError(f"form must be one of {E.FORMS}", field=f"inputs.{m}", actual=form)
        data = data if isinstance(data, np.ndarray) else np.asarray(data)
        if data.dtype.kind != "f":
            raise InvalidArgumentError("tensor must be floating point", field=f"inputs.{m}.{form}",
                                       actual=str(data.dtype))
        if form != "activations" and not r:
            raise InvalidArgumentError("module has no shared A; send activations",
                                       field=f"inputs.{m}.{form}", limit="activations", actual=form)
        rows, cols = (r, r) if form == "moments" else (None, d_in if form == "activations" else r)
        if data.ndim != 2 or (rows is not None and data.shape[0] != rows) or data.shape[1] != cols \
                or data.shape[0] < 1:
            raise InvalidArgumentError("wrong shape", field=f"inputs.{m}.{form}.shape",
                                       limit=("T" if rows is None else rows, cols), actual=data.shape)
        tokens = int(inp.tokens) if form == "moments" else data.shape[0]
        if tokens < 1:
            raise InvalidArgumentError("token count must be >= 1", field=f"inputs.{m}.tokens", actual=tokens)
        if form != "moments":
            if T is not None and T != data.shape[0]:
                raise InvalidArgumentError("all per-token inputs need the same token count",
                                           field=f"inputs.{m}.{form}.shape", limit=T, actual=data.shape[0])
            T = data.shape[0]
        data32 = np.ascontiguousarray(data, dtype=np.float32)
        same = data32 is inp.data and tokens == inp.tokens
        out[m] = inp if same else E.ModuleInput(form=form, data=data32, tokens=tokens)
    _check_finite(out)
    return out


def _check_finite(inputs: Mapping[str, E.ModuleInput]) -> None:
    # A sum is finite only if every term is: one pass per distinct tensor, no temporary. A
    # non-finite sum (a NaN/Inf, or a finite overflow) sends it to the exact per-module search.
    arrays = {id(i.data): i.data for i in inputs.values()}
    with np.errstate(over="ignore", invalid="ignore"):
        if all(np.isfinite(a.sum()) for a in arrays.values()):
            return
    for m, inp in sorted(inputs.items()):
        if not np.isfinite(inp.data).all():
            raise InvalidArgumentError("non-finite values (NaN/Inf)", field=f"inputs.{m}.{inp.form}")


def candidate_ids(index: LibraryIndex, candidates) -> np.ndarray:
    if candidates is None:
        return index.ids
    if len(candidates) == 0:
        raise InvalidArgumentError("candidates, when given, must name at least one adapter",
                                   field="candidates", limit=">=1", actual=0)
    ids = {index.entry(n, field="candidates").adapter_id for n in candidates}
    return np.array(sorted(ids), dtype=np.int64)


@dataclass(frozen=True)
class Plan:
    """What one request needs, settled before any scoring (shared by every backend)."""

    index: LibraryIndex
    inputs: Mapping[str, E.ModuleInput]     # validated, float32
    options: RouteOptions
    ids: np.ndarray                         # candidate ids, library order
    norm: Normalisation                     # effective (after the uncalibrated fallback)
    fallback: str
    per_token: bool
    token_mean: bool                        # sequence routing, linear normalisation: only mean_t e

    @property
    def verify(self) -> bool:
        return self.options.verify and self.options.method == "seqr"


@dataclass(frozen=True)
class Scores:
    """A backend's answer: scores of candidates ``ids`` — (n,), or (T, n) per token — and
    bounds: the same shape, (T,) per token uniform over adapters, or None (not tracked)."""

    ids: np.ndarray
    S: np.ndarray
    B: np.ndarray | None


def plan(index: LibraryIndex, inputs: Mapping[str, E.ModuleInput],
         options: RouteOptions = RouteOptions()) -> Plan:
    """Validate a request and settle candidates and normalisation. Raises what routing raises."""
    inputs = check_inputs(index, inputs)
    if not index.adapters:       # also what a caller who may see none of them gets
        raise FailedPreconditionError(f"library {index.name!r} has no adapters to route to; upload one "
                                      "first (PutAdapter, `seqr adapters put`)", field="library",
                                      actual=index.name)
    ids = candidate_ids(index, options.candidates)
    norm, fallback = options.normalisation, ""
    tgt = targeted(index, ids, inputs)
    if not tgt.size:
        raise InvalidArgumentError("no candidate adapter targets any supplied module",
                                   field="inputs", actual=sorted(inputs)[:4])
    missing = uncalibrated(index, tgt, inputs, norm, first=8)
    if missing:
        fallback, norm = fallback_text(missing), Normalisation("frobenius")
    elif norm.kind == "zscore" and norm.granularity == "adapter":
        check_adapter_level_modules(index, tgt, inputs)
    per_token = options.granularity == "token" or options.aggregation == "vote"
    if per_token:
        for m, inp in sorted(inputs.items()):
            if inp.pooled:
                raise InvalidArgumentError("per-token routing needs per-token inputs, not moments",
                                           field=f"inputs.{m}.moments")
    # Sequence routing with a normalisation linear in e needs only mean_t e: the cheap path.
    linear = norm.kind != "zscore" or norm.transform == "e"
    return Plan(index=index, inputs=inputs, options=options, ids=ids, norm=norm, fallback=fallback,
                per_token=per_token, token_mean=linear and not per_token)


def _energy_fn(index: LibraryIndex, method: str, *, token_mean: bool = False) -> Callable:
    if method == "seqr":
        return lambda m, inp, allowed: E.seqr_energies(index, m, inp, allowed=allowed,
                                                       field=f"inputs.{m}", token_mean=token_mean)
    fn = {"exact": BL.exact_energies, "spectr": BL.spectr_energies, "arrow": BL.arrow_energies,
          "lag": BL.spectr_energies}[method]
    return lambda m, inp, allowed: fn(index, m, inp, allowed=allowed, field=f"inputs.{m}")


def numpy_scores(p: Plan) -> Scores:
    """The numpy backend: batched paths where the request qualifies, per module otherwise."""
    index, inputs, ids, norm, method = p.index, p.inputs, p.ids, p.norm, p.options.method
    if method == "lag":
        arrow = _energy_fn(index, "arrow")
        Sa, _ = combine(index, {m: arrow(m, inp, ids) for m, inp in inputs.items()}, ids,
                        Normalisation("none"), per_token=False)
        ids = np.sort(ids[order(Sa, ids)[: max(p.options.lag_k, p.options.top_k)]])
    if method == "seqr" and p.token_mean:
        got = sequence_scores(index, inputs, ids, norm)
        if got is not None:
            return Scores(ids, *got)
    if method == "seqr" and p.per_token and (norm.kind != "zscore" or norm.transform == "e"):
        got = token_scores(index, inputs, ids, norm)
        if got is not None:
            return Scores(ids, *got)
    energy = _energy_fn(index, method, token_mean=p.token_mean)
    S, B = combine(index, {m: energy(m, inp, ids) for m, inp in inputs.items()}, ids, norm,
                   per_token=p.per_token)
    return Scores(ids, S, B if method == "seqr" else None)


def exact_scores(p: Plan, ids: np.ndarray, tokens: np.ndarray | None = None) -> np.ndarray:
    """Float64 scores of adapters ``ids`` from the index (the re-check): (n,), or
    (len(tokens), n) per token."""
    blocks = {}
    for m, inp in p.inputs.items():
        here = ids[np.isin(ids, p.index.module_ids(m))]
        e = E.recheck_f64(p.index, m, inp, here, tokens=tokens, token_mean=p.token_mean)
        blocks[m] = E.Energies(ids=here, e=e, pooled=inp.pooled or p.token_mean)
    s, _ = combine(p.index, blocks, ids, p.norm, per_token=tokens is not None)
    return s


def decide(p: Plan, sc: Scores) -> Decision:
    """Rank exactly: settle what the bounds settle, re-check the rest in float64."""
    o, ids, index = p.options, sc.ids, p.index
    tokens, bounds = None, sc.B
    check = sc.B if p.verify else None            # unverified: fp32 order, bounds only reported
    if p.per_token:
        S_t = sc.S
        tid, tsc, rechecked, tb = token_ranks(S_t, check, ids, o.top_k,
                                              lambda pos, t: exact_scores(p, ids[pos], t))
        T = S_t.shape[0]
        valid = ~np.isnan(S_t[0]) if T else np.zeros(ids.size, bool)
        if tb is None and sc.B is not None:       # unverified: the bounds as the scorer gave them
            tb = sc.B if sc.B.ndim == 1 else np.where(valid, sc.B, 0.0).max(axis=1, initial=0.0)
        tokens, bounds = TokenDecisions(ids=tid, scores=tsc, bounds=tb), None
        votes = np.bincount(np.searchsorted(ids, tid[:, 0][tid[:, 0] >= 0]), minlength=ids.size)
        mean_s = S_t.mean(axis=0) if T else np.zeros(ids.size)
        S = np.where(valid, votes / max(T, 1), np.nan)
        ordr = np.flatnonzero(valid)[np.lexsort((ids[valid], -mean_s[valid], -S[valid]))][: max(o.top_k, 2)]
    else:
        ordr, S, checked, rechecked = exact_rank(sc.S, check, ids, o.top_k,
                                                 lambda R: exact_scores(p, ids[R]))
        bounds = checked if check is not None else sc.B
    top = ordr[: o.top_k]
    sc_top = S[top]
    w = np.exp((sc_top - sc_top.max()) / o.temperature) if sc_top.size else sc_top
    w = w / w.sum() if sc_top.size else w
    lib_pos = index.positions(ids[top])
    choices = tuple(Choice(name=index.adapters[int(q)].name, adapter_id=int(ids[i]), score=float(S[i]),
                           weight=float(wi)) for i, q, wi in zip(top, lib_pos, w))
    margin = float(S[ordr[0]] - S[ordr[1]]) if ordr.size > 1 else float("inf")
    return Decision(choices=choices, margin=margin, version=index.version, method=o.method,
                    normalisation=p.norm.label, fallback=p.fallback, rechecked=rechecked,
                    candidate_ids=ids, scores=S, tokens=tokens, bounds=bounds)


def route(index: LibraryIndex, inputs: Mapping[str, E.ModuleInput],
          options: RouteOptions = RouteOptions()) -> Decision:
    """Rank the candidate adapters for one request. See the module docstring for exactness."""
    p = plan(index, inputs, options)
    return decide(p, numpy_scores(p))
