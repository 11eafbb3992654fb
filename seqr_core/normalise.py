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


def uncalibrated(index: LibraryIndex, ids: np.ndarray, modules, norm: Normalisation, *,
                 first: int | None = None) -> list[str]:
    """Adapters among ``ids`` lacking the stats ``norm`` needs on the supplied ``modules``
    (only the ``first`` few names, when that is all the caller shows)."""
    if not norm.needs_calibration or not len(ids):
        return []
    pos = index.positions(ids)
    if index.cal_columns is None:
        bad = np.ones(pos.size, bool)
    else:
        slots = index.slots[pos]
        rows = np.array([index.layout.row[m] for m in modules])
        need = index.table("present")[np.ix_(rows, slots)]                       # (Mr, n)
        has = index.cal_table("has")[np.ix_(rows, slots)]
        bad = ~index.cal_table("calibrated")[slots] | (need & ~has).any(axis=0)
        bad |= ~_has_values(index, norm, rows, slots, need)
    return [index.adapters[int(p)].name for p in pos[bad][:first]]


def targeted(index: LibraryIndex, ids: np.ndarray, modules) -> np.ndarray:
    """The candidates among ``ids`` that target at least one of ``modules``."""
    rows = np.array([index.layout.row[m] for m in modules])
    present = index.table("present")
    if ids.size == index.ids.size and index.compact:
        return ids[present[rows].any(axis=0)]
    return ids[present[np.ix_(rows, index.slots_of(ids))].any(axis=0)]


def _has_values(index: LibraryIndex, norm: Normalisation, rows, slots: np.ndarray, need: np.ndarray) -> np.ndarray:
    """(n,) whether the statistics ``norm`` reads are numbers: stats derived from pooled
    moments (calibration.derived_stats) hold transform e per module only, NaN elsewhere."""
    t = 0 if norm.kind == "activation" else TRANSFORMS.index(norm.transform)
    if norm.kind == "zscore" and norm.granularity == "adapter":
        return np.all([np.isfinite(index.cal_table(k)[t, slots])
                       for k in ("seq_mean", "seq_std", "tok_mean", "tok_std")], axis=0)
    keys = ("mod_mean",) if norm.kind == "activation" else ("mod_mean", "mod_std")
    ok = np.ones(slots.size, bool)
    for k in keys:
        ok &= ~(need & ~np.isfinite(index.cal_table(k)[t][np.ix_(rows, slots)])).any(axis=0)
    return ok


def effective(index: LibraryIndex, norm: Normalisation, modules, ids: np.ndarray | None = None
              ) -> tuple[Normalisation, str]:
    """(the normalisation routing will apply, why it differs): a data-aware normalisation
    with any uncalibrated candidate falls back to frobenius, visibly."""
    ids = index.ids if ids is None else ids
    if norm.needs_calibration and ids.size:
        missing = uncalibrated(index, targeted(index, ids, modules), modules, norm, first=8)
        if missing:
            return Normalisation("frobenius"), fallback_text(missing)
    return norm, ""


def fallback_text(missing: list[str]) -> str:
    return f"uncalibrated adapters {missing[:8]}: fell back to frobenius"


def affine(index: LibraryIndex, sel, norm: Normalisation):
    """(μ, c) with u = (f(e) − μ)/c for the (module, slot) table entries ``sel`` selects —
    the one definition every scorer (per module, batched, ONNX export) normalises with."""
    mu, c = 0.0, 1.0
    if norm.kind == "frobenius":
        c = np.maximum(index.table("frob2")[sel], 1e-30)
    elif norm.kind == "activation":
        c = np.maximum(index.cal_table("mod_mean")[0][sel], 1e-30)
    elif norm.kind == "zscore" and norm.granularity == "adapter_module":
        t = TRANSFORMS.index(norm.transform)
        mu, c = index.cal_table("mod_mean")[t][sel], index.cal_table("mod_std")[t][sel]
    return mu, c


def module_constants(index: LibraryIndex, module: str, slots: np.ndarray, norm: Normalisation):
    """Per-column (offset μ, scale c, log floor δ) so u = (f(e) − μ)/c, for adapter ``slots``."""
    k = index.layout.row[module]
    mu, c = affine(index, (k, slots), norm)
    delta = LOG_FLOOR * index.table("frob2")[k, slots] + 1e-30
    return np.broadcast_to(mu, slots.shape), np.broadcast_to(c, slots.shape), delta


def adapter_stats(index: LibraryIndex, slots: np.ndarray, norm: Normalisation, *, per_token: bool):
    """Adapter-level zscore (μ_i, σ_i) of ``slots``: token stats per token, else sequence stats."""
    t = TRANSFORMS.index(norm.transform)
    key = "tok" if per_token else "seq"
    return index.cal_table(f"{key}_mean")[t, slots], index.cal_table(f"{key}_std")[t, slots]


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
        mu, c, delta = module_constants(index, m, index.slots_of(sub.ids), norm)
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
            mean, sd = adapter_stats(index, index.slots_of(ids), norm, per_token=per_token)
            S, B = (S - mean) / sd, B / sd
        else:
            S, B = S / cnt, B / cnt
    S[..., cnt == 0] = np.nan
    B[..., cnt == 0] = np.nan
    return S, B


def check_adapter_level_modules(index: LibraryIndex, ids: np.ndarray, modules) -> None:
    """Adapter-level z-scores compare sums over modules: the request must cover the same set."""
    slots = index.slots_of(ids)
    supplied = np.zeros(len(index.layout.modules), bool)
    supplied[[index.layout.row[m] for m in modules]] = True
    has = index.cal_table("has")[:, slots]
    tgt = index.table("present")[:, slots] & supplied[:, None]                 # (M, n)
    differs = (tgt != has).any(axis=0) & tgt.any(axis=0)
    if differs.any():
        j = int(np.flatnonzero(differs)[0])
        name = index.adapters[int(index.positions(ids[j:j + 1])[0])].name
        raise FailedPreconditionError(
            f"adapter-level zscore for {name!r} was calibrated on {int(has[:, j].sum())} "
            "modules; the request must supply the same modules", field="inputs",
            limit=int(has[:, j].sum()), actual=int(tgt[:, j].sum()))
