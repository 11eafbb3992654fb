"""The ONNX scorer equals the numpy scorer: scores within 1e-5, sound bounds, top-k in tolerance.

Parity criterion (stated once, used everywhere): |onnx − numpy| ≤ 1e-5·max(|numpy|, s) where s
is the largest |score| of the request (normalised scores such as z-scores pass through zero,
where a purely relative test is meaningless). Top-k: ONNX's choice at every rank is never
beaten by an unchosen candidate by more than the two scores' bounds (float64 reference).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st

from seqr_core import LibraryIndex, ModuleInput, Normalisation
from seqr_core import energies as E
from seqr_core.errors import FailedPreconditionError, InvalidArgumentError
from seqr_core.normalise import combine
from seqr_core.onnx_export import MASK, build_scorer_model, export_scorer, input_name, scorer_metadata

from . import reference as ref
from .libraries import add, calibrated, random_inputs, random_library

NORMS = [("none", "adapter_module", "e"), ("frobenius", "adapter_module", "e"),
         ("activation", "adapter_module", "e")] + [
    ("zscore", g, t) for g in ("adapter_module", "adapter") for t in ("e", "sqrt", "log")]
RTOL = 1e-5
# SEQR_ONNX_PROVIDER=cuda (bench/gpu_check.sh) runs every session here on CUDA, TF32 off.
ON_CUDA = os.environ.get("SEQR_ONNX_PROVIDER", "").lower() == "cuda"
PROVIDERS = ([("CUDAExecutionProvider", {"use_tf32": "0"})] if ON_CUDA else []) + ["CPUExecutionProvider"]


def session(model: bytes):
    sess = ort.InferenceSession(model, providers=PROVIDERS)
    assert not ON_CUDA or sess.get_providers()[0] == "CUDAExecutionProvider"
    return sess


def run(model: bytes, inputs, mask, *, dtype=np.float32):
    sess = session(model)
    feeds = {input_name(m, i.form): i.data[None].astype(dtype) for m, i in inputs.items()}
    feeds[MASK] = mask[None]
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds))), sess


def numpy_scores(idx, inputs, norm, *, per_token=False):
    blocks = {m: E.seqr_energies(idx, m, i) for m, i in inputs.items()}
    return combine(idx, blocks, idx.ids, norm, per_token=per_token)


def assert_parity(onnx_s, np_s, where, *, bounds=None):
    """Within RTOL of numpy — or, where a z-score's division by a small calibration σ
    amplifies float32 rounding past that, within the two paths' proven bounds of the
    float64 truth (each path's bound is asserted against the truth separately)."""
    a, b = onnx_s[..., where], np_s[..., where]
    assert np.array_equal(np.isnan(a), np.isnan(b))
    scale = np.nanmax(np.abs(b), axis=-1, keepdims=True) if b.size else 0
    tol = RTOL * np.maximum(np.abs(b), scale)
    if bounds is not None:
        tol = np.maximum(tol, bounds[0][..., where] + bounds[1][..., where])
    ok = np.isnan(b) | (np.abs(a - b) <= tol)
    assert ok.all(), f"max rel diff {np.nanmax(np.abs(a - b) / np.maximum(np.abs(b), scale))}"


def f64_reference(idx, inputs, norm, *, per_token=False):
    by = ref.scores(idx, {m: (i.form, i.data) for m, i in inputs.items()}, kind=norm.kind,
                    granularity=norm.granularity, transform=norm.transform, per_token=per_token)
    T = next(iter(by.values())).size if per_token and by else None
    out = np.full((T, len(idx.adapters)) if per_token else (len(idx.adapters),), np.nan)
    for p, i in enumerate(idx.ids):
        if int(i) in by:
            out[..., p] = by[int(i)]
    return out


def assert_bounds_hold(onnx_s, bounds, truth):
    if np.isnan(truth).all():
        return
    ok = np.isnan(truth) | (np.abs(onnx_s - truth) <= bounds + 1e-10 * np.nanmax(np.abs(truth)))
    assert ok.all(), f"bound violated: {np.nanmax(np.abs(onnx_s - truth) - bounds)}"


def assert_topk_in_tolerance(top_idx, top_scores, truth, bounds, mask):
    chosen = [int(p) for p, s in zip(top_idx, top_scores) if np.isfinite(s)]
    valid = mask & ~np.isnan(truth)
    assert len(chosen) == min(len(top_idx), int(valid.sum()))
    for j, p in enumerate(chosen):
        rest = valid.copy()
        rest[chosen[: j + 1]] = False
        beaten = truth[rest] > truth[p] + bounds[rest] + bounds[p]
        assert not beaten.any(), f"rank {j}: position {p} clearly beaten"


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    form = draw(st.sampled_from(("activations", "projected", "moments")))
    rng = np.random.default_rng(seed)
    idx = random_library(rng, n_adapters=draw(st.integers(1, 8)), n_modules=draw(st.integers(1, 3)),
                         d=draw(st.integers(2, 20)), r=draw(st.integers(1, 5)),
                         shared_only=form != "activations")
    norm = draw(st.sampled_from(NORMS if form != "moments" else NORMS[:4] + [NORMS[6]]))
    if norm[0] in ("activation", "zscore"):
        idx = calibrated(rng, idx)
    inputs = random_inputs(rng, idx, T=draw(st.integers(1, 6)), form=form)
    mask = rng.random(len(idx.adapters)) < 0.8
    per_token = form != "moments" and draw(st.booleans())
    return idx, inputs, Normalisation(*norm), mask, per_token, draw(st.integers(1, 4))


@settings(max_examples=30, deadline=None)
@given(cases())
def test_scores_match_numpy_bounds_hold_and_topk_in_tolerance(case):
    idx, inputs, norm, mask, per_token, k = case
    model = export_scorer(idx, normalisation=norm, forms={m: i.form for m, i in inputs.items()},
                          modules=list(inputs), per_token=per_token, top_k=k)
    out, _ = run(model, inputs, mask)
    S, B = numpy_scores(idx, inputs, norm)
    assert_parity(out["scores"][0], S, mask,
                  bounds=None if norm.kind != "zscore" else (out["score_bounds"][0], B))
    assert np.isnan(out["scores"][0][~mask]).all()
    truth = f64_reference(idx, inputs, norm)
    assert_bounds_hold(out["scores"][0][mask], out["score_bounds"][0][mask], truth[mask])
    assert_topk_in_tolerance(out["topk_indices"][0], out["topk_scores"][0], truth,
                             np.nan_to_num(out["score_bounds"][0]), mask)
    assert np.array_equal(out["topk_adapter_ids"][0][np.isfinite(out["topk_scores"][0])],
                          idx.ids[out["topk_indices"][0][np.isfinite(out["topk_scores"][0])]])
    if per_token:
        St, _ = numpy_scores(idx, inputs, norm, per_token=True)
        assert_parity(out["token_scores"][0], St, mask)
        truth_t = f64_reference(idx, inputs, norm, per_token=True)
        assert_bounds_hold(out["token_scores"][0][:, mask], out["token_score_bounds"][0][:, mask],
                           truth_t[:, mask])
    else:
        assert "token_scores" not in out


@pytest.mark.parametrize("dtype,onnx_type", [("float16", 10), ("bfloat16", 16)])
def test_half_precision_inputs_give_fp32_scores(dtype, onnx_type):
    import ml_dtypes
    rng = np.random.default_rng(3)
    idx = random_library(rng, n_adapters=5, n_modules=2, d=16, r=4)
    inputs = random_inputs(rng, idx, T=7, form="activations")
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    rounded = {m: ModuleInput(i.form, i.data.astype(np_dtype).astype(np.float32), i.tokens)
               for m, i in inputs.items()}
    model = export_scorer(idx, input_dtype=dtype)
    sess = session(model)
    feeds = {input_name(m, "activations"): ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
        i.data[None].astype(np_dtype).view(np.uint16), onnx_type) for m, i in inputs.items()}
    feeds[MASK] = np.ones((1, 5), bool)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    assert out["scores"].dtype == np.float32 and out["token_scores"].dtype == np.float32
    S, _ = numpy_scores(idx, rounded, Normalisation("frobenius"))  # the default, uncalibrated
    assert_parity(out["scores"][0], S, np.ones(5, bool))


