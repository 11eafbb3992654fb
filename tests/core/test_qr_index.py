"""Incremental index behaviour: add/remove symmetry, immutable snapshots, shared-A detection,
tables that grow in place, and no B anywhere in a snapshot."""

import gc
import types

import numpy as np
import pytest

from seqr_core import (Adapter, AlreadyExistsError, InvalidArgumentError, LibraryIndex, ModuleFactors,
                       Normalisation, NotFoundError, RouteOptions, route)
from seqr_core.signature import BaseModelSignature, ModuleSpec

from .libraries import add, calibrated, original, random_inputs, random_library

TABLES = ("ids", "present", "shared", "frob2", "rf2", "wnorm")
GENERAL = ("ids", "M", "offsets", "mnorm")


def _same_index(a, b):
    """Same adapters and bit-identical per-adapter tables (live slots, library order)."""
    assert a.names == b.names
    assert [e.adapter_id for e in a.adapters] == [e.adapter_id for e in b.adapters]
    keys = TABLES + tuple(f"W{g}" for g in range(len(a.layout.groups)))
    for key in keys:
        np.testing.assert_array_equal(a.columns.view(key)[..., a.slots], b.columns.view(key)[..., b.slots],
                                      err_msg=key)
    assert sorted(a.general) == sorted(b.general)
    for m in a.general:
        for f in GENERAL:
            np.testing.assert_array_equal(getattr(a.general[m], f), getattr(b.general[m], f), err_msg=f)


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
    assert e.kind == "shared_a" and e.shared_modules == {m}


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
        mutate(idx, original(idx.adapters[0]))
    assert ei.value.field == field


def _rebuilt_with(base, replacement):
    """``base`` built from scratch with ``replacement`` in place of its namesake (same id)."""
    idx = type(base).create(name=base.name, signature=base.signature, shared_a=base.shared_a)
    for e in base.adapters:
        idx, _ = idx.add_adapter(replacement if e.name == replacement.name else original(e),
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
    assert [(c.name, c.adapter_id) for c in got.choices] == [(c.name, c.adapter_id) for c in want.choices]
    # same numbers up to float64 rounding: the replaced snapshot keeps the old version's dead
    # slot until compaction, and BLAS blocks differ with the number of slots
    np.testing.assert_allclose([c.score for c in got.choices], [c.score for c in want.choices], rtol=1e-12)
    assert base.entry(victim.name) is victim            # the old snapshot is untouched


def test_replacing_drops_the_old_versions_calibration_only():
    rng = np.random.default_rng(3)
    idx = calibrated(rng, random_library(rng, n_adapters=4, n_modules=2, d=8, r=2, p_copy=0))
    victim = idx.adapters[1]
    new, _ = idx.replace_adapter(Adapter(name=victim.name, factors=dict(original(victim).factors)),
                                 adapter_id=victim.adapter_id)
    assert new.calibration.get(victim.name) is None
    assert all(new.calibration.get(e.name) is not None for e in idx.adapters if e is not victim)


def test_a_replaced_adapter_keeps_its_id():
    rng = np.random.default_rng(4)
    idx = random_library(rng, n_adapters=3, n_modules=1, d=8, r=2, p_copy=0)
    e = idx.adapters[0]
    with pytest.raises(InvalidArgumentError) as ei:
        idx.replace_adapter(original(e), adapter_id=e.adapter_id + 1)
    assert ei.value.field == "adapter_id"
    with pytest.raises(AlreadyExistsError):       # a new name may not take another adapter's id
        idx.replace_adapter(Adapter(name="other", factors=dict(original(e).factors)), adapter_id=e.adapter_id)


def _reachable(root):
    """Every object reachable from ``root`` (not through modules, classes or functions)."""
    seen, todo, out = set(), [root], []
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, (types.ModuleType, type, types.FunctionType,
                                            types.BuiltinFunctionType, types.MethodType)):
            continue
        seen.add(id(o))
        out.append(o)
        todo.extend(gc.get_referents(o))
        if isinstance(o, np.ndarray) and o.base is not None:
            todo.append(o.base)
    return out


