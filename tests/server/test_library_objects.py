"""The library objects the server stores read back, whatever the layout (issue 9, item 1)."""

from __future__ import annotations

import itertools

import numpy as np

from seqr_core import SharedARecipe, llama_signature
from seqr_server import library_objects as lo
from seqr_server.config import Limits


def test_stored_shared_a_reads_back_for_every_small_llama_layout():
    first_bytes = set()
    for hidden, layers, rank, targets in itertools.product(
            (32, 48, 64, 96, 128), (1, 2, 3, 4), (2, 4, 8, 16),
            (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))):
        sig = llama_signature(base_model="sweep", hidden=hidden, intermediate=2 * hidden, layers=layers,
                              heads=4, kv_heads=2)
        mods = [m.name for m in sig.modules if m.name.endswith(targets)]
        recipe = SharedARecipe(seed=rank)
        spec = lo.LibrarySpec(name="lib", signature=sig, recipe=recipe, meta={},
                              shared_a=lo.recipe_shared_a(sig, recipe, rank=rank, modules=mods,
                                                                  limits=Limits()))
        stored = spec.objects()[lo.SHARED_A]
        first_bytes.add(stored[0])
        back = lo.spec_from_store("lib", spec.store_meta(), stored)
        assert back.signature == sig and back.recipe == recipe
        assert sorted(back.shared_a) == sorted(mods)
        for m in mods:
            np.testing.assert_array_equal(back.shared_a[m], spec.shared_a[m])
    assert 0x80 in first_bytes          # the sweep reaches the layouts the old reader refused