def test_batch_axis_and_mask_broadcast():
    rng = np.random.default_rng(4)
    idx = random_library(rng, n_adapters=6, n_modules=2, d=12, r=3)
    reqs = [random_inputs(rng, idx, T=5, form="activations") for _ in range(3)]
    model = export_scorer(idx, per_token=False, top_k=2)
    sess = session(model)
    feeds = {input_name(m, "activations"): np.stack([r[m].data for r in reqs]) for m in reqs[0]}
    masks = rng.random((3, 6)) < 0.7
    masks[:, 0] = True
    for mask in (np.ones((1, 6), bool), masks):
        batched = sess.run(["scores"], {**feeds, MASK: mask})[0]
        for b, r in enumerate(reqs):
            single, _ = run(model, r, mask[min(b, len(mask) - 1)])
            np.testing.assert_array_equal(batched[b], single["scores"][0])


def test_metadata_documents_the_contract_and_model_checks():
    rng = np.random.default_rng(5)
    idx = calibrated(rng, random_library(rng, n_adapters=4, n_modules=2, d=8, r=2))
    norm = Normalisation("zscore", "adapter", "log")
    model = build_scorer_model(idx, normalisation=norm, top_k=3, tokens=9)
    onnx.checker.check_model(model, full_check=True)
    md = scorer_metadata({p.key: p.value for p in model.metadata_props})
    assert md["seqr.format"] == "seqr-onnx-scorer/1" and md["seqr.library"] == idx.name
    assert md["seqr.version"] == idx.version and md["seqr.top_k"] == 3
    assert [a["name"] for a in md["seqr.adapters"]] == list(idx.names)
    assert [a["id"] for a in md["seqr.adapters"]] == idx.ids.tolist()
    assert md["seqr.normalisation"]["label"] == "zscore/adapter/log"
    assert [i["name"] for i in md["seqr.inputs"]] == [input_name(m, "activations") for m in
                                                     sorted(idx.signature.names)] + [MASK]
    assert md["seqr.inputs"][0]["shape"] == ["batch", 9, 8]
    assert set(md["seqr.outputs"]) == {o.name for o in model.graph.output}
    assert "score_bounds" in md["seqr.outputs"] and model.doc_string
    assert export_scorer(idx, normalisation=norm) == export_scorer(idx, normalisation=norm)


