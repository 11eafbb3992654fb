"""Incremental index behaviour: add/remove symmetry, immutable snapshots, shared-A detection."""

import numpy as np
import pytest

from seqr_core import (Adapter, AlreadyExistsError, InvalidArgumentError, ModuleFactors,
                       ModuleInput, Normalisation, NotFoundError, RouteOptions, route)

from .libraries import calibrated, random_inputs, random_library

ARRAYS = ("shared_ids", "R", "gram", "general_ids", "M", "M_offsets", "frob2_shared", "frob2_general")


def _same_index(a, b):
    assert a.names == b.names
    assert [e.adapter_id for e in a.adapters] == [e.adapter_id for e in b.adapters]
    for m in a.modules:
        for f in ARRAYS:
            np.testing.assert_array_equal(getattr(a.modules[m], f), getattr(b.modules[m], f), err_msg=f)


@pytest.mark.parametrize("seed", range(8))
def test_add_then_remove_equals_never_added(seed):
    rng = np.random.default_rng(seed)
    base = random_library(rng, n_adapters=5, n_modules=2, d=12, r=3)
    rng2 = np.random.default_rng(seed + 100)
    newcomer = Adapter(name="newcomer", factors={
        s.name: ModuleFactors(A=base.shared_a[s.name] if k % 2 else rng2.uniform(-1, 1, (3, 12)).astype(np.float32),
                              B=rng2.standard_normal((s.d_out, 3)).astype(np.float32), scale=2.0)
        for k, s in enumerate(base.signature.modules)})
    added, entry = base.add_adapter(newcomer, adapter_id=1000)
    removed, gone = added.remove_adapter("newcomer")
    assert entry.name == gone.name == "newcomer" and added.version == base.version + 1
    assert removed.version == base.version + 2
    _same_index(removed, base)


def test_removing_a_middle_adapter_keeps_the_others_answers():
    rng = np.random.default_rng(11)
    idx = random_library(rng, n_adapters=6, n_modules=2, d=10, r=3, p_near_tie=0, p_copy=0)
    inputs = random_inputs(rng, idx, T=4, form="activations")
    before = route(idx, inputs, RouteOptions(normalisation=Normalisation("none"), top_k=6))
    victim = before.choices[2].name
    after = route(idx.remove_adapter(victim)[0], inputs,
                  RouteOptions(normalisation=Normalisation("none"), top_k=6))
    assert [c.name for c in after.choices] == [c.name for c in before.choices if c.name != victim]


def test_old_snapshot_keeps_old_answers():
    rng = np.random.default_rng(5)
    old = random_library(rng, n_adapters=4, n_modules=1, d=8, r=2, p_near_tie=0, p_copy=0)
    inputs = random_inputs(rng, old, T=3, form="activations")
    first = route(old, inputs, RouteOptions(top_k=4))
    # A dominant newcomer would win every request on the new snapshot...
    m = old.signature.names[0]
    big = Adapter(name="dominant", factors={m: ModuleFactors(A=old.shared_a[m], B=np.eye(old.signature.modules[0].d_out, 2, dtype=np.float32) * 1e3, scale=1.0)})
    new, _ = old.add_adapter(big, adapter_id=500)
    assert route(new, inputs, RouteOptions(normalisation=Normalisation("none"))).choices[0].name == "dominant"
    # ...but a reader holding the old snapshot gets exactly its old decision.
    again = route(old, inputs, RouteOptions(top_k=4))
    assert again.choices == first.choices and again.version == first.version


def test_shared_a_detected_bitwise_and_general_otherwise():
    rng = np.random.default_rng(1)
    idx = random_library(rng, n_adapters=0, n_modules=1, d=6, r=2)
    m = idx.signature.names[0]
    o = idx.signature.modules[0].d_out
    B = rng.standard_normal((o, 2)).astype(np.float32)
    idx, shared = idx.add_adapter(Adapter(name="s", factors={m: ModuleFactors(A=idx.shared_a[m], B=B, scale=1)}), adapter_id=1)
    nudged = idx.shared_a[m].copy()
    nudged[0, 0] = np.nextafter(nudged[0, 0], np.float32(9))
    idx, general = idx.add_adapter(Adapter(name="g", factors={m: ModuleFactors(A=nudged, B=B, scale=1)}), adapter_id=2)
    assert shared.kind == "shared_a" and general.kind == "general"


def test_fp16_upload_of_shared_a_snaps_to_library_a():
    rng = np.random.default_rng(2)
    idx = random_library(rng, n_adapters=0, n_modules=1, d=6, r=2)
    m = idx.signature.names[0]
    A16 = idx.shared_a[m].astype(np.float16).astype(np.float32)
    B = rng.standard_normal((idx.signature.modules[0].d_out, 2)).astype(np.float32)
    idx, e = idx.add_adapter(Adapter(name="h", factors={m: ModuleFactors(A=A16, B=B, scale=1)}),
                             adapter_id=1, upload_dtype="F16")
    assert e.kind == "shared_a"
    np.testing.assert_array_equal(e.adapter.factors[m].A, idx.shared_a[m])


