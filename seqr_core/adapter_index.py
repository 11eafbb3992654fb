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
class AdapterIndex:
    """One adapter's index: per module (sorted), R (r, r) float64 with the scale folded in,
    ‖ΔW‖_F², and the own A (r, d) float32 of general modules only."""

    name: str
    upload_dtype: str
    modules: tuple[str, ...]
    R: tuple[np.ndarray, ...]
    frob2: np.ndarray                    # (n,) float64
    own_a: Mapping[str, np.ndarray]      # general modules -> A

    @property
    def shared_modules(self) -> frozenset[str]:
        return frozenset(m for m in self.modules if m not in self.own_a)

    @property
    def rank(self) -> int:
        return max(R.shape[0] for R in self.R)

    @property
    def nbytes(self) -> int:
        return sum(R.nbytes for R in self.R) + self.frob2.nbytes + sum(a.nbytes for a in self.own_a.values())


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
    mods = tuple(sorted(adapter.factors))
    by_shape: dict[tuple, list[str]] = {}
    for m in mods:
        by_shape.setdefault(adapter.factors[m].B.shape, []).append(m)
    Rs = {}
    for ms in by_shape.values():
        stack = np.stack([adapter.factors[m].B.astype(np.float64) * adapter.factors[m].scale for m in ms])
        Rs.update(zip(ms, thin_r(stack)))
    frob2, own = np.zeros(len(mods)), {}
    for k, m in enumerate(mods):
        f, R = adapter.factors[m], Rs[m]
        if _snap(f, shared_a.get(m), upload_dtype):
            frob2[k] = np.einsum("ab,ab->", R @ shared_gram[m], R)                  # tr(R·AAᵀ·Rᵀ)
        else:
            RA = R @ f.A.astype(np.float64)                                        # (r, d)
            frob2[k] = np.einsum("ad,ad->", RA, RA)
            own[m] = _frozen(f.A, np.float32)
    return AdapterIndex(name=adapter.name, upload_dtype=upload_dtype, modules=mods,
                        R=tuple(_frozen(Rs[m], np.float64) for m in mods), frob2=_frozen(frob2, np.float64),
                        own_a=MappingProxyType(own))


def encode(ai: AdapterIndex) -> bytes:
    """safetensors bytes: meta (JSON as uint8), packed upper triangles of every R (float64),
    ‖ΔW‖_F² per module and the own A of general modules."""
    meta = {"format": FORMAT, "name": ai.name, "upload_dtype": ai.upload_dtype,
            "modules": [[m, int(R.shape[0]), m not in ai.own_a] for m, R in zip(ai.modules, ai.R)]}
    tensors = {
        "meta": np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), np.uint8),
        "R": np.concatenate([R[np.triu_indices(R.shape[0])] for R in ai.R]),
        "frob2": np.asarray(ai.frob2, np.float64),
    }
    for k, m in enumerate(ai.modules):
        if m in ai.own_a:
            tensors[f"A{k}"] = ai.own_a[m]
    return safetensors.numpy.save(tensors)


def _unpack(flat: np.ndarray, ranks: list[int]) -> tuple[np.ndarray, ...]:
    """Upper triangles back into (r, r) matrices; all modules of one rank in one assignment."""
    if len(set(ranks)) == 1:
        r = ranks[0]
        iu, ju = np.triu_indices(r)
        K = iu.size
        if flat.size != K * len(ranks):
            raise ValueError("sizes disagree")
        out = np.zeros((len(ranks), r, r))
        out[:, iu, ju] = flat.reshape(len(ranks), K)
        out.setflags(write=False)
        return tuple(out)
    mats, pos = [], 0
    for r in ranks:
        K = r * (r + 1) // 2
        R = np.zeros((r, r))
        R[np.triu_indices(r)] = flat[pos:pos + K]
        R.setflags(write=False)
        mats.append(R)
        pos += K
    if pos != flat.size:
        raise ValueError("sizes disagree")
    return tuple(mats)


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
        mods = [(str(m), int(r), bool(sh)) for m, r, sh in meta["modules"]]
        R = _unpack(np.asarray(t["R"], np.float64), [r for _, r, _ in mods])
        frob2 = _frozen(t["frob2"], np.float64)
        if frob2.shape != (len(mods),):
            raise ValueError("sizes disagree")
        own = {m: _frozen(t[f"A{k}"], np.float32) for k, (m, _, sh) in enumerate(mods) if not sh}
        return AdapterIndex(name=str(meta["name"]), upload_dtype=str(meta["upload_dtype"]),
                            modules=tuple(m for m, _, _ in mods), R=R, frob2=frob2,
                            own_a=MappingProxyType(own))
    except (KeyError, ValueError, TypeError) as e:
        raise IntegrityError(f"index object is inconsistent ({e})", field=field) from None
