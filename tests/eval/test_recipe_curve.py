"""bench/recipe_search.py curve: the weight -> accuracy, perplexity rows joined from the harness
and the service's evaluation runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def recipe_search():
    spec = importlib.util.spec_from_file_location("recipe_search", BENCH / "recipe_search.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _harness(weight, acc, ppl, recipe=None):
    return {"contrast": weight, "contrast_recipe": recipe, "accuracy": {"activation": acc},
            "per_domain": {"activation": {"a": acc}}, "gram_cosine": 0.5, "oracle_ppl": ppl, "base_ppl": 30.0}


def _service(weight, acc):
    lib = "seqr8"
    return {"recipe": {"contrast": weight or None}, "accuracy": {lib: {"seqr · activation": acc}},
            "agreement": {f"{lib}: activation": {"top1": 1.0}},
            "perplexity": {"mean (of domains)": {"routed (activation)": 21.0}},
            "confidence": {f"{lib}: seqr · activation": {"thresholds": [{"margin": 0.01, "target": 0.95}]}}}


def test_rows_pair_each_weight_with_its_service_run_and_price_perplexity_against_plain(recipe_search):
    harness = {"c05": _harness(0.5, 0.7, 22.0, {"weight": 0.5}),
               "plain": _harness(0.0, 0.6, 20.0),
               "c05-late": _harness(0.5, 0.65, 21.0, {"weight": 0.5, "start": 20})}
    rows = recipe_search.curve_rows(harness, {0.0: _service(0.0, 0.61), 0.5: _service(0.5, 0.71)})
    assert [(r["set"], r["contrast"]) for r in rows] == [("plain", 0.0), ("c05", 0.5), ("c05-late", 0.5)]
    plain, c05, late = rows
    assert plain["service"]["activation"] == 0.61 and c05["service"]["activation"] == 0.71
    assert "service" not in late                   # a schedule variant is not the service's run of that weight
    assert late["schedule"] == {"start": 20}
    assert c05["oracle_ppl_vs_plain"] == pytest.approx(0.10) and plain["oracle_ppl_vs_plain"] == 0.0
    assert c05["mixed_activation"] is None         # no general adapters measured: no mixed number


def test_rows_without_plain_adapters_leave_the_perplexity_cost_open(recipe_search):
    rows = recipe_search.curve_rows({"c05": _harness(0.5, 0.7, 22.0, {"weight": 0.5})}, {})
    assert rows[0]["oracle_ppl_vs_plain"] is None and "service" not in rows[0]
