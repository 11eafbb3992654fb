"""`seqr train --library`: an adapter owner trains against a running library's shared A and
background (fetched through the real client) without sharing data; `--from-adapter` fine-tunes
an existing adapter's B with the distinguishability term on."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from seqr_cli.main import main
from seqr_client import RouterClient
from seqr_client.hf_host import capture_inputs
from seqr_client.hf_models import signature_of, tiny_llama
from seqr_client.training import Contrast, DEFAULT_CONTRAST_WEIGHT, read_lora_b, read_seqr_json

LIBRARY, SEED, RANK = "owners", 77, 8
CODE = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(24)]
PROSE = [f"And it came to pass in the {i}th year, that the king went up to the city." for i in range(24)]
FAST = ["--model", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress"]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A served library for the tiny training model, calibrated on unlabeled text."""
    from .conftest import launch

    model, tok = tiny_llama()
    sig = signature_of(model, ("q_proj", "v_proj"))
    h = launch(tmp_path_factory.mktemp("owners") / "data")
    with RouterClient(h.target, timeout=60) as c:
        c.create_library(LIBRARY, signature={"base_model": "tiny", "modules": [list(s) for s in sig]},
                         shared_a_seed=SEED, shared_a_rank=RANK)
        traffic = [capture_inputs(model, t, modules=("q_proj", "v_proj"), tokenizer=tok, max_length=32)
                   for t in CODE[:10] + PROSE[:10]]
        c.calibrate(traffic, library=LIBRARY)
        background = c.training_inputs(LIBRARY).background
    yield h, background
    h.stop(grace=1.0)


def _texts(tmp_path, lines) -> str:
    p = tmp_path / "domain.txt"
    p.write_text("\n".join(lines * 4))
    return str(p)


def test_seqr_train_library_trains_against_the_fetched_a_and_background(library, tmp_path, capsys):
    h, background = library
    out = tmp_path / "code"
    rc = main(["train", "--library", LIBRARY, "--target", h.target, "--domain-text", _texts(tmp_path, CODE),
               "--out", str(out), *FAST])
    assert rc == 0, capsys.readouterr().err
    assert "contrast 0.1 vs the library's background" in capsys.readouterr().out
    meta = read_seqr_json(out)
    want = Contrast(background={m: b for m, b in background.items()}, weight=DEFAULT_CONTRAST_WEIGHT).recipe()
    assert meta["contrast"] == want and meta["shared_a"]["seed"] == SEED and meta["rank"] == RANK
    with RouterClient(h.target, timeout=30) as c:     # the library takes it as shared-A, no flag
        assert c.put_adapter(out, name="code", library=LIBRARY).kind == "shared_a"


def test_seqr_train_from_adapter_fine_tunes_its_b_with_the_term_on(library, tmp_path, capsys):
    h, _ = library
    plain = tmp_path / "plain"
    assert main(["train", "--shared-a-seed", str(SEED), "--domain-text", _texts(tmp_path, PROSE),
                 "--out", str(plain), *FAST, "--steps", "10"]) == 0
    assert "contrast" not in read_seqr_json(plain)
    tuned = tmp_path / "tuned"
    rc = main(["train", "--library", LIBRARY, "--target", h.target, "--from-adapter", str(plain),
               "--domain-text", _texts(tmp_path, PROSE), "--out", str(tuned), *FAST])
    assert rc == 0, capsys.readouterr().err
    meta = read_seqr_json(tuned)
    assert meta["contrast"]["weight"] == DEFAULT_CONTRAST_WEIGHT and meta["init_b_sha256"]
    a0, b0, _ = read_lora_b(plain)
    a1, b1, _ = read_lora_b(tuned)
    assert all(np.array_equal(a0[m], a1[m]) for m in a0)                # A is still the library's
    # two Adam steps move B by about 2·lr per entry: a fifth of the ten that made it, not from zero
    moved = [np.linalg.norm(b1[m] - b0[m]) / np.linalg.norm(b0[m]) for m in b0]
    assert 0 < max(moved) < 0.5


def test_seqr_train_library_needs_a_calibrated_library(library, tmp_path, capsys):
    h, _ = library
    with RouterClient(h.target, timeout=30) as c:
        c.create_library("fresh", signature={"base_model": "tiny", "modules": [
            list(s) for s in signature_of(tiny_llama()[0], ("q_proj", "v_proj"))]}, shared_a_seed=SEED,
            shared_a_rank=RANK)
    rc = main(["train", "--library", "fresh", "--target", h.target, "--domain-text", _texts(tmp_path, CODE),
               "--out", str(tmp_path / "x"), *FAST])
    assert rc == 1 and "no background yet" in capsys.readouterr().err


def test_seqr_train_from_the_entry_point_takes_its_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--library", "--from-adapter", "--shared-a-seed", "--contrast-weight", "--target"):
        assert opt in out
