"""Per-module adapter energies e = ‖ΔW x‖² for every scoring method, plus error bounds.

Input forms per module (DESIGN §3): ``activations`` x (T, d); ``projected`` z = A_m·x (T, r),
shared-A adapters only; ``moments`` G = ZᵀZ/T (r, r), shared-A, token-mean energy only.

The seqr path runs in float32 and returns, beside e, a rigorous bound on |e − e_f64| (the
standard γ_n = n·u/(1 − n·u) dot-product bounds), so routing can re-check in float64 exactly
the candidates whose order the bound leaves in doubt. ``brute_force_f64`` is the reference:
‖s·B·(A·x)‖² in float64 — the definition every ranking must equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError
from .qr_index import LibraryIndex, ModuleIndex, gram_weights, triu_pairs

FORMS = ("activations", "projected", "moments")
_U32 = 2.0 ** -24
_F64_SLACK = 1e-12  # QR route vs B route differ in float64 rounding only


def gamma(n: int) -> float:
    return n * _U32 / (1.0 - n * _U32)


@dataclass(frozen=True)
class ModuleInput:
    """One module's request input. ``tokens`` is T (for moments: the T they were taken over)."""

    form: str
    data: np.ndarray
    tokens: int

    @property
    def pooled(self) -> bool:
        return self.form == "moments"


@dataclass(frozen=True)
class Bound:
    """A separable bound on |e − e_f64| for a block of columns, kept in factored form so the
    token mean costs O(T + n), not O(T·n):

        b_ti = a_t·g_i + c_t·h_i + 2·√(e_ti + a_t·g_i)·δ_t·ρ_i + δ_t²·ρ_i² + rel·e_ti
    """

    a: np.ndarray      # (T,)
    g: np.ndarray      # (n,)
    c: np.ndarray      # (T,)
    h: np.ndarray      # (n,)
    delta: np.ndarray  # (T,)
    rho: np.ndarray    # (n,)
    rel: float = 0.0

    def dense(self, e: np.ndarray) -> np.ndarray:
        ag = np.outer(self.a, self.g)                                     # (T, n)
        b = ag + np.outer(self.c, self.h) + self.rel * e
        if self.delta.any():
            b += 2 * np.sqrt(np.maximum(e, 0) + ag) * np.outer(self.delta, self.rho)
            b += np.outer(self.delta ** 2, self.rho ** 2)
        return b

    def mean(self, e_sum: np.ndarray, T: int) -> np.ndarray:
        """Upper bound on mean_t b_ti given e_sum = Σ_t e_ti (Cauchy–Schwarz on the √ term)."""
        b = self.a.mean() * self.g + self.c.mean() * self.h + self.rel * np.maximum(e_sum, 0) / T
        if self.delta.any():
            root = np.sqrt(np.maximum(e_sum, 0) + self.a.sum() * self.g) * np.sqrt((self.delta ** 2).sum())
            b += 2 * root * self.rho / T + (self.delta ** 2).mean() * self.rho ** 2
        return b


@dataclass(frozen=True)
class Energies:
    """Energies of adapters ``ids`` on one module: e (T, n), or (1, n) token means if pooled.

    ``bounds`` lists (start, stop, Bound) column blocks; empty when not tracked (baselines,
    float64 reference) — then the values are taken as they are.
    """

    ids: np.ndarray            # (n,) int64
    e: np.ndarray              # (T, n) float32 or float64
    pooled: bool
    bounds: tuple = ()

    @property
    def tracked(self) -> bool:
        return bool(self.bounds)

    def bound_dense(self) -> np.ndarray:
        out = np.zeros(self.e.shape)
        for lo, hi, b in self.bounds:
            out[:, lo:hi] = b.dense(self.e[:, lo:hi].astype(np.float64))
        return out

    def bound_mean(self, e_sum: np.ndarray) -> np.ndarray:
        out = np.zeros(self.e.shape[1])
        for lo, hi, b in self.bounds:
            out[lo:hi] = b.mean(e_sum[lo:hi], self.e.shape[0])
        return out

    def take(self, keep: np.ndarray) -> "Energies":
        """The columns where ``keep`` (bool, (n,)) is set; bounds are re-sliced."""
        if keep.all():
            return self
        bounds, pos = [], 0
        for lo, hi, b in self.bounds:
            k = keep[lo:hi]
            n = int(k.sum())
            if n:
                bounds.append((pos, pos + n, Bound(a=b.a, g=b.g[k], c=b.c, h=b.h[k], delta=b.delta,
                                                   rho=b.rho[k], rel=b.rel)))
            pos += n
        return Energies(ids=self.ids[keep], e=self.e[:, keep], pooled=self.pooled, bounds=tuple(bounds))