def test_adapter_added_after_calibration_falls_back_to_frobenius_visibly():
    rng = np.random.default_rng(4)
    idx = calibrated(rng, random_library(rng, n_adapters=3, n_modules=1, d=8, r=2))
    m = idx.signature.names[0]
    late = Adapter(name="late", factors={m: ModuleFactors(A=idx.shared_a[m], B=rng.standard_normal((idx.signature.modules[0].d_out, 2)).astype(np.float32), scale=1)})
    idx, _ = idx.add_adapter(late, adapter_id=99)
    d = route(idx, random_inputs(rng, idx, T=3, form="activations"),
              RouteOptions(normalisation=Normalisation("zscore", "adapter", "log")))
    assert d.normalisation == "frobenius" and "late" in d.fallback
    d2 = route(idx, random_inputs(rng, idx, T=3, form="activations"),
               RouteOptions(normalisation=Normalisation("zscore", "adapter", "log"),
                            candidates=tuple(n for n in idx.names if n != "late")))
    assert d2.normalisation == "zscore/adapter/log" and not d2.fallback


@pytest.mark.parametrize("mutate, error, field", [
    (lambda idx, a: idx.add_adapter(a, adapter_id=10), AlreadyExistsError, "adapter.name"),
    (lambda idx, a: idx.add_adapter(Adapter(name="z", factors=dict(a.factors)), adapter_id=5),
     InvalidArgumentError, "adapter_id"),
    (lambda idx, a: idx.remove_adapter("ghost"), NotFoundError, "adapter"),
])
def test_index_mutations_reject_bad_requests(mutate, error, field):
    rng = np.random.default_rng(0)
    idx = random_library(rng, n_adapters=2, n_modules=1, d=4, r=2)
    with pytest.raises(error) as ei:
        mutate(idx, idx.adapters[0].adapter)
    assert ei.value.field == field


def _rebuilt_with(base, replacement):
    """``base`` built from scratch with ``replacement`` in place of its namesake (same id)."""
    idx = type(base).create(name=base.name, signature=base.signature, shared_a=base.shared_a)
    for e in base.adapters:
        idx, _ = idx.add_adapter(replacement if e.name == replacement.name else e.adapter,
                                 adapter_id=e.adapter_id, upload_dtype=e.upload_dtype)
    return idx


@pytest.mark.parametrize("seed", range(6))
def test_replacing_an_adapter_equals_building_the_library_with_the_new_version(seed):
    rng = np.random.default_rng(seed)
    base = random_library(rng, n_adapters=6, n_modules=3, d=12, r=3, p_copy=0)
    victim = base.adapters[int(rng.integers(1, len(base.adapters) - 1))]     # a middle one
    mods = base.signature.modules[: 1 + seed % 3]        # the new version may target other modules
    new = Adapter(name=victim.name, factors={
        s.name: ModuleFactors(A=base.shared_a[s.name] if k % 2 == seed % 2 else rng.uniform(-1, 1, (3, 12)).astype(np.float32),
                              B=rng.standard_normal((s.d_out, 3)).astype(np.float32), scale=1.5)
        for k, s in enumerate(mods)})
    replaced, entry = base.replace_adapter(new, adapter_id=victim.adapter_id)
    assert entry.adapter_id == victim.adapter_id and replaced.version == base.version + 1
    _same_index(replaced, _rebuilt_with(base, new))
    inputs = random_inputs(rng, base, T=4, form="activations")
    opts = RouteOptions(normalisation=Normalisation("none"), top_k=6)
    got, want = route(replaced, inputs, opts), route(_rebuilt_with(base, new), inputs, opts)
    assert [(c.name, c.adapter_id, c.score) for c in got.choices] == \
        [(c.name, c.adapter_id, c.score) for c in want.choices]
    assert base.entry(victim.name) is victim            # the old snapshot is untouched


def test_replacing_drops_the_old_versions_calibration_only():
    rng = np.random.default_rng(3)
    idx = calibrated(rng, random_library(rng, n_adapters=4, n_modules=2, d=8, r=2, p_copy=0))
    victim = idx.adapters[1]
    new, _ = idx.replace_adapter(Adapter(name=victim.name, factors=dict(victim.adapter.factors)),
                                 adapter_id=victim.adapter_id)
    assert new.calibration.get(victim.name) is None
    assert all(new.calibration.get(e.name) is not None for e in idx.adapters if e is not victim)


def test_a_replaced_adapter_keeps_its_id():
    rng = np.random.default_rng(4)
    idx = random_library(rng, n_adapters=3, n_modules=1, d=8, r=2, p_copy=0)
    e = idx.adapters[0]
    with pytest.raises(InvalidArgumentError) as ei:
        idx.replace_adapter(e.adapter, adapter_id=e.adapter_id + 1)
    assert ei.value.field == "adapter_id"
    with pytest.raises(AlreadyExistsError):       # a new name may not take another adapter's id
        idx.replace_adapter(Adapter(name="other", factors=dict(e.adapter.factors)), adapter_id=e.adapter_id)
