"""Per-adapter index objects: all routing keeps of an uploaded adapter — never its B.

For each module, with s·B = Q·R a thin QR (R r×r, upper triangular, float64): ‖ΔW‖_F², and the
Gram weights of R, i.e. the upper triangle of RᵀR = (sB)ᵀ(sB) (shared-A modules: what routing
multiplies with; the library's frozen A serves as A; computed as that Gram, no QR needed), or
R itself from a Householder QR and the adapter's own A (general modules). Computed once at upload (``index_adapter``),
stored encrypted beside the PEFT files (``encode``/``decode``: safetensors bytes, no I/O), and
loaded at startup instead of re-parsing the PEFT files. ``FORMAT`` changes whenever what is
stored changes, or how it is computed changes beyond float64 rounding within the bound of
seqr_core.bounds (shared-A w from the Gram of s·B instead of from a QR's R is within it: objects
of format 1 written either way stay valid); a stored object of another format is refused with
``IndexFormatError`` so the service re-parses that adapter's PEFT files once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
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
    """One adapter's index. Per module (sorted): its rank and ‖ΔW‖_F², and either — shared-A
    modules — the float64 Gram weights w of R (zᵀRᵀRz = feat(z)·w, K = r(r+1)/2 numbers:
    exactly what routing multiplies with) or — general modules — R itself and the own A."""

    name: str
    upload_dtype: str
    modules: tuple[str, ...]
    ranks: tuple[int, ...]
    frob2: np.ndarray                            # (n,) float64
    gram: np.ndarray                             # (Σ K over shared modules,) float64, module order
    own: Mapping[str, tuple[np.ndarray, np.ndarray]]   # general module -> (R (r, r) f64, A (r, d) f32)

    @cached_property
    def shared_modules(self) -> frozenset[str]:
        return frozenset(m for m in self.modules if m not in self.own)

    @cached_property
    def gram_rows(self) -> np.ndarray | None:
        """The shared modules' w as (n_shared, K) when they share one rank, else None."""
        ks = {r * (r + 1) // 2 for m, r in zip(self.modules, self.ranks) if m not in self.own}
        if len(ks) != 1:
            return None
        return self.gram.reshape(-1, ks.pop())

    def gram_of(self, shared_pos) -> np.ndarray:
        """w of the shared modules at ``shared_pos`` (positions among the shared modules)."""
        rows = self.gram_rows
        if rows is not None:
            return rows[shared_pos]
        Ks = [r * (r + 1) // 2 for m, r in zip(self.modules, self.ranks) if m not in self.own]
        offs = np.concatenate([[0], np.cumsum(Ks)])
        return np.stack([self.gram[offs[k]:offs[k + 1]] for k in np.arange(len(Ks))[shared_pos]])

    @property
    def rank(self) -> int:
        return max(self.ranks)

    @property
    def nbytes(self) -> int:
        return self.gram.nbytes + self.frob2.nbytes + sum(R.nbytes + A.nbytes for R, A in self.own.values())


def gram_weights(R: np.ndarray) -> np.ndarray:
    """R (n, r, r) -> (n, K) float64 weights w with zᵀ(RᵀR)z = feat(z)·w, K = r(r+1)/2 (the
    upper triangle of RᵀR, off-diagonal entries doubled). Each matrix's arithmetic is its own:
    the result does not depend on how many are stacked."""
    return _packed(np.matmul(np.swapaxes(R, -1, -2), R))                  # (n, r, r) RᵀR


def _packed(S: np.ndarray) -> np.ndarray:
    """Symmetric S (..., r, r) -> its upper triangle (..., K), off-diagonal entries doubled."""
    iu, ju = np.triu_indices(S.shape[-1])
    return S[..., iu, ju] * np.where(iu == ju, 1.0, 2.0)


def sym_feat(G: np.ndarray) -> np.ndarray:
    """Upper-triangle features of a symmetric (r, r) G: zᵀSz-style products become feat·w."""
    iu, ju = np.triu_indices(G.shape[-1])
    return (0.5 * (G + np.swapaxes(G, -1, -2)))[..., iu, ju]


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


def _scaled_stack(adapter: Adapter, ms: list[str]) -> np.ndarray:
    """s·B of equally shaped modules as one (n, o, r) float64 array, converted in one pass."""
    f0 = adapter.factors[ms[0]].B
    out = np.empty((len(ms),) + f0.shape)
    for k, m in enumerate(ms):
        np.multiply(adapter.factors[m].B, adapter.factors[m].scale, out=out[k], dtype=np.float64)
    return out


def index_adapter(adapter: Adapter, *, shared_a: Mapping[str, np.ndarray],
                  shared_gram: Mapping[str, np.ndarray], upload_dtype: str = "F32") -> AdapterIndex:
    """The index object of ``adapter`` for a library whose frozen A's are ``shared_a``
    (``shared_gram``: A·Aᵀ per module in float64, so ‖ΔW‖_F² = tr(RᵀR·AAᵀ) = feat(AAᵀ)·w costs
    K, not r²·d).

    Shared-A modules keep only w, the upper triangle of RᵀR = (sB)ᵀ(sB): it is computed as that
    Gram directly (o·r² flops, one batched GEMM per shape; no factorisation, and within the bound
    of seqr_core.bounds: |zᵀ(Ĝ − G)z| ≤ γ₆₄(o)·‖sB‖_F²·‖z‖²). General modules need R itself
    (M = R·A): Householder QRs, equally shaped B's in one stacked LAPACK call."""
    mods = tuple(sorted(adapter.factors))
    shared = {m for m in mods if _snap(adapter.factors[m], shared_a.get(m), upload_dtype)}
    by_shape: dict[tuple, list[str]] = {}
    for m in mods:
        by_shape.setdefault((m in shared,) + adapter.factors[m].B.shape, []).append(m)
    ws, Rs = {}, {}
    for (is_shared, _, r), ms in by_shape.items():
        stack = _scaled_stack(adapter, ms)
        if is_shared:
            S = np.matmul(np.swapaxes(stack, -1, -2), stack)                  # (n, r, r) (sB)ᵀ(sB) = RᵀR
            ws.update(zip(ms, _packed(S)))
        else:
            Rs.update(zip(ms, thin_r(stack)))
    frob2, own = np.zeros(len(mods)), {}
    for k, m in enumerate(mods):
        if m in ws:
            frob2[k] = float(sym_feat(shared_gram[m]) @ ws[m])
        else:
            A = _frozen(adapter.factors[m].A, np.float32)
            RA = Rs[m] @ A.astype(np.float64)                                      # (r, d)
            frob2[k] = np.einsum("ad,ad->", RA, RA)
            own[m] = (_frozen(Rs[m], np.float64), A)
    gram = np.concatenate([ws[m] for m in mods if m in ws]) if ws else np.zeros(0)
    return AdapterIndex(name=adapter.name, upload_dtype=upload_dtype, modules=mods,
                        ranks=tuple(int(adapter.factors[m].B.shape[1]) for m in mods),
                        frob2=_frozen(frob2, np.float64), gram=_frozen(gram, np.float64),
                        own=MappingProxyType(own))


def encode(ai: AdapterIndex) -> bytes:
    """safetensors bytes: meta (JSON as uint8), the shared modules' Gram weights (float64),
    ‖ΔW‖_F² per module, and for general modules R (upper triangle) and the own A."""
    meta = {"format": FORMAT, "name": ai.name, "upload_dtype": ai.upload_dtype,
            "modules": [[m, r, m not in ai.own] for m, r in zip(ai.modules, ai.ranks)]}
    tensors = {
        "meta": np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), np.uint8),
        "W": np.asarray(ai.gram, np.float64),
        "frob2": np.asarray(ai.frob2, np.float64),
    }
    for k, m in enumerate(ai.modules):
        if m in ai.own:
            R, A = ai.own[m]
            tensors[f"R{k}"], tensors[f"A{k}"] = R[np.triu_indices(R.shape[0])], A
    return safetensors.numpy.save(tensors)


