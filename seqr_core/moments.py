"""Pooled moments of the projected input z = A_m·x: what a library keeps of its calibration
traffic, so a shared-A adapter uploaded later is calibrated at once (DESIGN §4c).

With φ(z) the upper-triangle features of z zᵀ (K = r(r+1)/2) and w the adapter's Gram weights
(adapter_index.gram_weights), every token's energy is linear in φ: e_t = φ(z_t)·w. So over the pooled
tokens, exactly (up to float64 rounding):

    mean_t e             = μ·w          μ = mean_t φ(z_t)                  (K,)
    Σ_t (e_t − mean e)²  = wᵀ C w       C = Σ_t (φ(z_t) − μ)(φ(z_t) − μ)ᵀ  (K, K)

That is the calibration mean of e per (adapter, module) — the default ``activation``
normalisation — and the per-token variance ``zscore/adapter_module/e`` needs. What these
aggregates cannot give exactly: √e and log e (not linear in φ per token) and the adapter-level
z-scores (their variance is over sums across modules, which needs the cross-module covariance,
(M·K)² numbers). Derived statistics leave those entries NaN; routing with such a normalisation
then falls back to ``frobenius`` for a request that involves the adapter, visibly, until the
next Calibrate streams it (normalise.uncalibrated).

μ is also the library's *background*: S̄ = E[z zᵀ] per module, what adapter owners train
against (seqr_client.training.Contrast). Only aggregates are kept, never a sequence.

``MomentAccumulator`` is mutable (Calibrate, routed traffic); ``MomentPool`` is its frozen,
serialisable result. Decay (for traffic) scales the existing weights before each new sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from .errors import IntegrityError, InvalidArgumentError
from .qr_index import triu_pairs

FORMAT = 1


def features(z: np.ndarray) -> np.ndarray:
    """φ(z): (T, r) -> (T, K) float64, upper-triangle products z_i·z_j (i ≤ j)."""
    z = np.asarray(z, dtype=np.float64)
    iu, ju = triu_pairs(z.shape[1])
    return z[:, iu] * z[:, ju]


def matrix_features(G: np.ndarray) -> np.ndarray:
    """φ of a second-moment matrix G (r, r): its symmetrised upper triangle (K,)."""
    G = np.asarray(G, dtype=np.float64)
    iu, ju = triu_pairs(G.shape[0])
    return (0.5 * (G + G.T))[iu, ju]


def unfeature(mu: np.ndarray, r: int) -> np.ndarray:
    """The symmetric (r, r) matrix whose upper triangle is ``mu`` (inverse of matrix_features)."""
    iu, ju = triu_pairs(r)
    S = np.zeros((r, r))
    S[iu, ju] = mu
    S[ju, iu] = mu
    return S


def rank_of(K: int) -> int:
    r = int((np.sqrt(8 * K + 1) - 1) / 2)
    if r * (r + 1) // 2 != K:
        raise InvalidArgumentError("feature length is not r(r+1)/2", field="moments.mean", actual=K)
    return r


@dataclass(frozen=True)
class ModuleMoments:
    """One module's pooled moments. ``n``/``mean``: every token seen (moments-form traffic
    included); ``n2``/``mean2``/``comoment``: the tokens seen one by one (Calibrate always
    is; ``comoment`` is None when the library keeps first moments only)."""

    n: float
    mean: np.ndarray                 # (K,)
    n2: float = 0.0
    mean2: np.ndarray | None = None  # (K,)
    comoment: np.ndarray | None = None  # (K, K), centred at mean2

    @property
    def rank(self) -> int:
        return rank_of(self.mean.size)

    def background(self) -> np.ndarray:
        """S̄ = E[z zᵀ] over the pooled tokens, (r, r) float64."""
        return unfeature(self.mean, self.rank)

    def energy_stats(self, w: np.ndarray) -> np.ndarray:
        """[n, mean, M2] of e = φ·w over the pooled tokens; M2 NaN without second moments."""
        mean = float(self.mean @ w)
        if self.comoment is None or self.n2 <= 1:
            return np.array([self.n, mean, np.nan])
        m2 = float(w @ self.comoment @ w)
        # std = √(M2/(n−1)) must be that of the per-token subset when it is smaller than n.
        scale = (self.n - 1) / (self.n2 - 1) if self.n2 != self.n else 1.0
        return np.array([self.n, mean, max(m2, 0.0) * scale])


@dataclass(frozen=True)
class MomentPool:
    modules: Mapping[str, ModuleMoments]
    sequences: float = 0.0

    def background(self) -> dict[str, np.ndarray]:
        return {m: mm.background() for m, mm in sorted(self.modules.items())}

    def second_order(self) -> bool:
        return bool(self.modules) and all(mm.comoment is not None for mm in self.modules.values())

    def replacing(self, fresh: "MomentPool") -> "MomentPool":
        """This pool with ``fresh``'s modules replacing its own (a newer Calibrate wins)."""
        mods = dict(self.modules)
        mods.update(fresh.modules)
        return MomentPool(modules=MappingProxyType(mods), sequences=fresh.sequences)

    # --- storage ------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors, doc = {}, {}
        for k, (m, mm) in enumerate(sorted(self.modules.items())):
            tensors[f"{k}.mean"] = np.ascontiguousarray(mm.mean, dtype="<f8")
            if mm.mean2 is not None:
                tensors[f"{k}.mean2"] = np.ascontiguousarray(mm.mean2, dtype="<f8")
            if mm.comoment is not None:
                tensors[f"{k}.comoment"] = np.ascontiguousarray(mm.comoment, dtype="<f8")
            doc[m] = {"k": k, "n": mm.n, "n2": mm.n2}
        meta = {"format": str(FORMAT), "sequences": repr(float(self.sequences)), "modules": json.dumps(doc)}
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "MomentPool":
        """Parse a stored pool (already authenticated by the store); malformed -> IntegrityError."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            tensors = load(raw)
            meta = _metadata(raw)
            if meta.get("format") != str(FORMAT):
                raise ValueError(f"unknown moments format {meta.get('format')!r}")
            doc = json.loads(meta["modules"])
            mods = {}
            for m, d in doc.items():
                k = int(d["k"])
                mean = tensors[f"{k}.mean"]
                r = rank_of(mean.size)
                K = r * (r + 1) // 2
                mean2, com = tensors.get(f"{k}.mean2"), tensors.get(f"{k}.comoment")
                if (mean2 is not None and mean2.shape != (K,)) or (com is not None and com.shape != (K, K)):
                    raise ValueError(f"module {m}: inconsistent shapes")
                mods[m] = ModuleMoments(n=float(d["n"]), mean=mean, n2=float(d["n2"]), mean2=mean2,
                                        comoment=com)
            return cls(modules=MappingProxyType(mods), sequences=float(meta["sequences"]))
        except (ValueError, KeyError, TypeError, IndexError, SafetensorError) as e:
            raise IntegrityError(f"stored moments do not parse: {e}", field="moments") from None


def _metadata(raw: bytes) -> dict:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8: 8 + n]).get("__metadata__") or {}


class MomentAccumulator:
    """Streams sequences into pooled moments (Chan's parallel update, float64, centred, so the
    variance never comes from a difference of large sums). Keeps no sequence.

    ``second_order=False`` keeps first moments only (K numbers per module instead of K²).
    ``decay`` in (0, 1]: before each sequence the existing weights are multiplied by it.
    """

    def __init__(self, *, second_order: bool = True, decay: float = 1.0):
        if not 0.0 < decay <= 1.0:
            raise InvalidArgumentError("decay must be in (0, 1]", field="decay", actual=decay)
        self.second_order, self.decay = second_order, decay
        self._n: dict[str, float] = {}
        self._mean: dict[str, np.ndarray] = {}
        self._n2: dict[str, float] = {}
        self._mean2: dict[str, np.ndarray] = {}
        self._com: dict[str, np.ndarray] = {}
        self.sequences = 0.0

    def begin_sequence(self) -> None:
        if self.decay < 1.0:
            for d in (self._n, self._n2):
                for m in d:
                    d[m] *= self.decay
            for m in self._com:
                self._com[m] *= self.decay
            self.sequences *= self.decay
        self.sequences += 1.0

    def add_tokens(self, module: str, z: np.ndarray) -> None:
        """z (T, r): this sequence's projected input on ``module`` (per token)."""
        phi = features(z)                                                  # (T, K)
        nb, mb = float(phi.shape[0]), phi.mean(axis=0)
        self._merge_first(module, nb, mb)
        if not self.second_order:
            return
        c = phi - mb
        cb = c.T @ c                                                       # (K, T)·(T, K) -> (K, K)
        na = self._n2.get(module, 0.0)
        if na == 0.0:
            self._n2[module], self._mean2[module], self._com[module] = nb, mb, cb
            return
        tot = na + nb
        d = mb - self._mean2[module]
        self._mean2[module] = self._mean2[module] + d * (nb / tot)
        self._com[module] = self._com[module] + cb + np.outer(d, d) * (na * nb / tot)
        self._n2[module] = tot

    def add_moments(self, module: str, G: np.ndarray, tokens: int) -> None:
        """A sequence given only as G = ZᵀZ/T over ``tokens`` tokens: first moments only."""
        self._merge_first(module, float(max(tokens, 1)), matrix_features(G))

    def _merge_first(self, module: str, nb: float, mb: np.ndarray) -> None:
        na = self._n.get(module, 0.0)
        if na == 0.0:
            self._n[module], self._mean[module] = nb, mb.copy()
            return
        tot = na + nb
        self._mean[module] = self._mean[module] + (mb - self._mean[module]) * (nb / tot)
        self._n[module] = tot

    def finish(self) -> MomentPool:
        mods = {m: ModuleMoments(n=self._n[m], mean=self._mean[m].copy(), n2=self._n2.get(m, 0.0),
                                 mean2=None if m not in self._mean2 else self._mean2[m].copy(),
                                 comoment=None if m not in self._com else self._com[m].copy())
                for m in self._n}
        return MomentPool(modules=MappingProxyType(mods), sequences=self.sequences)


def derived_module_stats(pool: MomentPool, w: np.ndarray, module: str) -> np.ndarray | None:
    """(3 transforms, 3) [n, mean, M2] for one shared-A adapter's Gram weights ``w`` (K,) on
    ``module`` (adapter_index.gram_weights): transform e from the pool, √e and log e NaN (not
    derivable); None if the pool lacks the module."""
    mm = pool.modules.get(module)
    if mm is None or mm.mean.size != w.size:
        return None
    out = np.full((3, 3), np.nan)
    out[0] = mm.energy_stats(w)
    return out
