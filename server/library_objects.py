"""What the service keeps in the store for a library, and how it reads it back.

* library meta (JSON): format, base-model signature, shared-A recipe and rank, caller meta;
* object ``shared_a``: the frozen A per module as safetensors (stored even when it came from a
  recipe, so a library never depends on a future numpy drawing the same numbers);
* object ``calibration``: CalibrationStats plus the adapter id each adapter's stats belong to,
  so stats of a deleted adapter can never attach to a later adapter of the same name (stats
  derived from the pooled moments are not stored: they are derived again at every load);
* object ``moments``: the pooled moments of z = A·x per shared-A module (seqr_core.moments),
  written with the calibration it came from in one commit;
* per adapter: the uploaded PEFT files verbatim, meta, and object ``index``: the adapter's
  routing index (seqr_core.adapter_index: R per module, ‖ΔW‖_F², own A of general modules),
  sealed like the files and committed with them. Startup loads the index objects and never
  parses PEFT files, except for an adapter whose index is missing (a store written before index
  objects existed) or of another format: that one is re-parsed once and its index stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from seqr_core import (AdapterEntry, AdapterIndex, BaseModelSignature, CalibrationStats, LibraryIndex,
                       MomentPool, SharedARecipe, generate_shared_a, write_safetensors)
from seqr_core import adapter_index
from seqr_core.adapters import MAX_RANK
from seqr_core.errors import FailedPreconditionError, InvalidArgumentError, IntegrityError, LimitExceededError

from .config import Limits

FORMAT = 1
SHARED_A = "shared_a"
CALIBRATION = "calibration"
MOMENTS = "moments"
INDEX = "index"                       # per adapter


@dataclass(frozen=True)
class LibrarySpec:
    """Everything needed to create a library, validated, before the store is touched."""

    name: str
    signature: BaseModelSignature
    shared_a: Mapping[str, np.ndarray]
    recipe: SharedARecipe | None
    meta: Mapping[str, str]
    shared_a_only: bool = False     # refuse adapters whose A is not the shared A

    def store_meta(self) -> dict:
        return {"format": FORMAT, "signature": self.signature.to_dict(),
                "recipe": self.recipe.to_dict() if self.recipe else None, "user": dict(self.meta),
                **({"shared_a_only": True} if self.shared_a_only else {})}

    def objects(self) -> dict[str, bytes]:
        return {SHARED_A: write_safetensors(dict(self.shared_a))} if self.shared_a else {}

    def empty_index(self, version: int) -> LibraryIndex:
        return LibraryIndex.create(name=self.name, signature=self.signature,
                                   shared_a=self.shared_a, version=version)


# --- library shape: checked before anything is allocated ----------------------------------
# A 35-byte CreateLibrary (d_in 2**20, rank 128) used to cost 525 MB of memory and 537 MB of
# disk. Each refusal names the Limits field (and its `seqr serve` flag).

def check_signature_shape(modules: Sequence, *, limits: Limits) -> None:
    """Module count and sizes of a requested signature (wire ModuleSpecs or anything with
    ``d_in``/``d_out``), before any core object is built from them."""
    if len(modules) > limits.max_library_modules:
        raise LimitExceededError("more modules than a library may have (max_library_modules, "
                                 "--max-library-modules)", field="signature.modules",
                                 limit=limits.max_library_modules, actual=len(modules))
    for i, m in enumerate(modules):
        for dim, limit in (("d_in", limits.max_d_in), ("d_out", limits.max_d_out)):
            if int(getattr(m, dim)) > limit:
                raise LimitExceededError(f"module {dim} above the server limit (max_{dim}, "
                                         f"--max-{dim.replace('_', '-')})",
                                         field=f"signature.modules[{i}].{dim}", limit=limit,
                                         actual=int(getattr(m, dim)))


def _check_rank(rank: int, *, field: str, limits: Limits) -> None:
    if rank > limits.max_rank:
        raise LimitExceededError("rank above the server limit (max_rank, --max-rank)", field=field,
                                 limit=limits.max_rank, actual=rank)
    if not (1 <= rank <= MAX_RANK):
        raise InvalidArgumentError("rank must be in range", field=field, limit=f"[1, {MAX_RANK}]", actual=rank)


def _check_shared_a_bytes(total: int, *, field: str, limits: Limits) -> None:
    if total > limits.max_shared_a_bytes:
        raise LimitExceededError("shared A larger than a library may hold (max_shared_a_bytes, "
                                 "--max-shared-a-mb)", field=field, limit=limits.max_shared_a_bytes,
                                 actual=total)


def check_uploaded_shared_a(shared: Mapping[str, np.ndarray], *, limits: Limits) -> None:
    """Rank and total size of an uploaded A (already bounded by the message size)."""
    for m, a in shared.items():
        if a.ndim == 2:
            _check_rank(int(a.shape[0]), field=f"uploaded.modules[{m}].shape[0]", limits=limits)
    _check_shared_a_bytes(sum(4 * int(a.size) for a in shared.values()), field="uploaded.modules",
                          limits=limits)


def recipe_shared_a(signature: BaseModelSignature, recipe: SharedARecipe, *, rank: int,
                    modules: list[str], limits: Limits) -> dict[str, np.ndarray]:
    """A from a seed for ``modules`` (empty: all of the signature) at ``rank``."""
    _check_rank(rank, field="shared_a_rank", limits=limits)
    names = modules or list(signature.names)
    if len(set(names)) != len(names):
        raise InvalidArgumentError("duplicate module", field="shared_a_modules")
    d_in = {m: signature.spec(m, field="shared_a_modules").d_in for m in names}
    _check_shared_a_bytes(4 * rank * sum(d_in.values()), field="shared_a_rank", limits=limits)
    return {m: generate_shared_a(recipe, module=m, rank=rank, d_in=d_in[m]) for m in names}


def spec_from_store(name: str, meta: dict, shared_a_bytes: bytes | None) -> LibrarySpec:
    if meta.get("format") != FORMAT:
        raise IntegrityError("unknown library meta format", field=f"library[{name}].meta.format",
                             limit=FORMAT, actual=meta.get("format"))
    sig = BaseModelSignature.from_dict(meta["signature"])
    recipe = SharedARecipe.from_dict(meta["recipe"]) if meta.get("recipe") else None
    shared = _read_sealed_tensors(shared_a_bytes, field=f"library[{name}].shared_a") if shared_a_bytes else {}
    return LibrarySpec(name=name, signature=sig, shared_a=shared, recipe=recipe,
                       meta=dict(meta.get("user") or {}), shared_a_only=bool(meta.get("shared_a_only", False)))


def check_adapter_kind(spec: LibrarySpec, entry: AdapterEntry, *, allow_general: bool) -> None:
    """An upload whose A is not the library's shared A is never silently stored as general."""
    foreign = [m for m in entry.modules if m not in entry.shared_modules]
    if not foreign:
        return
    m = foreign[0]
    if spec.shared_a_only:
        why = ("has no shared A in this library" if m not in spec.shared_a
               else "is not the library's shared A")
        raise FailedPreconditionError(
            f"library {spec.name!r} accepts shared-A adapters only (created with shared_a_only), and "
            f"module {m} of adapter {entry.name!r} {why}: train it against the library "
            f"(seqr train --library {spec.name})", field="library.shared_a_only", actual=entry.name)
    mismatched = [x for x in foreign if x in spec.shared_a]
    if mismatched and not allow_general:
        raise FailedPreconditionError(
            f"lora_A of adapter {entry.name!r} is not the library's shared A on {len(mismatched)} "
            f"module(s), e.g. {mismatched[0]}: it would be routed as a general adapter (exact but slower, "
            f"and general adapters tend to win over shared-A ones). Train it against the library "
            f"(seqr train --library {spec.name}), or set allow_general (seqr adapters put --allow-general) "
            "to store it as general", field="header.allow_general", actual=entry.name)


def moment_bytes(spec: LibrarySpec) -> int:
    """Bytes of the second-order pooled moments (K×K float64 per shared-A module)."""
    return sum(8 * (a.shape[0] * (a.shape[0] + 1) // 2) ** 2 for a in spec.shared_a.values())


def encode_moments(pool: MomentPool) -> bytes:
    return pool.to_bytes()


def decode_moments(raw: bytes) -> MomentPool:
    return MomentPool.from_bytes(raw)


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
    stats = stats.streamed()
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
