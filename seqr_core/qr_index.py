"""The QR index: what SEQR needs to route, per module, built incrementally.

For adapter i on module m with ΔW = s·B·A, thin QR s·B = Q·R gives ‖ΔW x‖ = ‖R·A·x‖, so only
the r×r R is kept. Shared-A adapters (A equal to the library's frozen A_m) go on the fast path:
z = A_m·x once, then e_i = zᵀ(RᵢᵀRᵢ)z for all i as one GEMM over the upper-triangle features
of z z ᵀ. Other adapters keep M_i = R_i·A_i (r×d) — SpectR's cost, the same exact answer.

Snapshots are immutable: add_adapter/remove_adapter return a new LibraryIndex (sharing the
untouched arrays) plus what changed, so a reader holding an old snapshot keeps its answers.
"""

from __future__ import annotations

import functools

import threading
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

import numpy as np

from .adapters import Adapter, ModuleFactors, check_adapter_name
from .errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from .signature import BaseModelSignature

# How far an uploaded A may sit from the library's A and still be the same matrix: the
# rounding of the upload dtype (fp16/bf16 uploads of an fp32 A), never more.
_SNAP_RTOL = {"F32": 0.0, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}


@functools.lru_cache(maxsize=64)
def triu_pairs(r: int) -> tuple[np.ndarray, np.ndarray]:
    """Upper-triangle index pairs of an r×r matrix (cached: read-only, shared by every caller)."""
    iu, ju = np.triu_indices(r)
    iu.setflags(write=False)
    ju.setflags(write=False)
    return iu, ju


def gram_weights(R: np.ndarray) -> np.ndarray:
    """R (n, r, r) -> (K, n) weights w with zᵀ(RᵀR)z = feat(z)·w, K = r(r+1)/2."""
    r = R.shape[-1]
    iu, ju = triu_pairs(r)
    S = np.matmul(R.transpose(0, 2, 1), R)                # (n, r, r) RᵀR (3x einsum's speed: snapshots redo this)
    w = S[:, iu, ju] * np.where(iu == ju, 1.0, 2.0)       # (n, K)
    return np.ascontiguousarray(w.T)                       # (K, n)


def thin_r(scaled_B: np.ndarray) -> np.ndarray:
    """R of the thin QR of s·B (o, r), as (r, r) float64 (zero rows padded when o < r)."""
    R = np.linalg.qr(np.asarray(scaled_B, dtype=np.float64), mode="r")  # (min(o,r), r)
    r = scaled_B.shape[1]
    if R.shape[0] < r:
        R = np.vstack([R, np.zeros((r - R.shape[0], r))])
    return R


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    adapter_id: int
    adapter: Adapter
    shared_modules: frozenset[str]
    upload_dtype: str = "F32"

    @property
    def kind(self) -> str:
        if len(self.shared_modules) == len(self.adapter.factors):
            return "shared_a"
        return "general" if not self.shared_modules else "mixed"


@dataclass(frozen=True)
class ModuleIndex:
    """Per-module index. Shared and general sub-indexes hold adapter ids in library order."""

    name: str
    shared_a: np.ndarray | None          # (r_s, d) float32
    shared_ids: np.ndarray               # (Ns,) int64
    R: np.ndarray                        # (Ns, r_s, r_s) float64, scale folded in
    gram: np.ndarray                     # (K, Ns) float32
    general_ids: np.ndarray              # (Ng,) int64
    M: np.ndarray                        # (Σr, d) float32, rows of s·R_i·A_i
    M_offsets: np.ndarray                # (Ng+1,) int64
    frob2_shared: np.ndarray             # (Ns,) float64 ‖ΔW‖_F²
    frob2_general: np.ndarray            # (Ng,) float64
    _cache: dict = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate([self.shared_ids, self.general_ids])

    def cached(self, key: str, build):
        """Lazily built derived arrays (SVD factors for baselines); built once per snapshot."""
        with self._lock:
            if key not in self._cache:
                self._cache[key] = build()
            return self._cache[key]


