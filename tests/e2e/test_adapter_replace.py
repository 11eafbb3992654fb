"""PutAdapter with replace: same name and id, version + 1, atomic swap, old version crypto-shredded."""

from __future__ import annotations

import numpy as np
import pytest

from seqr_client import NotFoundError, RouterClient, SeqrError
from seqr_core import (Calibrator, LibraryIndex, ModuleInput, Normalisation, RouteOptions, parse_peft_adapter,
                       route)
from seqr_server.auth import OPEN

from ..peft_factory import make_peft_adapter, read_dir
from .conftest import LIB, RANK, activations, launch, populate
from .tenants import HIDDEN, UPLOADS, close, connect, populate_tenants, write_tokens

FILES = ("adapter_config.json", "adapter_model.safetensors")
VICTIM = "shared-a1"          # id 1 of the world's five adapters: a middle one


@pytest.fixture(scope="module")
def new_version(world, tmp_path_factory):
    """A different shared-A adapter (new B, other scale) to upload under an existing name."""
    return make_peft_adapter(world.model, tmp_path_factory.mktemp("v2") / "v2", seed=77, rank=RANK,
                             alpha=32, shared_a=world.recipe)


def expected_index(world, replaced: dict[str, object]) -> LibraryIndex:
    """The core index of the world's adapters, ids in upload order, some names' files swapped."""
    idx = LibraryIndex.create(name=LIB, signature=world.sig, shared_a=world.shared_a)
    for i, (name, path) in enumerate(world.adapters.items()):
        parsed = parse_peft_adapter(read_dir(replaced.get(name, path)), name=name, signature=world.sig)
        idx, _ = idx.add_adapter(parsed.adapter, adapter_id=i, upload_dtype=parsed.upload_dtype)
    return idx


def blob_files(h, name: str) -> list:
    return [h.manager._store.blob_path(LIB, adapter=name, file=f) for f in FILES]


def test_replace_keeps_name_and_id_and_bumps_the_version(populated, new_version):
    _, client = populated
    before = {a.name: a for a in client.list_adapters(LIB)}
    lib_before = client.describe(LIB).version
    info = client.put_adapter(new_version, name=VICTIM, library=LIB, replace=True)
    assert (info.name, info.adapter_id, info.version) == (VICTIM, before[VICTIM].adapter_id, 2)
    assert info.sha256 != before[VICTIM].sha256 and info.kind == "shared_a"
    after = {a.name: a for a in client.list_adapters(LIB)}
    assert [a.adapter_id for a in after.values()] == [a.adapter_id for a in before.values()]
    assert after[VICTIM].version == 2 and all(a.version == 1 for n, a in after.items() if n != VICTIM)
    assert client.describe(LIB).version == lib_before + 1
    again = client.put_adapter(new_version, name=VICTIM, library=LIB, replace=True)
    assert (again.adapter_id, again.version) == (info.adapter_id, 3)


def test_routing_uses_the_new_factors_at_once(world, populated, new_version):
    _, client = populated
    x = activations(world)
    opts = dict(top_k=5, normalisation="none")
    client.put_adapter(new_version, name=VICTIM, library=LIB, replace=True)
    got = client.route(LIB, x, **opts)
    want = route(expected_index(world, {VICTIM: new_version}),
                 {m: ModuleInput("activations", a, a.shape[0]) for m, a in x.items()},
                 RouteOptions(top_k=5, normalisation=Normalisation("none")))
    assert [(c.name, c.adapter_id) for c in got.choices] == [(c.name, c.adapter_id) for c in want.choices]
    # float64 rounding apart: the served snapshot keeps the old version's dead slot until
    # compaction, so its BLAS blocks differ from a library built fresh
    np.testing.assert_allclose([c.score for c in got.choices], [c.score for c in want.choices], rtol=1e-12)
    old = route(expected_index(world, {}), {m: ModuleInput("activations", a, a.shape[0]) for m, a in x.items()},
                RouteOptions(top_k=5, normalisation=Normalisation("none")))
    assert {c.name: c.score for c in old.choices}[VICTIM] != {c.name: c.score for c in got.choices}[VICTIM]


