"""Calibration that never goes stale, through the real server: Calibrate keeps the library's
pooled moments (encrypted), a shared-A adapter uploaded later is calibrated from them at once,
and the library publishes its background for adapter owners."""

from __future__ import annotations

import numpy as np
import pytest

from seqr_client import FailedPreconditionError, RouterClient

from .conftest import LIB, _capture, activations, create_library, projected

LATE = "shared-f16"
EARLY = ("shared-a0", "shared-a1")
NORMS = ("activation", "zscore/adapter_module/e")


@pytest.fixture(scope="module")
def traffic(world):
    """Unlabeled calibration sequences: hidden states of the tiny model on random prompts."""
    return [activations(world, _capture(world.model, 6 + 3 * (k % 4), seed=100 + k)) for k in range(20)]


def _library(client: RouterClient, world, names) -> None:
    create_library(client, world)
    for n in names:
        client.put_adapter(world.adapters[n], name=n, library=LIB)


def _stats(h, name: str):
    return h.manager.get(LIB, _open()).index.calibration.get(name)


def _open():
    from seqr_server.auth import OPEN
    return OPEN


def _scores(client, world, norm: str) -> dict:
    r = client.route(LIB, activations(world), normalisation=norm, top_k=3, include_scores=True)
    assert r.fallback == "" and r.normalisation == norm
    return r.scores


def test_adapter_added_after_calibration_is_routed_calibrated_with_restreamed_statistics(
        world, start_server, tmp_path, traffic):
    h = start_server(tmp_path / "data")
    with RouterClient(h.target, timeout=30) as c:
        _library(c, world, EARLY)
        cal = c.calibrate(traffic, library=LIB)
        assert cal.pooled_moments_updated and set(cal.adapters) == set(EARLY)
        c.put_adapter(world.adapters[LATE], name=LATE, library=LIB)
        info = c.describe(LIB)
        assert info.derived_adapters == (LATE,) and info.pooled_sequences == len(traffic)
        assert LATE in info.calibrated_adapters
        derived = {n: _scores(c, world, n) for n in NORMS}          # no fallback: calibrated at upload
        got = _stats(h, LATE)
        assert got.derived
        c.calibrate(traffic, library=LIB)                           # re-stream the same set
        assert c.describe(LIB).derived_adapters == ()
        want = _stats(h, LATE)
        assert not want.derived and got.modules == want.modules
        for m in want.modules:
            np.testing.assert_allclose(got.module_stats[m][0], want.module_stats[m][0], rtol=1e-10)
        for n in NORMS:
            restreamed = _scores(c, world, n)
            assert restreamed.keys() == derived[n].keys()
            np.testing.assert_allclose([derived[n][k] for k in sorted(restreamed)],
                                       [restreamed[k] for k in sorted(restreamed)], rtol=1e-9)


def test_derived_statistics_survive_a_restart_from_the_encrypted_store(world, start_server, tmp_path, traffic):
    h = start_server(tmp_path / "data")
    with RouterClient(h.target, timeout=30) as c:
        _library(c, world, EARLY)
        c.calibrate(traffic, library=LIB)
        c.put_adapter(world.adapters[LATE], name=LATE, library=LIB)
        before = _scores(c, world, "activation")
    h.stop(grace=1.0)
    h2 = start_server(tmp_path / "data")
    with RouterClient(h2.target, timeout=30) as c:
        assert c.describe(LIB).derived_adapters == (LATE,)
        assert _scores(c, world, "activation") == before


def test_projected_calibration_pools_the_same_moments(world, start_server, tmp_path, traffic):
    h = start_server(tmp_path / "data")
    with RouterClient(h.target, timeout=30) as c:
        _library(c, world, EARLY)
        c.calibrate([projected(world, _hidden(world, x)) for x in traffic], library=LIB, form="projected")
        c.put_adapter(world.adapters[LATE], name=LATE, library=LIB)
        assert c.describe(LIB).derived_adapters == (LATE,)
        assert _scores(c, world, "zscore/adapter_module/e")


def _hidden(world, acts: dict) -> dict:
    return {int(m.split(".")[2]): x for m, x in acts.items()}


def test_the_library_publishes_its_background_once_it_pools_enough_sequences(world, start_server, tmp_path, traffic):
    h = start_server(tmp_path / "data")
    with RouterClient(h.target, timeout=30) as c:
        _library(c, world, EARLY)
        with pytest.raises(FailedPreconditionError) as e:
            c.training_inputs(LIB)
        assert e.value.field == "include_background"
        c.calibrate(traffic[:3], library=LIB)
        with pytest.raises(FailedPreconditionError) as e:            # 3 sequences are not an aggregate
            c.training_inputs(LIB)
        assert "3 sequences" in str(e.value)
        c.calibrate(traffic, library=LIB)
        info = c.training_inputs(LIB)
    assert sorted(info.background) == sorted(world.qv) and sorted(info.shared_a) == sorted(world.qv)
    for m in world.qv:
        z = np.concatenate([x[m].astype(np.float64) @ world.shared_a[m].T.astype(np.float64) for x in traffic])
        np.testing.assert_allclose(info.background[m], z.T @ z / z.shape[0], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(info.shared_a[m], world.shared_a[m])
