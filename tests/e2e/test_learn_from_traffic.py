"""`seqr serve --learn-from-traffic`: routed sequences calibrate adapters that have no statistics
(aggregates only, in the pool after the answer) and feed a drift metric; off by default."""

from __future__ import annotations

import time

import numpy as np

from seqr_client import RouterClient
from seqr_core import Calibrator, LibraryIndex, ModuleInput, parse_peft_adapter

from ..peft_factory import read_dir
from .conftest import LIB, _capture, activations, create_library

GENERAL = "general-g0"


def _traffic(world, n: int, seed: int = 500):
    return [activations(world, _capture(world.model, 5 + k % 3, seed=seed + k)) for k in range(n)]


def _route_and_settle(h, c, x):
    r = c.route(LIB, x, top_k=2)
    deadline = time.monotonic() + 20
    while h.learner is not None and h.learner.busy(LIB):      # one learning task at a time: wait
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return r


def _library(c, world):
    create_library(c, world)
    for n in ("shared-a0", "shared-a1"):
        c.put_adapter(world.adapters[n], name=n, library=LIB)


def test_a_general_adapter_is_calibrated_from_routed_traffic(world, start_server, tmp_path):
    h = start_server(tmp_path / "data", learn_from_traffic=True, learn_min_sequences=6)
    calib, routed = _traffic(world, 8), _traffic(world, 6, seed=900)
    with RouterClient(h.target, timeout=30) as c:
        _library(c, world)
        c.calibrate(calib, library=LIB)
        c.put_adapter(world.adapters[GENERAL], name=GENERAL, library=LIB, allow_general=True)
        first = activations(world)
        assert GENERAL in _route_and_settle(h, c, first).fallback          # no stats yet
        for x in routed:
            _route_and_settle(h, c, x)
    learned = [first, *routed[:5]]                                          # the first 6 it saw
    with RouterClient(h.target, timeout=30) as c:
        info = c.describe(LIB)
        assert GENERAL in info.calibrated_adapters and GENERAL not in info.derived_adapters
        r = c.route(LIB, activations(world), normalisation="zscore/adapter/log")
        assert r.fallback == "" and r.normalisation == "zscore/adapter/log"
    # exactly the statistics a Calibrate of the routed sequences gives that adapter
    parsed = parse_peft_adapter(read_dir(world.adapters[GENERAL]), name=GENERAL, signature=world.sig)
    only = LibraryIndex.create(name=LIB, signature=world.sig, shared_a=world.shared_a)
    only, _ = only.add_adapters([(parsed.adapter, 2, parsed.upload_dtype)])
    ref = Calibrator(only)
    for x in learned:
        ref.update({m: ModuleInput("activations", a, a.shape[0]) for m, a in x.items()})
    want = ref.finish().get(GENERAL)
    from seqr_server.auth import OPEN
    got = h.manager.get(LIB, OPEN).index.calibration.get(GENERAL)
    for m in want.modules:
        np.testing.assert_allclose(got.module_stats[m], want.module_stats[m], rtol=1e-10)
    np.testing.assert_allclose(got.seq_stats, want.seq_stats, rtol=1e-10)


def test_traffic_drift_is_a_metric_and_streamed_statistics_are_never_replaced(world, start_server, tmp_path):
    h = start_server(tmp_path / "data", learn_from_traffic=True, learn_min_sequences=4)
    with RouterClient(h.target, timeout=30) as c:
        _library(c, world)
        c.calibrate(_traffic(world, 8), library=LIB)
        from seqr_server.auth import OPEN
        before = h.manager.get(LIB, OPEN).index.calibration
        version = c.describe(LIB).version
        scaled = [{m: 3.0 * a for m, a in x.items()} for x in _traffic(world, 16, seed=700)]
        for x in scaled:                       # traffic unlike the calibration set
            _route_and_settle(h, c, x)
        assert c.describe(LIB).version == version                          # nothing stored
        assert h.manager.get(LIB, OPEN).index.calibration is before
    reg = h.metrics.registry
    assert reg.get_sample_value("seqr_traffic_sequences", {"library": LIB}) > 10
    drift = reg.get_sample_value("seqr_calibration_drift", {"library": LIB})
    assert drift is not None and drift > 0


def test_without_the_flag_nothing_is_learned(world, start_server, tmp_path):
    h = start_server(tmp_path / "data")
    with RouterClient(h.target, timeout=30) as c:
        _library(c, world)
        c.put_adapter(world.adapters[GENERAL], name=GENERAL, library=LIB, allow_general=True)
        for x in _traffic(world, 6):
            c.route(LIB, x)
        assert h.learner is None and c.describe(LIB).calibrated_adapters == ()
