"""seqr_eval.confidence: accuracy by margin and the fallback threshold, on constructed answers."""

from __future__ import annotations

import numpy as np
import pytest

from seqr_eval.confidence import margin_bins, threshold


def _answers():
    # 10 samples: margins 0.1..1.0; the four smallest are wrong (right adapter second), the rest right.
    margins = np.linspace(0.1, 1.0, 10)
    labels = ["a"] * 10
    scores = [({"b": 1.0 + m, "a": 1.0} if k < 4 else {"a": 1.0 + m, "b": 1.0}) for k, m in enumerate(margins)]
    return margins, scores, labels


def test_threshold_is_the_smallest_margin_above_which_top1_reaches_the_target():
    t = threshold(*_answers(), target=0.98)
    assert t.margin == pytest.approx(0.5) and t.coverage == pytest.approx(0.6)
    assert t.top1_above == 1.0 and t.top1_below == 0.0 and t.top2_below == 1.0
    lax = threshold(*_answers(), target=0.6)       # 6 right of the top 10 already reach 60%
    assert lax.margin == pytest.approx(0.1) and lax.coverage == 1.0


def test_bins_report_accuracy_rising_with_margin():
    bins = margin_bins(*_answers(), bins=2)
    assert [b.n for b in bins] == [5, 5]
    assert bins[0].top1 == pytest.approx(0.2) and bins[1].top1 == 1.0


def test_owner_maps_adapters_to_domains():
    margins, scores, labels = _answers()
    scores = [{f"general-{k}" if k == "a" else k: v for k, v in s.items()} for s in scores]
    t = threshold(margins, scores, labels, owner=lambda n: n.removeprefix("general-"))
    assert t.margin == pytest.approx(0.5)