def _sym_feat_tokens(z: np.ndarray) -> np.ndarray:
    iu, ju = triu_pairs(z.shape[1])
    return z[:, iu] * z[:, ju]                                            # (T, K)


def _sym_feat_matrix(G: np.ndarray) -> np.ndarray:
    iu, ju = triu_pairs(G.shape[0])
    Gs = 0.5 * (G + G.T)
    return Gs[iu, ju][None, :]                                            # (1, K)


def _norm_cols(mi: ModuleIndex):
    def build():
        gn = np.linalg.norm(mi.gram.astype(np.float64), axis=0)          # (Ns,)
        rf = np.sqrt(np.einsum("nab,nab->n", mi.R, mi.R))                 # (Ns,) ‖R‖_F
        af = float(np.linalg.norm(mi.shared_a)) if mi.shared_a is not None else 0.0
        mf = np.sqrt(np.add.reduceat((mi.M.astype(np.float64) ** 2).sum(1), mi.M_offsets[:-1])
                     ) if mi.general_ids.size else np.zeros(0)
        return gn, rf, af, mf
    return mi.cached("norms", build)


def _select(ids_all: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    if allowed is None:
        return np.arange(ids_all.size)
    return np.flatnonzero(np.isin(ids_all, allowed))


_U64 = 2.0 ** -53


def _gamma64(n: int) -> float:
    return n * _U64 / (1.0 - n * _U64)


def _f64(mi: ModuleIndex):
    """Float64 copies used by the precise path (built once per snapshot)."""
    def build():
        A64 = mi.shared_a.astype(np.float64) if mi.shared_a is not None else None
        gram64 = gram_weights(mi.R) if mi.shared_ids.size else np.zeros((0, 0))
        return A64, gram64
    return mi.cached("f64", build)


def module_moment(mi: ModuleIndex, inp: ModuleInput, *, x64: np.ndarray | None = None):
    """(G, err): G = ZᵀZ/T (r, r) in float64 for the module's shared A, and a bound on ‖Ĝ − G‖_F."""
    if inp.form == "moments":
        return inp.data.astype(np.float64), 0.0
    if inp.form == "projected":
        z = inp.data.astype(np.float64)                                    # (T, r)
    else:
        x64 = inp.data.astype(np.float64) if x64 is None else x64
        z = x64 @ _f64(mi)[0].T                                            # (T, d)·(d, r) -> (T, r)
    zn2 = np.einsum("tr,tr->t", z, z)                                      # (T,)
    G = z.T @ z / z.shape[0]                                               # (r, r)
    err = _gamma64(z.shape[0] + 2) * float(zn2.mean())
    if inp.form == "activations":
        _, _, af, _ = _norm_cols(mi)
        dz = _gamma64(x64.shape[1]) * af * np.sqrt(np.einsum("td,td->t", x64, x64))  # (T,) ‖δz‖
        err += float(np.mean(2 * np.sqrt(zn2) * dz + dz ** 2))
    return G, 2 * err


def _pooled_bound(mean_bound: np.ndarray) -> Bound:
    n = mean_bound.size
    one, zero = np.ones(1), np.zeros(1)
    return Bound(a=one, g=mean_bound, c=zero, h=np.zeros(n), delta=zero, rho=np.zeros(n))


def seqr_energies(mi: ModuleIndex, inp: ModuleInput, *, allowed: np.ndarray | None = None,
                  field: str = "inputs", token_mean: bool = False, precise: bool = True,
                  bounds: bool = True) -> Energies:
    """SEQR energies of the allowed adapters on one module, with rigorous error bounds.

    ``token_mean``: only mean_t e is wanted (sequence routing, linear normalisation): the
    shared-A part becomes tr(RᵢᵀRᵢ·ZᵀZ/T) — O(T·r² + K·N) in float64 instead of a T×N GEMM.
    ``precise``: z = A·x (and M·x) in float64, so the bound is set by the float32 Gram GEMM
    alone; False is the all-float32 kernel (bounds then carry γ_d·‖A‖·‖x‖ and are looser).
    ``bounds=False`` (with precise=False): the bare kernel, e only — for benchmarks.
    """
    if not bounds and not precise and not token_mean and inp.form == "activations":
        return _bare_kernel(mi, inp, allowed)
    gn, rf, af, mf = _norm_cols(mi)
    s_sel = _select(mi.shared_ids, allowed)
    g_sel = _select(mi.general_ids, allowed)
    if inp.form != "activations" and g_sel.size:
        raise InvalidArgumentError(
            f"module {mi.name} has adapters with their own A (general path) that need "
            f"activations; send activations or restrict candidates", field=f"{field}.{inp.form}",
            actual=int(g_sel.size))
    pooled = inp.pooled or token_mean
    parts_e, parts_b, parts_ids = [], [], []
    x64 = inp.data.astype(np.float64) if inp.form == "activations" and (precise or token_mean) else None
    if s_sel.size:
        A64, gram64 = _f64(mi)
        K = mi.gram.shape[0]
        if pooled:
            G, gerr = module_moment(mi, inp, x64=x64)
            w = gram64[:, s_sel]                                               # (K, n)
            feat = _sym_feat_matrix(G)                                         # (1, K)
            e = feat @ w                                                       # (1, K)·(K, n) -> (1, n)
            fn = float(np.linalg.norm(feat))
            b = (_gamma64(K + 2) * fn + gerr) * np.linalg.norm(w, axis=0) + _F64_SLACK * fn * rf[s_sel] ** 2
            parts_e.append(e)
            parts_b.append(_pooled_bound(b))
        else:
            gram = mi.gram if s_sel.size == mi.shared_ids.size else mi.gram[:, s_sel]
            T = inp.data.shape[0]
            if inp.form == "projected":
                z = inp.data.astype(np.float32)
                delta = np.zeros(T)
            elif precise:
                z64 = x64 @ A64.T                                              # (T, d)·(d, r) -> (T, r)
                z = z64.astype(np.float32)
                # Rounding z to float32 moves it by ≤ u·‖z‖; the float64 GEMM adds γ64_d·‖A‖·‖x‖.
                delta = (_U32 * np.sqrt(np.einsum("tr,tr->t", z64, z64))
                         + _gamma64(x64.shape[1]) * af * np.sqrt(np.einsum("td,td->t", x64, x64)))
            else:
                z = inp.data @ mi.shared_a.T                                   # (T, d)·(d, r) -> (T, r)
                xn2 = np.einsum("td,td->t", inp.data, inp.data).astype(np.float64)
                d = mi.shared_a.shape[1]
                delta = gamma(d) * af * np.sqrt(xn2 * (1 + gamma(d)))
            feat = _sym_feat_tokens(z)                                         # (T, K)
            parts_e.append(feat @ gram)                                        # (T, K)·(K, Ns) -> (T, Ns)
            fz = np.sqrt(np.einsum("tk,tk->t", feat, feat, dtype=np.float64))  # (T,) ‖feat‖
            parts_b.append(Bound(a=fz, g=gamma(K + 2) * gn[s_sel], c=fz, h=_F64_SLACK * rf[s_sel] ** 2,
                                 delta=delta, rho=rf[s_sel]))
        parts_ids.append(mi.shared_ids[s_sel])
    if g_sel.size:
        x = inp.data
        if g_sel.size == mi.general_ids.size:
            rows, offs = None, mi.M_offsets
        else:
            rows = np.concatenate([np.arange(mi.M_offsets[k], mi.M_offsets[k + 1]) for k in g_sel])
            offs = np.concatenate([[0], np.cumsum(np.diff(mi.M_offsets)[g_sel])])
        T, d = x.shape
        rmax = int(np.diff(offs).max())
        if precise or token_mean:
            M64 = mi.cached("M64", lambda: mi.M.astype(np.float64))
            M = M64 if rows is None else M64[rows]
            y = x64 @ M.T                                                      # (T, d)·(d, Σr) -> (T, Σr)
            e = np.add.reduceat(y * y, offs[:-1], axis=1)                      # (T, Ng)
            xn = np.sqrt(np.einsum("td,td->t", x64, x64))
            # M is float32-rounded from float64 R·A: that rounding (u) dominates γ64_d.
            bound = Bound(a=np.zeros(T), g=np.zeros(g_sel.size), c=xn ** 2, h=_F64_SLACK * mf[g_sel] ** 2,
                          delta=(_U32 + _gamma64(d + 1)) * xn, rho=mf[g_sel], rel=_gamma64(rmax + 1))
        else:
            M = mi.M if rows is None else mi.M[rows]
            y = x @ M.T                                                        # (T, d)·(d, Σr) -> (T, Σr)
            e = np.add.reduceat(y * y, offs[:-1], axis=1)                      # (T, Ng)
            xn = np.sqrt(np.einsum("td,td->t", x, x).astype(np.float64) * (1 + gamma(d)))
            bound = Bound(a=np.zeros(T), g=np.zeros(g_sel.size), c=xn ** 2, h=_F64_SLACK * mf[g_sel] ** 2,
                          delta=gamma(d + 1) * xn, rho=mf[g_sel], rel=gamma(rmax + 1))
        if pooled:
            e_sum = e.sum(axis=0, dtype=np.float64)
            parts_e.append((e_sum / T)[None, :])
            parts_b.append(_pooled_bound(bound.mean(e_sum, T)))
        else:
            parts_e.append(e)
            parts_b.append(bound)
        parts_ids.append(mi.general_ids[g_sel])
    return _merge(parts_ids, parts_e, parts_b, inp, pooled=pooled)


def _bare_kernel(mi: ModuleIndex, inp: ModuleInput, allowed) -> Energies:
    """float32 e only: z = A·x, features of z·zᵀ, one GEMM; general adapters as ‖M·x‖²."""
    es, ids = [], []
    s_sel, g_sel = _select(mi.shared_ids, allowed), _select(mi.general_ids, allowed)
    if s_sel.size:
        gram = mi.gram if s_sel.size == mi.shared_ids.size else mi.gram[:, s_sel]
        z = inp.data @ mi.shared_a.T                                       # (T, d)·(d, r) -> (T, r)
        es.append(_sym_feat_tokens(z) @ gram)                              # (T, K)·(K, Ns) -> (T, Ns)
        ids.append(mi.shared_ids[s_sel])
    if g_sel.size:
        y = inp.data @ mi.M.T                                              # (T, d)·(d, Σr) -> (T, Σr)
        e = np.add.reduceat(y * y, mi.M_offsets[:-1], axis=1)              # (T, Ng)
        es.append(e[:, g_sel])
        ids.append(mi.general_ids[g_sel])
    e = es[0] if len(es) == 1 else np.concatenate(es, axis=1)
    return Energies(ids=np.concatenate(ids), e=e, pooled=False)


def _merge(ids, es, bs, inp: ModuleInput, *, pooled: bool) -> Energies:
    if not ids:
        T = 1 if pooled else inp.data.shape[0]
        return Energies(ids=np.zeros(0, np.int64), e=np.zeros((T, 0), np.float32), pooled=pooled)
    bounds, pos = [], 0
    for e, b in zip(es, bs):
        bounds.append((pos, pos + e.shape[1], b))
        pos += e.shape[1]
    e = es[0] if len(es) == 1 else np.concatenate([x.astype(np.float64) for x in es], axis=1)
    return Energies(ids=np.concatenate(ids), e=e, pooled=pooled, bounds=tuple(bounds))


def _need_activations(inp: ModuleInput, method: str, field: str) -> None:
    if inp.form != "activations":
        raise InvalidArgumentError(f"method {method!r} needs activations", field=f"{field}.{inp.form}",
                                   limit="activations", actual=inp.form)


def _factor_ids(index: LibraryIndex, module: str, allowed) -> list:
    mi = index.modules[module]
    ids = np.sort(mi.ids)
    if allowed is not None:
        ids = ids[np.isin(ids, allowed)]
    by_id = {a.adapter_id: a for a in index.adapters}
    return [(int(i), by_id[int(i)].adapter.factors[module]) for i in ids]


def exact_energies(index: LibraryIndex, module: str, inp: ModuleInput, *,
                   allowed: np.ndarray | None = None, field: str = "inputs") -> Energies:
    """Brute force in float32: ‖s·B·(A·x)‖² per adapter (the baseline, N·(r·d + o·r) per token)."""
    _need_activations(inp, "exact", field)
    x = inp.data
    pairs = _factor_ids(index, module, allowed)
    cols = [(((x @ f.A.T) @ f.B.T) * np.float32(f.scale)) for _, f in pairs]  # (T, o) each
    e = np.stack([np.einsum("to,to->t", y, y) for y in cols], 1) if cols else np.zeros((x.shape[0], 0))
    return Energies(ids=np.array([i for i, _ in pairs], np.int64), e=e.astype(np.float64),
                    pooled=False)


def _svd_factors(index: LibraryIndex, module: str):
    mi = index.modules[module]

    def build():
        ids, svs, v1 = [], [], []
        for i, f in _factor_ids(index, module, None):
            dW_row = np.linalg.qr(f.scale * f.B.astype(np.float64), mode="r") @ f.A.astype(np.float64)
            _, S, Vt = np.linalg.svd(dW_row, full_matrices=False)         # ΔW = Q·U·S·Vᵀ
            ids.append(i)
            svs.append((S[:, None] * Vt).astype(np.float32))               # (r, d)
            v1.append(Vt[0].astype(np.float32))                            # (d,)
        d = index.signature.spec(module).d_in
        return (np.array(ids, np.int64),
                np.concatenate(svs, 0) if svs else np.zeros((0, d), np.float32),
                np.array([s.shape[0] for s in svs], np.int64),
                np.stack(v1) if v1 else np.zeros((0, d), np.float32))
    return mi.cached("svd", build)


def spectr_energies(index: LibraryIndex, module: str, inp: ModuleInput, *,
                    allowed: np.ndarray | None = None, field: str = "inputs") -> Energies:
    """SpectR: e = ‖S·Vᵀ·x‖² from the SVD of ΔW (equal to exact, N·r·d per token)."""
    _need_activations(inp, "spectr", field)
    ids, SV, ranks, _ = _svd_factors(index, module)
    sel = _select(ids, allowed)
    offs = np.concatenate([[0], np.cumsum(ranks)])
    rows = np.concatenate([np.arange(offs[k], offs[k + 1]) for k in sel]) if sel.size else np.zeros(0, int)
    y = inp.data @ SV[rows].T                                             # (T, Σr)
    starts = np.concatenate([[0], np.cumsum(ranks[sel])])[:-1]
    e = np.add.reduceat(y * y, starts, axis=1) if sel.size else np.zeros((inp.data.shape[0], 0))
    return Energies(ids=ids[sel], e=e.astype(np.float64), pooled=False)


def arrow_energies(index: LibraryIndex, module: str, inp: ModuleInput, *,
                   allowed: np.ndarray | None = None, field: str = "inputs") -> Energies:
    """Arrow: (v₁ᵀx)² with v₁ the top right singular vector of ΔW. Not norm-maximising."""
    _need_activations(inp, "arrow", field)
    ids, _, _, V1 = _svd_factors(index, module)
    sel = _select(ids, allowed)
    p = inp.data @ V1[sel].T                                              # (T, d)·(d, n) -> (T, n)
    return Energies(ids=ids[sel], e=(p * p).astype(np.float64), pooled=False)


def brute_force_f64(index: LibraryIndex, module: str, inp: ModuleInput, ids: np.ndarray,
                    *, tokens: np.ndarray | None = None, token_mean: bool = False) -> np.ndarray:
    """The reference: e = ‖s·B·(A·x)‖² in float64 for adapters ``ids``. Returns (T, n).

    ``token_mean``: (1, n) mean_t e as s²·tr(BᵀB·ZᵀZ/T) — the same number by linearity, at
    o·r² per adapter instead of T·o·r (what keeps re-checks cheap on long prompts).
    """
    by_id = {a.adapter_id: a for a in index.adapters}
    data = inp.data.astype(np.float64)
    if token_mean and not inp.pooled:
        Gs, out = {}, []
        for i in ids:
            f = by_id[int(i)].adapter.factors[module]
            if id(f.A) not in Gs:
                z = data if inp.form == "projected" else data @ f.A.astype(np.float64).T  # (T, r)
                Gs[id(f.A)] = z.T @ z / z.shape[0]                                    # (r, r)
            B, s = f.B.astype(np.float64), float(f.scale)
            out.append([s * s * float(np.sum((B.T @ B) * Gs[id(f.A)]))])
        return np.array(out).T if out else np.zeros((1, 0))
    if tokens is not None and not inp.pooled:
        data = data[tokens]
    out, zs = [], {}
    for i in ids:
        f = by_id[int(i)].adapter.factors[module]
        B, s = f.B.astype(np.float64), float(f.scale)
        if inp.form == "moments":
            G = 0.5 * (data + data.T)
            out.append(np.array([s * s * float(np.sum((B.T @ B) * G))]))   # tr(sB G Bᵀs)
            continue
        if inp.form == "projected":
            z = data
        else:  # shared-A adapters hold the very same A array: compute A·x once for them
            if id(f.A) not in zs:
                zs[id(f.A)] = data @ f.A.astype(np.float64).T              # (T, d)·(d, r) -> (T, r)
            z = zs[id(f.A)]
        y = s * (z @ B.T)                                                  # (T, o)
        out.append(np.einsum("to,to->t", y, y))
    T = 1 if inp.pooled else data.shape[0]
    return np.stack(out, 1) if out else np.zeros((T, 0))