def test_no_b_array_is_reachable_from_a_snapshot():
    rng = np.random.default_rng(8)
    d, r, d_out = 6, 2, 23        # d_out: a size no index array has (N, d, r, K differ)
    sig = BaseModelSignature("toy", (ModuleSpec("q", d, d_out), ModuleSpec("v", d, d_out)))
    A = {m: rng.uniform(-1, 1, (r, d)).astype(np.float32) for m in ("q", "v")}
    idx = LibraryIndex.create(name="lib", signature=sig, shared_a=A)
    Bs = []
    for i in range(5):
        own = i % 2 == 1
        f = {m: ModuleFactors(A=rng.uniform(-1, 1, (r, d)).astype(np.float32) if own and m == "v" else A[m],
                              B=rng.standard_normal((d_out, r)).astype(np.float32), scale=2.0)
             for m in ("q", "v")}
        Bs += [x.B for x in f.values()]
        idx = add(idx, Adapter(name=f"a{i}", factors=f), adapter_id=i)
    idx = calibrated(rng, idx)
    route(idx, random_inputs(rng, idx, T=3, form="activations"), RouteOptions(granularity="token"))
    idx = idx.remove_adapter("a1")[0]
    f = {m: ModuleFactors(A=A[m], B=rng.standard_normal((d_out, r)).astype(np.float32), scale=2.0) for m in ("q", "v")}
    Bs += [x.B for x in f.values()]
    idx = idx.replace_adapter(Adapter(name="a2", factors=f), adapter_id=2)[0]    # a new version
    arrays = [o for o in _reachable(idx) if isinstance(o, np.ndarray)]
    assert arrays
    assert not [a.shape for a in arrays if d_out in a.shape]
    for B in Bs:
        for a in arrays:
            assert a.size != B.size or not (np.array_equal(a.ravel(), B.ravel()) or
                                            np.array_equal(a.ravel(), 2 * B.astype(np.float64).ravel()))


def test_adding_an_adapter_writes_its_columns_into_the_shared_tables():
    rng = np.random.default_rng(9)
    idx = random_library(rng, n_adapters=3, n_modules=2, d=8, r=2, shared_only=True)
    before = idx.table("W0").copy()
    m = idx.signature.names[0]
    new, _ = idx.add_adapter(Adapter(name="late", factors={m: ModuleFactors(
        A=idx.shared_a[m], B=rng.standard_normal((idx.signature.modules[0].d_out, 2)).astype(np.float32),
        scale=1.0)}), adapter_id=999)
    # Same buffer, one more column: no copy of the others (amortised growth), and the old
    # snapshot still sees exactly what it saw.
    assert np.shares_memory(new.table("W0"), idx.table("W0"))
    assert new.table("W0").shape[-1] == idx.table("W0").shape[-1] + 1
    np.testing.assert_array_equal(idx.table("W0"), before)
    # A branch off the old snapshot cannot overwrite the new one's column: it forks.
    other, _ = idx.add_adapter(Adapter(name="branch", factors={m: ModuleFactors(
        A=idx.shared_a[m], B=np.ones((idx.signature.modules[0].d_out, 2), np.float32), scale=1.0)}),
        adapter_id=999)
    assert not np.shares_memory(other.table("W0"), new.table("W0"))
    assert not np.array_equal(other.table("W0")[..., -1], new.table("W0")[..., -1])
    # Removing one masks its slot: the tables are not rebuilt either.
    gone, _ = new.remove_adapter(new.names[0])
    assert np.shares_memory(gone.table("W0"), new.table("W0")) and gone.names == new.names[1:]