def _unpack(flat: np.ndarray, r: int) -> np.ndarray:
    """An upper triangle back into an (r, r) matrix."""
    R = np.zeros((r, r))
    R[np.triu_indices(r)] = flat
    R.setflags(write=False)
    return R


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
        names, ranks, shared = zip(*meta["modules"]) if meta["modules"] else ((), (), ())
        ranks = tuple(int(r) for r in ranks)
        gram, frob2 = _frozen(t["W"], np.float64), _frozen(t["frob2"], np.float64)
        if frob2.shape != (len(names),) or gram.size != sum(r * (r + 1) // 2 for r, sh in zip(ranks, shared) if sh):
            raise ValueError("sizes disagree")
        own = {m: (_unpack(t[f"R{k}"], r), _frozen(t[f"A{k}"], np.float32))
               for k, (m, r, sh) in enumerate(zip(names, ranks, shared)) if not sh}
        return AdapterIndex(name=str(meta["name"]), upload_dtype=str(meta["upload_dtype"]),
                            modules=tuple(str(m) for m in names), ranks=ranks, frob2=frob2, gram=gram,
                            own=MappingProxyType(own))
    except (KeyError, ValueError, TypeError) as e:
        raise IntegrityError(f"index object is inconsistent ({e})", field=field) from None
