"""Random libraries for property tests: mixed shared-A and general adapters, near-ties.

The product keeps no B; the float64 reference (tests/core/reference.py) does: every adapter
added through ``add`` is remembered here with its original factors, keyed by its index entry.
"""

from __future__ import annotations

import numpy as np

from seqr_core import (Adapter, BaseModelSignature, Calibrator, LibraryIndex, ModuleFactors,
                       ModuleInput, ModuleSpec)


_ORIGINAL: dict[int, tuple] = {}


def add(idx: LibraryIndex, adapter: Adapter, *, adapter_id: int, upload_dtype: str = "F32") -> LibraryIndex:
    """``idx.add_adapter``, remembering the adapter's original factors for the reference."""
    idx, entry = idx.add_adapter(adapter, adapter_id=adapter_id, upload_dtype=upload_dtype)
    _ORIGINAL[id(entry)] = (entry, adapter)
    return idx


def original(entry) -> Adapter:
    """The adapter (with its B) an index entry was built from (added through ``add``)."""
    kept, adapter = _ORIGINAL[id(entry)]
    assert kept is entry, "adapter was not added through tests.core.libraries.add"
    return adapter


def random_library(rng: np.random.Generator, *, n_adapters: int, n_modules: int, d: int, r: int,
                   p_general: float = 0.3, p_near_tie: float = 0.3, p_copy: float = 0.1,
                   p_skip_module: float = 0.15, shared_only: bool = False,
                   b_dtype: str = "float32") -> LibraryIndex:
    specs = tuple(ModuleSpec(f"model.layers.{i}.q_proj", d, int(rng.integers(1, 2 * d + 1)))
                  for i in range(n_modules))
    sig = BaseModelSignature(base_model="toy", modules=specs)
    shared = {s.name: rng.uniform(-1, 1, (r, d)).astype(np.float32) for s in specs}
    idx = LibraryIndex.create(name="lib", signature=sig, shared_a=shared)
    made: list[Adapter] = []
    for i in range(n_adapters):
        u = rng.random()
        if made and u < p_copy:
            src = made[int(rng.integers(len(made)))]
            ad = Adapter(name=f"a{i}", factors=dict(src.factors))
        elif made and u < p_copy + p_near_tie:
            src = made[int(rng.integers(len(made)))]
            eps = float(10.0 ** rng.uniform(-7, -3))
            ad = Adapter(name=f"a{i}", factors={m: ModuleFactors(A=f.A, B=f.B * np.float32(1 + eps),
                                                                 scale=f.scale)
                                                for m, f in src.factors.items()})
        else:
            general = (not shared_only) and rng.random() < p_general
            factors = {}
            for s in specs:
                if len(specs) > 1 and rng.random() < p_skip_module:
                    continue
                A = rng.uniform(-1, 1, (r, d)).astype(np.float32) if general else shared[s.name]
                B = _round(rng.standard_normal((s.d_out, r)) * rng.uniform(0.1, 3), b_dtype).astype(np.float32)
                factors[s.name] = ModuleFactors(A=A, B=B, scale=float(rng.uniform(0.25, 4)))
            if not factors:
                factors[specs[0].name] = ModuleFactors(A=shared[specs[0].name],
                                                       B=rng.standard_normal((specs[0].d_out, r)).astype(np.float32),
                                                       scale=1.0)
            ad = Adapter(name=f"a{i}", factors=factors)
        made.append(ad)
        idx = add(idx, ad, adapter_id=10 + 3 * i)
    return idx


def _round(a: np.ndarray, dtype: str) -> np.ndarray:
    """Values exactly representable in ``dtype`` (what an fp16/bf16 host would send)."""
    if dtype == "float16":
        return a.astype(np.float16)
    if dtype == "bfloat16":
        return ((a.astype(np.float32).view(np.uint32) + 0x8000) & 0xFFFF0000).view(np.float32)
    return a.astype(np.float32)


def random_inputs(rng, index: LibraryIndex, *, T: int, form: str, modules=None,
                  dtype: str = "float32") -> dict:
    out = {}
    names = modules or index.signature.names
    x = (rng.standard_normal((T, index.signature.modules[0].d_in)) * rng.uniform(0.1, 5)).astype(np.float32)
    for m in names:
        xm = x if rng.random() < 0.5 else (rng.standard_normal(x.shape)).astype(np.float32)
        A = index.shared_a[m]
        if form == "activations":
            out[m] = ModuleInput("activations", _round(xm, dtype), T)
        elif form == "projected":
            out[m] = ModuleInput("projected", _round(xm @ A.T, dtype), T)
        else:
            z = (xm @ A.T).astype(np.float32)
            out[m] = ModuleInput("moments", _round(z.T @ z / T, dtype), T)
    return out


def calibrated(rng, index: LibraryIndex, *, sequences: int = 6, T: int = 5) -> LibraryIndex:
    cal = Calibrator(index)
    for _ in range(sequences):
        cal.update(random_inputs(rng, index, T=T, form="activations"))
    return index.with_calibration(cal.finish())
