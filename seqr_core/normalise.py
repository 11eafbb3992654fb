"""Normalisation and aggregation: per-module energies -> one score per adapter (or per token).

Definitions (u is the normalised per-token, per-module score of adapter i on module m):
  none        u = e
  frobenius   u = e / ‖ΔW_im‖_F²                        (data-free)
  activation  u = e / μ_im, μ_im = calibration mean of e  (data-aware frobenius)
  zscore      adapter_module: u = (f(e) − μ^f_im) / σ^f_im
              adapter:        S_i = (Σ_m mean_t f(e) − μ^f_i) / σ^f_i
Sequence score S_i = mean over the supplied modules adapter i targets of mean_t u.
Token score S_ti = the same mean over modules, per token (adapter-level z: token stats).
Every function also carries an absolute error bound so routing can decide what to re-check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .calibration import LOG_FLOOR, TRANSFORMS, transform, transform_bound
from .energies import Energies
from .errors import FailedPreconditionError, InvalidArgumentError
from .qr_index import LibraryIndex
from .stacked import stacked

KINDS = ("none", "frobenius", "activation", "zscore")
GRANULARITIES = ("adapter_module", "adapter")


@dataclass(frozen=True)
class Normalisation:
    # The best measured label-free setting on real adapters (bench/results/evaluation.md: 95.1%
    # top-1 over 9 domains vs 54.9% frobenius); uncalibrated adapters fall back to frobenius.
    kind: str = "activation"
    granularity: str = "adapter_module"
    transform: str = "e"

    def __post_init__(self) -> None:
        for f, val, ok in (("kind", self.kind, KINDS), ("granularity", self.granularity, GRANULARITIES),
                           ("transform", self.transform, TRANSFORMS)):
            if val not in ok:
                raise InvalidArgumentError(f"must be one of {ok}", field=f"normalisation.{f}",
                                           actual=val)

    @property
    def label(self) -> str:
        if self.kind != "zscore":
            return self.kind
        return f"zscore/{self.granularity}/{self.transform}"

    @property
    def needs_calibration(self) -> bool:
        return self.kind in ("activation", "zscore")


def uncalibrated(index: LibraryIndex, ids: np.ndarray, modules, norm: Normalisation) -> list[str]:
    """Adapters among ``ids`` lacking the stats ``norm`` needs on the supplied ``modules``."""
    if not norm.needs_calibration or not len(ids):
        return []
    st = stacked(index)
    pos = index.positions(ids)
    rows = [st.row[m] for m in modules]
    if st.cal is None:
        bad = np.ones(pos.size, bool)
    else:
        need = st.present[np.ix_(rows, pos)]                                  # (Mr, n)
        bad = ~st.cal.calibrated[pos] | (need & ~st.cal.has[np.ix_(rows, pos)]).any(axis=0)
        bad |= ~_has_values(st.cal, norm, rows, pos, need)
    return [index.adapters[int(p)].name for p in pos[bad]]


def _has_values(cal, norm: Normalisation, rows, pos: np.ndarray, need: np.ndarray) -> np.ndarray:
    """(n,) whether the statistics ``norm`` reads are numbers: stats derived from pooled
    moments (calibration.derived_stats) hold transform e per module only, NaN elsewhere."""
    t = 0 if norm.kind == "activation" else TRANSFORMS.index(norm.transform)
    if norm.kind == "zscore" and norm.granularity == "adapter":
        return np.isfinite(cal.seq_mean[t, pos]) & np.isfinite(cal.seq_std[t, pos]) \
            & np.isfinite(cal.tok_mean[t, pos]) & np.isfinite(cal.tok_std[t, pos])
    arrays = [cal.mod_mean[t]] if norm.kind == "activation" else [cal.mod_mean[t], cal.mod_std[t]]
    ok = np.ones(pos.size, bool)
    for a in arrays:
        ok &= ~(need & ~np.isfinite(a[np.ix_(rows, pos)])).any(axis=0)
    return ok


def effective(index: LibraryIndex, norm: Normalisation, modules, ids: np.ndarray | None = None
              ) -> tuple[Normalisation, str]:
    """(the normalisation routing will apply, why it differs): a data-aware normalisation
    with any uncalibrated candidate falls back to frobenius, visibly."""
    ids = index.ids if ids is None else ids
    if norm.needs_calibration and ids.size:
        st = stacked(index)
        rows = [st.row[m] for m in modules]
        pos = index.positions(ids)
        targeted = ids[st.present[rows][:, pos].any(axis=0)]
        missing = uncalibrated(index, targeted, modules, norm)
        if missing:
            return Normalisation("frobenius"), f"uncalibrated adapters {missing[:8]}: fell back to frobenius"
    return norm, ""


def _module_constants(index: LibraryIndex, module: str, ids: np.ndarray, norm: Normalisation):
    """Per-column (offset μ, scale c, log floor δ) so u = (f(e) − μ)/c."""
    st = stacked(index)
    k, pos = st.row[module], index.positions(ids)
    f2 = st.frob2[k, pos]
    delta = LOG_FLOOR * f2 + 1e-30
    mu, c = np.zeros(pos.size), np.ones(pos.size)
    if norm.kind == "frobenius":
        c = np.maximum(f2, 1e-30)
    elif norm.kind == "activation":
        c = np.maximum(st.cal.mod_mean[0, k, pos], 1e-30)
    elif norm.kind == "zscore" and norm.granularity == "adapter_module":
        t = TRANSFORMS.index(norm.transform)
        mu, c = st.cal.mod_mean[t, k, pos], st.cal.mod_std[t, k, pos]
    return mu, c, delta


def _check_pooled(norm: Normalisation, module: str) -> None:
    if norm.kind == "zscore" and norm.transform != "e":
        raise InvalidArgumentError("moments give the token mean of e only; "
                                   f"zscore of {norm.transform} needs activations or projected",
                                   field=f"inputs.{module}.moments", actual=norm.transform)


def combine(index: LibraryIndex, blocks: Mapping[str, Energies], ids: np.ndarray,
            norm: Normalisation, *, per_token: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scores and bounds for adapters ``ids`` (library order): (N,) or (T, N) if per_token.

    Adapters absent from every block get NaN (not routable for this request).
    """
    T = None
    for m, en in blocks.items():
        if per_token and en.pooled:
            raise InvalidArgumentError("per-token routing needs per-token inputs, not moments",
                                       field=f"inputs.{m}.moments")
        if not en.pooled:
            T = en.e.shape[0]
    shape = (T, ids.size) if per_token else (ids.size,)
    S, B, cnt = np.zeros(shape), np.zeros(shape), np.zeros(ids.size)
    adapter_level = norm.kind == "zscore" and norm.granularity == "adapter"
    t = norm.transform if norm.kind == "zscore" else "e"
    for m, en in sorted(blocks.items()):
        sub = en.take(np.isin(en.ids, ids))
        if not sub.ids.size:
            continue
        cols = np.searchsorted(ids, sub.ids)
        if en.pooled:
            _check_pooled(norm, m)
        mu, c, delta = _module_constants(index, m, sub.ids, norm)
        if t == "e" and not per_token:
            # Linear in e: the token mean and its bound come from column sums (O(T·n), one pass).
            T = sub.e.shape[0]
            e_sum = sub.e.sum(axis=0, dtype=np.float64)                   # (n,)
            fe = e_sum / T
            fb = sub.bound_mean(e_sum) if sub.tracked else np.zeros_like(fe)
        else:
            e = np.maximum(sub.e.astype(np.float64), 0.0)                 # (T, n)
            b = sub.bound_dense() if sub.tracked else np.zeros_like(e)
            fe, fb = transform(e, t, delta), transform_bound(e, b, t, delta)
            if not per_token:
                fe, fb = fe.mean(axis=0), fb.mean(axis=0)
        if not adapter_level:
            fe, fb = (fe - mu) / c, fb / c
        S[..., cols] += fe
        B[..., cols] += fb
        cnt[cols] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        if adapter_level:
            st, t = stacked(index), TRANSFORMS.index(norm.transform)
            pos = index.positions(ids)
            mean = (st.cal.tok_mean if per_token else st.cal.seq_mean)[t, pos]
            sd = (st.cal.tok_std if per_token else st.cal.seq_std)[t, pos]
            S, B = (S - mean) / sd, B / sd
        else:
            S, B = S / cnt, B / cnt
    S[..., cnt == 0] = np.nan
    B[..., cnt == 0] = np.nan
    return S, B


def check_adapter_level_modules(index: LibraryIndex, ids: np.ndarray, modules) -> None:
    """Adapter-level z-scores compare sums over modules: the request must cover the same set."""
    st = stacked(index)
    pos = index.positions(ids)
    supplied = np.zeros(len(st.modules), bool)
    supplied[[st.row[m] for m in modules]] = True
    targeted = st.present[:, pos] & supplied[:, None]                         # (M, n)
    differs = (targeted != st.cal.has[:, pos]).any(axis=0) & targeted.any(axis=0)
    if differs.any():
        j = int(np.flatnonzero(differs)[0])
        name = index.adapters[int(pos[j])].name
        raise FailedPreconditionError(
            f"adapter-level zscore for {name!r} was calibrated on {int(st.cal.has[:, pos[j]].sum())} "
            "modules; the request must supply the same modules", field="inputs",
            limit=int(st.cal.has[:, pos[j]].sum()), actual=int(targeted[:, j].sum()))
