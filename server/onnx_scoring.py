"""One request on an ONNX scorer: plan (which graph, which candidates) and decide (exact ranking).

Mirrors ``seqr_core.routing.route`` step by step — same candidate resolution, same
normalisation fallback text, same float64 re-check of the candidates the bounds leave in
doubt (``routing._exact_rank``) — so the Decision equals the numpy path's. Pure functions:
the session is passed in; nothing here knows about caching or threads.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from seqr_core import energies as E
from seqr_core.normalise import Normalisation, check_adapter_level_modules, combine, effective, uncalibrated
from seqr_core.onnx_export import MASK, input_name
from seqr_core.qr_index import LibraryIndex
# _exact_rank is routing's own bound-driven float64 re-check: reused, not copied, so the two
# backends cannot drift apart.
from seqr_core.routing import (Choice, Decision, RouteOptions, TokenDecisions, _exact_rank,
                               candidate_ids)



@dataclass(frozen=True)
class Profile:
    """What one graph is specialised to: supplied modules + forms, effective normalisation,
    per-token outputs or not."""

    modules: tuple[tuple[str, str], ...]   # sorted (module, form)
    normalisation: Normalisation
    per_token: bool
    precise: bool = True                   # z = A·x in float64: tight bounds (verify=True)

    @property
    def key(self) -> str:
        mods = ",".join(f"{m}:{f}" for m, f in self.modules)
        return (f"{self.normalisation.label}|{'token' if self.per_token else 'seq'}|"
                f"{'z64' if self.precise else 'z32'}|{mods}")

    def export_options(self) -> dict:
        return {"modules": [m for m, _ in self.modules], "forms": dict(self.modules),
                "normalisation": self.normalisation, "per_token": self.per_token, "top_k": 1,
                "bounds": True, "precise_z": self.precise, "on_unscorable": "exclude",
                "profile": self.key}


def default_profile(index: LibraryIndex, norm: Normalisation | None = None) -> Profile:
    """Every module that has adapters, as activations, sequence scores; the default
    normalisation as routing would apply it (frobenius while adapters are uncalibrated)."""
    mods = tuple((m, "activations") for m in sorted(index.signature.names) if index.modules[m].ids.size)
    if norm is None:
        norm = effective(index, Normalisation(), [m for m, _ in mods])[0]
    return Profile(mods, norm, False)


@dataclass(frozen=True)
class RoutePlan:
    profile: Profile
    ids: np.ndarray              # (n,) candidate adapter ids, library order
    norm: Normalisation          # effective (after the uncalibrated fallback)
    fallback: str


def _memo(memo: dict | None, key, build):
    """Per-snapshot memo (snapshots are immutable): a plain dict, racing writers agree."""
    if memo is None:
        return build()
    if key not in memo:
        memo[key] = build()
    return memo[key]


def plan(snap: LibraryIndex, inputs: Mapping[str, E.ModuleInput], options: RouteOptions,
         candidates, *, memo: dict | None = None) -> RoutePlan | str:
    """The graph profile for this request, or why numpy must serve it (numpy then raises the
    error it always raises for requests it rejects). Raises what route raises before scoring.
    ``memo``: a dict owned by the snapshot's cache entry, so per-library work (O(N) Python) is
    done once per snapshot, not per request."""
    all_ids = _memo(memo, "ids", lambda: snap.ids)
    ids = all_ids if candidates is None else candidate_ids(snap, candidates)
    mods = frozenset(inputs)

    def targets():                                  # (N,) adapter targets a supplied module
        return np.logical_or.reduce([np.isin(all_ids, snap.modules[m].ids) for m in mods])
    hit = _memo(memo, ("targets", mods), targets)
    tpos = np.flatnonzero(hit if candidates is None else hit & np.isin(all_ids, ids))
    if not tpos.size:
        return "no candidate targets a supplied module"
    norm, fallback = options.normalisation, ""
    if norm.needs_calibration:
        targeted = all_ids[tpos]
        # Memoised only for "all candidates": request-chosen candidate sets are unbounded.
        once = memo if candidates is None else None
        missing = _memo(once, ("uncal", mods, norm), lambda: uncalibrated(snap, targeted, inputs, norm))
        if missing:
            fallback = f"uncalibrated adapters {missing[:8]}: fell back to frobenius"
            norm = Normalisation("frobenius")
        elif norm.kind == "zscore" and norm.granularity == "adapter":
            _memo(once, ("adapter_level", mods), lambda: check_adapter_level_modules(snap, targeted, inputs))
    per_token = options.granularity == "token" or options.aggregation == "vote"
    forms = {m: i.form for m, i in inputs.items()}
    if "moments" in forms.values():
        if per_token:
            return "per-token routing on moments (rejected by numpy)"
        if norm.kind == "zscore" and norm.transform != "e":
            return "zscore of sqrt/log on moments (rejected by numpy)"
    for m, f in forms.items():
        if f != "activations" and np.isin(snap.modules[m].general_ids, ids).any():
            return "own-A adapters with projected/moments input (rejected by numpy)"
    return RoutePlan(Profile(tuple(sorted(forms.items())), norm, per_token, options.verify), ids,
                     norm, fallback)


def _exact_scores(snap, inputs, ids, norm):
    """Float64 scores of candidates at positions R (of ``ids``), as route's re-check does."""
    def scores(R: np.ndarray, tokens=None) -> np.ndarray:
        sub = ids[R]
        blocks = {}
        for m, inp in inputs.items():
            here = sub[np.isin(sub, snap.modules[m].ids)]
            blocks[m] = E.Energies(ids=here, e=E.brute_force_f64(snap, m, inp, here, tokens=tokens),
                                   pooled=inp.pooled)
        s, _ = combine(snap, blocks, sub, norm, per_token=tokens is not None)
        return s[0] if tokens is not None else s
    return scores