def _empty_module(name: str, d: int, shared_a: np.ndarray | None) -> ModuleIndex:
    rs = 0 if shared_a is None else shared_a.shape[0]
    K = rs * (rs + 1) // 2
    return ModuleIndex(name=name, shared_a=shared_a, shared_ids=np.zeros(0, np.int64),
                       R=np.zeros((0, rs, rs)), gram=np.zeros((K, 0), np.float32),
                       general_ids=np.zeros(0, np.int64), M=np.zeros((0, d), np.float32),
                       M_offsets=np.zeros(1, np.int64), frob2_shared=np.zeros(0),
                       frob2_general=np.zeros(0))


def _add_many_to_module(mi: ModuleIndex, adds) -> ModuleIndex:
    """Append (adapter_id, factors, shared?) in order; arrays are concatenated once."""
    sh = [(i, f) for i, f, s in adds if s]
    ge = [(i, f) for i, f, s in adds if not s]
    out = mi
    if sh:
        R = np.stack([thin_r(f.scale * f.B.astype(np.float64)) for _, f in sh])   # (n, r, r)
        RA = np.einsum("nab,bd->nad", R, mi.shared_a.astype(np.float64))          # (n, r, d)
        out = replace(out, shared_ids=np.append(out.shared_ids, [i for i, _ in sh]),
                      R=np.concatenate([out.R, R], axis=0),
                      gram=np.concatenate([out.gram, gram_weights(R).astype(np.float32)], axis=1),
                      frob2_shared=np.append(out.frob2_shared, np.einsum("nad,nad->n", RA, RA)))
    if ge:
        RAs = [thin_r(f.scale * f.B.astype(np.float64)) @ f.A.astype(np.float64) for _, f in ge]  # (r, d) each
        offs = out.M_offsets[-1] + np.cumsum([x.shape[0] for x in RAs])
        out = replace(out, general_ids=np.append(out.general_ids, [i for i, _ in ge]),
                      M=np.concatenate([out.M] + [x.astype(np.float32) for x in RAs], axis=0),
                      M_offsets=np.append(out.M_offsets, offs),
                      frob2_general=np.append(out.frob2_general, [float((x * x).sum()) for x in RAs]))
    return replace(out, _cache={}, _lock=threading.Lock())


def _remove_from_module(mi: ModuleIndex, adapter_id: int) -> ModuleIndex:
    s = np.flatnonzero(mi.shared_ids == adapter_id)
    if s.size:
        k = int(s[0])
        return replace(mi, shared_ids=np.delete(mi.shared_ids, k), R=np.delete(mi.R, k, 0),
                       gram=np.delete(mi.gram, k, 1), frob2_shared=np.delete(mi.frob2_shared, k),
                       _cache={}, _lock=threading.Lock())
    g = np.flatnonzero(mi.general_ids == adapter_id)
    if not g.size:
        return mi
    k = int(g[0])
    lo, hi = int(mi.M_offsets[k]), int(mi.M_offsets[k + 1])
    offs = np.concatenate([mi.M_offsets[: k + 1], mi.M_offsets[k + 2:] - (hi - lo)])
    return replace(mi, general_ids=np.delete(mi.general_ids, k),
                   M=np.delete(mi.M, np.s_[lo:hi], 0), M_offsets=offs,
                   frob2_general=np.delete(mi.frob2_general, k), _cache={}, _lock=threading.Lock())


def _insert_into_module(mi: ModuleIndex, adapter_id: int, f: ModuleFactors, shared: bool) -> ModuleIndex:
    """Insert one adapter at its id's place (sub-indexes stay in library order)."""
    one = _add_many_to_module(_empty_module(mi.name, mi.M.shape[1], mi.shared_a), [(adapter_id, f, shared)])
    if shared:
        k = int(np.searchsorted(mi.shared_ids, adapter_id))
        return replace(mi, shared_ids=np.insert(mi.shared_ids, k, adapter_id), R=np.insert(mi.R, k, one.R[0], 0),
                       gram=np.insert(mi.gram, k, one.gram[:, 0], 1),
                       frob2_shared=np.insert(mi.frob2_shared, k, one.frob2_shared[0]),
                       _cache={}, _lock=threading.Lock())
    k = int(np.searchsorted(mi.general_ids, adapter_id))
    at, rows = int(mi.M_offsets[k]), one.M.shape[0]
    offs = np.concatenate([mi.M_offsets[: k + 1], mi.M_offsets[k:] + rows])
    return replace(mi, general_ids=np.insert(mi.general_ids, k, adapter_id), M=np.insert(mi.M, at, one.M, 0),
                   M_offsets=offs, frob2_general=np.insert(mi.frob2_general, k, one.frob2_general[0]),
                   _cache={}, _lock=threading.Lock())