def test_the_old_version_is_shredded_and_the_new_one_survives_a_restart(world, start_server, tmp_path,
                                                                        new_version):
    h = start_server(tmp_path / "d")
    with RouterClient(h.target, timeout=30) as c:
        populate(h, world).close()
        c.calibrate([activations(world)], library=LIB)
        old_blobs = blob_files(h, VICTIM)
        assert all(p.is_file() for p in old_blobs)
        info = c.put_adapter(new_version, name=VICTIM, library=LIB, replace=True)
        assert not any(p.exists() for p in old_blobs)            # unlinked after the commit
        assert all(p.is_file() for p in blob_files(h, VICTIM))
        listed = {a.name: a for a in c.list_adapters(LIB)}
        # The old version's statistics describe other factors: gone; the others keep theirs. A
        # shared-A adapter then gets statistics derived from the library's pooled moments.
        assert listed["shared-a0"].calibrated and "shared-a0" not in c.describe(LIB).derived_adapters
        assert listed[VICTIM].calibrated and VICTIM in c.describe(LIB).derived_adapters
        routed = c.route(LIB, activations(world), top_k=5, normalisation="none")
    h.stop(grace=1.0)
    h2 = start_server(tmp_path / "d")
    with RouterClient(h2.target, timeout=30) as c:
        listed = {a.name: a for a in c.list_adapters(LIB)}
        assert (listed[VICTIM].adapter_id, listed[VICTIM].version) == (info.adapter_id, 2)
        assert listed["shared-a0"].calibrated and "shared-a0" not in c.describe(LIB).derived_adapters
        assert listed[VICTIM].calibrated and VICTIM in c.describe(LIB).derived_adapters
        again = c.route(LIB, activations(world), top_k=5, normalisation="none").choices
        assert [(x.name, x.adapter_id) for x in again] == [(x.name, x.adapter_id) for x in routed.choices]
        # float64 rounding apart: before the restart the replaced version's dead slot was still there
        np.testing.assert_allclose([x.score for x in again], [x.score for x in routed.choices], rtol=1e-12)


def test_replacing_a_missing_adapter_is_not_found_and_stores_nothing(populated, new_version):
    _, client = populated
    version = client.describe(LIB).version
    with pytest.raises(NotFoundError) as ei:
        client.put_adapter(new_version, name="no-such-adapter", library=LIB, replace=True)
    assert ei.value.field == "header.name"
    assert client.describe(LIB).version == version
    assert "no-such-adapter" not in [a.name for a in client.list_adapters(LIB)]


def test_calibration_fitted_on_the_old_version_is_not_stored_for_the_new_one(world, populated, new_version):
    h, client = populated
    basis = h.manager.get(LIB, OPEN).index          # a Calibrate stream started before the replace
    cal = Calibrator(basis)
    cal.update({m: ModuleInput("activations", a, a.shape[0]) for m, a in activations(world).items()})
    client.put_adapter(new_version, name=VICTIM, library=LIB, replace=True)
    _, names = h.manager.store_calibration(LIB, basis, cal.finish(), OPEN)
    assert VICTIM not in names and "shared-a0" in names


def _err(fn) -> SeqrError:
    with pytest.raises(SeqrError) as ei:
        fn()
    return ei.value


def test_a_restricted_admin_cannot_replace_a_hidden_adapter(world, tmp_path, new_version):
    tokens = write_tokens(tmp_path / "tokens.json", {"admin": dict(roles=["admin"]),
                                                     "admin-a": dict(roles=["admin"], adapters=["team-a-*"])})
    h = launch(tmp_path / "d", tokens_file=tmp_path / "tokens.json")
    clients = connect(h, tokens)
    try:
        populate_tenants(clients["admin"], world)
        before = {a.name: a for a in clients["admin"].list_adapters(LIB)}
        a = clients["admin-a"]
        hidden = _err(lambda: a.put_adapter(new_version, name=HIDDEN, library=LIB, replace=True))
        absent = _err(lambda: a.put_adapter(new_version, name="absent-x", library=LIB, replace=True))
        assert isinstance(hidden, NotFoundError)
        assert (hidden.code, hidden.field, hidden.reason) == (absent.code, absent.field, absent.reason)
        assert str(hidden).replace(HIDDEN, "<x>") == str(absent).replace("absent-x", "<x>")
        after = {x.name: x for x in clients["admin"].list_adapters(LIB)}
        assert after[HIDDEN] == before[HIDDEN]
        # Its own adapters it may replace.
        mine = a.put_adapter(new_version, name="team-a-0", library=LIB, replace=True)
        assert (mine.adapter_id, mine.version) == (before["team-a-0"].adapter_id, 2)
        assert set(UPLOADS) == set(after)
    finally:
        close(clients)
        h.stop(grace=1.0)


def test_replacing_a_quarantined_adapter_repairs_it_in_place(world, tmp_path, new_version):
    from .tenants import Tenants, flip_bit, index_blob
    t = Tenants(world, tmp_path, principals={"admin": dict(roles=["admin"]),
                                             "admin-a": dict(roles=["admin"], adapters=["team-a-*"])})
    try:
        blob = index_blob(t.h, HIDDEN)
        t.h.stop(grace=1.0)
        flip_bit(blob)
        t.restart()
        admin = t.c["admin"]
        damaged = {a.name: a for a in admin.list_adapters(LIB)}[HIDDEN]
        assert damaged.status == "damaged"
        with pytest.raises(NotFoundError):            # hidden from admin-a: absent, damaged or not
            t.c["admin-a"].put_adapter(new_version, name=HIDDEN, library=LIB, replace=True)
        fixed = admin.put_adapter(new_version, name=HIDDEN, library=LIB, replace=True)
        assert (fixed.adapter_id, fixed.version, fixed.status) == (damaged.adapter_id, 2, "ready")
        assert not blob.exists() and not admin.describe(LIB).degraded
        assert HIDDEN in [c.name for c in admin.route(LIB, activations(world), top_k=3).choices]
    finally:
        t.close()
