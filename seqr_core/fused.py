"""The fused fast path: sequence routing, linear normalisation, shared-A adapters.

mean_t e_im = feat(G_m)·W_m[:, i] with G_m = ZᵀZ/T, so a request over M modules is M small
r×r moments plus one batched product (M, K)·(M, K, N) -> (M, N) in float64, then the
normalisation as (M, N) array ops. No per-module Python beyond computing G_m.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .energies import _F64_SLACK, ModuleInput, _gamma64, module_moment
from .normalise import Normalisation
from .qr_index import LibraryIndex, triu_pairs
from .stacked import stacked, subset


def fused_scores(index: LibraryIndex, inputs: Mapping[str, ModuleInput], ids: np.ndarray,
                 norm: Normalisation) -> tuple[np.ndarray, np.ndarray] | None:
    """(S (n,), bounds (n,)) for candidates ``ids``, or None when the request doesn't qualify
    (a supplied module without shared A, a candidate with its own A there, mixed ranks)."""
    st = stacked(index)
    mods = sorted(inputs, key=st.row.__getitem__)  # signature order
    pos = index.positions(ids)
    if pos.size == st.ids.size:      # all adapters: this module set's tables, sliced once per snapshot
        sub = subset(st, tuple(mods))
        if not sub.fused:
            return None
        rows, present, W = sub.rows, sub.present, sub.W
        Wnorm, rf2, frob2 = sub.Wnorm, sub.rf2, sub.frob2

        def take(a: np.ndarray) -> np.ndarray:
            return a[rows]
    else:
        rows = np.array([st.row[m] for m in mods])
        if any(st.W[k] is None for k in rows) or len({st.W[k].shape[0] for k in rows}) != 1:
            return None
        sel = np.ix_(rows, pos)
        present = st.present[sel]                                          # (Mr, n)
        if (present & ~st.shared[sel]).any():
            return None
        W = st.W3[st.w3_row[rows]] if st.W3 is not None else np.stack([st.W[k] for k in rows])  # (Mr, K, N)
        W = W[:, :, pos]
        Wnorm, rf2, frob2 = st.Wnorm[sel], st.rf2[sel], st.frob2[sel]

        def take(a: np.ndarray) -> np.ndarray:
            return a[sel]
    r = index.modules[mods[0]].shared_a.shape[0]
    iu, ju = triu_pairs(r)
    Gs, gerr = np.empty((len(mods), r, r)), np.empty(len(mods))
    groups: dict[int, list[int]] = {}  # q/k/v of a layer share one input: one GEMM for the group
    given, given_data = [], []
    for j, m in enumerate(mods):
        inp = inputs[m]
        if inp.form == "moments":
            given.append(j)
            given_data.append(inp.data)
        elif inp.form == "activations":
            groups.setdefault(id(inp.data), []).append(j)
        else:
            Gs[j], gerr[j] = module_moment(index.modules[m], inp)
    if len(given) == len(mods):     # all moments (the usual request): one conversion
        Gs, gerr = np.array(given_data, dtype=np.float64), np.zeros(len(mods))
    elif given:   # already ZᵀZ/T: exact inputs, no error to carry
        Gs[given] = np.stack(given_data)
        gerr[given] = 0.0
    for js in groups.values():
        Gs[js], gerr[js] = _group_moments(index, [mods[j] for j in js], inputs[mods[js[0]]].data)
    F = (0.5 * (Gs + Gs.transpose(0, 2, 1)))[:, iu, ju]                    # (Mr, K)
    E = np.matmul(F[:, None, :], W)[:, 0, :]                               # (Mr, 1, K)·(Mr, K, n) -> (Mr, n)
    fn = np.linalg.norm(F, axis=1)                                         # (Mr,)
    K = F.shape[1]
    Bm = ((_gamma64(K + 2) * fn + gerr)[:, None] * Wnorm
          + _F64_SLACK * fn[:, None] * rf2)                  # (Mr, n)
    cnt = present.sum(axis=0)
    if norm.kind == "zscore" and norm.granularity == "adapter":
        v, bv = (E * present).sum(0), (Bm * present).sum(0)
        S, B = (v - st.cal.seq_mean[0, pos]) / st.cal.seq_std[0, pos], bv / st.cal.seq_std[0, pos]
    else:
        mu, c = 0.0, 1.0
        if norm.kind == "frobenius":
            c = np.maximum(frob2, 1e-30)
        elif norm.kind == "activation":
            c = np.maximum(take(st.cal.mod_mean[0]), 1e-30)
        elif norm.kind == "zscore":
            mu, c = take(st.cal.mod_mean[0]), take(st.cal.mod_std[0])
        with np.errstate(invalid="ignore", divide="ignore"):
            S = (((E - mu) / c) * present).sum(0) / cnt
            B = ((Bm / c) * present).sum(0) / cnt
    S, B = np.where(cnt > 0, S, np.nan), np.where(cnt > 0, B, np.nan)
    return S, B


def _group_moments(index: LibraryIndex, mods: list[str], x: np.ndarray):
    """ZᵀZ/T for several modules reading the same input x (T, d), with the error bounds of
    energies.module_moment: one float64 GEMM against the stacked A's."""
    x64 = x.astype(np.float64)
    A = np.concatenate([_a64(index, m) for m in mods])                     # (g·r, d)
    T, r = x64.shape[0], A.shape[0] // len(mods)
    Z = (x64 @ A.T).reshape(T, len(mods), r).transpose(1, 0, 2)            # (T, d)·(d, g·r) -> (g, T, r)
    G = np.matmul(Z.transpose(0, 2, 1), Z) / T                             # (g, r, T)·(g, T, r) -> (g, r, r)
    zn2 = (Z * Z).sum(axis=2).T                                            # (T, g)
    err = _gamma64(T + 2) * zn2.mean(axis=0)
    af = np.array([float(np.linalg.norm(index.modules[m].shared_a)) for m in mods])
    dz = _gamma64(x64.shape[1]) * np.sqrt(np.einsum("td,td->t", x64, x64))[:, None] * af  # (T, g)
    err = err + (2 * np.sqrt(zn2) * dz + dz ** 2).mean(axis=0)
    return G, 2 * err


def _a64(index: LibraryIndex, module: str) -> np.ndarray:
    mi = index.modules[module]
    return mi.cached("A64", lambda: mi.shared_a.astype(np.float64))