def _snap_to_shared(f: ModuleFactors, shared_a: np.ndarray | None, upload_dtype: str) -> ModuleFactors | None:
    """The factors with A replaced by the library's A if A is that matrix up to upload rounding."""
    if shared_a is None or f.A.shape != shared_a.shape:
        return None
    if np.array_equal(f.A, shared_a):
        return f
    rtol = _SNAP_RTOL.get(upload_dtype, 0.0)
    if rtol and np.all(np.abs(f.A - shared_a) <= rtol * np.abs(shared_a) + 1e-30):
        return ModuleFactors(A=shared_a, B=f.B, scale=f.scale)
    return None


@dataclass(frozen=True)
class LibraryIndex:
    """An immutable snapshot of one library's routing index."""

    name: str
    signature: BaseModelSignature
    version: int
    shared_a: Mapping[str, np.ndarray]
    adapters: tuple[AdapterEntry, ...] = ()
    modules: Mapping[str, ModuleIndex] = field(default_factory=dict)
    calibration: object = None           # seqr_core.calibration.CalibrationStats | None

    @classmethod
    def create(cls, *, name: str, signature: BaseModelSignature,
               shared_a: Mapping[str, np.ndarray] | None = None, version: int = 1) -> "LibraryIndex":
        sa = {}
        for m, A in (shared_a or {}).items():
            spec = signature.spec(m, field=f"shared_a.{m}")
            A = np.ascontiguousarray(A, dtype=np.float32)
            if A.ndim != 2 or A.shape[1] != spec.d_in or not np.isfinite(A).all():
                raise InvalidArgumentError("shared A must be finite (r, d_in)",
                                           field=f"shared_a.{m}", limit=spec.d_in, actual=A.shape)
            A.setflags(write=False)
            sa[m] = A
        mods = {s.name: _empty_module(s.name, s.d_in, sa.get(s.name)) for s in signature.modules}
        return cls(name=name, signature=signature, version=version,
                   shared_a=MappingProxyType(sa), modules=MappingProxyType(mods))

    # --- lookups -----------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    @property
    def ids(self) -> np.ndarray:
        return self._ids  # type: ignore[attr-defined]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {a.name: a for a in self.adapters})
        ids = np.array([a.adapter_id for a in self.adapters], dtype=np.int64)
        ids.setflags(write=False)
        object.__setattr__(self, "_ids", ids)
        # Derived per-snapshot tables (seqr_core.stacked); a new snapshot starts empty.
        object.__setattr__(self, "_cache", {})
        object.__setattr__(self, "_lock", threading.Lock())

    def entry(self, name: str, *, field: str = "adapter") -> AdapterEntry:
        e = self._by_name.get(name)  # type: ignore[attr-defined]
        if e is not None:
            return e
        raise NotFoundError(f"no adapter {name!r} in library {self.name!r}", field=field,
                            actual=name)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Library-order positions of adapter ids (ids grow with position)."""
        return np.searchsorted(self.ids, ids)

    # --- paired mutations ----------------------------------------------------------------
    def add_adapter(self, adapter: Adapter, *, adapter_id: int, upload_dtype: str = "F32",
                    version: int | None = None) -> tuple["LibraryIndex", AdapterEntry]:
        """Returns (new snapshot, the entry added). Other adapters' R/M are not recomputed."""
        new, entries = self.add_adapters([(adapter, adapter_id, upload_dtype)], version=version)
        return new, entries[0]

    def add_adapters(self, items, *, version: int | None = None) -> tuple["LibraryIndex", tuple[AdapterEntry, ...]]:
        """Bulk add of (adapter, adapter_id, upload_dtype) triples: one concatenation per module.

        Returns (new snapshot, the entries added). All or nothing: any invalid item raises
        before the snapshot is built.
        """
        names = {a.name for a in self.adapters}
        last = self.adapters[-1].adapter_id if self.adapters else -1
        entries, per_module = [], {}
        for adapter, adapter_id, upload_dtype in items:
            check_adapter_name(adapter.name)
            if adapter.name in names:
                raise AlreadyExistsError(f"adapter {adapter.name!r} already exists",
                                         field="adapter.name", actual=adapter.name)
            if adapter_id <= last:
                raise InvalidArgumentError("adapter ids must grow (ids are never reused)",
                                           field="adapter_id", limit=f">{last}", actual=adapter_id)
            names.add(adapter.name)
            last = int(adapter_id)
            entry = self._entry(adapter, adapter_id, upload_dtype)
            for m, f in entry.adapter.factors.items():
                per_module.setdefault(m, []).append((int(adapter_id), f, m in entry.shared_modules))
            entries.append(entry)
        mods = dict(self.modules)
        for m, adds in per_module.items():
            mods[m] = _add_many_to_module(mods[m], adds)
        new = replace(self, adapters=self.adapters + tuple(entries), modules=MappingProxyType(mods),
                      version=self.version + 1 if version is None else version)
        return new, tuple(entries)

    def remove_adapter(self, name: str, *, version: int | None = None) -> tuple["LibraryIndex", AdapterEntry]:
        """Returns (new snapshot, the entry removed); its calibration stats go with it."""
        entry = self.entry(name)
        mods = dict(self.modules)
        for m in entry.adapter.factors:
            mods[m] = _remove_from_module(mods[m], entry.adapter_id)
        cal = self.calibration.without(name) if self.calibration is not None else None
        new = replace(self, adapters=tuple(a for a in self.adapters if a.name != name),
                      modules=MappingProxyType(mods), calibration=cal,
                      version=self.version + 1 if version is None else version)
        return new, entry

    def replace_adapter(self, adapter: Adapter, *, adapter_id: int, upload_dtype: str = "F32",
                        version: int | None = None) -> tuple["LibraryIndex", AdapterEntry]:
        """Swap in a new version of adapter ``adapter.name`` under ``adapter_id``, at its place in
        library order (ids stay sorted). The old version, if present, must hold the same id; its
        calibration stats go with it (they describe the old factors). Returns (snapshot, new entry).
        """
        old = self._by_name.get(adapter.name)  # type: ignore[attr-defined]
        if old is not None and old.adapter_id != adapter_id:
            raise InvalidArgumentError("a replaced adapter keeps its id", field="adapter_id",
                                       limit=old.adapter_id, actual=adapter_id)
        base = self if old is None else self.remove_adapter(adapter.name, version=self.version)[0]
        if adapter_id in set(base.ids.tolist()):
            raise AlreadyExistsError("adapter id already in use", field="adapter_id", actual=adapter_id)
        check_adapter_name(adapter.name)
        entry = self._entry(adapter, adapter_id, upload_dtype)
        mods = dict(base.modules)
        for m, f in entry.adapter.factors.items():
            mods[m] = _insert_into_module(mods[m], int(adapter_id), f, m in entry.shared_modules)
        k = int(np.searchsorted(base.ids, adapter_id))
        new = replace(base, adapters=base.adapters[:k] + (entry,) + base.adapters[k:],
                      modules=MappingProxyType(mods),
                      version=self.version + 1 if version is None else version)
        return new, entry

    def _entry(self, adapter: Adapter, adapter_id: int, upload_dtype: str) -> AdapterEntry:
        """The entry for an adapter checked against the signature, with A snapped to the shared A."""
        adapter.check_against(self.signature)
        factors, shared = {}, set()
        for m, f in adapter.factors.items():
            snapped = _snap_to_shared(f, self.shared_a.get(m), upload_dtype)
            factors[m] = snapped or f
            if snapped is not None:
                shared.add(m)
        return AdapterEntry(name=adapter.name, adapter_id=int(adapter_id),
                            adapter=Adapter(name=adapter.name, factors=factors, meta=adapter.meta),
                            shared_modules=frozenset(shared), upload_dtype=upload_dtype)

    def with_calibration(self, stats, *, version: int | None = None) -> "LibraryIndex":
        return replace(self, calibration=stats,
                       version=self.version + 1 if version is None else version)

    def with_version(self, version: int) -> "LibraryIndex":
        return replace(self, version=version)

    def frob2(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, ‖ΔW‖_F²) of the adapters present on ``module``, shared then general."""
        mi = self.modules[module]
        return mi.ids, np.concatenate([mi.frob2_shared, mi.frob2_general])