@pytest.mark.parametrize("seed", range(4))
def test_one_at_a_time_equals_bulk_and_survives_compaction(seed):
    rng = np.random.default_rng(seed)
    lib = random_library(rng, n_adapters=80, n_modules=2, d=6, r=2)
    items = [(original(e), e.adapter_id, e.upload_dtype) for e in lib.adapters]
    empty = LibraryIndex.create(name="lib", signature=lib.signature, shared_a=lib.shared_a)
    bulk, _ = empty.add_adapters(items)
    _same_index(lib, bulk)
    # Remove most adapters one by one: tombstones, then compaction; answers stay those of an
    # index that never had them.
    gone = set(rng.choice(lib.names, size=60, replace=False))
    cur = lib
    for n in sorted(gone):
        cur = cur.remove_adapter(n)[0]
    assert cur.compact or cur.columns.n < lib.columns.n
    fresh, _ = empty.add_adapters([it for it in items if it[0].name not in gone])
    _same_index(cur, fresh)
    inputs = random_inputs(rng, cur, T=3, form="activations")
    for gran in ("sequence", "token"):
        a = route(cur, inputs, RouteOptions(top_k=3, granularity=gran, normalisation=Normalisation("none")))
        b = route(fresh, inputs, RouteOptions(top_k=3, granularity=gran, normalisation=Normalisation("none")))
        assert [c.adapter_id for c in a.choices] == [c.adapter_id for c in b.choices]
        # same numbers up to float64 rounding (BLAS blocks differ with the number of slots)
        np.testing.assert_allclose([c.score for c in a.choices], [c.score for c in b.choices], rtol=1e-12)


def test_a_restricted_view_routes_its_adapters_as_a_library_of_them_alone():
    rng = np.random.default_rng(11)
    idx = calibrated(rng, random_library(rng, n_adapters=7, n_modules=2, d=8, r=2, p_copy=0))
    keep = [idx.names[k] for k in (1, 4, 5)]
    view = idx.restricted(keep)
    assert view.names == tuple(keep) and all(view.entry(n) is idx.entry(n) for n in keep)
    assert sorted(view.calibration.adapters) == sorted(n for n in keep if idx.calibration.get(n) is not None)
    alone, _ = LibraryIndex.create(name=idx.name, signature=idx.signature, shared_a=idx.shared_a).add_adapters(
        [(original(idx.entry(n)), idx.entry(n).adapter_id, idx.entry(n).upload_dtype) for n in keep])
    inputs = random_inputs(rng, idx, T=3, form="activations")
    for gran in ("sequence", "token"):
        opts = RouteOptions(top_k=3, granularity=gran, normalisation=Normalisation("frobenius"))
        a, b = route(view, inputs, opts), route(alone, inputs, opts)
        assert [c.adapter_id for c in a.choices] == [c.adapter_id for c in b.choices]
        np.testing.assert_allclose([c.score for c in a.choices], [c.score for c in b.choices], rtol=1e-12)
    assert idx.names == tuple(sorted(idx.names, key=lambda n: idx.entry(n).adapter_id))   # untouched


def test_shared_a_gram_weights_equal_those_of_the_qr_factor_to_float64_rounding():
    from seqr_core.adapter_index import gram_weights, thin_r
    rng = np.random.default_rng(12)
    d, r, d_out = 32, 4, 300
    sig = BaseModelSignature("toy", (ModuleSpec("q", d, d_out),))
    A = {"q": rng.uniform(-1, 1, (r, d)).astype(np.float32)}
    idx = LibraryIndex.create(name="lib", signature=sig, shared_a=A)
    B = (rng.standard_normal((d_out, r)) * 10.0 ** rng.uniform(-3, 3, r)).astype(np.float32)  # badly scaled columns
    ai = idx.index_adapter(Adapter(name="a", factors={"q": ModuleFactors(A=A["q"], B=B, scale=1.7)}))
    via_qr = gram_weights(thin_r((1.7 * B.astype(np.float64))[None]))[0]
    scale = (1.7 * np.linalg.norm(B.astype(np.float64))) ** 2
    assert np.abs(ai.gram - via_qr).max() <= 1e-13 * scale