def _token_decisions(S_t, B_t, ids, k, exact):
    """Per-token exact top-k, as route does it; returns (TokenDecisions, re-checked count)."""
    T, k = S_t.shape[0], min(k, ids.size)
    tid, tsc = np.full((T, k), -1, np.int64), np.full((T, k), np.nan)
    n = 0
    for t in range(T):
        o, s, nt = _exact_rank(S_t[t], None if B_t is None else B_t[t], ids, k,
                               lambda R, t=t: exact(R, tokens=np.array([t])))
        n += nt
        tid[t, : min(k, o.size)] = ids[o[:k]]
        tsc[t, : min(k, o.size)] = s[o[:k]]
    return TokenDecisions(ids=tid, scores=tsc), n


def decide(snap: LibraryIndex, inputs: Mapping[str, E.ModuleInput], options: RouteOptions,
           rp: RoutePlan, session, *, memo: dict | None = None) -> Decision:
    """Run the graph for one request (batch of 1) and rank exactly."""
    all_ids = _memo(memo, "ids", lambda: snap.ids)
    ids = rp.ids
    full = ids is all_ids
    pos = np.arange(ids.size) if full else np.searchsorted(all_ids, ids)
    feeds = {input_name(m, i.form): i.data[None] for m, i in inputs.items()}   # (1, T, ·)
    feeds[MASK] = (np.ones(ids.size, bool) if full else np.isin(all_ids, ids))[None]  # (1, N)
    exact = _exact_scores(snap, inputs, ids, rp.norm)
    verify = options.verify
    tokens = None
    if rp.profile.per_token:
        St, Bt = session.run(["token_scores", "token_score_bounds"], feeds)    # (1, T, N) each
        S_t = St[0][:, pos].astype(np.float64)                                 # (T, n)
        tokens, rechecked = _token_decisions(S_t, Bt[0][:, pos].astype(np.float64) if verify else None,
                                             ids, options.top_k, exact)
        T = S_t.shape[0]
        votes = np.array([(tokens.ids[:, 0] == i).sum() for i in ids], dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN columns: untargeted
            mean_s = np.nanmean(S_t, axis=0)
        valid = ~np.isnan(S_t).all(axis=0)
        S = np.where(valid, votes / max(T, 1), np.nan)
        order = np.flatnonzero(valid)[np.lexsort((ids[valid], -mean_s[valid], -S[valid]))]
    else:
        Sq, Bq = session.run(["scores", "score_bounds"], feeds)                # (1, N) each
        S, B = Sq[0, pos].astype(np.float64), Bq[0, pos].astype(np.float64)
        order, S, rechecked = _exact_rank(S, B if verify else None, ids, options.top_k, exact)
    return _decision(snap, options, rp, pos, S, order, rechecked, tokens)


def _decision(snap, options, rp, pos, S, order, rechecked, tokens) -> Decision:
    ids = rp.ids
    top = order[: options.top_k]
    sc = S[top]
    w = np.exp((sc - sc.max()) / options.temperature) if sc.size else sc
    w = w / w.sum() if sc.size else w
    choices = tuple(Choice(name=snap.adapters[int(pos[p])].name, adapter_id=int(ids[p]), score=float(S[p]),
                           weight=float(wi)) for p, wi in zip(top, w))
    margin = float(S[order[0]] - S[order[1]]) if order.size > 1 else float("inf")
    return Decision(choices=choices, margin=margin, version=snap.version, method="seqr",
                    normalisation=rp.norm.label, fallback=rp.fallback, rechecked=rechecked,
                    candidate_ids=ids, scores=S, tokens=tokens)

