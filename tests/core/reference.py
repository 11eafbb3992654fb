"""An independent float64 brute-force reference for routing, written from the definitions.

Shares no numeric code with seqr_core: energies are ‖s·B·A·x‖² from the adapters' ORIGINAL
factors (kept by tests.core.libraries, never by the index), normalisations are re-implemented
from DESIGN §1 and seqr_core's docstrings.
"""

from __future__ import annotations

import numpy as np

from .libraries import original

LOG_FLOOR = 1e-8


def energies(entry, module, form, data):
    f = original(entry).factors[module]
    A, B, s = f.A.astype(np.float64), f.B.astype(np.float64), float(f.scale)
    dW = s * (B @ A)                                                      # (o, d)
    data = data.astype(np.float64)
    if form == "activations":
        y = data @ dW.T                                                   # (T, o)
        return (y ** 2).sum(1)
    if form == "projected":
        y = data @ (s * B).T
        return (y ** 2).sum(1)
    G = 0.5 * (data + data.T)
    return np.array([np.trace((s * B) @ G @ (s * B).T)])


def _f(e, t, frob2):
    if t == "e":
        return e
    if t == "sqrt":
        return np.sqrt(e)
    return np.log(e + LOG_FLOOR * frob2 + 1e-30)


def _mean_std(arr, t):
    n, mean, m2 = arr[("e", "sqrt", "log").index(t)]
    sd = np.sqrt(m2 / (n - 1)) if n > 1 else 0.0
    return mean, max(sd, 1e-12 * abs(mean) + 1e-30)


def scores(index, inputs, *, kind, granularity="adapter_module", transform="e", candidates=None,
           per_token=False):
    """{adapter_id: score} (or per-token arrays) from the definitions."""
    out = {}
    cal = index.calibration
    for entry in index.adapters:
        if candidates is not None and entry.name not in candidates:
            continue
        mods = [m for m in sorted(inputs) if m in original(entry).factors]
        if not mods:
            continue
        parts = []
        for m in mods:
            form, data = inputs[m]
            e = energies(entry, m, form, data)
            f = original(entry).factors[m]
            frob2 = float(((float(f.scale) * f.B.astype(np.float64) @ f.A.astype(np.float64)) ** 2).sum())
            if kind == "none":
                u = e
            elif kind == "frobenius":
                u = e / max(frob2, 1e-30)
            elif kind == "activation":
                mu, _ = _mean_std(cal.get(entry.name).module_stats[m], "e")
                u = e / max(mu, 1e-30)
            elif granularity == "adapter_module":
                mu, sd = _mean_std(cal.get(entry.name).module_stats[m], transform)
                u = (_f(e, transform, frob2) - mu) / sd
            else:
                u = _f(e, transform, frob2)
            parts.append(u if per_token else np.array([u.mean()]))
        P = np.stack(parts)                                               # (M, T|1)
        if kind == "zscore" and granularity == "adapter":
            st = cal.get(entry.name)
            mu, sd = _mean_std(st.tok_stats if per_token else st.seq_stats, transform)
            v = (P.sum(0) - mu) / sd
        else:
            v = P.mean(0)
        out[entry.adapter_id] = v if per_token else float(v[0])
    return out


def ranking(score_by_id, rtol=1e-12):
    """Ids by score descending. Scores within rtol·max|score| of their neighbour above tie
    (float64 rounding of different exact formulas) and break by id."""
    items = sorted(score_by_id.items(), key=lambda kv: (-kv[1], kv[0]))
    if not items:
        return []
    tol = rtol * max(abs(v) for _, v in items)
    group, keyed = 0, []
    for j, (i, v) in enumerate(items):
        if j and items[j - 1][1] - v > tol:
            group += 1
        keyed.append((group, i))
    return [i for _, i in sorted(keyed)]
