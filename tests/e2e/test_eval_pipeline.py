"""The evaluation pipeline of bench/evaluate.py, CI-sized: a tiny random Llama, three synthetic
domains, a few training steps, a real server and the real client.

train shared-A adapters (seqr_client.training) → create the library and upload them (PutAdapter)
→ calibrate through the service on an unlabeled mix → route every held-out sample through the
service with several methods and normalisations → accuracy well above chance, seqr == exact on
every sample; then the model-host round trip: capture → route → set adapter → generate.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from seqr_eval import pipeline as P  # noqa: E402
from seqr_client.hf_host import capture_inputs, load_adapters  # noqa: E402
from seqr_client.hf_models import signature_of, tiny_llama  # noqa: E402
from seqr_client.training import train_lora  # noqa: E402
from seqr_core import SharedARecipe  # noqa: E402

SEED = 31
RANK = 8
TARGETS = ("q_proj", "v_proj")
LIB = "synthetic"


def _domain_texts(kind: str, n: int, rng: np.random.Generator) -> list[str]:
    """Text from clearly different character distributions, so a few steps can learn them."""
    out = []
    for _ in range(n):
        if kind == "arith":
            parts = [f"{rng.integers(10, 999)} {rng.choice(list('+-*'))} {rng.integers(2, 99)} = "
                     f"{rng.integers(10, 9999)};" for _ in range(6)]
        elif kind == "vowels":
            parts = ["".join(rng.choice(list("aeioulmn"), size=rng.integers(2, 7))) for _ in range(14)]
        else:  # "shout"
            parts = ["".join(rng.choice(list("BCDFGHKRSTXZ"), size=rng.integers(3, 8))) + rng.choice(list("!?."))
                     for _ in range(10)]
        out.append(" ".join(parts))
    return out


DOMAINS = ("arith", "vowels", "shout")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rng = np.random.default_rng(0)
    model, tok = tiny_llama(seed=3, hidden=64, layers=2)
    data = {d: (_domain_texts(d, 48, rng), _domain_texts(d, 12, rng)) for d in DOMAINS}  # train, test
    root = tmp_path_factory.mktemp("adapters")
    recipe = SharedARecipe(seed=SEED)
    dirs = {d: train_lora(model, tok, data[d][0], out_dir=root / d, shared_a=recipe, rank=RANK,
                          target_modules=TARGETS, steps=12, batch_size=8, seq_len=64, lr=1e-2,
                          domain=d, progress=False) for d in DOMAINS}
    sig = signature_of(model, TARGETS)
    modules = [m for m, _, _ in sig]

    def captured(text):
        got = capture_inputs(model, text, modules=("q_proj",), tokenizer=tok, max_length=64)
        x = np.stack(list(got.values()), axis=1)                  # (T, L, d)
        return P.layer_inputs(x, [int(m.split(".")[2]) for m in got], modules)

    calib = [t for d in DOMAINS for t in data[d][0][:10]]
    rng.shuffle(calib)
    tests = [(d, t) for d in DOMAINS for t in data[d][1]]
    return dict(model=model, tok=tok, dirs=dirs, sig=sig, modules=modules, recipe=recipe,
                calib=[captured(t) for t in calib], tests=tests,
                test_inputs=[captured(t) for _, t in tests])


@pytest.fixture(scope="module")
def service(world, tmp_path_factory):
    with P.running_service(tmp_path_factory.mktemp("svc"), workers=4) as (handles, client):
        ids = P.register_library(client, LIB, signature={"base_model": "tiny-llama", "modules": world["sig"]},
                                 shared_a_seed=SEED, rank=RANK, modules=world["modules"],
                                 adapters=world["dirs"])
        yield client, ids


NORMS = ("none", "frobenius", "activation", "zscore/adapter_module/log", "zscore/adapter/log")


def test_routing_through_the_service_beats_chance_and_seqr_equals_exact(world, service):
    client, ids = service
    assert sorted(ids) == sorted(DOMAINS)
    assert [a.kind for a in client.list_adapters(LIB)] == ["shared_a"] * 3
    cal = P.calibrate(client, LIB, world["calib"])
    assert cal.sequences == len(world["calib"]) and sorted(cal.adapters) == sorted(DOMAINS)

    labels = [d for d, _ in world["tests"]]
    samples = [lambda k=k: world["test_inputs"][k] for k in range(len(labels))]
    acc = {}
    for norm in NORMS:
        seqr = P.route_all(client, LIB, samples, P.Setting("seqr", norm))
        exact = P.route_all(client, LIB, samples, P.Setting("exact", norm))
        assert not seqr.fallback, seqr.fallback                  # calibrated: no frobenius fallback
        assert P.agreement(seqr, exact) == (1.0, 1.0), norm      # same top-1 and same ranking, every sample
        acc[norm] = P.accuracy(seqr, labels)
    chance = 1 / len(DOMAINS)
    assert max(acc.values()) >= 0.9, acc
    assert acc["zscore/adapter_module/log"] > chance + 0.4, acc
    c = P.confusion(seqr, labels, DOMAINS)
    assert c.sum() == len(labels)
    arrow = P.route_all(client, LIB, samples, P.Setting("arrow", "none"))
    assert len(arrow.names) == len(labels)


def test_host_round_trip_capture_route_set_adapter_generate(world, service):
    client, _ = service
    peft_model = load_adapters(world["model"], world["dirs"])
    try:
        d, text = world["tests"][0]
        r = P.host_round_trip(peft_model, world["tok"], client, LIB, text[:60], max_new_tokens=6,
                              normalisation="frobenius")
        best = r["choices"][0][0]
        assert r["active"] == best and peft_model.active_adapter == best
        assert isinstance(r["generated"], str)
        mix = P.host_round_trip(peft_model, world["tok"], client, LIB, text[:60], max_new_tokens=4,
                                top_k=2, normalisation="frobenius")
        assert mix["active"] == "seqr_mix" and len(mix["choices"]) == 2
        assert abs(sum(w for _, _, w in mix["choices"]) - 1) < 1e-9
    finally:
        peft_model.unload()


def test_research_harness_scores_like_the_service(world, service):
    """seqr_eval.eval_lib (the in-process sweep behind bench/results/research.md) must pick what the
    service picks, so its numbers are the service's numbers."""
    from seqr_eval import eval_lib as L

    client, _ = service
    P.calibrate(client, LIB, world["calib"])
    layers = sorted({int(m.split(".")[2]) for m in world["modules"]})

    def capture_of(samples):
        xs = [np.stack([s[f"model.layers.{l}.self_attn.q_proj"] for l in layers], axis=1) for s in samples]
        return L.Capture(x=np.concatenate(xs), offsets=np.cumsum([0] + [x.shape[0] for x in xs]),
                         layers=tuple(layers), site="attn")

    from seqr_core import BaseModelSignature, ModuleSpec
    sig = BaseModelSignature("tiny-llama", tuple(ModuleSpec(n, i, o) for n, i, o in world["sig"]))
    ad = L.load_adapter_set(world["dirs"], sig)
    et = L.energies(capture_of(world["test_inputs"]), ad)
    cal = L.calibrate(L.energies(capture_of(world["calib"]), ad))
    samples = [lambda k=k: world["test_inputs"][k] for k in range(len(world["tests"]))]
    for norm, kw in (("frobenius", {}), ("activation", {}),
                     ("zscore/adapter_module/log", dict(gran="adapter_module", transform="log"))):
        harness = [ad.names[i] for i in L.scores(et, norm.split("/")[0], cal=cal, **kw).argmax(1)]
        assert harness == P.route_all(client, LIB, samples, P.Setting("seqr", norm)).names, norm


def test_seqr_demo_is_mounted_on_the_cli():
    from seqr_cli.main import build_parser
    from seqr_eval import demo as model_demo

    a = build_parser().parse_args(["demo", "--prompt", "def f(x):", "--max-new-tokens", "4"])
    assert a.func is model_demo.run and a.prompt == ["def f(x):"] and a.normalisation == model_demo.NORMALISATION
