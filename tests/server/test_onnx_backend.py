"""OnnxBackend: the numpy path's Decisions, sessions from bytes, atomic swaps under load.

Runs on the CPU provider by default; SEQR_ONNX_PROVIDER=cuda runs it on the CUDA provider
(bench/gpu_check.sh). Tests marked ``gpu`` need CUDA and are skipped without it.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st

from seqr_core import Adapter, LibraryIndex, ModuleFactors, Normalisation, RouteOptions, route
from seqr_core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnavailableError
from seqr_server.onnx_backend import CUDA, OnnxBackend, gpu_present, select_providers
from tests.core.libraries import calibrated, random_inputs, random_library

NORMS = [Normalisation("frobenius"), Normalisation("none"), Normalisation("activation"),
         Normalisation("zscore", "adapter_module", "log"), Normalisation("zscore", "adapter", "sqrt"),
         Normalisation("zscore", "adapter", "e")]
HAVE_CUDA = CUDA in ort.get_available_providers() and gpu_present()


@pytest.fixture(scope="module")
def backend():
    be = OnnxBackend()
    yield be
    be.close()


def served_by_onnx(be, idx, inputs, opts):
    """Route once (schedules the profile's build), wait for it, route again on the warm graph."""
    be.route(idx, inputs, opts)
    be.wait_idle()
    before = sum(v for k, v in be.stats().items() if k.startswith("onnx:"))
    d = be.route(idx, inputs, opts)
    assert sum(v for k, v in be.stats().items() if k.startswith("onnx:")) == before + 1, be.stats()
    return d


def assert_same_decision(a, b, *, verified=True):
    """a numpy, b onnx. Each path's scores lie within its own proven bounds of the float64
    scores, so the two agree within the sum of both bounds (re-checked scores are float64 on
    both sides: equal up to float64 rounding). Sequence: identical ranking when verified.
    Token granularity: identical exact per-token top-k and votes; unverified, the k-th best
    score moves by at most the largest bound of its token (order statistics are 1-Lipschitz)."""
    head = (lambda d: (d.version, d.method, d.normalisation, d.fallback))
    assert head(b) == head(a)
    np.testing.assert_array_equal(b.candidate_ids, a.candidate_ids)
    if a.tokens is None:
        scale = np.nanmax(np.abs(a.scores)) if np.isfinite(a.scores).any() else 1.0
        assert np.array_equal(np.isnan(a.scores), np.isnan(b.scores))
        untracked = np.zeros(a.scores.shape)        # baselines: both sides ran the same numpy code
        tol = (untracked if a.bounds is None else a.bounds) + (untracked if b.bounds is None else b.bounds) \
            + 1e-12 * scale
        assert (np.isnan(a.scores) | (np.abs(b.scores - a.scores) <= tol)).all(), \
            np.nanmax(np.abs(b.scores - a.scores) - tol)
        if verified:
            assert [c.adapter_id for c in b.choices] == [c.adapter_id for c in a.choices]
        pos = {int(i): k for k, i in enumerate(a.candidate_ids)}
        for ca, cb in zip(a.choices, b.choices):      # rank by rank, even where near-ties swap
            assert abs(cb.score - ca.score) <= tol[pos[ca.adapter_id]] + tol[pos[cb.adapter_id]]
        return
    if not verified:                          # unverified fp32 per-token ranks: near-ties may swap
        scale = np.nanmax(np.abs(a.tokens.scores))
        tol = (a.tokens.bounds + b.tokens.bounds)[:, None] + 1e-12 * scale
        assert (np.abs(b.tokens.scores - a.tokens.scores) <= tol).all()
        return
    np.testing.assert_array_equal(b.tokens.ids, a.tokens.ids)
    np.testing.assert_array_equal(b.scores, a.scores)
    for ca, cb in zip(a.choices, b.choices):
        assert ca.score == cb.score
        if ca.adapter_id != cb.adapter_id:
            assert b.scores[list(b.candidate_ids).index(ca.adapter_id)] == cb.score   # a vote tie


@st.composite
def requests(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    form = draw(st.sampled_from(("activations", "projected", "moments")))
    idx = calibrated(rng, random_library(rng, n_adapters=draw(st.integers(2, 8)), n_modules=2,
                                         d=draw(st.integers(3, 16)), r=draw(st.integers(1, 4)),
                                         shared_only=form != "activations"))
    inputs = random_inputs(rng, idx, T=draw(st.integers(1, 6)), form=form)
    norm = draw(st.sampled_from(NORMS[:3] + [NORMS[5]] if form == "moments" else NORMS))
    gran = "sequence" if form == "moments" else draw(st.sampled_from(("sequence", "token")))
    cands = None
    if draw(st.booleans()):
        cands = tuple(n for n in idx.names if rng.random() < 0.7) or idx.names[:1]
    opts = RouteOptions(normalisation=norm, granularity=gran, top_k=draw(st.integers(1, 3)),
                        candidates=cands, verify=draw(st.sampled_from((True, True, False))))
    return idx, inputs, opts


@settings(max_examples=20, deadline=None)
@given(requests())
def test_decisions_equal_the_numpy_path(req):
    idx, inputs, opts = req
    be = OnnxBackend()
    try:
        assert_same_decision(route(idx, inputs, opts), served_by_onnx(be, idx, inputs, opts),
                             verified=opts.verify)
    finally:
        be.close()


def test_uncalibrated_fallback_text_and_adapter_level_checks_match(backend):
    rng = np.random.default_rng(11)
    idx = random_library(rng, n_adapters=4, n_modules=2, d=8, r=2)
    inputs = random_inputs(rng, idx, T=3, form="activations")
    opts = RouteOptions(normalisation=Normalisation("zscore", "adapter", "log"))
    a, b = route(idx, inputs, opts), served_by_onnx(backend, idx, inputs, opts)
    assert b.fallback.startswith("uncalibrated adapters") and b.normalisation == "frobenius"
    assert_same_decision(a, b)


def test_unsupported_requests_go_to_numpy_with_the_same_answers_and_errors(backend, caplog):
    rng = np.random.default_rng(12)
    idx = random_library(rng, n_adapters=5, n_modules=2, d=8, r=2, shared_only=True)
    acts = random_inputs(rng, idx, T=4, form="activations")
    caplog.set_level(logging.INFO, logger="seqr_server.onnx_backend")
    opts = RouteOptions(method="exact", normalisation=Normalisation("none"))
    assert_same_decision(route(idx, acts, opts), backend.route(idx, acts, opts))
    assert any("method exact runs on numpy" in r.getMessage() for r in caplog.records)
    moments = random_inputs(rng, idx, T=4, form="moments")
    with pytest.raises(InvalidArgumentError) as np_err:
        route(idx, moments, RouteOptions(granularity="token"))
    with pytest.raises(InvalidArgumentError) as ox_err:
        backend.route(idx, moments, RouteOptions(granularity="token"))
    assert str(ox_err.value) == str(np_err.value)
    with pytest.raises(NotFoundError):
        backend.route(idx, acts, RouteOptions(candidates=("nope",)))
    bad = {m: type(i)(i.form, i.data[:, :-1], i.tokens) for m, i in acts.items()}
    with pytest.raises(InvalidArgumentError, match="shape"):
        backend.route(idx, bad, RouteOptions())


def test_sessions_come_from_bytes_and_log_their_provider(monkeypatch, caplog):
    seen = []
    real = ort.InferenceSession

    class Spy(real):
        def __init__(self, model, *a, **kw):
            seen.append(type(model))
            super().__init__(model, *a, **kw)
    monkeypatch.setattr(ort, "InferenceSession", Spy)
    caplog.set_level(logging.INFO, logger="seqr_server.onnx_backend")
    rng = np.random.default_rng(13)
    idx = random_library(rng, n_adapters=3, n_modules=1, d=8, r=2)
    be = OnnxBackend()
    try:
        be.prepare(idx, wait=True)
        assert be.warm_version(idx.name) == idx.version
    finally:
        be.close()
    assert seen and all(t is bytes for t in seen)
    assert any("warm on" in r.getMessage() and "ExecutionProvider" in r.getMessage() for r in caplog.records)


def _add(idx, rng, i):
    f = {m: ModuleFactors(A=idx.shared_a[m], scale=float(rng.uniform(0.5, 2)),
                          B=rng.standard_normal((idx.signature.spec(m).d_out, 4)).astype(np.float32))
         for m in idx.signature.names}
    return idx.add_adapter(Adapter(name=f"new{i}", factors=f), adapter_id=1000 + i)[0]


def test_a_snapshot_is_never_scored_by_an_older_graph():
    rng = np.random.default_rng(15)
    idx = random_library(rng, n_adapters=4, n_modules=2, d=8, r=4, shared_only=True)
    inputs = random_inputs(rng, idx, T=3, form="activations")
    be = OnnxBackend()
    try:
        be.prepare(idx, wait=True)
        gate = threading.Event()
        be._builder.submit(gate.wait)                         # hold the builder: nothing warms
        new = _add(idx, rng, 0)
        before = be.stats().get("numpy: scorer warming", 0)
        d = be.route(new, inputs, RouteOptions(top_k=3))
        assert d.version == new.version                       # numpy, on the current snapshot
        assert be.stats()["numpy: scorer warming"] == before + 1
        assert_same_decision(route(new, inputs, RouteOptions(top_k=3)), d)
        gone, _ = new.remove_adapter(idx.names[0])
        d = be.route(gone, inputs, RouteOptions(top_k=4))
        assert d.version == gone.version and idx.names[0] not in [c.name for c in d.choices]
        gate.set()
        be.prepare(gone, wait=True)
        onnx_before = sum(v for k, v in be.stats().items() if k.startswith("onnx:"))
        assert be.route(gone, inputs, RouteOptions()).version == gone.version
        assert sum(v for k, v in be.stats().items() if k.startswith("onnx:")) == onnx_before + 1
    finally:
        be.close()


def test_routing_continues_while_adapters_are_added_and_the_scorer_swaps():
    rng = np.random.default_rng(16)
    idx = random_library(rng, n_adapters=3, n_modules=2, d=24, r=4, shared_only=True)
    inputs = random_inputs(rng, idx, T=6, form="activations")
    opts = RouteOptions(top_k=2)
    snaps, current = {idx.version: idx}, [idx]
    results, errors, stop = [], [], threading.Event()
    be = OnnxBackend()

    def worker():
        while not stop.is_set() and len(results) < 3000:
            req = current[0]
            try:
                results.append((req.version, be.route(req, inputs, opts)))
            except Exception as e:                                  # noqa: BLE001 - reported below
                errors.append(e)
            time.sleep(0.001)
    try:
        be.prepare(idx, wait=True)
        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(6):
            nxt = _add(current[0], rng, i) if i != 3 else current[0].remove_adapter(current[0].names[1])[0]
            snaps[nxt.version] = nxt
            current[0] = nxt
            be.prepare(nxt)
            time.sleep(0.05)
        be.wait_idle()
        time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
    finally:
        be.close()
    assert not errors, errors[:3]
    assert be.warm_version(idx.name) == current[0].version
    assert len({v for v, _ in results}) >= 3
    expected = {}
    for req_v, d in results:
        assert d.version == req_v                 # always the snapshot asked for, never an older one
        if req_v not in expected:
            expected[req_v] = route(snaps[req_v], inputs, opts)
        assert [c.adapter_id for c in d.choices] == [c.adapter_id for c in expected[req_v].choices]


def test_provider_selection():
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(InvalidArgumentError):
        select_providers("tpu")
    if not HAVE_CUDA:
        with pytest.raises(UnavailableError):
            select_providers("cuda")
        assert select_providers("auto") == ["CPUExecutionProvider"]


def test_an_empty_library_prepares_quietly_and_routes_like_numpy(backend, caplog):
    rng = np.random.default_rng(17)
    full = random_library(rng, n_adapters=2, n_modules=1, d=6, r=2)
    empty = LibraryIndex.create(name="empty", signature=full.signature, shared_a=dict(full.shared_a))
    caplog.set_level(logging.WARNING, logger="seqr_server.onnx_backend")
    backend.prepare(empty).result()
    assert not caplog.records
    inputs = random_inputs(rng, full, T=2, form="activations")
    with pytest.raises(FailedPreconditionError) as a:      # "library 'empty' has no adapters"
        route(empty, inputs)
    with pytest.raises(FailedPreconditionError) as b:
        backend.route(empty, inputs)
    assert str(a.value) == str(b.value) and a.value.field == "library"


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="no usable CUDA provider / NVIDIA GPU")
def test_cuda_provider_decisions_equal_numpy():
    be = OnnxBackend(prefer="cuda")
    try:
        rng = np.random.default_rng(18)
        for form in ("activations", "projected", "moments"):
            idx = calibrated(rng, random_library(rng, n_adapters=8, n_modules=2, d=64, r=8,
                                                 shared_only=form != "activations"))
            inputs = random_inputs(rng, idx, T=16, form=form)
            for norm in NORMS[:3] + [NORMS[5]]:
                for gran in ("sequence",) if form == "moments" else ("sequence", "token"):
                    opts = RouteOptions(normalisation=norm, granularity=gran, top_k=3)
                    assert_same_decision(route(idx, inputs, opts), served_by_onnx(be, idx, inputs, opts))
        assert any(k == f"onnx: {CUDA}" for k in be.stats()), be.stats()
    finally:
        be.close()
