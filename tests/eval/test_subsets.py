"""seqr_eval.eval_lib.first_per_domain: the cheap evaluation subsets (perplexity on a few chunks per domain)."""

from __future__ import annotations

import numpy as np
import pytest

from seqr_eval.eval_lib import first_per_domain


@pytest.mark.parametrize("labels, n, want", [
    ([0, 0, 0, 1, 1, 1], 2, [0, 1, 3, 4]),            # the first n of every domain, domain order
    ([0, 1, 0, 1, 0, 1], 1, [0, 1]),                  # interleaved labels: still the first of each
    ([0, 0, 1], 5, [0, 1, 2]),                        # fewer than n: all of that domain
    ([2, 2, 0, 1], 1, [2, 3, 0]),                     # labels in sorted order, not order of appearance
    ([1, 0, 1, 0], None, [0, 1, 2, 3]),               # None: everything, in the original order
])
def test_subset_takes_the_first_n_samples_of_every_domain(labels, n, want):
    got = first_per_domain(np.array(labels), n)
    assert got.tolist() == want
    assert got.dtype == np.int64


def test_subset_of_zero_is_empty():
    assert first_per_domain(np.array([0, 1, 1]), 0).tolist() == []
