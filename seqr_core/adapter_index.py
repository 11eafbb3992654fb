"""Per-adapter index objects: all routing keeps of an uploaded adapter — never its B.

For each module: the float64 factor R of a Householder thin QR s·B = Q·R (r×r, upper
triangular), ‖ΔW‖_F², and — only for adapters with their own A (the general path) — that A.
Shared-A modules reuse the library's frozen A. Computed once at upload (``index_adapter``),
stored encrypted beside the PEFT files (``encode``/``decode``: safetensors bytes, no I/O), and
loaded at startup instead of re-parsing the PEFT files. ``FORMAT`` changes whenever what is
stored or how it is computed changes; a stored object of another format is refused with
``IndexFormatError`` so the service re-parses that adapter's PEFT files once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from .adapters import Adapter, ModuleFactors
from .errors import FailedPreconditionError, IntegrityError

FORMAT = 1
# How far an uploaded A may sit from the library's A and still be the same matrix: the
# rounding of the upload dtype (fp16/bf16 uploads of an fp32 A), never more.
_SNAP_RTOL = {"F32": 0.0, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}


class IndexFormatError(FailedPreconditionError):
    """A stored index object was written in another format: re-derive it from the adapter."""


@dataclass(frozen=True)
class FactorIndex:
    """One module of one adapter."""

    R: np.ndarray              # (r, r) float64 upper triangular, scale folded in: s·B = Q·R
    A: np.ndarray | None       # (r, d) float32 own A (general path); None: the library's shared A
    frob2: float               # ‖ΔW‖_F² = ‖R·A‖_F²

    @property
    def shared(self) -> bool:
        return self.A is None

    @property
    def rank(self) -> int:
        return int(self.R.shape[0])


@dataclass(frozen=True)
class AdapterIndex:
    name: str
    upload_dtype: str
    factors: Mapping[str, FactorIndex]

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.factors)

    @property
    def shared_modules(self) -> frozenset[str]:
        return frozenset(m for m, f in self.factors.items() if f.shared)

    @property
    def rank(self) -> int:
        return max(f.rank for f in self.factors.values())

    @property
    def nbytes(self) -> int:
        return sum(f.R.nbytes + (0 if f.A is None else f.A.nbytes) + 8 for f in self.factors.values())


def _frozen(a: np.ndarray, dtype) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=dtype)
    a.setflags(write=False)
    return a


def thin_r(scaled_B: np.ndarray) -> np.ndarray:
    """R factors of the thin QRs of s·B: (..., o, r) -> (..., r, r) float64, zero rows padded
    when o < r. Householder (LAPACK geqrf) on every matrix of the stack."""
    B = np.asarray(scaled_B, dtype=np.float64)
    R = np.linalg.qr(B, mode="r")                                        # (..., min(o, r), r)
    r = B.shape[-1]
    if R.shape[-2] < r:
        pad = np.zeros(R.shape[:-2] + (r - R.shape[-2], r))
        R = np.concatenate([R, pad], axis=-2)
    return R


def _snap(f: ModuleFactors, shared_a: np.ndarray | None, upload_dtype: str) -> bool:
    """Whether ``f.A`` is the library's A up to the rounding of the upload dtype."""
    if shared_a is None or f.A.shape != shared_a.shape:
        return False
    if np.array_equal(f.A, shared_a):
        return True
    rtol = _SNAP_RTOL.get(upload_dtype, 0.0)
    return bool(rtol) and bool(np.all(np.abs(f.A - shared_a) <= rtol * np.abs(shared_a) + 1e-30))


def index_adapter(adapter: Adapter, *, shared_a: Mapping[str, np.ndarray],
                  shared_gram: Mapping[str, np.ndarray], upload_dtype: str = "F32") -> AdapterIndex:
    """The index object of ``adapter`` for a library whose frozen A's are ``shared_a``
    (``shared_gram``: A·Aᵀ per module in float64, so ‖ΔW‖_F² = tr(RᵀR·AAᵀ) costs r³, not r²·d).
    QRs of equally shaped B's run as one stacked LAPACK call."""
    shared = {m: _snap(f, shared_a.get(m), upload_dtype) for m, f in adapter.factors.items()}
    by_shape: dict[tuple, list[str]] = {}
    for m, f in adapter.factors.items():
        by_shape.setdefault(f.B.shape, []).append(m)
    Rs = {}
    for ms in by_shape.values():
        stack = np.stack([adapter.factors[m].B.astype(np.float64) * adapter.factors[m].scale for m in ms])
        for m, R in zip(ms, thin_r(stack)):
            Rs[m] = R
    out = {}
    for m, f in adapter.factors.items():
        R = Rs[m]
        if shared[m]:
            frob2 = float(np.einsum("ab,ab->", R @ shared_gram[m], R))              # tr(R·AAᵀ·Rᵀ)
            out[m] = FactorIndex(R=_frozen(R, np.float64), A=None, frob2=frob2)
        else:
            RA = R @ f.A.astype(np.float64)                                          # (r, d)
            out[m] = FactorIndex(R=_frozen(R, np.float64), A=_frozen(f.A, np.float32),
                                 frob2=float(np.einsum("ad,ad->", RA, RA)))
    return AdapterIndex(name=adapter.name, upload_dtype=upload_dtype,
                        factors=MappingProxyType(dict(sorted(out.items()))))


def encode(ai: AdapterIndex) -> bytes:
    """safetensors bytes: meta (JSON as uint8), packed upper triangles of every R (float64),
    ‖ΔW‖_F² per module and the own A of general modules."""
    mods = list(ai.factors.items())
    meta = {"format": FORMAT, "name": ai.name, "upload_dtype": ai.upload_dtype,
            "modules": [[m, f.rank, f.shared] for m, f in mods]}
    tensors = {
        "meta": np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), np.uint8),
        "R": np.concatenate([f.R[np.triu_indices(f.rank)] for _, f in mods]),
        "frob2": np.array([f.frob2 for _, f in mods], np.float64),
    }
    for k, (_, f) in enumerate(mods):
        if not f.shared:
            tensors[f"A{k}"] = f.A
    return safetensors.numpy.save(tensors)


def decode(raw: bytes, *, field: str = "index") -> AdapterIndex:
    """An index object back from ``encode``'s bytes. The bytes are authenticated by the store,
    so anything malformed is damage (IntegrityError); another FORMAT is IndexFormatError."""
    try:
        t = safetensors.numpy.load(bytes(raw))
        meta = json.loads(t["meta"].tobytes().decode())
    except (SafetensorError, KeyError, ValueError) as e:
        raise IntegrityError(f"index object is not readable ({e})", field=field) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise IndexFormatError("index object written in another format", field=f"{field}.format",
                               limit=FORMAT, actual=got)
    try:
        Rflat, frob2, out, pos = t["R"], t["frob2"], {}, 0
        for k, (m, r, shared) in enumerate(meta["modules"]):
            K = r * (r + 1) // 2
            R = np.zeros((r, r))
            R[np.triu_indices(r)] = Rflat[pos:pos + K]
            pos += K
            out[m] = FactorIndex(R=_frozen(R, np.float64), A=None if shared else _frozen(t[f"A{k}"], np.float32),
                                 frob2=float(frob2[k]))
        if pos != Rflat.size or len(out) != frob2.size:
            raise ValueError("sizes disagree")
        return AdapterIndex(name=str(meta["name"]), upload_dtype=str(meta["upload_dtype"]),
                            factors=MappingProxyType(dict(sorted(out.items()))))
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise IntegrityError(f"index object is inconsistent ({e})", field=field) from None
