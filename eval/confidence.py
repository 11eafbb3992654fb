"""What a routing margin means: accuracy as a function of the margin, and the threshold below
which a host should not trust the top-1 choice (fall back to the base model or a top-2 mix).

Inputs are an evaluation's per-sample answers (seqr_eval.pipeline.Routed: margins, every
candidate's score) and the true labels; nothing here talks to a server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class MarginBin:
    lo: float
    hi: float
    n: int
    top1: float          # the routed adapter is the sample's own
    top2: float          # the sample's own adapter is among the first two


@dataclass(frozen=True)
class Threshold:
    margin: float        # trust the top-1 choice at or above this margin
    target: float        # top-1 accuracy required above it
    coverage: float      # share of samples at or above it
    top1_above: float
    top1_below: float
    top2_below: float    # how often a top-2 mix would hold the right adapter below it


def _hits(scores: Sequence[dict], labels: Sequence[str], owner) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 hit, top-2 hit) per sample; ``owner(name)`` maps an adapter to its domain."""
    t1, t2 = [], []
    for s, y in zip(scores, labels):
        ranked = sorted(s, key=lambda n: -s[n])
        t1.append(owner(ranked[0]) == y)
        t2.append(any(owner(n) == y for n in ranked[:2]))
    return np.array(t1), np.array(t2)


def margin_bins(margins: np.ndarray, scores: Sequence[dict], labels: Sequence[str], *, bins: int = 5,
                owner=lambda n: n) -> list[MarginBin]:
    """Accuracy per margin quantile bin (equal counts), lowest margins first."""
    m = np.asarray(margins, dtype=np.float64)
    t1, t2 = _hits(scores, labels, owner)
    edges = np.quantile(m, np.linspace(0, 1, bins + 1))
    out = []
    for k in range(bins):
        sel = (m >= edges[k]) & ((m < edges[k + 1]) if k < bins - 1 else (m <= edges[k + 1]))
        if sel.any():
            out.append(MarginBin(float(edges[k]), float(edges[k + 1]), int(sel.sum()), float(t1[sel].mean()),
                                 float(t2[sel].mean())))
    return out


def threshold(margins: np.ndarray, scores: Sequence[dict], labels: Sequence[str], *, target: float = 0.98,
              owner=lambda n: n) -> Threshold:
    """The smallest margin τ such that top-1 accuracy over samples with margin ≥ τ reaches
    ``target`` (the largest margin if none does)."""
    m = np.asarray(margins, dtype=np.float64)
    t1, t2 = _hits(scores, labels, owner)
    order = np.argsort(m)
    ms, h1 = m[order], t1[order]
    above = np.cumsum(h1[::-1])[::-1] / np.arange(ms.size, 0, -1)   # accuracy of samples [k:]
    ok = np.flatnonzero(above >= target)
    k = int(ok[0]) if ok.size else ms.size - 1
    below = order[:k]
    return Threshold(margin=float(ms[k]), target=target, coverage=float((m >= ms[k]).mean()),
                     top1_above=float(t1[m >= ms[k]].mean()),
                     top1_below=float(t1[below].mean()) if below.size else float("nan"),
                     top2_below=float(t2[below].mean()) if below.size else float("nan"))


def report(margins, scores, labels, *, owner=lambda n: n, targets=(0.95, 0.98)) -> dict:
    """JSON-ready: bins and thresholds."""
    return {"bins": [b.__dict__ for b in margin_bins(margins, scores, labels, owner=owner)],
            "thresholds": [threshold(margins, scores, labels, target=t, owner=owner).__dict__ for t in targets]}


def markdown(rep: dict, title: str) -> list[str]:
    lines = [f"**{title}**", "", "| margin | samples | top-1 | top-2 |", "|---|---|---|---|"]
    lines += [f"| {b['lo']:.3f}–{b['hi']:.3f} | {b['n']} | {b['top1']:.1%} | {b['top2']:.1%} |" for b in rep["bins"]]
    lines += ["", "| trust top-1 at margin ≥ | target | coverage | top-1 above | top-1 below | top-2 below |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {t['margin']:.3f} | {t['target']:.0%} | {t['coverage']:.1%} | {t['top1_above']:.1%} | "
              f"{t['top1_below']:.1%} | {t['top2_below']:.1%} |" for t in rep["thresholds"]]
    return lines
