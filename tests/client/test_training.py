"""Adapter training (seqr_client.training) on a tiny random Llama — fast, CPU, offline."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from seqr_client.hf_models import signature_of, tiny_llama
from seqr_client.training import (PEFT_FILES, check_shared_a, chunk_text, main, read_seqr_json,
                                  train_lora)
from seqr_core.shared_a import SharedARecipe, generate_shared_a

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(24)]
FAST = dict(steps=3, batch_size=4, seq_len=32, progress=False)
RECIPE = SharedARecipe(seed=11)


def _tensors(path):
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture()
def tiny():
    return tiny_llama(seed=0)


def test_shared_a_training_keeps_a_bitwise_and_changes_b(tiny, tmp_path):
    model, tok = tiny
    out = train_lora(model, tok, TEXTS, out_dir=tmp_path / "a", shared_a=RECIPE, domain="py", **FAST)
    assert sorted(p.name for p in out.iterdir()) == sorted([*PEFT_FILES, "seqr.json"])
    t = _tensors(out)
    sig = signature_of(model, ("q_proj", "v_proj"))
    for name, d_in, d_out in sig:
        a = t[f"base_model.model.{name}.lora_A.weight"]
        b = t[f"base_model.model.{name}.lora_B.weight"]
        want = generate_shared_a(RECIPE, module=name, rank=8, d_in=d_in)
        assert a.dtype == np.float32 and np.array_equal(a.view(np.uint32), want.view(np.uint32))
        assert b.shape == (d_out, 8) and np.abs(b).max() > 0  # B starts at zero, so it trained
    assert check_shared_a(out, RECIPE) == len(sig)
    meta = read_seqr_json(out)
    assert meta["shared_a"] == RECIPE.to_dict() and meta["kind"] == "shared_a"
    assert meta["domain"] == "py" and meta["steps"] == 3 and meta["finished"] is True
    assert len(meta["losses"]) == 3


def test_adapter_config_holds_only_peft_keys(tiny, tmp_path):
    from peft import LoraConfig

    model, tok = tiny
    out = train_lora(model, tok, TEXTS, out_dir=tmp_path / "a", shared_a=RECIPE, **FAST)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert not [k for k in cfg if "seqr" in k or "shared" in k]
    loaded = LoraConfig.from_pretrained(str(out))
    assert loaded.r == 8 and loaded.lora_alpha == 16 and set(loaded.target_modules) == {"q_proj", "v_proj"}


def test_training_is_deterministic_in_seed(tiny, tmp_path):
    model, tok = tiny
    a = _tensors(train_lora(model, tok, TEXTS, out_dir=tmp_path / "a", shared_a=RECIPE, **FAST))
    b = _tensors(train_lora(model, tok, TEXTS, out_dir=tmp_path / "b", shared_a=RECIPE, **FAST))
    c = _tensors(train_lora(model, tok, TEXTS, out_dir=tmp_path / "c", shared_a=RECIPE, seed=1, **FAST))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if "lora_B" in k)


def test_finished_adapter_is_reused_without_training(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    out = train_lora(model, tok, TEXTS, out_dir=tmp_path / "a", shared_a=RECIPE, **FAST)
    before = (out / "adapter_model.safetensors").read_bytes()

    def boom(*a, **k):
        raise AssertionError("retrained a finished adapter")

    monkeypatch.setattr(torch.optim, "AdamW", boom)
    assert train_lora(model, tok, TEXTS, out_dir=out, shared_a=RECIPE, **FAST) == out
    assert (out / "adapter_model.safetensors").read_bytes() == before
    with pytest.raises(AssertionError, match="retrained"):  # a different recipe does train
        train_lora(model, tok, TEXTS, out_dir=out, shared_a=RECIPE, lr=1e-3, **FAST)


def test_changed_recipe_replaces_the_adapter(tiny, tmp_path):
    model, tok = tiny
    out = train_lora(model, tok, TEXTS, out_dir=tmp_path / "a", shared_a=RECIPE, **FAST)
    h1 = read_seqr_json(out)["recipe_hash"]
    train_lora(model, tok, TEXTS[:12], out_dir=out, shared_a=RECIPE, **FAST)
    assert read_seqr_json(out)["recipe_hash"] != h1 and read_seqr_json(out)["n_texts"] == 12


def test_refuses_to_replace_a_foreign_folder(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        train_lora(model, tok, TEXTS, out_dir=tmp_path / "mine", shared_a=RECIPE, **FAST)


def test_general_training_trains_its_own_a(tiny, tmp_path):
    model, tok = tiny
    out = train_lora(model, tok, TEXTS, out_dir=tmp_path / "g", shared_a=None, **FAST)
    meta = read_seqr_json(out)
    assert meta["kind"] == "general" and meta["shared_a"] is None
    with pytest.raises(ValueError):
        check_shared_a(out, RECIPE)


def test_base_model_is_restored_after_training(tiny, tmp_path):
    model, tok = tiny
    ids = tok(["hello world"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    train_lora(model, tok, TEXTS, out_dir=tmp_path / "a", shared_a=RECIPE, **FAST)
    assert not hasattr(model, "peft_config") and not model.training
    assert not any("lora" in n for n, _ in model.named_modules())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    train_lora(model, tok, TEXTS, out_dir=tmp_path / "b", shared_a=None, **FAST)  # again works


def test_cli_trains_a_shared_a_adapter(tmp_path, capsys):
    text = tmp_path / "domain.txt"
    text.write_text("\n".join(TEXTS * 4))
    rc = main(["--domain-text", str(text), "--out", str(tmp_path / "cli"), "--shared-a-seed", "11",
               "--model", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
               "--no-progress"])
    assert rc == 0 and "shared_a adapter" in capsys.readouterr().out
    assert check_shared_a(tmp_path / "cli", RECIPE) == 4
    assert read_seqr_json(tmp_path / "cli")["domain"] == "cli"


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--domain-text", "--out", "--shared-a-seed", "--general", "--rank", "--alpha",
                "--target-modules", "--steps", "--batch-size", "--seq-len", "--lr", "--seed"):
        assert opt in out


def test_chunks_are_deterministic_bounded_and_verbatim():
    text = ("word " * 400 + "\n") + "\n".join(f"line {i} " + "x" * (i % 90) for i in range(300))
    a, b = chunk_text(text, size=600), chunk_text(text, size=600)
    assert a == b and len(a) > 5
    assert all(200 <= len(c) <= 600 for c in a)
    clean = "\n".join(line.rstrip() for line in text.split("\n"))
    assert all(c in clean for c in a)  # cut, never rewritten (trailing blanks of lines dropped)


def _own_over_background(model, tok, out, texts, bg):
    """Mean over modules of tr(B G_own Bᵀ) / tr(B G_bg Bᵀ) for a saved adapter."""
    from seqr_client.training import background_moments
    own = background_moments(model, tok, texts, shared_a=RECIPE, rank=8)
    t = _tensors(out)
    r = []
    for m, g in bg.items():
        b = t[f"base_model.model.{m}.lora_B.weight"].astype(np.float64)
        r.append(np.sum((b @ own[m]) * b) / np.sum((b @ g) * b))
    return float(np.mean(r))


def test_contrast_term_makes_the_adapter_stand_out_on_its_own_inputs(tiny, tmp_path):
    from seqr_client.training import Contrast, background_moments

    model, tok = tiny
    other = [f"And it came to pass in the {i}th year, that the king" for i in range(24)]
    bg = background_moments(model, tok, TEXTS + other, shared_a=RECIPE, rank=8)
    assert all(g.shape == (8, 8) and np.allclose(g, g.T) for g in bg.values())
    kw = dict(shared_a=RECIPE, steps=8, batch_size=4, seq_len=32, progress=False)
    plain = train_lora(model, tok, TEXTS, out_dir=tmp_path / "plain", **kw)
    sharp = train_lora(model, tok, TEXTS, out_dir=tmp_path / "sharp", contrast=Contrast(bg, 1.0), **kw)
    assert check_shared_a(sharp, RECIPE) == 4                        # A is still the library's A
    meta = read_seqr_json(sharp)
    assert meta["contrast"]["weight"] == 1.0 and len(meta["contrast_terms"]) == 8
    assert meta["recipe_hash"] != read_seqr_json(plain)["recipe_hash"]
    assert "contrast" not in read_seqr_json(plain)                     # plain recipes keep their hash
    assert _own_over_background(model, tok, sharp, TEXTS, bg) > _own_over_background(model, tok, plain, TEXTS, bg)
    with pytest.raises(ValueError, match="shared A"):
        train_lora(model, tok, TEXTS, out_dir=tmp_path / "g", shared_a=None, contrast=Contrast(bg), **FAST)


def test_cli_trains_with_background_moments(tmp_path, capsys):
    from seqr_client.training import background_moments
    model, tok = tiny_llama(seed=0)
    bg = background_moments(model, tok, TEXTS, shared_a=RECIPE, rank=8)
    np.savez(tmp_path / "bg.npz", **bg)
    text = tmp_path / "domain.txt"
    text.write_text("\n".join(TEXTS * 4))
    rc = main(["--domain-text", str(text), "--out", str(tmp_path / "cli"), "--shared-a-seed", "11",
               "--background", str(tmp_path / "bg.npz"), "--contrast-weight", "0.25", "--model", "tiny",
               "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress"])
    assert rc == 0
    assert read_seqr_json(tmp_path / "cli")["contrast"]["weight"] == 0.25


def test_contrast_schedule_holds_the_term_back_until_its_start(tiny, tmp_path):
    from seqr_client.training import Contrast, background_moments

    model, tok = tiny
    bg = background_moments(model, tok, TEXTS[::2], shared_a=RECIPE, rank=8)
    kw = dict(shared_a=RECIPE, steps=3, batch_size=4, seq_len=32, progress=False)
    plain = _tensors(train_lora(model, tok, TEXTS, out_dir=tmp_path / "plain", **kw))
    never = train_lora(model, tok, TEXTS, out_dir=tmp_path / "never", contrast=Contrast(bg, 1.0, start=3), **kw)
    late = train_lora(model, tok, TEXTS, out_dir=tmp_path / "late", contrast=Contrast(bg, 1.0, start=2), **kw)
    assert all(np.array_equal(v, plain[k]) for k, v in _tensors(never).items())   # term never on: plain B
    assert read_seqr_json(never)["contrast_terms"] == [] and len(read_seqr_json(late)["contrast_terms"]) == 1
    assert read_seqr_json(late)["contrast"]["start"] == 2
    assert read_seqr_json(never)["recipe_hash"] != read_seqr_json(late)["recipe_hash"]
    assert any(not np.array_equal(v, plain[k]) for k, v in _tensors(late).items())


@pytest.mark.parametrize("weight,start,ramp,expect", [
    (0.4, 0, 0, [0.4, 0.4, 0.4, 0.4]),
    (0.4, 2, 0, [0.0, 0.0, 0.4, 0.4]),
    (0.4, 1, 2, [0.0, 0.2, 0.4, 0.4]),
])
def test_contrast_weight_follows_its_schedule(weight, start, ramp, expect):
    from seqr_client.training import Contrast
    c = Contrast({}, weight, start=start, ramp=ramp)
    assert [round(c.weight_at(s), 6) for s in range(4)] == expect


def test_contrast_min_layer_leaves_earlier_layers_to_the_lm_loss(tiny, tmp_path):
    from seqr_client.training import Contrast, background_moments

    model, tok = tiny
    bg = background_moments(model, tok, TEXTS[::2], shared_a=RECIPE, rank=8)
    kw = dict(shared_a=RECIPE, steps=4, batch_size=4, seq_len=32, progress=False)
    plain = _tensors(train_lora(model, tok, TEXTS, out_dir=tmp_path / "plain", **kw))
    every = _tensors(train_lora(model, tok, TEXTS, out_dir=tmp_path / "every", contrast=Contrast(bg, 1.0), **kw))
    deep = _tensors(train_lora(model, tok, TEXTS, out_dir=tmp_path / "deep",
                               contrast=Contrast(bg, 1.0, min_layer=1), **kw))
    b_keys = [k for k in deep if "lora_B" in k]
    early = [k for k in b_keys if ".layers.0." in k]
    later = [k for k in b_keys if ".layers.0." not in k]
    assert early and later
    moved = lambda t, ks: sum(float(np.linalg.norm(t[k] - plain[k])) for k in ks)  # noqa: E731
    # Layer 0 still feels the later layers' change through the LM loss, but far less than the term itself.
    assert moved(deep, early) < 0.5 * moved(every, early)
    assert moved(deep, later) > 0.5 * moved(every, later) > 0


def test_cli_default_weight_is_the_evaluated_recipe(tmp_path):
    """`seqr train --background` without a weight trains the recipe the evaluation measured."""
    from seqr_client.training import DEFAULT_CONTRAST_WEIGHT, background_moments
    from seqr_eval.train_adapters import DEFAULT_CONTRAST

    model, tok = tiny_llama(seed=0)
    np.savez(tmp_path / "bg.npz", **background_moments(model, tok, TEXTS, shared_a=RECIPE, rank=8))
    text = tmp_path / "domain.txt"
    text.write_text("\n".join(TEXTS * 4))
    assert main(["--domain-text", str(text), "--out", str(tmp_path / "cli"), "--shared-a-seed", "11",
                 "--background", str(tmp_path / "bg.npz"), "--model", "tiny", "--steps", "1",
                 "--batch-size", "2", "--seq-len", "32", "--no-progress"]) == 0
    assert read_seqr_json(tmp_path / "cli")["contrast"]["weight"] == DEFAULT_CONTRAST_WEIGHT == DEFAULT_CONTRAST
