"""Per-snapshot tables stacked across modules, so routing is a few array ops, not a Python loop.

Built once per LibraryIndex snapshot (lazily, cached on it):
  rows of a (M, N) table are the signature's modules, columns the library's adapters.
  - frob2, present, shared: ‖ΔW‖_F², whether the adapter targets the module, on the shared-A path
  - W[m]: (K, N) float64 Gram weights (zeros where not shared) — e_mean = feat(ZᵀZ/T)·W[m]
  - calibration means/stds per transform, per (module, adapter) and per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .calibration import TRANSFORMS
from .qr_index import LibraryIndex, gram_weights


@dataclass(frozen=True)
class CalTable:
    has: np.ndarray        # (M, N) bool: stats exist for (module, adapter)
    mod_mean: np.ndarray   # (3, M, N)
    mod_std: np.ndarray    # (3, M, N)
    seq_mean: np.ndarray   # (3, N)
    seq_std: np.ndarray    # (3, N)
    tok_mean: np.ndarray   # (3, N)
    tok_std: np.ndarray    # (3, N)
    calibrated: np.ndarray  # (N,) bool
    modules: tuple         # per adapter: frozenset of calibrated module rows


@dataclass(frozen=True)
class Stacked:
    modules: tuple[str, ...]
    row: dict
    ids: np.ndarray            # (N,)
    frob2: np.ndarray          # (M, N)
    present: np.ndarray        # (M, N) bool
    shared: np.ndarray         # (M, N) bool
    W: tuple                   # per row: (K, N) float64, or None without a shared A
    W3: np.ndarray | None      # (Ms, K, N) the shared-A modules' W stacked, when they share one rank
    w3_row: np.ndarray         # (M,) row of each module in W3, -1 without a shared A
    Wnorm: np.ndarray          # (M, N) ‖W[m][:, i]‖
    rf2: np.ndarray            # (M, N) ‖R‖_F²
    cal: CalTable | None
    subsets: dict = field(default_factory=dict, compare=False, repr=False)   # see subset()


@dataclass(frozen=True)
class Subset:
    """The tables restricted to one set of supplied modules (rows in signature order), all
    adapters: a model host sends the same modules on every request, so routing slices once."""

    rows: np.ndarray           # (Mr,)
    present: np.ndarray        # (Mr, N)
    hit: np.ndarray            # (N,) the adapter targets one of the modules
    fused: bool                # every row has a shared A of one rank and only shared adapters
    W: np.ndarray | None       # (Mr, K, N) when fused
    Wnorm: np.ndarray          # (Mr, N)
    rf2: np.ndarray            # (Mr, N)
    frob2: np.ndarray          # (Mr, N)


_MAX_SUBSETS = 32


def subset(st: Stacked, modules: tuple[str, ...]) -> Subset:
    """``st`` restricted to ``modules`` (given in signature order); cached per snapshot."""
    sub = st.subsets.get(modules)
    if sub is None:
        rows = np.array([st.row[m] for m in modules], dtype=np.intp)
        present = st.present[rows]
        has_w = all(st.W[k] is not None for k in rows.tolist())
        fused = (has_w and len({st.W[k].shape[0] for k in rows.tolist()}) == 1
                 and not (present & ~st.shared[rows]).any())
        W = None
        if fused:
            W = (st.W3[st.w3_row[rows]] if st.W3 is not None else np.stack([st.W[k] for k in rows.tolist()]))
        sub = Subset(rows=rows, present=present, hit=present.any(axis=0), fused=fused, W=W,
                     Wnorm=st.Wnorm[rows], rf2=st.rf2[rows], frob2=st.frob2[rows])
        for a in (sub.present, sub.hit, sub.Wnorm, sub.rf2, sub.frob2, *([W] if W is not None else [])):
            a.setflags(write=False)
        if len(st.subsets) >= _MAX_SUBSETS:      # an unusual mix of module sets: start over
            st.subsets.clear()
        st.subsets[modules] = sub
    return sub


def _std(n, m2):
    return np.where(n > 1, np.sqrt(np.maximum(m2, 0) / np.maximum(n - 1, 1)), 0.0)


def _cal_table(index: LibraryIndex, row: dict, N: int) -> CalTable | None:
    cal = index.calibration
    if cal is None:
        return None
    M = len(row)
    has = np.zeros((M, N), bool)
    mod = np.zeros((3, 3, M, N))          # (stat n/mean/M2, transform, M, N)
    seq, tok = np.zeros((3, 3, N)), np.zeros((3, 3, N))
    calibrated = np.zeros(N, bool)
    mods = []
    for p, entry in enumerate(index.adapters):
        st = cal.get(entry.name)
        if st is None:
            mods.append(frozenset())
            continue
        calibrated[p] = True
        rows = frozenset(row[m] for m in st.modules)
        mods.append(rows)
        for m, arr in st.module_stats.items():
            has[row[m], p] = True
            mod[:, :, row[m], p] = np.asarray(arr).T          # arr (3 transforms, 3 stats)
        seq[:, :, p] = np.asarray(st.seq_stats).T
        tok[:, :, p] = np.asarray(st.tok_stats).T

    def floor(mean, sd):
        return np.maximum(sd, 1e-12 * np.abs(mean) + 1e-30)

    return CalTable(has=has, mod_mean=mod[1], mod_std=floor(mod[1], _std(mod[0], mod[2])),
                    seq_mean=seq[1], seq_std=floor(seq[1], _std(seq[0], seq[2])),
                    tok_mean=tok[1], tok_std=floor(tok[1], _std(tok[0], tok[2])),
                    calibrated=calibrated, modules=tuple(mods))


def _build(index: LibraryIndex) -> Stacked:
    names = index.signature.names
    row = {m: k for k, m in enumerate(names)}
    ids = index.ids
    N, M = ids.size, len(names)
    frob2, present, shared = np.zeros((M, N)), np.zeros((M, N), bool), np.zeros((M, N), bool)
    Wnorm, rf2, W = np.zeros((M, N)), np.zeros((M, N)), []
    for k, m in enumerate(names):
        mi = index.modules[m]
        sp, gp = index.positions(mi.shared_ids), index.positions(mi.general_ids)
        present[k, sp] = present[k, gp] = True
        shared[k, sp] = True
        frob2[k, sp], frob2[k, gp] = mi.frob2_shared, mi.frob2_general
        if mi.shared_a is None:
            W.append(None)
            continue
        r = mi.shared_a.shape[0]
        w = np.zeros((r * (r + 1) // 2, N))
        if sp.size:
            w[:, sp] = gram_weights(mi.R)                                  # (K, Ns)
            rf2[k, sp] = np.einsum("nab,nab->n", mi.R, mi.R)
        W.append(w)
        Wnorm[k] = np.linalg.norm(w, axis=0)
    have = [w for w in W if w is not None]
    uniform = bool(have) and len({w.shape[0] for w in have}) == 1
    w3_row = np.cumsum([w is not None for w in W]) - 1
    w3_row[[w is None for w in W]] = -1
    return Stacked(modules=names, row=row, ids=ids, frob2=frob2, present=present, shared=shared,
                   W=tuple(W), W3=np.stack(have) if uniform else None, w3_row=w3_row,
                   Wnorm=Wnorm, rf2=rf2, cal=_cal_table(index, row, N))


def stacked(index: LibraryIndex) -> Stacked:
    """The snapshot's stacked tables (built on first use, then cached on the snapshot)."""
    cache = index._cache  # type: ignore[attr-defined]
    with index._lock:     # type: ignore[attr-defined]
        if "stacked" not in cache:
            cache["stacked"] = _build(index)
        return cache["stacked"]


def transform_index(t: str) -> int:
    return TRANSFORMS.index(t)
