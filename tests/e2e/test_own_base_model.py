"""Your own base model and trainer: `seqr train --model PATH`, `seqr libraries shared-a` + stock
peft (the README recipe), and `seqr calibrate --texts` on a local Hugging Face folder."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seqr_cli.main import main
from seqr_client import RouterClient

from .conftest import LIB, RANK, SEED, create_library

SEQR = str(Path(sys.executable).with_name("seqr"))
TEXT = "\n".join(f"Clause {i}: the lessee shall keep the premises in good repair and return them at the end "
                 f"of the term, fair wear and tear excepted." for i in range(40))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A local Hugging Face causal-LM folder (config.json, safetensors weights, tokenizer files)."""
    from seqr_client.hf_models import tiny_llama
    d = tmp_path_factory.mktemp("my-model")
    model, tok = tiny_llama(seed=3, hidden=32, layers=2)
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def seqr(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([SEQR, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"seqr {' '.join(args)}\n{out.stdout}\n{out.stderr}"
    return out


def test_the_readme_recipe_with_stock_peft_makes_a_shared_a_adapter(world, start_server, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    h = start_server(tmp_path / "d")
    with RouterClient(h.target, timeout=30) as c:
        create_library(c, world)
    assert main(["libraries", "shared-a", "--target", h.target, "--library", LIB, "--out", str(tmp_path / "A")]) == 0
    shared = tmp_path / "A"
    # --- the recipe, as README.md gives it ---
    meta = json.load(open(shared / "shared_a.json"))
    model = get_peft_model(copy.deepcopy(world.model), LoraConfig(
        r=meta["rank"], lora_alpha=2 * meta["rank"], target_modules=meta["target_modules"], lora_dropout=0.0))
    set_peft_model_state_dict(model, load_file(shared / "shared_a.safetensors"))
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "mine", safe_serialization=True)
    # --- what the recipe promises ---
    assert meta["rank"] == RANK and meta["seed"] == SEED and sorted(meta["modules"]) == sorted(world.qv)
    assert trainable and all("lora_B" in n for n in trainable)
    saved = load_file(tmp_path / "mine" / "adapter_model.safetensors")
    for m in world.qv:
        key = f"base_model.model.{m}"
        assert torch.equal(saved[f"{key}.lora_A.weight"], torch.from_numpy(world.shared_a[m]))
        assert saved[f"{key}.lora_B.weight"].abs().sum() > 0          # B was trained (PEFT starts it at 0)
    with RouterClient(h.target, timeout=30) as c:
        info = c.put_adapter(tmp_path / "mine", name="mine", library=LIB)
        assert info.kind == "shared_a" and sorted(info.modules) == sorted(world.qv)


def test_train_on_a_local_model_folder_and_upload_it(model_dir, start_server, tmp_path):
    (tmp_path / "legal.txt").write_text(TEXT)
    out = seqr("train", "--model", str(model_dir), "--shared-a-seed", str(SEED), "--rank", str(RANK),
               "--domain-text", str(tmp_path / "legal.txt"), "--out", str(tmp_path / "legal"), "--steps", "2",
               "--batch-size", "2", "--seq-len", "32", "--no-progress")
    assert "shared_a adapter" in out.stdout
    h = start_server(tmp_path / "d")
    conn = ["--target", h.target]
    seqr("libraries", "create", "mine", "--hf-config", str(model_dir / "config.json"), "--shared-a-seed",
         str(SEED), "--rank", str(RANK), "--target-modules", "q_proj,v_proj", *conn)
    put = json.loads(seqr("adapters", "put", str(tmp_path / "legal"), "--library", "mine", "--json", *conn).stdout)
    assert put[0]["kind"] == "shared_a"


def test_train_refuses_a_model_path_that_is_not_a_model(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    out = subprocess.run([SEQR, "train", "--model", str(tmp_path), "--shared-a-seed", "1", "--domain-text",
                          str(tmp_path / "t.txt"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2 and "no config.json" in out.stderr and "Traceback" not in out.stderr


def _library_with_adapters(h, model_dir: Path, tmp_path: Path, *, general: bool, name: str = "mine") -> None:
    """Library ``name`` on the local model: two shared-A adapters (and one with its own A)."""
    from seqr_client.hf_models import load_local
    from seqr_core import SharedARecipe, signature_from_hf_config

    from ..peft_factory import make_peft_adapter
    model, _ = load_local(model_dir)
    qv = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    with RouterClient(h.target, timeout=30) as c:
        c.create_library(name, signature=signature_from_hf_config(model.config.to_dict(), base_model="mine"),
                         shared_a_seed=SEED, shared_a_rank=RANK, shared_a_modules=qv)
        for i in range(2):
            c.put_adapter(make_peft_adapter(model, tmp_path / f"s{i}", seed=i, rank=RANK,
                                            shared_a=SharedARecipe(seed=SEED)), name=f"s{i}", library=name)
        if general:
            c.put_adapter(make_peft_adapter(model, tmp_path / "g", seed=9, rank=RANK), name="g", library=name,
                         allow_general=True)


@pytest.mark.parametrize("general", [False, True], ids=["shared-only", "with-general"])
def test_calibrate_from_texts_on_a_local_model(model_dir, start_server, tmp_path, capsys, general):
    h = start_server(tmp_path / "d")
    _library_with_adapters(h, model_dir, tmp_path, general=general)
    (tmp_path / "traffic.txt").write_text(TEXT)
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(x) for x in
                                                   ["a prompt about leases", {"text": "another one"}, {"prompt": "third"}]))
    assert main(["calibrate", "--library", "mine", "--target", h.target, "--texts", str(tmp_path / "traffic.txt"),
                 str(tmp_path / "more.jsonl"), "--model", str(model_dir), "--max-tokens", "32"]) == 0
    out = capsys.readouterr()
    from seqr_client.text_calibration import read_texts
    n = len(read_texts([tmp_path / "traffic.txt", tmp_path / "more.jsonl"], chunk_chars=600))
    assert n == 3 + len(read_texts([tmp_path / "traffic.txt"], chunk_chars=600)) > 4
    assert f"calibrated {3 if general else 2} adapters on {n} sequences" in out.out
    # Projected (T x r) where every adapter on a module shares its A; one with its own A needs x.
    assert f"4 modules as {'activations' if general else 'projected'}" in out.err
    with RouterClient(h.target, timeout=30) as c:
        info = c.describe("mine")
        assert sorted(info.calibrated_adapters) == sorted(a.name for a in info.adapters)
        x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
        r = c.route("mine", {m.name: x for m in info.modules if m.shared_rank}, top_k=2)
        assert r.fallback == "" and r.normalisation == "activation"
        if general:
            # Captures are held until the stream starts: bounded, one line when too much.
            assert main(["calibrate", "--library", "mine", "--target", h.target, "--texts",
                         str(tmp_path / "traffic.txt"), "--model", str(model_dir), "--max-tokens", "100000",
                         "--max-memory-mb", "1"]) == 2
            assert "need up to" in capsys.readouterr().err
            return
    # A model that is not the library's base model is one line, before anything is sent.
    assert main(["calibrate", "--library", "mine", "--target", h.target, "--texts", str(tmp_path / "traffic.txt"),
                 "--model", "tiny"]) == 2
    assert "does not match library 'mine'" in capsys.readouterr().err
    with RouterClient(h.target, timeout=30) as c:
        # The statistics the projected stream fitted are those of the captured activations.
        from seqr_client.hf_host import capture_inputs
        from seqr_client.hf_models import load_local
        _library_with_adapters(h, model_dir, tmp_path, general=False, name="ref")
        model, tok = load_local(model_dir)
        texts = read_texts([tmp_path / "traffic.txt", tmp_path / "more.jsonl"], chunk_chars=600)
        c.calibrate([capture_inputs(model, t, modules=("q_proj", "v_proj"), tokenizer=tok, max_length=32)
                     for t in texts], library="ref")
        ref = c.route("ref", {m.name: x for m in info.modules if m.shared_rank}, top_k=2)
        assert [ch.name for ch in r.choices] == [ch.name for ch in ref.choices]
        np.testing.assert_allclose([ch.score for ch in r.choices], [ch.score for ch in ref.choices], rtol=1e-5)
