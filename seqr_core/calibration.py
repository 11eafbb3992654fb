"""Calibration statistics fitted by streaming over unlabeled traffic (Welford; no activations kept).

Per (adapter, module) and per transform f ∈ {e, √e, log e}: count, mean and M2 of f(e_t) over
tokens. Per adapter: the same moments of v = Σ_m mean_t f(e) over sequences, and of
Σ_m f(e_t) over tokens (for adapter-level z-scores). log uses a floor δ = 1e-8·‖ΔW‖_F² so a
zero-energy token stays finite.

Beside them the stream keeps the library's pooled moments of z = A·x (seqr_core.moments), from
which ``derived_stats`` calibrates shared-A adapters that arrive later: mean and per-token
variance of e per module, exactly; the other statistics stay NaN (see moments.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

import numpy as np

from .energies import ModuleInput, a64, recheck_f64
from .errors import InvalidArgumentError
from .moments import MomentAccumulator, MomentPool, derived_module_stats
from .adapter_index import AdapterIndex
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
    # Derived from a library's pooled moments (calibration.derived_stats), not streamed: only
    # transform e per module is known (the other entries are NaN); re-derived at every load.
    derived: bool = False

    def serves(self, kind: str, granularity: str, transform_: str) -> bool:
        """Whether these stats hold what normalisation (kind, granularity, transform) needs."""
        if kind not in ("activation", "zscore"):
            return True
        t = 0 if kind == "activation" else TRANSFORMS.index(transform_)
        if kind == "zscore" and granularity == "adapter":
            return bool(np.isfinite(self.seq_stats[t]).all() and np.isfinite(self.tok_stats[t]).all())
        need = slice(1, 2) if kind == "activation" else slice(1, 3)
        return all(np.isfinite(np.asarray(a)[t, need]).all() for a in self.module_stats.values())

    def mean_std(self, which: np.ndarray, t: str) -> tuple[float, float]:
        n, mean, m2 = which[TRANSFORMS.index(t)]
        std = float(np.sqrt(m2 / (n - 1))) if n > 1 else 0.0
        return float(mean), max(std, 1e-12 * abs(float(mean)) + 1e-30)


@dataclass(frozen=True)
class CalibrationStats:
    adapters: Mapping[str, AdapterStats] = field(default_factory=dict)
    sequences: int = 0
    # Unix time of the Calibrate that produced these stats; the service stamps it when it stores
    # them (the core keeps no clock). None: stats stored before calibration times were recorded.
    calibrated_at: float | None = None

    def get(self, name: str) -> AdapterStats | None:
        return self.adapters.get(name)

    def streamed(self) -> "CalibrationStats":
        """Only the stats a Calibrate streamed (derived ones are re-derived from the pool)."""
        return replace(self, adapters=MappingProxyType({k: v for k, v in self.adapters.items()
                                                        if not v.derived}))

    def without(self, name: str) -> "CalibrationStats":
        return replace(self, adapters=MappingProxyType({k: v for k, v in self.adapters.items()
                                                        if k != name}))

    def to_bytes(self) -> bytes:
        doc = {"format": 1, "sequences": self.sequences, "adapters": {
            n: {"modules": list(s.modules),
                "module_stats": {m: a.tolist() for m, a in s.module_stats.items()},
                "seq_stats": s.seq_stats.tolist(), "tok_stats": s.tok_stats.tolist(),
                **({"derived": True} if s.derived else {})}
            for n, s in sorted(self.adapters.items())}}
        if self.calibrated_at is not None:
            doc["calibrated_at"] = float(self.calibrated_at)
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
                               seq_stats=np.array(s["seq_stats"]), tok_stats=np.array(s["tok_stats"]),
                               derived=bool(s.get("derived", False)))
               for n, s in doc["adapters"].items()}
        at = doc.get("calibrated_at")
        return cls(adapters=MappingProxyType(ads), sequences=int(doc["sequences"]),
                   calibrated_at=None if at is None else float(at))


class Calibrator:
    """Streams sequences through the index and accumulates moments. Keeps no activations.

    ``update`` takes one sequence (all its modules); ``finish`` returns CalibrationStats for
    the adapters of the snapshot it was built on, and ``pool()`` the pooled moments of z = A·x
    per shared-A module (seqr_core.moments), from which adapters added later are calibrated.
    Energies are computed in float64 (z = A·x, φ(z)·w and ‖M·x‖²), so streamed statistics and
    those derived from the pool agree to float64 rounding.
    """

    def __init__(self, index: LibraryIndex, *, second_order: bool = True):
        self.index = index
        self._mod: dict[str, list] = {}      # module -> [n, mean, M2] arrays (3, n_adapters)
        self._ids = index.ids
        N = self._ids.size
        self._seq = [np.zeros((3, N)), np.zeros((3, N)), np.zeros((3, N))]
        self._tok = [np.zeros((3, N)), np.zeros((3, N)), np.zeros((3, N))]
        self._modules: dict[int, set] = {}
        self._pool = MomentAccumulator(second_order=second_order)
        self.sequences = 0

    def update(self, inputs: Mapping[str, ModuleInput]) -> None:
        if not inputs:
            raise InvalidArgumentError("no modules in calibration input", field="inputs")
        N = self._ids.size
        T = None
        v = np.zeros((3, N))
        tok = None
        energies = {}
        for m, inp in sorted(inputs.items()):
            if inp.form == "moments":
                raise InvalidArgumentError("calibration needs per-token inputs (activations or "
                                           "projected), not moments", field=f"inputs.{m}.moments")
            energies[m] = energies64(self.index, m, inp, field=f"inputs.{m}")
            if T is None:
                T = energies[m][1].shape[0]
            if energies[m][1].shape[0] != T:
                raise InvalidArgumentError("all modules must have the same token count",
                                           field=f"inputs.{m}", limit=T, actual=energies[m][1].shape[0])
        self._pool.begin_sequence()
        tok = np.zeros((3, T, N))
        for m, (ids, e, z) in energies.items():
            if z is not None:
                self._pool.add_tokens(m, z)
            pos = self.index.positions(ids)
            _, f2 = self.index.frob2(m)
            delta = LOG_FLOOR * f2 + 1e-30
            st = self._mod.setdefault(m, [np.zeros((3, N)), np.zeros((3, N)), np.zeros((3, N))])
            for k, t in enumerate(TRANSFORMS):
                fe = transform(e, t, delta)                                # (T, n)
                n_, mu, m2 = _welford_merge(st[0][k, pos], st[1][k, pos], st[2][k, pos], fe)
                st[0][k, pos], st[1][k, pos], st[2][k, pos] = n_, mu, m2
                v[k, pos] += fe.mean(axis=0)
                tok[k][:, pos] += fe
            for i in ids:
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

    def pool(self) -> MomentPool:
        """The pooled moments of the shared-A modules this stream covered."""
        return self._pool.finish()


def energies64(index: LibraryIndex, module: str, inp: ModuleInput, *, field: str):
    """(ids, e (T, n) float64, z (T, r) float64 or None) of every adapter on one module,
    shared then general (the order of ``index.frob2``): the float64 re-check's energies."""
    ids = index.module_ids(module)
    g = index.general.get(module)
    if inp.form != "activations" and g is not None:
        raise InvalidArgumentError(
            f"module {module} has adapters with their own A (general path) that need "
            f"activations", field=f"{field}.{inp.form}", actual=int(g.ids.size))
    z = None
    if module in index.shared_a:
        x64 = inp.data.astype(np.float64)
        z = x64 if inp.form == "projected" else x64 @ a64(index, module).T        # (T, d)·(d, r) -> (T, r)
    return ids, recheck_f64(index, module, inp, ids), z


