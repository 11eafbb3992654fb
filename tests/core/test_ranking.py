"""Ranking helpers: the partial top-k equals the full tie-aware order, near-tie chains included."""

import numpy as np
from hypothesis import given, strategies as st

from seqr_core.bounds import TIE_RTOL
from seqr_core.ranking import order, top


@given(st.integers(0, 2**32 - 1), st.integers(1, 400), st.integers(1, 8))
def test_partial_top_k_equals_the_full_order(seed, n, k):
    rng = np.random.default_rng(seed)
    S = rng.choice([1.0, 2.0, 3.0], n) * rng.uniform(0.5, 2) + rng.standard_normal(n) * rng.choice([0, 1e-14, 1e-3])
    # chains of near-ties (each step under the tie tolerance) and exact ties
    chain = rng.integers(0, n, size=min(n, 5))
    S[chain] = S.max() - np.arange(chain.size) * 0.6 * TIE_RTOL * np.abs(S).max()
    S[rng.random(n) < 0.1] = np.nan
    ids = np.sort(rng.choice(10 * n, n, replace=False))
    np.testing.assert_array_equal(top(S, ids, k), order(S, ids)[:k])
