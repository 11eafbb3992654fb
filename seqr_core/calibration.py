"""Calibration statistics fitted by streaming over unlabeled traffic (Welford; no activations kept).

Per (adapter, module) and per transform f ∈ {e, √e, log e}: count, mean and M2 of f(e_t) over
tokens. Per adapter: the same moments of v = Σ_m mean_t f(e) over sequences, and of
Σ_m f(e_t) over tokens (for adapter-level z-scores). log uses a floor δ = 1e-8·‖ΔW‖_F² so a
zero-energy token stays finite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

import numpy as np

from .energies import ModuleInput, seqr_energies
from .errors import InvalidArgumentError
from .qr_index import LibraryIndex

TRANSFORMS = ("e", "sqrt", "log")
LOG_FLOOR = 1e-8


def transform(e: np.ndarray, kind: str, delta: np.ndarray | float) -> np.ndarray:
    if kind == "e":
        return e
    if kind == "sqrt":
        return np.sqrt(np.maximum(e, 0.0))
    return np.log(np.maximum(e, 0.0) + delta)


def transform_bound(e: np.ndarray, b: np.ndarray, kind: str, delta) -> np.ndarray:
    """Bound on |f(e_true) − f(e)| given |e_true − e| ≤ b, e_true ≥ 0 (f monotone)."""
    if kind == "e":
        return b
    lo = np.maximum(e - b, 0.0)
    f0, fl, fh = transform(e, kind, delta), transform(lo, kind, delta), transform(e + b, kind, delta)
    return np.maximum(fh - f0, f0 - fl)


def _welford_merge(n, mean, m2, xs: np.ndarray):
    """Merge a batch xs (T, n_cols) into per-column (n, mean, M2) (Chan et al.)."""
    nb = xs.shape[0]
    mb = xs.mean(axis=0)
    m2b = ((xs - mb) ** 2).sum(axis=0)
    tot = n + nb
    d = mb - mean
    mean = mean + d * (nb / tot)
    m2 = m2 + m2b + d * d * (n * nb / tot)
    return tot, mean, m2


@dataclass(frozen=True)
class AdapterStats:
    """Streaming moments for one adapter. Arrays are (3 transforms, 3) = [n, mean, M2]."""

    modules: tuple[str, ...]
    module_stats: Mapping[str, np.ndarray]
    seq_stats: np.ndarray
    tok_stats: np.ndarray

    def mean_std(self, which: np.ndarray, t: str) -> tuple[float, float]:
        n, mean, m2 = which[TRANSFORMS.index(t)]
        std = float(np.sqrt(m2 / (n - 1))) if n > 1 else 0.0
        return float(mean), max(std, 1e-12 * abs(float(mean)) + 1e-30)


@dataclass(frozen=True)
class CalibrationStats:
    adapters: Mapping[str, AdapterStats] = field(default_factory=dict)
    sequences: int = 0

    def get(self, name: str) -> AdapterStats | None:
        return self.adapters.get(name)

    def without(self, name: str) -> "CalibrationStats":
        return replace(self, adapters=MappingProxyType({k: v for k, v in self.adapters.items()
                                                        if k != name}))

    def to_bytes(self) -> bytes:
        doc = {"format": 1, "sequences": self.sequences, "adapters": {
            n: {"modules": list(s.modules),
                "module_stats": {m: a.tolist() for m, a in s.module_stats.items()},
                "seq_stats": s.seq_stats.tolist(), "tok_stats": s.tok_stats.tolist()}
            for n, s in sorted(self.adapters.items())}}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "CalibrationStats":
        doc = json.loads(raw.decode())
        if doc.get("format") != 1:
            raise InvalidArgumentError("unknown calibration format", field="calibration.format",
                                       actual=doc.get("format"))
        ads = {n: AdapterStats(modules=tuple(s["modules"]),
                               module_stats=MappingProxyType({m: np.array(a) for m, a in
                                                              s["module_stats"].items()}),
                               seq_stats=np.array(s["seq_stats"]), tok_stats=np.array(s["tok_stats"]))
               for n, s in doc["adapters"].items()}
        return cls(adapters=MappingProxyType(ads), sequences=int(doc["sequences"]))


class Calibrator:
    """Streams sequences through the index and accumulates moments. Keeps no activations.

    ``update`` takes one sequence (all its modules); ``finish`` returns CalibrationStats for
    the adapters of the snapshot it was built on.
    """

    def __init__(self, index: LibraryIndex):
        self.index = index
        self._mod: dict[str, list] = {}      # module -> [n, mean, M2] arrays (3, n_adapters)
        self._ids = index.ids
        N = self._ids.size
        self._seq = [np.zeros((3, N)), np.zeros((3, N)), np.zeros((3, N))]
        self._tok = [np.zeros((3, N)), np.zeros((3, N)), np.zeros((3, N))]
        self._modules: dict[int, set] = {}
        self.sequences = 0

    def update(self, inputs: Mapping[str, ModuleInput]) -> None:
        if not inputs:
            raise InvalidArgumentError("no modules in calibration input", field="inputs")
        N = self._ids.size
        T = None
        v = np.zeros((3, N))
        tok = None
        for m, inp in sorted(inputs.items()):
            if inp.form == "moments":
                raise InvalidArgumentError("calibration needs per-token inputs (activations or "
                                           "projected), not moments", field=f"inputs.{m}.moments")
            en = seqr_energies(self.index, m, inp, field=f"inputs.{m}")
            T = en.e.shape[0] if T is None else T
            if en.e.shape[0] != T:
                raise InvalidArgumentError("all modules must have the same token count",
                                           field=f"inputs.{m}", limit=T, actual=en.e.shape[0])
            if tok is None:
                tok = np.zeros((3, T, N))
            pos = self.index.positions(en.ids)
            _, f2 = self.index.frob2(m)
            delta = LOG_FLOOR * f2 + 1e-30
            st = self._mod.setdefault(m, [np.zeros((3, N)), np.zeros((3, N)), np.zeros((3, N))])
            for k, t in enumerate(TRANSFORMS):
                fe = transform(en.e, t, delta)                            # (T, n)
                n_, mu, m2 = _welford_merge(st[0][k, pos], st[1][k, pos], st[2][k, pos], fe)
                st[0][k, pos], st[1][k, pos], st[2][k, pos] = n_, mu, m2
                v[k, pos] += fe.mean(axis=0)
                tok[k][:, pos] += fe
            for i in en.ids:
                self._modules.setdefault(int(i), set()).add(m)
        for k in range(3):
            for acc, xs in ((self._seq, v[k][None, :]), (self._tok, tok[k])):
                n_, mu, m2 = _welford_merge(acc[0][k], acc[1][k], acc[2][k], xs)
                acc[0][k], acc[1][k], acc[2][k] = n_, mu, m2
        self.sequences += 1

    def finish(self) -> CalibrationStats:
        out = {}
        for p, entry in enumerate(self.index.adapters):
            mods = tuple(sorted(self._modules.get(entry.adapter_id, ())))
            if not mods:
                continue
            ms = {m: np.stack([self._mod[m][j][:, p] for j in range(3)], axis=1) for m in mods}
            out[entry.name] = AdapterStats(
                modules=mods, module_stats=MappingProxyType(ms),
                seq_stats=np.stack([self._seq[j][:, p] for j in range(3)], axis=1),
                tok_stats=np.stack([self._tok[j][:, p] for j in range(3)], axis=1))
        return CalibrationStats(adapters=MappingProxyType(out), sequences=self.sequences)


def merge_into(index: LibraryIndex, fresh: CalibrationStats) -> CalibrationStats:
    """Stats for the index: fresh stats replace old ones adapter by adapter."""
    old = dict(index.calibration.adapters) if index.calibration is not None else {}
    old.update(fresh.adapters)
    names = set(index.names)
    return CalibrationStats(adapters=MappingProxyType({k: v for k, v in old.items() if k in names}),
                            sequences=fresh.sequences)