def test_export_rejects_what_it_cannot_score():
    rng = np.random.default_rng(6)
    idx = random_library(rng, n_adapters=6, n_modules=2, d=8, r=2, p_general=0.5)
    m0 = idx.signature.names[0]
    with pytest.raises(InvalidArgumentError, match="export.modules"):
        export_scorer(idx, modules=["nope"])
    with pytest.raises(InvalidArgumentError, match="per-token"):
        export_scorer(idx, form="moments", per_token=True)
    with pytest.raises(InvalidArgumentError, match="top_k"):
        export_scorer(idx, top_k=0)
    with pytest.raises(FailedPreconditionError, match="uncalibrated"):
        export_scorer(idx, normalisation=Normalisation("activation"))
    general = [e for e in idx.adapters if e.kind != "shared_a" and m0 in e.modules]
    if general:
        with pytest.raises(FailedPreconditionError, match="needs activations"):
            export_scorer(idx, form="projected", modules=[m0])
        md = onnx.load_from_string(export_scorer(idx, form="projected", modules=[m0],
                                                 on_unscorable="exclude"))
        ads = scorer_metadata({p.key: p.value for p in md.metadata_props})["seqr.adapters"]
        assert all(a["excluded"] and not a["scored"] for a in ads if a["name"] == general[0].name)
    empty = LibraryIndex.create(name="e", signature=idx.signature, shared_a=dict(idx.shared_a))
    with pytest.raises(FailedPreconditionError):
        export_scorer(empty)


def test_opset_17_graph_gives_the_same_scores():
    rng = np.random.default_rng(7)
    idx = random_library(rng, n_adapters=5, n_modules=2, d=10, r=3)
    inputs = random_inputs(rng, idx, T=4, form="activations")
    a, _ = run(export_scorer(idx, opset=17), inputs, np.ones(5, bool))
    b, _ = run(export_scorer(idx, opset=18), inputs, np.ones(5, bool))
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-6)


PLAIN_HOST = r"""
import json, sys
import numpy as np, onnxruntime as ort
sess = ort.InferenceSession(open(sys.argv[1], "rb").read(), providers=["CPUExecutionProvider"])
md = sess.get_modelmeta().custom_metadata_map
ins, ads = json.loads(md["seqr.inputs"]), json.loads(md["seqr.adapters"])
data = np.load(sys.argv[2])
feeds = {i["name"]: data[i["name"].replace(":", "__")] for i in ins if i["name"] != "candidate_mask"}
feeds["candidate_mask"] = np.ones((1, len(ads)), dtype=bool)
out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("seqr_core", "seqr_server", "torch", "onnx"))
print(json.dumps({"scores": out["scores"][0].tolist(), "best": ads[int(out["topk_indices"][0, 0])]["name"],
                  "best_id": int(out["topk_adapter_ids"][0, 0]), "project_modules": ours,
                  "normalisation": json.loads(md["seqr.normalisation"])["label"]}))
"""


