"""Pooled moments (seqr_core.moments): a shared-A adapter added after calibration gets the
statistics re-streaming would give, exactly those, and nothing it cannot know."""

from __future__ import annotations

import numpy as np
import pytest

from seqr_core import (Calibrator, ModuleInput, MomentPool, Normalisation, RouteOptions, derived_stats,
                       route)
from seqr_core.errors import IntegrityError
from seqr_core.moments import MomentAccumulator

from .libraries import original, random_library

D, R = 16, 4


def _library(seed: int):
    rng = np.random.default_rng(seed)
    return random_library(rng, n_adapters=6, n_modules=3, d=D, r=R, shared_only=True, p_copy=0,
                          p_near_tie=0, p_skip_module=0), rng


def _sequences(rng, index, n: int, form: str = "activations"):
    out = []
    for _ in range(n):
        T = int(rng.integers(2, 24))
        x = (rng.standard_normal((T, D)) * rng.uniform(0.2, 3)).astype(np.float32)
        out.append({m: ModuleInput(form, x if form == "activations" else
                                   (x.astype(np.float64) @ index.shared_a[m].T.astype(np.float64)).astype(np.float32), T)
                    for m in index.signature.names})
    return out


def _stream(index, seqs) -> Calibrator:
    cal = Calibrator(index)
    for s in seqs:
        cal.update(s)
    return cal


def _reference_e(index, name: str, module: str, seqs) -> np.ndarray:
    """Every calibration token's e = ‖s·B·A·x‖² in float64, from the adapter's own factors."""
    f = original(index.entry(name)).factors[module]
    es = []
    for s in seqs:
        inp = s[module]
        z = inp.data.astype(np.float64)
        z = z if inp.form == "projected" else z @ f.A.astype(np.float64).T
        y = f.scale * (z @ f.B.astype(np.float64).T)
        es.append((y * y).sum(axis=1))
    return np.concatenate(es)


@pytest.mark.parametrize("form", ["activations", "projected"])
def test_adapter_added_after_calibration_gets_the_streamed_statistics(form):
    index, rng = _library(1)
    seqs = _sequences(rng, index, 40, form)
    late = index.adapters[-1].name
    before, _ = index.remove_adapter(late)
    cal = _stream(before, seqs)
    pool = MomentPool.from_bytes(cal.pool().to_bytes())            # as the store keeps it
    got = derived_stats(index.with_calibration(cal.finish()), pool).get(late)
    want = _stream(index, seqs).finish().get(late)
    assert got is not None and got.derived and got.modules == want.modules
    for m in want.modules:
        e = _reference_e(index, late, m, seqs)
        n, mean, m2 = got.module_stats[m][0]
        assert n == e.size
        np.testing.assert_allclose([mean, m2], want.module_stats[m][0][1:], rtol=1e-11)
        np.testing.assert_allclose([mean, m2], [e.mean(), ((e - e.mean()) ** 2).sum()], rtol=1e-9)


def test_derived_statistics_serve_mean_and_per_token_zscore_of_e_only():
    index, rng = _library(2)
    seqs = _sequences(rng, index, 12)
    late = index.adapters[-1].name
    before, _ = index.remove_adapter(late)
    cal = _stream(before, seqs)
    stats = derived_stats(index.with_calibration(cal.finish()), cal.pool())
    full = index.with_calibration(stats)
    x = _sequences(rng, index, 1)[0]
    for norm, falls_back in [(Normalisation("activation"), False),
                             (Normalisation("zscore", "adapter_module", "e"), False),
                             (Normalisation("zscore", "adapter_module", "log"), True),
                             (Normalisation("zscore", "adapter_module", "sqrt"), True),
                             (Normalisation("zscore", "adapter", "e"), True)]:
        d = route(full, x, RouteOptions(normalisation=norm, top_k=3))
        assert bool(d.fallback) == falls_back, norm.label
        assert (late in d.fallback) == falls_back
        assert d.normalisation == ("frobenius" if falls_back else norm.label)


