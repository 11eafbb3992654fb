"""What the client returns: frozen dataclasses with numpy arrays, no protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class Choice:
    name: str
    adapter_id: int      # stable, never reused, from 0; vLLM's lora_int_id is adapter_id + 1
    score: float
    weight: float        # softmax over the returned choices at the request's temperature


@dataclass(frozen=True)
class TokenChoices:
    adapter_ids: np.ndarray   # (T, k) int64, -1 where fewer than k candidates
    scores: np.ndarray        # (T, k) float64


@dataclass(frozen=True)
class Timings:
    decode_ms: float
    score_ms: float
    total_ms: float


@dataclass(frozen=True)
class RouteResult:
    choices: tuple[Choice, ...]
    margin: float                       # score(first) - score(second); inf with one candidate
    library_version: int
    method: str
    normalisation: str                  # what was applied
    fallback: str                       # why the requested normalisation was not used ('' if it was)
    rechecked: int
    timings: Timings
    tokens: TokenChoices | None = None  # granularity="token"
    scores: Mapping[str, float] = field(default_factory=dict)   # include_scores=True

    @property
    def best(self) -> Choice:
        return self.choices[0]


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    d_in: int
    d_out: int
    shared_rank: int          # 0: no shared A on this module (activations only)


@dataclass(frozen=True)
class SharedARecipe:
    seed: int
    scheme: str
    rng: str


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    adapter_id: int
    kind: str                 # "shared_a" | "general" | "mixed"
    rank: int
    modules: tuple[str, ...]
    upload_dtype: str
    created_at: str
    sha256: Mapping[str, str]
    size_bytes: int
    meta: Mapping[str, str]
    calibrated: bool
    status: str = "ready"     # "ready" | "damaged" (quarantined: never routed; delete and re-upload)
    damaged_reason: str = ""
    version: int = 1          # 1 at upload, +1 per in-place replace


@dataclass(frozen=True)
class LibraryInfo:
    name: str
    version: int
    base_model: str
    modules: tuple[ModuleInfo, ...]
    shared_a_recipe: SharedARecipe | None
    adapters: tuple[AdapterInfo, ...]
    calibrated_adapters: tuple[str, ...]
    calibration_sequences: int
    meta: Mapping[str, str]
    shared_a: Mapping[str, np.ndarray] = field(default_factory=dict)   # include_shared_a=True
    degraded: bool = False                 # damage this caller may know of (see damaged_objects, adapters)
    damaged_objects: tuple[str, ...] = ()  # quarantined library objects, e.g. "calibration"
    background: Mapping[str, np.ndarray] = field(default_factory=dict)  # include_background=True
    shared_a_only: bool = False            # the library refuses adapters with their own A
    pooled_sequences: int = 0              # sequences behind the pooled moments (0: none)
    derived_adapters: tuple[str, ...] = () # calibrated from the pooled moments, not streamed


@dataclass(frozen=True)
class LibrarySummary:
    name: str
    version: int
    base_model: str
    adapters: int
    degraded: bool = False
    damaged_adapters: int = 0


@dataclass(frozen=True)
class DeleteResult:
    name: str
    adapter_id: int
    library_version: int


@dataclass(frozen=True)
class CalibrationResult:
    sequences: int
    adapters: tuple[str, ...]
    library_version: int
    pooled_moments_updated: bool = False   # the stream replaced the library's pooled moments