def derived_stats(index: LibraryIndex, pool: MomentPool | None) -> CalibrationStats | None:
    """The index's calibration plus statistics derived from ``pool`` for every shared-A
    adapter that has none (moments.py: mean and per-token variance of e per module; the rest
    NaN, so normalisations needing them fall back for these adapters until a Calibrate)."""
    cal = index.calibration
    if pool is None or not pool.modules:
        return cal
    have = dict(cal.adapters) if cal is not None else {}
    added = {}
    for entry, slot in zip(index.adapters, index.slots):
        if entry.name in have or entry.kind != "shared_a":
            continue
        got = _derived(pool, entry.modules,
                       lambda m: index.table(f"W{index.layout.group_of[m][0]}")[index.layout.group_of[m][1]][:, slot])
        if got is not None:
            added[entry.name] = got
    if not added:
        return cal
    have.update(added)
    return CalibrationStats(adapters=MappingProxyType(have),
                            sequences=cal.sequences if cal is not None else int(pool.sequences),
                            calibrated_at=cal.calibrated_at if cal is not None else None)


def derived_for(ai: AdapterIndex, pool: MomentPool | None) -> dict[str, "AdapterStats"]:
    """{name: stats} derived from ``pool`` for one index object about to be added (what
    ``derived_stats`` would give it once added: the same Gram weights, the same arithmetic);
    empty when it has its own A on some module or the pool lacks one of its modules."""
    if pool is None or not pool.modules or ai.own:
        return {}
    got = _derived(pool, ai.modules, lambda m, pos={m: k for k, m in enumerate(ai.modules)}: ai.gram_of([pos[m]])[0])
    return {} if got is None else {ai.name: got}


def _derived(pool: MomentPool, modules, weights) -> "AdapterStats | None":
    ms = {}
    for m in modules:
        got = derived_module_stats(pool, np.ascontiguousarray(weights(m), np.float64), m)  # (one summation order)
        if got is None:
            return None
        ms[m] = got
    nan = np.full((3, 3), np.nan)
    return AdapterStats(modules=tuple(ms), module_stats=MappingProxyType(ms), seq_stats=nan, tok_stats=nan,
                        derived=True)


def merge_into(index: LibraryIndex, fresh: CalibrationStats) -> CalibrationStats:
    """Stats for the index: fresh stats replace old ones adapter by adapter."""
    old = dict(index.calibration.adapters) if index.calibration is not None else {}
    old.update(fresh.adapters)
    names = set(index.names)
    return CalibrationStats(adapters=MappingProxyType({k: v for k, v in old.items() if k in names}),
                            sequences=fresh.sequences, calibrated_at=fresh.calibrated_at)
