"""The product's promise: seqr's ranking equals the float64 brute-force ranking."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from seqr_core import Normalisation, RouteOptions, route
from seqr_core.baselines import spectr_energies

from . import reference as ref
from .libraries import add, calibrated, original, random_inputs, random_library

NORMS = [("none", "adapter_module", "e"), ("frobenius", "adapter_module", "e"),
         ("activation", "adapter_module", "e")] + [
    ("zscore", g, t) for g in ("adapter_module", "adapter") for t in ("e", "sqrt", "log")]


def _as_ref_inputs(inputs):
    return {m: (i.form, i.data) for m, i in inputs.items()}


@st.composite
def cases(draw, forms=("activations", "projected", "moments")):
    seed = draw(st.integers(0, 2**32 - 1))
    form = draw(st.sampled_from(forms))
    rng = np.random.default_rng(seed)
    dtypes = ("float32", "float16", "bfloat16")
    idx = random_library(rng, n_adapters=draw(st.integers(1, 9)), n_modules=draw(st.integers(1, 3)),
                         d=draw(st.integers(2, 24)), r=draw(st.integers(1, 6)),
                         shared_only=form != "activations", b_dtype=draw(st.sampled_from(dtypes)))
    norm = draw(st.sampled_from(NORMS if form != "moments" else NORMS[:4] + [NORMS[6]]))
    if norm[0] in ("activation", "zscore"):
        idx = calibrated(rng, idx)
    inputs = random_inputs(rng, idx, T=draw(st.integers(1, 6)), form=form,
                           dtype=draw(st.sampled_from(dtypes)))
    k = draw(st.integers(1, 4))
    return idx, inputs, Normalisation(*norm), k


@given(cases())
def test_seqr_top_k_equals_float64_brute_force(case):
    idx, inputs, norm, k = case
    d = route(idx, inputs, RouteOptions(normalisation=norm, top_k=k))
    want = ref.ranking(ref.scores(idx, _as_ref_inputs(inputs), kind=norm.kind,
                                  granularity=norm.granularity, transform=norm.transform))
    assert [c.adapter_id for c in d.choices] == want[:k]
    assert d.normalisation == norm.label and not d.fallback


@given(cases(forms=("activations", "projected")), st.sampled_from(["mean", "vote"]))
def test_per_token_decisions_equal_float64_brute_force(case, aggregation):
    idx, inputs, norm, k = case
    d = route(idx, inputs, RouteOptions(normalisation=norm, top_k=k, granularity="token",
                                        aggregation=aggregation))
    per_tok = ref.scores(idx, _as_ref_inputs(inputs), kind=norm.kind, granularity=norm.granularity,
                         transform=norm.transform, per_token=True)
    T = next(iter(inputs.values())).data.shape[0]
    for t in range(T):
        want = ref.ranking({i: float(v[t]) for i, v in per_tok.items()})[:k]
        assert list(d.tokens.ids[t][: len(want)]) == want


@given(cases(forms=("activations",)), st.data())
def test_candidate_mask_restricts_before_ranking(case, data):
    idx, inputs, norm, k = case
    names = list(idx.names)
    cand = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    want = ref.ranking(ref.scores(idx, _as_ref_inputs(inputs), kind=norm.kind,
                                  granularity=norm.granularity, transform=norm.transform,
                                  candidates=set(cand)))
    if not want:
        return
    d = route(idx, inputs, RouteOptions(normalisation=norm, top_k=k, candidates=tuple(cand)))
    assert [c.adapter_id for c in d.choices] == want[:k]
    assert {c.name for c in d.choices} <= set(cand)


@given(st.integers(0, 2**32 - 1))
def test_spectr_and_exact_energies_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    idx = random_library(rng, n_adapters=int(rng.integers(1, 8)), n_modules=1,
                         d=int(rng.integers(2, 30)), r=int(rng.integers(1, 6)))
    inputs = random_inputs(rng, idx, T=4, form="activations")
    (m, inp), = inputs.items()
    sp = spectr_energies(idx, m, inp)
    by_id = {e.adapter_id: e for e in idx.adapters}
    want = np.stack([ref.energies(by_id[int(i)], m, inp.form, inp.data) for i in sp.ids], 1)
    scale = np.abs(want).max() + 1e-30
    np.testing.assert_allclose(sp.e, want, rtol=1e-4, atol=1e-5 * scale)
    for name in ("exact", "spectr"):
        d = route(idx, inputs, RouteOptions(method=name, normalisation=Normalisation("none"), top_k=3))
        np.testing.assert_allclose([c.score for c in d.choices],
                                   sorted(want.mean(0), reverse=True)[:3], rtol=1e-4, atol=1e-5 * scale)


def test_normalised_scores_match_their_definitions():
    rng = np.random.default_rng(7)
    idx = calibrated(rng, random_library(rng, n_adapters=6, n_modules=3, d=16, r=4, p_near_tie=0,
                                         p_copy=0), sequences=8)
    inputs = random_inputs(rng, idx, T=8, form="activations")
    for kind, gran, t in NORMS:
        d = route(idx, inputs, RouteOptions(normalisation=Normalisation(kind, gran, t), top_k=1))
        want = ref.scores(idx, _as_ref_inputs(inputs), kind=kind, granularity=gran, transform=t)
        got = dict(zip(d.candidate_ids.tolist(), d.scores.tolist()))
        for i, v in want.items():
            assert got[i] == pytest.approx(v, rel=1e-4, abs=1e-6), (kind, gran, t, i)


def test_exact_ties_break_by_adapter_id():
    rng = np.random.default_rng(3)
    idx = random_library(rng, n_adapters=1, n_modules=1, d=8, r=2)
    ad = original(idx.adapters[0])
    from seqr_core import Adapter
    idx = add(idx, Adapter(name="twin", factors=dict(ad.factors)), adapter_id=99)
    d = route(idx, random_inputs(rng, idx, T=3, form="activations"), RouteOptions(top_k=2))
    assert [c.adapter_id for c in d.choices] == [10, 99]
    assert d.margin == 0.0 and d.rechecked == 2
