"""Over the real socket, Route answers exactly what seqr_core.route answers on the same index."""

from __future__ import annotations

import numpy as np
import pytest

from seqr_core import ModuleInput, Normalisation, RouteOptions, route

from .conftest import LIB, T, activations, core_index, moments, projected


def core_decision(index, inputs: dict, form: str, **opts):
    tokens = {"moments": T}.get(form)
    mi = {m: ModuleInput(form, a, tokens or a.shape[0]) for m, a in inputs.items()}
    return route(index, mi, RouteOptions(**opts))


def assert_same(result, decision):
    assert [(c.name, c.adapter_id) for c in result.choices] == \
        [(c.name, c.adapter_id) for c in decision.choices]
    assert [c.score for c in result.choices] == [c.score for c in decision.choices]
    assert [c.weight for c in result.choices] == [c.weight for c in decision.choices]
    assert result.margin == decision.margin
    assert result.library_version == decision.version
    assert result.normalisation == decision.normalisation
    assert result.rechecked == decision.rechecked


@pytest.mark.parametrize("form", ["activations", "projected", "moments"])
def test_each_input_form_gets_exactly_the_core_answer(world, populated, form):
    _, client = populated
    index = core_index(world, version=1 + len(world.adapters))
    data = {"activations": activations, "projected": projected, "moments": moments}[form](world)
    # projected/moments carry no information about adapters with their own A: route among shared ones.
    cands = None if form == "activations" else list(world.shared_names)
    kw = {"inputs" if form == "activations" else form: data}
    got = client.route(LIB, **kw, tokens=T if form == "moments" else None, top_k=3, candidates=cands,
                       include_scores=True)
    want = core_decision(index, data, form, top_k=3, candidates=tuple(cands) if cands else None)
    assert_same(got, want)
    names = {e.adapter_id: e.name for e in index.adapters}
    assert got.scores == {names[int(i)]: float(s) for i, s in zip(want.candidate_ids, want.scores)}


def test_token_granularity_returns_the_core_per_token_decisions(world, populated):
    _, client = populated
    index = core_index(world, version=1 + len(world.adapters))
    x = activations(world)
    got = client.route(LIB, x, granularity="token", top_k=2)
    want = core_decision(index, x, "activations", granularity="token", top_k=2)
    assert_same(got, want)
    np.testing.assert_array_equal(got.tokens.adapter_ids, want.tokens.ids)
    np.testing.assert_array_equal(got.tokens.scores, want.tokens.scores)
    assert got.tokens.adapter_ids.shape == (T, 2)


@pytest.mark.parametrize("norm", ["none", "frobenius", Normalisation("none")])
def test_normalisation_and_baseline_methods_match_the_core(world, populated, norm):
    _, client = populated
    index = core_index(world, version=1 + len(world.adapters))
    x = activations(world)
    for method in ("seqr", "exact", "spectr"):
        got = client.route(LIB, x, method=method, normalisation=norm, top_k=5)
        n = norm if isinstance(norm, Normalisation) else Normalisation(norm)
        assert_same(got, core_decision(index, x, "activations", method=method, normalisation=n, top_k=5))


def test_fp16_and_shared_tensor_requests_route_like_fp32(world, populated):
    _, client = populated
    x = activations(world)
    shared = {f"h{layer}": h for layer, h in world.hidden.items()}
    by_name = client.route(LIB, {m: f"h{m.split('.')[2]}" for m in x}, shared=shared, top_k=5)
    by_array = client.route(LIB, x, top_k=5)
    assert by_name.choices == by_array.choices
    half = client.route(LIB, {m: a.astype(np.float16) for m, a in x.items()}, top_k=5)
    index = core_index(world, version=1 + len(world.adapters))
    want = core_decision(index, {m: a.astype(np.float16).astype(np.float32) for m, a in x.items()},
                         "activations", top_k=5)
    assert_same(half, want)


def test_route_stream_answers_each_decode_step_like_route(world, populated):
    _, client = populated
    x = activations(world)
    steps = [{m: a[t:t + 1] for m, a in x.items()} for t in range(4)]
    streamed = list(client.route_stream(steps, library=LIB, top_k=2, granularity="sequence"))
    assert len(streamed) == 4
    for step, res in zip(steps, streamed):
        assert res.choices == client.route(LIB, step, top_k=2).choices


def test_describe_reports_signature_recipe_and_adapters(world, populated):
    _, client = populated
    info = client.describe(LIB, include_shared_a=True)
    assert info.version == 1 + len(world.adapters)
    assert info.shared_a_recipe.seed == world.recipe.seed
    assert [a.name for a in info.adapters] == list(world.adapters)
    assert [a.adapter_id for a in info.adapters] == list(range(len(world.adapters)))
    kinds = {a.name: a.kind for a in info.adapters}
    assert kinds["shared-f16"] == "shared_a" and kinds["general-g0"] == "general"
    assert {a.upload_dtype for a in info.adapters if a.name == "shared-f16"} == {"F16"}
    for m in world.qv:
        np.testing.assert_array_equal(info.shared_a[m], world.shared_a[m])
    assert {m.name for m in info.modules if m.shared_rank == 4} == set(world.qv)
