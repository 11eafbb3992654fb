"""Baselines: arrow is not norm-maximising (the paper's Theorem 3.1); lag filters then ranks."""

import numpy as np

from seqr_core import (Adapter, BaseModelSignature, LibraryIndex, ModuleFactors, ModuleInput,
                       ModuleSpec, Normalisation, RouteOptions, route)


def _two_adapter_library():
    sig = BaseModelSignature("toy", (ModuleSpec("m", 2, 2),))
    idx = LibraryIndex.create(name="thm31", signature=sig)
    # ΔW1 = e1 e1ᵀ: σ = (1), v1 = e1.   ΔW2 = [[0, 1], [0.9, 0]]: σ = (1, 0.9), v1 = e2.
    a1 = ModuleFactors(A=np.array([[1.0, 0.0]]), B=np.array([[1.0], [0.0]]), scale=1.0)
    a2 = ModuleFactors(A=np.array([[0.0, 1.0], [1.0, 0.0]]), B=np.diag([1.0, 0.9]), scale=1.0)
    idx, _ = idx.add_adapter(Adapter(name="one_direction", factors={"m": a1}), adapter_id=1)
    idx, _ = idx.add_adapter(Adapter(name="two_directions", factors={"m": a2}), adapter_id=2)
    return idx


def test_arrow_picks_a_different_adapter_than_the_norm_maximiser():
    # x = (1, 0.8): ‖ΔW1 x‖² = 1 but ‖ΔW2 x‖² = 0.64 + 0.81 = 1.45, so the norm maximiser is
    # adapter 2; arrow compares |v1ᵀx| = 1 vs 0.8 and picks adapter 1. Theorem 3.1 in action.
    idx = _two_adapter_library()
    x = {"m": ModuleInput("activations", np.array([[1.0, 0.8]], np.float32), 1)}
    none = Normalisation("none")
    arrow = route(idx, x, RouteOptions(method="arrow", normalisation=none)).choices[0].name
    seqr = route(idx, x, RouteOptions(method="seqr", normalisation=none)).choices[0]
    exact = route(idx, x, RouteOptions(method="exact", normalisation=none)).choices[0]
    assert arrow == "one_direction"
    assert seqr.name == exact.name == "two_directions"
    assert seqr.score == np.float32(1.45) or abs(seqr.score - 1.45) < 1e-6


def test_lag_ranks_the_arrow_shortlist_by_exact_norm():
    idx = _two_adapter_library()
    x = {"m": ModuleInput("activations", np.array([[1.0, 0.8]], np.float32), 1)}
    lag = route(idx, x, RouteOptions(method="lag", lag_k=2, normalisation=Normalisation("none")))
    assert lag.choices[0].name == "two_directions"
    only_one = route(idx, x, RouteOptions(method="lag", lag_k=1, normalisation=Normalisation("none")))
    assert only_one.choices[0].name == "one_direction"
