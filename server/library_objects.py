"""What the service keeps in the store for a library, and how it reads it back.

* library meta (JSON): format, base-model signature, shared-A recipe and rank, caller meta;
* object ``shared_a``: the frozen A per module as safetensors (stored even when it came from a
  recipe, so a library never depends on a future numpy drawing the same numbers);
* object ``calibration``: CalibrationStats plus the adapter id each adapter's stats belong to,
  so stats of a deleted adapter can never attach to a later adapter of the same name;
* per adapter: the uploaded PEFT files verbatim, meta, and object ``index``: the adapter's
  routing index (seqr_core.adapter_index: R per module, ‖ΔW‖_F², own A of general modules),
  sealed like the files and committed with them. Startup loads the index objects and never
  parses PEFT files, except for an adapter whose index is missing (a store written before index
  objects existed) or of another format: that one is re-parsed once and its index stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from seqr_core import (AdapterIndex, BaseModelSignature, CalibrationStats, LibraryIndex, SharedARecipe,
                       generate_shared_a, write_safetensors)
from seqr_core import adapter_index
from seqr_core.adapters import MAX_RANK
from seqr_core.errors import InvalidArgumentError, IntegrityError

FORMAT = 1
SHARED_A = "shared_a"
CALIBRATION = "calibration"
INDEX = "index"                       # per adapter


@dataclass(frozen=True)
class LibrarySpec:
    """Everything needed to create a library, validated, before the store is touched."""

    name: str
    signature: BaseModelSignature
    shared_a: Mapping[str, np.ndarray]
    recipe: SharedARecipe | None
    meta: Mapping[str, str]

    def store_meta(self) -> dict:
        return {"format": FORMAT, "signature": self.signature.to_dict(),
                "recipe": self.recipe.to_dict() if self.recipe else None, "user": dict(self.meta)}

    def objects(self) -> dict[str, bytes]:
        return {SHARED_A: write_safetensors(dict(self.shared_a))} if self.shared_a else {}

    def empty_index(self, version: int) -> LibraryIndex:
        return LibraryIndex.create(name=self.name, signature=self.signature,
                                   shared_a=self.shared_a, version=version)


def recipe_shared_a(signature: BaseModelSignature, recipe: SharedARecipe, *, rank: int,
                    modules: list[str]) -> dict[str, np.ndarray]:
    """A from a seed for ``modules`` (empty: all of the signature) at ``rank``."""
    if not (1 <= rank <= MAX_RANK):
        raise InvalidArgumentError("shared_a_rank must be in range", field="shared_a_rank",
                                   limit=f"[1, {MAX_RANK}]", actual=rank)
    names = modules or list(signature.names)
    if len(set(names)) != len(names):
        raise InvalidArgumentError("duplicate module", field="shared_a_modules")
    return {m: generate_shared_a(recipe, module=m, rank=rank,
                                 d_in=signature.spec(m, field="shared_a_modules").d_in) for m in names}


def spec_from_store(name: str, meta: dict, shared_a_bytes: bytes | None) -> LibrarySpec:
    if meta.get("format") != FORMAT:
        raise IntegrityError("unknown library meta format", field=f"library[{name}].meta.format",
                             limit=FORMAT, actual=meta.get("format"))
    sig = BaseModelSignature.from_dict(meta["signature"])
    recipe = SharedARecipe.from_dict(meta["recipe"]) if meta.get("recipe") else None
    shared = _read_sealed_tensors(shared_a_bytes, field=f"library[{name}].shared_a") if shared_a_bytes else {}
    return LibrarySpec(name=name, signature=sig, shared_a=shared, recipe=recipe,
                       meta=dict(meta.get("user") or {}))


def _read_sealed_tensors(raw: bytes, *, field: str) -> dict[str, np.ndarray]:
    """Tensors of an object the store authenticated (not a tenant upload), read with the
    safetensors library. (peft_io's strict upload reader takes a header length whose low byte
    is 0x80 for a pickle: the 128-module shared A of a Llama-3-8B library is refused by it.)"""
    try:
        out = safetensors.numpy.load(bytes(raw))
    except SafetensorError as e:
        raise IntegrityError(f"not readable ({e})", field=field) from None
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def encode_calibration(stats: CalibrationStats, adapter_ids: Mapping[str, int]) -> bytes:
    doc = {"format": FORMAT, "adapter_ids": {n: int(adapter_ids[n]) for n in stats.adapters},
           "stats": json.loads(stats.to_bytes())}
    return json.dumps(doc, sort_keys=True).encode()


def decode_calibration(raw: bytes, current_ids: Mapping[str, int]) -> CalibrationStats:
    """Stored stats, keeping only adapters that still exist with the same id."""
    doc = json.loads(raw.decode())
    stats = CalibrationStats.from_bytes(json.dumps(doc["stats"]).encode())
    for n, i in doc["adapter_ids"].items():
        if current_ids.get(n) != i:
            stats = stats.without(n)
    return stats


def encode_index(ai: AdapterIndex) -> bytes:
    return adapter_index.encode(ai)


def decode_index(raw: bytes, *, library: str, adapter: str) -> AdapterIndex:
    """A stored index object; its name must be the adapter's (the store binds the blob to it)."""
    field = f"library[{library}].adapter[{adapter}].index"
    ai = adapter_index.decode(raw, field=field)
    if ai.name != adapter:
        raise IntegrityError("index object names another adapter", field=field, limit=adapter, actual=ai.name)
    return ai
