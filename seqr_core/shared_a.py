"""Reproducible shared frozen A matrices for SEQR libraries.

All adapters of a SEQR library share one frozen A_m per module; adapter owners train only B
against it. A is random, not secret: it is regenerated anywhere from a recorded recipe.

The distribution is PEFT's default ``lora_A`` init, ``kaiming_uniform_(a=sqrt(5))``, which is
U(-1/sqrt(d), 1/sqrt(d)). We draw it with numpy's PCG64 rather than torch's generator so
the core can regenerate it without torch, bit for bit, on any platform.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError

SCHEME = "peft_kaiming_uniform"
RNG = "numpy.PCG64"


@dataclass(frozen=True)
class SharedARecipe:
    """How to regenerate a library's shared A: a seed and the (fixed) scheme/rng names."""

    seed: int
    scheme: str = SCHEME
    rng: str = RNG

    def __post_init__(self) -> None:
        if not (0 <= int(self.seed) < 2**63):
            raise InvalidArgumentError("seed must be a non-negative 63-bit integer",
                                       field="shared_a.seed", limit="[0, 2**63)", actual=self.seed)
        if self.scheme != SCHEME:
            raise InvalidArgumentError("unknown shared-A scheme", field="shared_a.scheme",
                                       limit=SCHEME, actual=self.scheme)
        if self.rng != RNG:
            raise InvalidArgumentError("unknown shared-A rng", field="shared_a.rng",
                                       limit=RNG, actual=self.rng)

    def to_dict(self) -> dict:
        return {"seed": int(self.seed), "scheme": self.scheme, "rng": self.rng}

    @classmethod
    def from_dict(cls, d: dict) -> "SharedARecipe":
        return cls(seed=int(d["seed"]), scheme=d.get("scheme", SCHEME), rng=d.get("rng", RNG))


def _module_seed(seed: int, module: str) -> np.random.SeedSequence:
    # Module names, not positions, pick the stream: a library that grows a module keeps the
    # A of every other module unchanged.
    digest = hashlib.sha256(module.encode("utf-8")).digest()
    return np.random.SeedSequence([int(seed), int.from_bytes(digest[:8], "little")])


def generate_shared_a(recipe: SharedARecipe, *, module: str, rank: int, d_in: int) -> np.ndarray:
    """A_m for one module. Returns (rank, d_in) float32."""
    if rank < 1 or d_in < 1:
        raise InvalidArgumentError("rank and d_in must be >= 1", field="shared_a.rank",
                                   limit=">=1", actual=(rank, d_in))
    rng = np.random.Generator(np.random.PCG64(_module_seed(recipe.seed, module)))
    bound = 1.0 / np.sqrt(d_in)
    return rng.uniform(-bound, bound, size=(rank, d_in)).astype(np.float32)  # (r, d)
