"""The batched fast paths: every supplied module in a few array ops, no per-module Python.

Both need shared-A modules of one rank (one W table) and a normalisation linear in e:

* sequence (``sequence_scores``): mean_t e_im = feat(G_m)·W_m[:, i] with G_m = ZᵀZ/T, so a
  request is M small r×r moments plus one batched product (M, K)·(M, K, N) -> (M, N) in
  float64, then the normalisation as (M, N) array ops;
* per token (``token_scores``): e_mti = feat(z_mt)·W_m[:, i] as one batched fp32 GEMM
  (M, T, K)·(M, K, N) -> (M, T, N); the normalised module sum S_t = Σ_m s_m·E_m − o is (T, N);
  its bound is returned per token, uniform over adapters (O(M·(T + N)), see ``_row_bound``), so
  ranking certifies most tokens with no (T, N) bound array at all.

Both return None when the request does not qualify; the per-module path then serves it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from . import bounds as bd
from .energies import ModuleInput, a64, sym_feat_matrix, sym_feat_tokens
from .normalise import Normalisation, adapter_stats, affine
from .qr_index import LibraryIndex

_CHUNK = 1 << 24            # elements of fp32 E held at once by the per-token path


def _plan(index: LibraryIndex, inputs: Mapping[str, ModuleInput], ids: np.ndarray):
    """(group, modules in table order, their rows in the group, candidate slots or None = all,
    present (Mr, n)) or None when the request does not qualify."""
    lay = index.layout
    mods = sorted(inputs, key=lay.row.__getitem__)
    gs = {lay.group_of.get(m, (-1, 0))[0] for m in mods}
    if len(gs) != 1 or -1 in gs:
        return None
    g = gs.pop()
    js = np.array([lay.group_of[m][1] for m in mods])
    rows = lay.groups[g].rows[js]
    full = ids.size == index.ids.size and index.compact
    slots = None if full else index.slots_of(ids)
    sel = (rows, slice(None)) if full else np.ix_(rows, slots)
    present = index.table("present")[sel]
    if (present & ~index.table("shared")[sel]).any():
        return None
    return g, mods, js, rows, slots, sel, present


def _scales(index: LibraryIndex, norm: Normalisation, slots, sel, present, *, per_token: bool):
    """(s (Mr, n), o (n,), cnt (n,)): S = Σ_m s_m·e_m − o for a linear normalisation, cnt the
    number of supplied modules each candidate targets."""
    cnt = present.sum(axis=0)
    if norm.kind == "zscore" and norm.granularity == "adapter":
        mean, sd = adapter_stats(index, index.slots if slots is None else slots, norm, per_token=per_token)
        return present / sd, mean / sd, cnt
    mu, c = affine(index, sel, norm)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = present / (c * cnt)
        o = (mu * s).sum(axis=0) if np.ndim(mu) else np.zeros(present.shape[1])
    return s, o, cnt


def _moments(index: LibraryIndex, mods, inputs):
    """(G (Mr, r, r), ‖Ĝ − G‖_F (Mr,)); modules reading the same activations share one GEMM."""
    r = index.shared_a[mods[0]].shape[0]
    Gs, gerr = np.empty((len(mods), r, r)), np.empty(len(mods))
    groups: dict[int, list[int]] = {}
    proj = []
    for j, m in enumerate(mods):
        inp = inputs[m]
        if inp.form == "moments":          # already ZᵀZ/T: exact inputs, no error to carry
            Gs[j], gerr[j] = inp.data, 0.0
        elif inp.form == "activations":
            groups.setdefault(id(inp.data), []).append(j)
        else:
            proj.append(j)
    if proj:                              # z as sent, exact: G and its rounding, all at once
        Z = np.stack([inputs[mods[j]].data for j in proj], dtype=np.float64)     # (P, T, r)
        T = Z.shape[1]
        Gs[proj] = np.matmul(Z.transpose(0, 2, 1), Z) / T
        gerr[proj] = bd.moment_errors((Z * Z).sum(axis=2).T, T, None)
    if groups:
        js, Z, dz = _project64(index, mods, inputs, list(groups.values()))     # (g, T, r), (g, T)
        T = Z.shape[1]
        Gs[js] = np.matmul(Z.transpose(0, 2, 1), Z) / T                         # (g, r, T)·(g, T, r)
        gerr[js] = bd.moment_errors((Z * Z).sum(axis=2).T, T, dz.T)
    return Gs, gerr


def _project64(index: LibraryIndex, mods, inputs, groups: list[list[int]]):
    """z = A·x in float64 for every module reading activations; modules sharing one x (q/k/v
    of a layer) are one GEMM against their stacked A's, and equally sized groups are one
    batched GEMM. Returns (module positions, Z (g, T, r), ‖δz_t‖ of the float64 GEMM (g, T))."""
    names = tuple(tuple(mods[j] for j in js) for js in groups)
    xs = [inputs[ms[0]].data for ms in names]
    r, d = index.shared_a[names[0][0]].shape
    sizes = {len(ms) for ms in names}
    if len(sizes) == 1 and len({x.shape for x in xs}) == 1:
        def stack():
            return np.stack([np.concatenate([a64(index, m) for m in ms]).T for ms in names])
        A = index.memo(("A64groups", names), stack)                            # (G, d, g·r)
        X = xs[0].astype(np.float64)[None] if len(xs) == 1 else np.stack(xs, dtype=np.float64)  # (G, T, d)
        G, T, g = X.shape[0], X.shape[1], sizes.pop()
        Z = np.matmul(X, A).reshape(G, T, g, r).transpose(0, 2, 1, 3).reshape(G * g, T, r)
    else:                               # ragged groups: one GEMM per group
        parts = []
        for ms, x in zip(names, xs):
            A = index.memo(("A64stack", ms), lambda ms=ms: np.concatenate([a64(index, m) for m in ms]))
            T = x.shape[0]
            parts.append((x.astype(np.float64) @ A.T).reshape(T, len(ms), r).transpose(1, 0, 2))
        Z = np.concatenate(parts)
    # ‖x_t‖ from the fp32 data: within γ_{d+1} of the true norm, scaled up once
    xn = np.concatenate([np.repeat(np.sqrt(np.einsum("td,td->t", x, x).astype(np.float64))[None], len(ms), axis=0)
                         for ms, x in zip(names, xs)]) * (1 + bd.gamma(d + 1))
    af = np.array([index.layout.a_norm[m] for ms in names for m in ms])
    return [j for js in groups for j in js], Z, bd.gamma64(d) * xn * af[:, None]


def sequence_scores(index: LibraryIndex, inputs: Mapping[str, ModuleInput], ids: np.ndarray,
                    norm: Normalisation) -> tuple[np.ndarray, np.ndarray] | None:
    """(S (n,), bounds (n,)) of candidates ``ids`` for sequence routing with a linear
    normalisation, or None when the request does not qualify."""
    p = _plan(index, inputs, ids)
    if p is None:
        return None
    g, mods, js, rows, slots, sel, present = p
    Gs, gerr = _moments(index, mods, inputs)
    F = sym_feat_matrix(Gs)                                                 # (Mr, K)
    W = index.table(f"W{g}")                                                # (Mg, K, slots)
    if np.array_equal(js, np.arange(W.shape[0])):
        E = np.matmul(F[:, None, :], W)[:, 0, :]                            # (Mr, 1, K)·(Mr, K, N) -> (Mr, N)
    else:                               # a subset of the modules: no copy of their tables
        E = np.stack([F[k] @ W[j] for k, j in enumerate(js)])               # (K,)·(K, N) -> (N,)
    if slots is not None:
        E = E[:, slots]
    fn = np.linalg.norm(F, axis=1)
    Bm = bd.gram_f64_columns(F.shape[1], fn[:, None], gerr[:, None], index.table("wnorm")[sel],
                             index.table("rf2")[sel])                        # (Mr, n)
    s, o, cnt = _scales(index, norm, slots, sel, present, per_token=False)
    with np.errstate(invalid="ignore"):
        S = np.einsum("mn,mn->n", E, s) - o
        B = np.einsum("mn,mn->n", Bm, np.abs(s))
    return np.where(cnt > 0, S, np.nan), np.where(cnt > 0, B, np.nan)


def token_scores(index: LibraryIndex, inputs: Mapping[str, ModuleInput], ids: np.ndarray,
                 norm: Normalisation):
    """(S (T, n), per-token bound (T,)) for per-token routing with a linear normalisation, or
    None when the request does not qualify (moments, general adapters, mixed ranks).

    z = A·x is taken in float64 and rounded once to fp32 (bound u·‖z‖). The kernel's fp32
    projection would save that GEMM's float64 cost, but its bound γ_d·‖A‖·‖x‖ is about 0.7% of
    a score at d=576 — wider than the usual gap between the best two of 100 adapters — so
    nearly every token would go to the float64 re-check."""
    if any(i.form == "moments" for i in inputs.values()):
        return None
    p = _plan(index, inputs, ids)
    if p is None:
        return None
    g, mods, js, tables, slots, sel, present = p
    Z32, delta = _token_z(index, mods, inputs)                              # (Mr, T, r), (Mr, T)
    feat = sym_feat_tokens(Z32)                                             # (Mr, T, K)
    Mr, T, K = feat.shape
    G = index.table(f"G{g}")                                                # (Mg, K, slots) fp32
    s, o, cnt = _scales(index, norm, slots, sel, present, per_token=True)
    step = max(1, _CHUNK // max(1, T * G.shape[2]))
    whole = np.array_equal(js, np.arange(G.shape[0]))
    S = np.zeros((T, present.shape[1]))
    for lo in range(0, Mr, step if whole else 1):
        hi = min(Mr, lo + step) if whole else lo + 1
        # all modules: chunks of one batched GEMM; a subset: per module, no copy of its table
        E = np.matmul(feat[lo:hi], G[lo:hi] if whole else G[js[lo]][None])   # (m, T, K)·(m, K, N) -> (m, T, N)
        S += np.einsum("mtn,mn->tn", E if slots is None else E[:, :, slots], s[lo:hi])
    S -= o
    S[:, cnt == 0] = np.nan
    # ‖feat_t‖ in fp32 is within γ_{K+1} of the true norm: scaled up once
    fz = np.sqrt(np.einsum("mtk,mtk->mt", feat, feat).astype(np.float64)) * (1 + bd.gamma(K + 1))
    beta = _row_bound(K, fz, delta, np.abs(s), index.table("wnorm")[sel], index.table("rf2")[sel])
    return S, beta


def _token_z(index: LibraryIndex, mods, inputs):
    """(z (Mr, T, r) fp32, ‖δz‖ (Mr, T)): z = A·x in float64 rounded once, for activations;
    as sent for projected inputs (exact: δ = 0)."""
    T = next(iter(inputs.values())).data.shape[0]
    r = index.shared_a[mods[0]].shape[0]
    Z, delta = np.empty((len(mods), T, r), np.float32), np.zeros((len(mods), T))
    groups: dict[int, list[int]] = {}
    for j, m in enumerate(mods):
        if inputs[m].form == "projected":
            Z[j] = inputs[m].data
        else:
            groups.setdefault(id(inputs[m].data), []).append(j)
    if groups:
        js, Z64, dz = _project64(index, mods, inputs, list(groups.values()))  # (g, T, r), (g, T)
        Z[js] = Z64
        delta[js] = bd.U32 * np.sqrt((Z64 * Z64).sum(axis=2)) + dz
    return Z, delta


def _row_bound(K: int, fz, delta, s, wnorm, rf2) -> np.ndarray:
    """(T,) β_t ≥ max_i Σ_m s_mi·b_mti, b the fp32 Gram bound (bounds.Bound with a = c = ‖feat‖,
    g = γ_{K+2}‖w‖, h = ε_RB, ρ = ‖R‖_F): column maxima per module, so O(M·(T + N)). The
    √(e + a·g) term uses e_mti ≤ ‖feat_mt‖·‖w_mi‖·(1 + γ_{K+2})."""
    g, h = bd.gram_token_columns(K, wnorm, rf2)                              # (Mr, n)
    gs, hs = (g * s).max(axis=1, initial=0.0), (h * s).max(axis=1, initial=0.0)
    ws = (wnorm * s).max(axis=1, initial=0.0) * (1 + bd.gamma(K + 2))
    rs = np.sqrt((rf2 * s).max(axis=1, initial=0.0))                        # max √(ρ²·s)
    beta = fz * (gs + hs)[:, None]                                          # (Mr, T)
    if delta.any():
        beta += 2 * np.sqrt(fz * (ws + gs)[:, None]) * delta * rs[:, None] + (delta * rs[:, None]) ** 2
    return beta.sum(axis=0)
