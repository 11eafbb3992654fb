"""Routing decisions: inputs + options -> ranked adapter choices, exact w.r.t. float64.

The float32 scores come with error bounds; the candidates whose order (or top-k membership)
those bounds leave in doubt are re-scored with the float64 brute force, so the returned
ranking equals the float64 brute-force ranking. Ties break by adapter id (older first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from . import energies as E
from .errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from .normalise import Normalisation, check_adapter_level_modules, combine, uncalibrated
from .fused import fused_scores
from .qr_index import LibraryIndex
from .stacked import stacked, subset

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


def _module_dims(index: LibraryIndex) -> dict:
    """{module: (d_in, shared-A rank or 0)}, per snapshot."""
    with index._lock:  # type: ignore[attr-defined]
        dims = index._cache.get("dims")  # type: ignore[attr-defined]
        if dims is None:
            dims = {s.name: (s.d_in, index.shared_a[s.name].shape[0] if s.name in index.shared_a else 0)
                    for s in index.signature.modules}
            index._cache["dims"] = dims  # type: ignore[attr-defined]
        return dims


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
    # One pass over all tensors (many small moments matrices cost one call, not sixty);
    # the per-module search runs only when something is wrong, to name the field.
    arrays = {id(i.data): i.data for i in inputs.values()}
    if np.isfinite(np.concatenate([a.ravel() for a in arrays.values()])).all():
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


def _energy_fn(index: LibraryIndex, method: str, *, token_mean: bool = False) -> Callable:
    if method == "seqr":
        return lambda m, inp, allowed: E.seqr_energies(index.modules[m], inp, allowed=allowed,
                                                       field=f"inputs.{m}", token_mean=token_mean)
    fn = {"exact": E.exact_energies, "spectr": E.spectr_energies, "arrow": E.arrow_energies,
          "lag": E.spectr_energies}[method]
    return lambda m, inp, allowed: fn(index, m, inp, allowed=allowed, field=f"inputs.{m}")


def _uncertain(S: np.ndarray, B: np.ndarray, ids: np.ndarray, kk: int) -> np.ndarray | None:
    """Positions whose top-kk membership/order the bounds leave open; None if all certain."""
    valid = ~np.isnan(S)
    lower, upper = np.where(valid, S - B, -np.inf), np.where(valid, S + B, -np.inf)
    Lk = np.sort(lower)[-kk]
    R = np.flatnonzero(valid & (upper >= Lk))
    if R.size == kk:
        o = R[np.argsort(-S[R], kind="stable")]
        if np.all(lower[o[:-1]] > upper[o[1:]]):
            return None
    return R


TIE_RTOL = 1e-12  # float64 scores this close are ties: different exact formulas disagree there


def _order(S: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions by score descending; scores within TIE_RTOL (relative) tie and go by id."""
    valid = np.flatnonzero(~np.isnan(S))
    o = valid[np.lexsort((ids[valid], -S[valid]))]
    if o.size < 2:
        return o
    tol = TIE_RTOL * float(np.abs(S[o]).max())
    groups = np.concatenate([[0], np.cumsum(np.diff(S[o]) < -tol)])  # new group on a real drop
    return o[np.lexsort((ids[o], groups))]


def _exact_rank(S, B, ids, k, recheck) -> tuple[np.ndarray, np.ndarray, int]:
    """(order of positions, scores with re-checked entries exact, number re-checked)."""
    S = S.copy()
    nvalid = int((~np.isnan(S)).sum())
    kk = min(max(k, 2), nvalid)
    n = 0
    if B is not None and kk > 0:
        R = _uncertain(S, B, ids, kk)
        if R is not None:
            S[R] = recheck(R)
            n = R.size
    return _order(S, ids), S, n