def test_exported_file_runs_in_plain_onnxruntime_without_project_code(tmp_path):
    rng = np.random.default_rng(8)
    idx = random_library(rng, n_adapters=6, n_modules=2, d=12, r=3)
    inputs = random_inputs(rng, idx, T=5, form="activations")
    (tmp_path / "scorer.onnx").write_bytes(export_scorer(idx))
    np.savez(tmp_path / "x.npz", **{input_name(m, i.form).replace(":", "__"): i.data[None]
                                    for m, i in inputs.items()})
    res = subprocess.run([sys.executable, "-c", PLAIN_HOST, str(tmp_path / "scorer.onnx"),
                          str(tmp_path / "x.npz")], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["project_modules"] == [] and got["normalisation"] == "frobenius"
    S, _ = numpy_scores(idx, inputs, Normalisation("frobenius"))  # the default, uncalibrated
    assert_parity(np.array(got["scores"]), S, np.ones(6, bool))
    assert got["best_id"] == idx.entry(got["best"]).adapter_id


@pytest.fixture(scope="module")
def peft_library(tmp_path_factory):
    """A tiny random Llama, 3 shared-A adapters (lora_A = the library's A), 1 rsLoRA shared-A,
    1 ordinary LoRA with its own A — all made and saved by real peft — and real activations."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from seqr_core import SharedARecipe, generate_shared_a, parse_peft_adapter
    from tests.peft_factory import make_peft_adapter, read_dir, signature, tiny_llama
    model = tiny_llama(hidden=32, layers=2)
    sig = signature(model)
    recipe = SharedARecipe(seed=1234)
    mods = [m.name for m in sig.modules if m.name.endswith(("q_proj", "v_proj"))]
    idx = LibraryIndex.create(name="peft-lib", signature=sig, shared_a={
        m: generate_shared_a(recipe, module=m, rank=4, d_in=sig.spec(m).d_in) for m in mods})
    tmp = tmp_path_factory.mktemp("peft")
    specs = [("law", dict(shared_a=recipe)), ("med", dict(shared_a=recipe)), ("code", dict(shared_a=recipe)),
             ("rs", dict(shared_a=recipe, use_rslora=True)), ("own", dict(shared_a=None))]
    for i, (name, kw) in enumerate(specs):
        path = make_peft_adapter(model, tmp / name, seed=10 + i, rank=4, **kw)
        parsed = parse_peft_adapter(read_dir(path), name=name, signature=sig)
        idx = add(idx, parsed.adapter, adapter_id=100 + i, upload_dtype=parsed.upload_dtype)
    acts = {}
    def keep(name):
        return lambda _m, a: acts.__setitem__(name, a[0][0].detach().numpy().copy())   # (T, d_in)
    hooks = [mod.register_forward_pre_hook(keep(name)) for name, mod in model.named_modules() if name in mods]
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 12)))
    for h in hooks:
        h.remove()
    return idx, {m: ModuleInput("activations", acts[m], 12) for m in mods}


@pytest.mark.parametrize("form", ["activations", "projected", "moments"])
def test_peft_made_library_parity_every_form(peft_library, form):
    idx, acts = peft_library
    assert {e.name: e.kind for e in idx.adapters}["own"] == "general"
    inputs = {}
    for m, a in acts.items():
        z = (a.data @ idx.shared_a[m].T).astype(np.float32)                # (T, d)·(d, r) -> (T, r)
        inputs[m] = {"activations": a, "projected": ModuleInput("projected", z, 12),
                     "moments": ModuleInput("moments", (z.T @ z / 12).astype(np.float32), 12)}[form]
    shared = np.array([e.kind == "shared_a" for e in idx.adapters])
    for norm in (Normalisation("none"), Normalisation("frobenius")):
        model = export_scorer(idx, form=form, normalisation=norm, top_k=3, on_unscorable="exclude")
        for mask in (np.ones(len(shared), bool), shared, np.eye(len(shared), dtype=bool)[1]):
            out, _ = run(model, inputs, mask)
            ids = idx.ids[mask & (shared | (form == "activations"))]
            blocks = {m: E.seqr_energies(idx, m, i, allowed=ids) for m, i in inputs.items()}
            S_np, _ = combine(idx, blocks, ids, norm, per_token=False)
            S = np.full(len(shared), np.nan)
            S[idx.positions(ids)] = S_np
            assert_parity(out["scores"][0], S, mask & ~np.isnan(out["scores"][0]))
            truth = f64_reference(idx, inputs, norm)
            valid = mask & ~np.isnan(S)
            assert_bounds_hold(out["scores"][0][valid], out["score_bounds"][0][valid], truth[valid])
            assert_topk_in_tolerance(out["topk_indices"][0], out["topk_scores"][0],
                                     np.where(valid, truth, np.nan),
                                     np.nan_to_num(out["score_bounds"][0]), valid)
