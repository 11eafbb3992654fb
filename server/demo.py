"""A small synthetic demo library for a fresh ``seqr serve`` (no model download needed).

Library ``demo``: a tiny Llama-shaped signature (hidden 64, 2 layers), a shared frozen A on
q_proj/v_proj from seed 1234 at rank 8, and four synthetic shared-A adapters written as real
PEFT files and uploaded through the normal path (so they are stored encrypted like any other),
then calibrated on synthetic traffic.
"""

from __future__ import annotations

import json

import numpy as np

from seqr_core import (Calibrator, ModuleInput, SharedARecipe, generate_shared_a, llama_signature,
                       write_safetensors)

from . import library_objects as lo
from .auth import OPEN
from .config import Limits
from .manager import LibraryManager

NAME = "demo"
SEED = 1234
RANK = 8
ADAPTERS = ("demo-legal", "demo-medical", "demo-code", "demo-chat")
TARGETS = ("q_proj", "v_proj")


def demo_spec() -> lo.LibrarySpec:
    sig = llama_signature(base_model="seqr-demo/tiny-llama", hidden=64, intermediate=128, layers=2,
                          heads=4, kv_heads=4)
    recipe = SharedARecipe(seed=SEED)
    mods = [m.name for m in sig.modules if m.name.rsplit(".", 1)[-1] in TARGETS]
    shared = lo.recipe_shared_a(sig, recipe, rank=RANK, modules=mods, limits=Limits())  # ours, tiny
    return lo.LibrarySpec(name=NAME, signature=sig, shared_a=shared, recipe=recipe,
                          meta={"description": "synthetic demo library (random adapters)"})


def demo_adapter_files(spec: lo.LibrarySpec, k: int) -> dict[str, bytes]:
    """PEFT files of synthetic shared-A adapter ``k`` (B random, one scale per adapter)."""
    rng = np.random.default_rng(1000 + k)
    tensors = {}
    for m, A in sorted(spec.shared_a.items()):
        d_out = spec.signature.spec(m).d_out
        tensors[f"base_model.model.{m}.lora_A.weight"] = generate_shared_a(
            spec.recipe, module=m, rank=RANK, d_in=A.shape[1])
        tensors[f"base_model.model.{m}.lora_B.weight"] = (0.05 * rng.standard_normal((d_out, RANK))
                                                          ).astype(np.float32)
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(TARGETS),
              "base_model_name_or_path": spec.signature.base_model}
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": write_safetensors(tensors)}


def create_demo(manager: LibraryManager) -> None:
    spec = demo_spec()
    manager.create_library(spec)
    for k, name in enumerate(ADAPTERS):
        manager.put_adapter(NAME, name, demo_adapter_files(spec, k), {"demo": "true"}, OPEN)
    # Calibrated on synthetic traffic so the demo routes with the default (activation)
    # normalisation, as a real library does after `seqr calibrate`.
    index = manager.get(NAME, OPEN).index
    cal = Calibrator(index)
    rng = np.random.default_rng(SEED)
    hidden = spec.signature.modules[0].d_in
    for _ in range(32):
        x = rng.standard_normal((16, hidden)).astype(np.float32)
        cal.update({m: ModuleInput("activations", x, 16) for m in spec.shared_a})
    manager.store_calibration(NAME, index, cal.finish(), OPEN)