def route(index: LibraryIndex, inputs: Mapping[str, E.ModuleInput],
          options: RouteOptions = RouteOptions()) -> Decision:
    """Rank the candidate adapters for one request. See the module docstring for exactness."""
    inputs = check_inputs(index, inputs)
    if not index.adapters:       # also what a caller who may see none of them gets
        raise FailedPreconditionError(f"library {index.name!r} has no adapters to route to; upload one "
                                      "first (PutAdapter, `seqr adapters put`)", field="library",
                                      actual=index.name)
    ids = candidate_ids(index, options.candidates)
    norm, fallback = options.normalisation, ""
    st = stacked(index)
    hit = subset(st, tuple(sorted(inputs, key=st.row.__getitem__))).hit   # (N,) targets a supplied module
    targeted = ids[hit if ids.size == st.ids.size else hit[index.positions(ids)]]
    if not targeted.size:
        raise InvalidArgumentError("no candidate adapter targets any supplied module",
                                   field="inputs", actual=sorted(inputs)[:4])
    missing = uncalibrated(index, targeted, inputs, norm)
    if missing:
        fallback = f"uncalibrated adapters {missing[:8]}: fell back to frobenius"
        norm = Normalisation("frobenius")
    elif norm.kind == "zscore" and norm.granularity == "adapter":
        check_adapter_level_modules(index, targeted, inputs)
    per_token = options.granularity == "token" or options.aggregation == "vote"
    # Sequence routing with a normalisation linear in e needs only mean_t e: the cheap path.
    linear = norm.kind != "zscore" or norm.transform == "e"
    energy = _energy_fn(index, options.method, token_mean=linear and not per_token)
    method = options.method
    if method == "lag":
        arrow = _energy_fn(index, "arrow")
        ab = {m: arrow(m, inp, ids) for m, inp in inputs.items()}
        Sa, _ = combine(index, ab, ids, Normalisation("none"), per_token=False)
        keep = _order(Sa, ids)[: max(options.lag_k, options.top_k)]
        ids = np.sort(ids[keep])
    token_mean = linear and not per_token
    fused = fused_scores(index, inputs, ids, norm) if method == "seqr" and token_mean else None
    blocks = {m: energy(m, inp, ids) for m, inp in inputs.items()} if fused is None else None
    verify = options.verify and method == "seqr"

    def exact_scores(pos: np.ndarray, tokens=None) -> np.ndarray:
        sub = ids[pos]
        fb = {}
        for m, inp in inputs.items():
            here = sub[_present(index, m, sub)]
            e = E.brute_force_f64(index, m, inp, here, tokens=tokens, token_mean=token_mean)
            fb[m] = E.Energies(ids=here, e=e, pooled=inp.pooled or token_mean)
        s, _ = combine(index, fb, sub, norm, per_token=tokens is not None)
        return s[0] if tokens is not None else s

    tokens = None
    rechecked = 0
    if per_token:
        S_t, B_t = combine(index, blocks, ids, norm, per_token=True)     # (T, N)
        T, k = S_t.shape[0], min(options.top_k, ids.size)
        tid, tsc = np.full((T, k), -1, np.int64), np.full((T, k), np.nan)
        for t in range(T):
            o, s, n = _exact_rank(S_t[t], B_t[t] if verify else None, ids, k,
                                  lambda R, t=t: exact_scores(R, tokens=np.array([t])))
            rechecked += n
            tid[t, : min(k, o.size)] = ids[o[:k]]
            tsc[t, : min(k, o.size)] = s[o[:k]]
        tokens = TokenDecisions(ids=tid, scores=tsc)
        votes = np.array([(tid[:, 0] == i).sum() for i in ids], dtype=np.float64)
        mean_s = np.nanmean(S_t, axis=0) if T else np.zeros(ids.size)
        valid = ~np.isnan(S_t).all(axis=0)
        S = np.where(valid, votes / max(T, 1), np.nan)
        order = np.flatnonzero(valid)[np.lexsort((ids[valid], -mean_s[valid], -S[valid]))]
    else:
        S, B = fused if fused is not None else combine(index, blocks, ids, norm, per_token=False)
        order, S, rechecked = _exact_rank(S, B if verify else None, ids, options.top_k,
                                          lambda R: exact_scores(R))
    top = order[: options.top_k]
    sc = S[top]
    w = np.exp((sc - sc.max()) / options.temperature) if sc.size else sc
    w = w / w.sum() if sc.size else w
    lib_pos = index.positions(ids[top])
    choices = tuple(Choice(name=index.adapters[int(q)].name, adapter_id=int(ids[p]), score=float(S[p]),
                           weight=float(wi)) for p, q, wi in zip(top, lib_pos, w))
    margin = float(S[order[0]] - S[order[1]]) if order.size > 1 else float("inf")
    return Decision(choices=choices, margin=margin, version=index.version, method=method,
                    normalisation=norm.label, fallback=fallback, rechecked=rechecked,
                    candidate_ids=ids, scores=S, tokens=tokens)


def _present(index: LibraryIndex, module: str, ids: np.ndarray) -> np.ndarray:
    return np.isin(ids, index.modules[module].ids)
