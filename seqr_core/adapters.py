"""LoRA adapters as the core sees them: per-module factors, a scale, a name.

ΔW_m = scale · B_m · A_m with A_m (r, d_in) and B_m (d_out, r). Arrays are float32, read-only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import numpy as np

from .errors import InvalidArgumentError
from .signature import BaseModelSignature

MAX_RANK = 256
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_adapter_name(name: str, *, field: str = "adapter.name") -> str:
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise InvalidArgumentError("adapter names are 1-128 chars of [A-Za-z0-9_.-], starting "
                                   "with a letter or digit", field=field, actual=name)
    return name


def peft_scale(*, lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else float(r))


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class ModuleFactors:
    """A (r, d_in) and B (d_out, r) of one module, with that module's scale."""

    A: np.ndarray
    B: np.ndarray
    scale: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "A", _frozen(self.A))
        object.__setattr__(self, "B", _frozen(self.B))
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise InvalidArgumentError("A must be (r, d_in) and B (d_out, r) with the same r",
                                       field="factors", actual=(self.A.shape, self.B.shape))
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise InvalidArgumentError("scale must be finite and > 0", field="scale",
                                       actual=self.scale)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter: name, per-module factors, free-form metadata (JSON-able)."""

    name: str
    factors: Mapping[str, ModuleFactors]
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_adapter_name(self.name)
        if not self.factors:
            raise InvalidArgumentError("an adapter needs at least one module",
                                       field="adapter.factors", limit=">=1", actual=0)
        object.__setattr__(self, "factors", MappingProxyType(dict(sorted(self.factors.items()))))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))
        for m, f in self.factors.items():
            if not (1 <= f.rank <= MAX_RANK):
                raise InvalidArgumentError("rank out of range", field=f"adapter.{m}.rank",
                                           limit=f"[1, {MAX_RANK}]", actual=f.rank)
            for part, arr in (("lora_A", f.A), ("lora_B", f.B)):
                if not np.isfinite(arr).all():
                    raise InvalidArgumentError("non-finite values (NaN/Inf)",
                                               field=f"adapter.{m}.{part}")

    @property
    def rank(self) -> int:
        return max(f.rank for f in self.factors.values())

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.factors)

    def check_against(self, signature: BaseModelSignature) -> None:
        """Raise unless every module is in the signature with matching d_in/d_out."""
        for m, f in self.factors.items():
            spec = signature.spec(m, field=f"adapter.{m}")
            if f.A.shape[1] != spec.d_in or f.B.shape[0] != spec.d_out:
                raise InvalidArgumentError(
                    f"base model mismatch: library {signature.base_model!r} has {m} with "
                    f"d_in={spec.d_in}, d_out={spec.d_out}", field=f"adapter.{m}",
                    limit=(spec.d_in, spec.d_out), actual=(f.A.shape[1], f.B.shape[0]))
