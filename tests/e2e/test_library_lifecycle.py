"""Deletes, restarts, calibration and snapshots, end to end."""

from __future__ import annotations

import numpy as np
import pytest

from seqr_client import NotFoundError, RouterClient
from seqr_core import Calibrator, ModuleInput, Normalisation, RouteOptions, merge_into, route

from .conftest import LIB, activations, core_index


def test_deleted_adapter_is_never_seen_again(world, populated):
    h, client = populated
    v0 = client.describe(LIB).version
    gone = client.delete_adapter("shared-a1", library=LIB)
    assert gone.adapter_id == 1 and gone.library_version == v0 + 1
    x = activations(world)
    assert "shared-a1" not in client.route(LIB, x, top_k=10, include_scores=True).scores
    assert "shared-a1" not in [a.name for a in client.list_adapters(LIB)]
    assert "shared-a1" not in [a.name for a in client.describe(LIB).adapters]
    with pytest.raises(NotFoundError) as ei:
        client.route(LIB, x, candidates=["shared-a1"])
    assert ei.value.field == "candidates"
    with pytest.raises(NotFoundError):
        client.delete_adapter("shared-a1", library=LIB)
    # the name can come back, but its id is new: ids are never reused
    again = client.put_adapter(world.adapters["shared-a1"], name="shared-a1", library=LIB)
    assert again.adapter_id == len(world.adapters)


def test_restart_on_the_same_data_dir_gives_the_same_answers_and_versions(world, start_server, populated):
    h, client = populated
    client.delete_adapter("general-g1", library=LIB)
    cal = client.calibrate([activations(world)], library=LIB)
    assert set(cal.adapters) == set(world.adapters) - {"general-g1"}
    x = activations(world)
    queries = [dict(normalisation="frobenius"), dict(normalisation="activation"),
               dict(normalisation="zscore/adapter_module/log", candidates=list(world.shared_names)),
               dict(granularity="token")]
    before = [client.route(LIB, x, top_k=4, include_scores=True, **q) for q in queries]
    info = client.describe(LIB)
    data_dir = h.config.data_dir
    h.stop(grace=1.0)
    h2 = start_server(data_dir)
    with RouterClient(h2.target) as c2:
        after = [c2.route(LIB, x, top_k=4, include_scores=True, **q) for q in queries]
        info2 = c2.describe(LIB)
    for b, a in zip(before, after):
        assert (a.choices, a.margin, a.library_version, a.normalisation, a.scores, a.fallback) == \
               (b.choices, b.margin, b.library_version, b.normalisation, b.scores, b.fallback)
    np.testing.assert_array_equal(after[3].tokens.adapter_ids, before[3].tokens.adapter_ids)
    assert info2 == info
    assert before[1].fallback == "" and before[1].normalisation == "activation"


def test_calibrated_routing_equals_the_core_with_the_same_statistics(world, populated):
    _, client = populated
    seqs = [activations(world), activations(world, {k: v[::-1].copy() for k, v in world.hidden.items()})]
    res = client.calibrate(seqs, library=LIB)
    index = core_index(world)
    cal = Calibrator(index)
    for s in seqs:
        cal.update({m: ModuleInput("activations", a, a.shape[0]) for m, a in s.items()})
    index = index.with_calibration(merge_into(index, cal.finish()), version=res.library_version)
    x = activations(world)
    opts = dict(top_k=3, candidates=tuple(world.shared_names))
    for norm in (Normalisation("activation"), Normalisation("zscore", "adapter", "log")):
        got = client.route(LIB, x, normalisation=norm, top_k=3, candidates=list(world.shared_names))
        want = route(index, {m: ModuleInput("activations", a, a.shape[0]) for m, a in x.items()},
                     RouteOptions(normalisation=norm, **opts))
        assert [(c.name, c.score) for c in got.choices] == [(c.name, c.score) for c in want.choices]
        assert got.library_version == want.version and got.fallback == ""


def test_uncalibrated_normalisation_falls_back_and_says_so(world, populated):
    _, client = populated
    r = client.route(LIB, activations(world), normalisation="activation")
    assert r.normalisation == "frobenius" and "uncalibrated" in r.fallback


def test_routing_proceeds_while_an_admin_write_holds_the_writer_lock(world, populated):
    h, client = populated
    with h.manager._write:        # an admin write in progress
        r = client.route(LIB, activations(world), timeout=10)
    assert r.choices


def test_old_snapshot_keeps_its_answers_after_a_delete(world, populated):
    h, client = populated
    snap = h.manager._libs[LIB].index
    client.delete_adapter("shared-a0", library=LIB)
    x = {m: ModuleInput("activations", a, a.shape[0]) for m, a in activations(world).items()}
    d = route(snap, x, RouteOptions(top_k=10))
    assert "shared-a0" in [c.name for c in d.choices] and d.version == snap.version