def test_routing_with_derived_statistics_equals_routing_after_restreaming():
    index, rng = _library(3)
    seqs = _sequences(rng, index, 30)
    late = index.adapters[-1].name
    before, _ = index.remove_adapter(late)
    cal = _stream(before, seqs)
    derived = index.with_calibration(derived_stats(index.with_calibration(cal.finish()), cal.pool()))
    restreamed = index.with_calibration(_stream(index, seqs).finish())
    for x in _sequences(rng, index, 5):
        for norm in (Normalisation("activation"), Normalisation("zscore", "adapter_module", "e")):
            a = route(derived, x, RouteOptions(normalisation=norm, top_k=6))
            b = route(restreamed, x, RouteOptions(normalisation=norm, top_k=6))
            assert not a.fallback and [c.name for c in a.choices] == [c.name for c in b.choices]
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9)


def test_general_and_streamed_adapters_are_not_derived():
    rng = np.random.default_rng(4)
    index = random_library(rng, n_adapters=8, n_modules=2, d=D, r=R, p_general=0.5, p_copy=0, p_near_tie=0)
    seqs = _sequences(rng, index, 6)
    cal = _stream(index, seqs)
    stats = derived_stats(index.with_calibration(cal.finish()), cal.pool())
    assert not any(s.derived for s in stats.adapters.values())       # every adapter was streamed
    bare = derived_stats(index, cal.pool())
    kinds = {e.name: e.kind for e in index.adapters}
    assert {n for n in bare.adapters} == {n for n, k in kinds.items() if k == "shared_a"}


def test_moments_form_updates_the_mean_but_not_the_second_moment():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((10, R))
    acc = MomentAccumulator()
    acc.begin_sequence()
    acc.add_tokens("m", z)
    acc.begin_sequence()
    acc.add_moments("m", z.T @ z / 10, 10)
    mm = acc.finish().modules["m"]
    assert mm.n == 20 and mm.n2 == 10
    np.testing.assert_allclose(mm.background(), z.T @ z / 10, rtol=1e-12)


def test_decay_weights_recent_sequences_more():
    acc = MomentAccumulator(decay=0.5)
    for v in (1.0, 3.0):
        acc.begin_sequence()
        acc.add_tokens("m", np.full((4, 1), v))
    mm = acc.finish().modules["m"]
    # weights 2 (old, halved) and 4: mean of z² = (2·1 + 4·9) / 6
    assert mm.n == 6 and mm.mean[0] == pytest.approx((2 * 1 + 4 * 9) / 6)


@pytest.mark.parametrize("raw", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", b"not safetensors at all"])
def test_damaged_moments_are_integrity_errors(raw):
    with pytest.raises(IntegrityError) as e:
        MomentPool.from_bytes(raw)
    assert e.value.field == "moments"


def test_an_adapter_added_with_derived_statistics_equals_deriving_them_after_the_add():
    from seqr_core.calibration import derived_for
    index, rng = _library(6)
    seqs = _sequences(rng, index, 20)
    late = index.adapters[-1]
    before, _ = index.remove_adapter(late.name)
    cal = _stream(before, seqs)
    pool = cal.pool()
    base = before.with_calibration(cal.finish())
    ai = base.index_adapter(original(late))
    stats = derived_for(ai, pool)
    assert set(stats) == {late.name} and stats[late.name].derived
    added, _ = base.add_indexed([(ai, late.adapter_id)], stats=stats)
    plain, _ = base.add_indexed([(ai, late.adapter_id)])
    rebuilt = plain.with_calibration(derived_stats(plain, pool))
    # written with its columns: the other adapters' calibration columns are not rebuilt
    assert np.shares_memory(added.cal_table("mod_mean"), base.cal_table("mod_mean"))
    for key in ("has", "mod_mean", "mod_std", "seq_mean", "seq_std", "calibrated"):
        np.testing.assert_array_equal(added.cal_table(key)[..., added.slots], rebuilt.cal_table(key)[..., rebuilt.slots],
                                      err_msg=key)
    x = _sequences(rng, index, 1)[0]
    for norm in (Normalisation("activation"), Normalisation("zscore", "adapter_module", "e")):
        a, b = route(added, x, RouteOptions(normalisation=norm, top_k=6)), route(rebuilt, x, RouteOptions(normalisation=norm, top_k=6))
        assert not a.fallback and a.choices == b.choices
