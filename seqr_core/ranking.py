"""Exact ranking from scores and bounds: certify what the bounds settle, re-check the rest.

A score S_i with bound B_i says the float64 score lies in [S_i − B_i, S_i + B_i]. The top-k
order is settled when those intervals separate; the candidates whose order (or top-k
membership) they leave open are re-scored in float64 (``exact``) and ranked on those values.
Ties — float64 scores within TIE_RTOL of each other (relative) — break by adapter id.

Per-token ranking is vectorised: the top k of every token come from k argmax passes over
(T, n), and a token is settled by comparing its top k with the best upper bound of the rest;
only the unsettled tokens go through the per-row path, with one batched re-check.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .bounds import TIE_RTOL


def uncertain(S: np.ndarray, B: np.ndarray, kk: int) -> np.ndarray | None:
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


def order(S: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions by score descending; scores within TIE_RTOL (relative) tie and go by id."""
    valid = np.flatnonzero(~np.isnan(S))
    o = valid[np.lexsort((ids[valid], -S[valid]))]
    if o.size < 2:
        return o
    tol = TIE_RTOL * float(np.abs(S[o]).max())
    groups = np.concatenate([[0], np.cumsum(np.diff(S[o]) < -tol)])  # new group on a real drop
    return o[np.lexsort((ids[o], groups))]


def top(S: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """``order(S, ids)[:k]`` without sorting all n: the scores within the tie tolerance of the
    k-th best (and any chain of near-ties reaching down from it) are the only ones that can
    land in the first k."""
    valid = ~np.isnan(S)
    nv = int(valid.sum())
    if nv <= max(4 * k, 64):
        return order(S, ids)[:k]
    Sv = np.where(valid, S, -np.inf)
    tol = TIE_RTOL * float(np.abs(S[valid]).max())
    kth = Sv.size - k                             # the k-th largest (invalid ones sort below)
    thr = float(np.partition(Sv, kth)[kth])
    while True:
        cand = Sv >= thr - tol
        below = Sv[~cand & valid]
        if not below.size or Sv[cand].min() - below.max() >= tol:
            break
        thr = float(below.max())                  # a near-tie chain continues below: follow it
    c = np.flatnonzero(cand)
    return c[order(S[c], ids[c])][:k]


def exact_rank(S, B, ids, k, recheck: Callable) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """(the first max(k, 2) positions in order, scores with re-checked entries exact, their
    bounds (0 where re-checked), number re-checked). The top two are always settled, for the
    margin."""
    S = S.copy()
    nvalid = int((~np.isnan(S)).sum())
    kk = min(max(k, 2), nvalid)
    n = 0
    if B is not None and kk > 0:
        R = uncertain(S, B, kk)
        if R is not None:
            S[R] = recheck(R)
            B = B.copy()
            B[R] = 0.0
            n = R.size
    return top(S, ids, max(k, 2)), S, B, n


def token_ranks(S: np.ndarray, B: np.ndarray | None, ids: np.ndarray, k: int,
                recheck: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    """Exact per-token top-k of S (T, n) with bounds B: (T, n) per score, (T,) per token
    (uniform over adapters) or None (not verified). ``recheck(positions, tokens)`` returns
    float64 scores (len(tokens), len(positions)). Returns (ids (T, k), scores (T, k), number
    re-checked, per-token bound (T,) or None)."""
    T, n = S.shape
    k = min(k, n)
    tid, tsc = np.full((T, k), -1, np.int64), np.full((T, k), np.nan)
    valid = ~np.isnan(S[0]) if T else np.zeros(n, bool)
    kk = min(k, int(valid.sum()))
    row_b = None if B is None else B.copy() if B.ndim == 1 else np.where(valid, B, 0.0).max(axis=1, initial=0.0)
    if kk == 0:
        return tid, tsc, 0, row_b
    rows = np.arange(T)
    Sw = np.where(valid, S, -np.inf)
    more = kk < int(valid.sum())
    top = np.empty((T, kk + more), np.int64)
    for j in range(kk + more):
        top[:, j] = Sw.argmax(axis=1)
        Sw[rows, top[:, j]] = -np.inf
    St = S[rows[:, None], top]                                             # (T, kk+1)
    ok = _settled(S, St, B, top, Sw, kk, more, valid)
    tid[ok, :kk] = ids[top[ok, :kk]]
    tsc[ok, :kk] = St[ok, :kk]
    rest = np.flatnonzero(~ok)
    if not rest.size:
        return tid, tsc, 0, row_b
    opened = {}
    for t in rest:
        if B is None:
            continue
        b = B[t] if B.ndim == 2 else np.full(n, B[t])
        R = uncertain(S[t], np.where(valid, b, 0.0), kk)
        if R is not None:
            opened[int(t)] = R
    exact, cols = None, None
    if opened:
        cols = np.unique(np.concatenate(list(opened.values())))
        exact = recheck(cols, np.array(sorted(opened)))                    # (tokens, cols)
        where = {t: j for j, t in enumerate(sorted(opened))}
    for t in rest:
        s = S[t]
        if int(t) in opened:
            s = s.copy()
            R = opened[int(t)]
            s[R] = exact[where[int(t)], np.searchsorted(cols, R)]
        o = order(s, ids)[:k]
        tid[t, : o.size] = ids[o]
        tsc[t, : o.size] = s[o]
    return tid, tsc, int(sum(r.size for r in opened.values())), row_b


def _settled(S, St, B, top, Sw, kk, more, valid) -> np.ndarray:
    """(T,) rows whose top kk (by S) are certainly the exact top kk, in that order."""
    T = S.shape[0]
    gaps = St[:, :-1] - St[:, 1:] if St.shape[1] > 1 else np.zeros((T, 0))
    if B is None:
        # Unverified: only the order of near-equal scores needs the tie rule (by id).
        tol = TIE_RTOL * np.abs(np.where(valid, S, 0.0)).max(axis=1, initial=0.0)
        return (gaps > tol[:, None]).all(axis=1)
    if B.ndim == 1:
        return (gaps > 2 * B[:, None]).all(axis=1)
    rows = np.arange(T)
    Bt = B[rows[:, None], top]
    L, U = St - Bt, St + Bt
    ok = (L[:, : kk - 1] > U[:, 1:kk]).all(axis=1)
    if more:
        Bz = np.where(valid, B, 0.0)
        rest = np.maximum((Sw + Bz).max(axis=1), U[:, kk])                 # best upper bound outside top kk
        ok &= L[:, kk - 1] > rest
    return ok
