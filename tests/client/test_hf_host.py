"""Model-host helpers (seqr_client.hf_host) on a tiny random Llama: capture, project, moments,
apply the decision, generate, vLLM arguments."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from seqr_client import Choice
from seqr_client.hf_host import (MIX_NAME, apply_decision, capture_inputs, generate_text,
                                 group_shared_inputs, load_adapters, moments, project,
                                 shared_a_matrices, vllm_lora_request_args)
from seqr_client.hf_models import signature_of, targeted_linears, tiny_llama
from seqr_client.training import train_lora
from seqr_core.shared_a import SharedARecipe

RECIPE = SharedARecipe(seed=5)
TARGETS = ("q_proj", "v_proj")
PROMPT = "import numpy as np\nx = np.zeros(3)"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """A tiny model with three adapters loaded: two shared-A, one general."""
    root = tmp_path_factory.mktemp("adapters")
    model, tok = tiny_llama(seed=1)
    fast = dict(steps=3, batch_size=4, seq_len=32, progress=False)
    dirs = {
        "code": train_lora(model, tok, [f"def f{i}(): return {i}" for i in range(16)],
                           out_dir=root / "code", shared_a=RECIPE, **fast),
        "bible": train_lora(model, tok, [f"And the LORD spake {i} times" for i in range(16)],
                            out_dir=root / "bible", shared_a=RECIPE, **fast),
        "general": train_lora(model, tok, [f"Article {i}. The licensee shall" for i in range(16)],
                              out_dir=root / "general", shared_a=None, **fast),
    }
    sig = signature_of(model, TARGETS)
    return load_adapters(model, dirs), tok, dirs, sig


def _outputs_of_linears(model, ids, names):
    """What each targeted nn.Linear actually produced, recorded with forward hooks."""
    seen, handles = {}, []
    for name, mod in targeted_linears(model, names).items():
        lin = getattr(mod, "base_layer", mod)
        handles.append(lin.register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, (m.weight.detach().numpy(), out[0].detach().numpy()))))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_captured_inputs_equal_what_the_linear_received(host):
    model, tok, _, sig = host
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    model.set_adapter("code")
    for base_only in (False, True):
        cap = capture_inputs(model, PROMPT, modules=TARGETS, tokenizer=tok, base_only=base_only)
        assert list(cap) == [n for n, _, _ in sig]
        with model.disable_adapter() if base_only else contextlib.nullcontext():
            seen = _outputs_of_linears(model, ids, TARGETS)
        for name, d_in, d_out in sig:
            x = cap[name]
            assert x.dtype == np.float32 and x.shape == (ids.shape[1], d_in)
            w, out = seen[name]  # (d_out, d_in), (T, d_out)
            np.testing.assert_allclose(x @ w.T, out, rtol=1e-5, atol=1e-5)


def test_capture_on_peft_model_sees_the_base_model_whatever_adapter_is_active(host):
    peft_model, tok, _, _ = host
    plain, _ = tiny_llama(seed=1)
    a = capture_inputs(plain, PROMPT, modules=TARGETS, tokenizer=tok)
    for active in ("code", "bible"):
        peft_model.set_adapter(active)
        b = capture_inputs(peft_model, PROMPT, modules=TARGETS, tokenizer=tok)
        assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
        assert peft_model.active_adapter == active  # adapters are back on afterwards
    with_lora = capture_inputs(peft_model, PROMPT, modules=TARGETS, tokenizer=tok, base_only=False)
    last = "model.layers.1.self_attn.q_proj"  # after layer 0's LoRA: differs
    assert not np.array_equal(with_lora[last], a[last])


def test_stop_early_gives_the_same_inputs_and_ids_forms_agree(host):
    model, tok, _, _ = host
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    full = capture_inputs(model, ids, modules=TARGETS, stop_early=False)
    early = capture_inputs(model, ids[0].tolist(), modules=TARGETS)
    text = capture_inputs(model, PROMPT, modules=TARGETS, tokenizer=tok)
    for name in full:
        assert np.array_equal(full[name], early[name]) and np.array_equal(full[name], text[name])
    short = capture_inputs(model, PROMPT, modules=["model.layers.1.self_attn.v_proj"], tokenizer=tok,
                           max_length=5)
    assert list(short) == ["model.layers.1.self_attn.v_proj"] and short["model.layers.1.self_attn.v_proj"].shape[0] == 5
    with pytest.raises(ValueError):
        capture_inputs(model, PROMPT, modules=TARGETS)  # text without tokenizer


def test_modules_of_one_layer_share_one_input_group(host):
    model, tok, _, _ = host
    cap = capture_inputs(model, PROMPT, modules=("q_proj", "k_proj", "v_proj"), tokenizer=tok)
    groups = group_shared_inputs(cap)
    for layer in (0, 1):
        p = f"model.layers.{layer}.self_attn."
        assert groups[p + "q_proj"] == groups[p + "k_proj"] == groups[p + "v_proj"] == p + "q_proj"
    assert len(set(groups.values())) == 2


def test_projection_and_moments_match_float64_reference(host):
    model, tok, _, sig = host
    cap = capture_inputs(model, PROMPT, modules=TARGETS, tokenizer=tok)
    a = shared_a_matrices(RECIPE, sig, rank=8)
    z = project(cap, a)
    g = moments(z)
    rng = np.random.default_rng(0)
    for name, d_in, _ in sig:
        x = cap[name].astype(np.float64)
        t = x.shape[0]
        assert a[name].shape == (8, d_in)
        assert z[name].shape == (t, 8) and z[name].dtype == np.float32
        np.testing.assert_allclose(z[name], x @ a[name].astype(np.float64).T, rtol=1e-6, atol=1e-7)
        assert g[name].shape == (8, 8) and g[name].dtype == np.float32
        np.testing.assert_allclose(g[name], g[name].T)
        assert np.linalg.eigvalsh(g[name].astype(np.float64)).min() > -1e-6
        r = np.triu(rng.normal(size=(8, 8)))  # tr(R G Rᵀ) = mean_t ‖R z_t‖²
        zz = z[name].astype(np.float64)
        np.testing.assert_allclose(np.trace(r @ g[name] @ r.T), np.mean(np.sum((zz @ r.T) ** 2, 1)),
                                   rtol=1e-5)
    with pytest.raises(ValueError):
        project(cap, {})
    with pytest.raises(ValueError):
        moments(np.zeros((0, 8)))


def test_apply_decision_switches_the_active_adapter_and_generate_runs(host):
    model, tok, _, _ = host
    assert apply_decision(model, "bible") == "bible" and model.active_adapter == "bible"
    assert isinstance(generate_text(model, tok, "And the", max_new_tokens=4), str)
    assert apply_decision(model, ["code"]) == "code" and model.active_adapter == "code"
    ids = tok("abc", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids["input_ids"].shape[1] + 3)
    with pytest.raises(KeyError):
        apply_decision(model, "absent")


def test_weighted_top_k_is_the_exact_weighted_sum_of_updates(host):
    model, tok, _, _ = host
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.self_attn.v_proj"
    layer = targeted_linears(model, [name])[name]
    names, weights = ["code", "bible", "general"], [0.5, 0.3, 0.2]

    def delta(adapter):
        model.set_adapter(adapter)
        with torch.no_grad():
            return (layer(x) - layer.base_layer(x)).double()  # (5, d_out)

    want = sum(w * delta(n) for n, w in zip(names, weights))
    assert apply_decision(model, names, weights) == MIX_NAME and model.active_adapter == MIX_NAME
    with torch.no_grad():
        got = (layer(x) - layer.base_layer(x)).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert generate_text(model, tok, "abc", max_new_tokens=3) is not None
    apply_decision(model, names, [0.2, 0.3, 0.5])  # new weights → rebuilt mix
    with torch.no_grad():
        assert not torch.allclose((layer(x) - layer.base_layer(x)).double(), want)
    with pytest.raises(ValueError):
        apply_decision(model, names, [1.0])


def test_vllm_lora_request_args_from_each_choice_form(host, tmp_path):
    _, _, dirs, _ = host

    class Choice:
        name, int_id, score = "code", 7, 1.5

    want = ("code", 8, str(dirs["code"].resolve()))   # lora_int_id = adapter id + 1
    assert vllm_lora_request_args(Choice(), dirs) == want
    assert vllm_lora_request_args({"name": "code", "id": 7}, dirs) == want
    assert vllm_lora_request_args(("code", 7), dirs) == want
    with pytest.raises(ValueError):
        vllm_lora_request_args(("code", -1), dirs)
    with pytest.raises(ValueError):
        vllm_lora_request_args(("code", 1.5), dirs)
    with pytest.raises(KeyError):
        vllm_lora_request_args(("nope", 3), dirs)


def test_a_librarys_first_adapter_gets_vllm_id_1(host):
    _, _, dirs, _ = host
    first = Choice(name="code", adapter_id=0, score=2.0, weight=1.0)   # what RouterClient.route returns
    second = Choice(name="bible", adapter_id=1, score=1.0, weight=0.0)
    assert vllm_lora_request_args(first, dirs)[1] == 1
    assert vllm_lora_request_args(second, dirs)[1] == 2
