"""Baseline scorers in the same code, for comparison: exact, spectr, arrow (lag = arrow + spectr).

None of them needs B: ΔW = Q·R·A, so ΔW's singular values and right singular vectors are those
of R·A. For shared-A adapters the index keeps RᵀR (as Gram weights); any factor R' with
R'ᵀR' = RᵀR gives the same R'A up to an orthogonal factor on the left, which neither norms
nor singular vectors see — R' = Λ^½Vᵀ from the eigen-decomposition.
"""

from __future__ import annotations

import numpy as np

from .energies import Energies, ModuleInput, _select, module_view, recheck_f64
from .errors import InvalidArgumentError
from .qr_index import LibraryIndex


def _need_activations(inp: ModuleInput, method: str, field: str) -> None:
    if inp.form != "activations":
        raise InvalidArgumentError(f"method {method!r} needs activations", field=f"{field}.{inp.form}",
                                   limit="activations", actual=inp.form)


def _factors_ra(index: LibraryIndex, module: str) -> list[tuple[int, np.ndarray]]:
    """(adapter id, R'·A (r, d) float64) for every adapter on ``module``, ascending ids."""
    v = module_view(index, module)
    out = []
    if v.slots.size:
        r = v.rank
        iu, ju = np.triu_indices(r)
        W = index.table(f"W{v.group}")[v.j][:, v.slots]                    # (K, Ns)
        A = v.shared_a.astype(np.float64)
        for i, w in zip(v.shared_ids, W.T):
            S = np.zeros((r, r))
            S[iu, ju] = w / np.where(iu == ju, 1.0, 2.0)
            S = S + np.triu(S, 1).T
            lam, V = np.linalg.eigh(S)
            out.append((int(i), (np.sqrt(np.maximum(lam, 0))[:, None] * V.T) @ A))
    if v.general is not None:
        for i, R, A in zip(v.general.ids, v.general.R, v.general.A):
            out.append((int(i), R @ A.astype(np.float64)))
    return sorted(out, key=lambda p: p[0])


def _svd_factors(index: LibraryIndex, module: str):
    def build():
        ids, svs, v1 = [], [], []
        for i, RA in _factors_ra(index, module):
            _, S, Vt = np.linalg.svd(RA, full_matrices=False)                 # ΔW = Q·U·S·Vᵀ
            ids.append(i)
            svs.append((S[:, None] * Vt).astype(np.float32))                   # (r, d)
            v1.append(Vt[0].astype(np.float32))                                # (d,)
        d = index.signature.spec(module).d_in
        return (np.array(ids, np.int64),
                np.concatenate(svs, 0) if svs else np.zeros((0, d), np.float32),
                np.array([s.shape[0] for s in svs], np.int64),
                np.stack(v1) if v1 else np.zeros((0, d), np.float32))
    return index.memo(("svd", module), build)


def exact_energies(index: LibraryIndex, module: str, inp: ModuleInput, *,
                   allowed: np.ndarray | None = None, field: str = "inputs") -> Energies:
    """The float64 reference ‖R·A·x‖² per adapter (= ‖s·B·A·x‖² within bounds.F64_SLACK)."""
    _need_activations(inp, "exact", field)
    ids = np.sort(index.module_ids(module))
    if allowed is not None:
        ids = ids[np.isin(ids, allowed)]
    return Energies(ids=ids, e=recheck_f64(index, module, inp, ids), pooled=False)


def spectr_energies(index: LibraryIndex, module: str, inp: ModuleInput, *,
                    allowed: np.ndarray | None = None, field: str = "inputs") -> Energies:
    """SpectR: e = ‖S·Vᵀ·x‖² from the SVD of ΔW (equal to exact, N·r·d per token)."""
    _need_activations(inp, "spectr", field)
    ids, SV, ranks, _ = _svd_factors(index, module)
    sel = _select(ids, allowed)
    T = inp.data.shape[0]
    if not sel.size:
        return Energies(ids=ids[sel], e=np.zeros((T, 0)), pooled=False)
    offs = np.concatenate([[0], np.cumsum(ranks)])
    if sel.size == ids.size:          # all of them: the stacked factors as they are, no copy
        y, starts = inp.data @ SV.T, offs[:-1]                              # (T, d)·(d, Σr) -> (T, Σr)
    else:
        rows = np.concatenate([np.arange(offs[k], offs[k + 1]) for k in sel])
        y, starts = inp.data @ SV[rows].T, np.concatenate([[0], np.cumsum(ranks[sel])])[:-1]
    e = np.add.reduceat(y * y, starts, axis=1)
    return Energies(ids=ids[sel], e=e.astype(np.float64), pooled=False)


def arrow_energies(index: LibraryIndex, module: str, inp: ModuleInput, *,
                   allowed: np.ndarray | None = None, field: str = "inputs") -> Energies:
    """Arrow: (v₁ᵀx)² with v₁ the top right singular vector of ΔW. Not norm-maximising."""
    _need_activations(inp, "arrow", field)
    ids, _, _, V1 = _svd_factors(index, module)
    sel = _select(ids, allowed)
    p = inp.data @ (V1 if sel.size == ids.size else V1[sel]).T             # (T, d)·(d, n) -> (T, n)
    return Energies(ids=ids[sel], e=(p * p).astype(np.float64), pooled=False)


def bare_spectr(SV: np.ndarray, ranks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """SpectR's routing step alone (benchmarks): ‖S·Vᵀ·x‖² per adapter from stacked factors."""
    y = x @ SV.T                                                           # (T, d)·(d, Σr) -> (T, Σr)
    return np.add.reduceat(y * y, np.concatenate([[0], np.cumsum(ranks)])[:-1], axis=1)


def svd_factors(index: LibraryIndex, module: str):
    """(ids, stacked S·Vᵀ rows, ranks, top right singular vectors) of every adapter on ``module``."""
    return _svd_factors(index, module)
