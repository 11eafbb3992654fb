"""Error bounds of every scorer, in one place: constants, factored bounds, per-column terms.

The numpy scorer (energies, batched) and the ONNX graph (onnx_graph) build their bounds from
the functions here, so the two cannot disagree on a constant. All bounds are rigorous
first-order-plus bounds on |score − score_f64| built from the standard dot-product bound
|fl(aᵀb) − aᵀb| ≤ γ_n·|a|ᵀ|b|, γ_n = n·u/(1 − n·u) (Higham, Thm 3.5), u = 2⁻²⁴ (fp32) or
2⁻⁵³ (fp64).

What "score_f64" is. The float64 re-check evaluates e = ‖Rᵢz‖² = feat(z)·wᵢ from the float64
factor Rᵢ of a Householder thin QR of sᵢBᵢ (computed once at upload; B is never held). Rᵢ is
backward stable: sB + ΔB = Q̂R̂ with Q̂ orthonormal and ‖ΔB‖_F ≤ η‖sB‖_F, η = γ̃_{o·r} (Higham,
Thm 19.4; in practice ~√(o·r)·u₆₄). Hence, for the same z,

    |‖R̂z‖² − ‖sBz‖²| ≤ (2η + η²)·‖R‖_F²·‖z‖²,

and each float64 evaluation adds its own rounding, ≤ γ₆₄(K+r+2)·‖R‖_F²·‖z‖² (R route, K =
r(r+1)/2) and ≤ γ₆₄(o+r+1)·‖sB‖_F²·‖z‖² (B route). So R-based and B-based float64 energies are
interchangeable up to ε_RB = (2η + η² + γ₆₄(K+r+2) + γ₆₄(o+r+1))·‖R‖_F²·‖z‖² — about 1e-13
relative to ‖R‖_F²‖z‖² at Llama shapes (o=4096, r=16) with the practical η, and at most
F64_SLACK·‖R‖_F²·‖z‖² whenever o·r ≤ 2¹⁶ (and the worst-case η constant ≤ 100). Shared-A modules keep only w, the upper
triangle of RᵀR = (sB)ᵀ(sB), computed as that Gram in float64 (adapter_index): then
|feat(z)·ŵ − ‖sBz‖²| ≤ (γ₆₄(o) + γ₆₄(K+2))·‖sB‖_F²·‖z‖², inside the same ε_RB. Rankings of the
two agree except between candidates whose float64 scores lie within ε_RB of each other, which
is what routing's TIE_RTOL treats as a tie.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

U32 = 2.0 ** -24
U64 = 2.0 ** -53
F64_SLACK = 1e-12           # ε_RB above, relative to ‖R‖_F²·‖z‖²
BOUND_SAFETY = 1.0 + 1e-3   # absorbs first-order fp32 rounding of a bound's own arithmetic (graph)
TIE_RTOL = 1e-12            # float64 scores this close (relative) are ties: ranked by adapter id


def gamma(n: int) -> float:
    return n * U32 / (1.0 - n * U32)


def gamma64(n: int) -> float:
    return n * U64 / (1.0 - n * U64)


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

    def dense(self, e: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """(T, n) bounds for energies ``e``; ``rows``: e holds only those tokens."""
        a, c, dl = (self.a, self.c, self.delta) if rows is None else \
            (self.a[rows], self.c[rows], self.delta[rows])
        ag = np.outer(a, self.g)                                              # (T, n)
        b = ag + np.outer(c, self.h) + self.rel * e
        if dl.any():
            b += 2 * np.sqrt(np.maximum(e, 0) + ag) * np.outer(dl, self.rho)
            b += np.outer(dl ** 2, self.rho ** 2)
        return b

    def mean(self, e_sum: np.ndarray, T: int) -> np.ndarray:
        """Upper bound on mean_t b_ti given e_sum = Σ_t e_ti (Cauchy–Schwarz on the √ term)."""
        b = self.a.mean() * self.g + self.c.mean() * self.h + self.rel * np.maximum(e_sum, 0) / T
        if self.delta.any():
            root = np.sqrt(np.maximum(e_sum, 0) + self.a.sum() * self.g) * np.sqrt((self.delta ** 2).sum())
            b += 2 * root * self.rho / T + (self.delta ** 2).mean() * self.rho ** 2
        return b

    def row_max(self, e_max: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """(T,) ≥ max_i b_ti·scale_i, given e_max_t ≥ max_i e_ti·scale_i·(‖·‖ ratio folded in
        by the caller) — a per-token bound uniform over columns, O(T + n)."""
        gs, hs = (self.g * scale).max(initial=0.0), (self.h * scale).max(initial=0.0)
        b = self.a * gs + self.c * hs + self.rel * e_max
        if self.delta.any():
            rs = np.sqrt((self.rho ** 2 * scale).max(initial=0.0))
            gr = self.g.max(initial=0.0) * scale.max(initial=0.0)
            b = b + 2 * np.sqrt(np.maximum(e_max, 0) + self.a * gr) * self.delta * rs \
                + self.delta ** 2 * rs ** 2
        return b

    def take(self, keep: np.ndarray) -> "Bound":
        return Bound(a=self.a, g=self.g[keep], c=self.c, h=self.h[keep], delta=self.delta,
                     rho=self.rho[keep], rel=self.rel)


def pooled(mean_bound: np.ndarray) -> Bound:
    """A (1, n) block whose bound is already known per column."""
    n = mean_bound.size
    one, zero = np.ones(1), np.zeros(1)
    return Bound(a=one, g=mean_bound, c=zero, h=np.zeros(n), delta=zero, rho=np.zeros(n))


# --- shared-A adapters: e = feat(z)·w with w the Gram weights of R -----------------------

def gram_token_columns(K: int, wnorm: np.ndarray, rf2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(g, h) per column for fp32 e_t = feat(z_t)·w: the GEMM on w rounded to fp32
    (γ_{K+3}·‖feat‖·‖w‖: K products and sums, the rounding of w and of the result) and ε_RB."""
    return gamma(K + 3) * wnorm, F64_SLACK * rf2


def gram_mean_columns(wnorm: np.ndarray, rf2: np.ndarray) -> np.ndarray:
    """Per column, × mean_t ‖feat_t‖: token mean taken in float64 before one fp32 rounding of
    the product (ONNX pooled path): feat's product, w's entry and the result, 4u."""
    return gamma(4) * wnorm + F64_SLACK * rf2


def gram_f64_columns(K: int, feat_norm: np.ndarray | float, gerr: np.ndarray | float,
                     wnorm: np.ndarray, rf2: np.ndarray) -> np.ndarray:
    """Bound on |feat(G)·w − e| for the float64 token-mean product from a moment G with
    ‖Ĝ − G‖_F ≤ gerr (broadcasts: rows of feat_norm/gerr, columns of wnorm/rf2)."""
    return (gamma64(K + 2) * feat_norm + gerr) * wnorm + F64_SLACK * feat_norm * rf2


def z_delta_precise(z_norm: np.ndarray, x_norm: np.ndarray, d: int, a_norm: float) -> np.ndarray:
    """‖δz_t‖ for z = A·x in float64, rounded once to fp32: u·‖z‖ + γ₆₄(d)·‖A‖_F·‖x‖."""
    return U32 * z_norm + gamma64(d) * a_norm * x_norm


def z_delta_fp32(x_norm2: np.ndarray, d: int, a_norm: float) -> np.ndarray:
    """‖δz_t‖ for z = A·x in fp32 (‖x‖² itself computed in fp32, hence the 1 + γ_d)."""
    return gamma(d) * a_norm * np.sqrt(x_norm2 * (1 + gamma(d)))


def moment_error(z_norm2: np.ndarray, T: int, dz: np.ndarray | None) -> float:
    """Bound on ‖Ĝ − G‖_F for G = ZᵀZ/T in float64 from z with per-token errors ``dz``."""
    err = gamma64(T + 2) * float(np.mean(z_norm2))
    if dz is not None:
        err += float(np.mean(2 * np.sqrt(z_norm2) * dz + dz ** 2))
    return 2 * err


def moment_errors(z_norm2: np.ndarray, T: int, dz: np.ndarray | None) -> np.ndarray:
    """moment_error for several modules at once: z_norm2 and dz are (T, g)."""
    err = gamma64(T + 2) * z_norm2.mean(axis=0)
    if dz is not None:
        err = err + (2 * np.sqrt(z_norm2) * dz + dz ** 2).mean(axis=0)
    return 2 * err


# --- general (own-A) adapters: e = ‖M·x‖², M = R·A rounded to fp32 ------------------------

def general_bound(x_norm: np.ndarray, m_norm: np.ndarray, *, d: int, rmax: int, precise: bool) -> Bound:
    """x·Mᵀ in float64 (precise: M's own fp32 rounding, u, dominates) or in fp32."""
    T = x_norm.size
    if precise:
        dl, rel = (U32 + gamma64(d + 1)) * x_norm, gamma64(rmax + 1)
    else:
        dl, rel = gamma(d + 1) * x_norm, gamma(rmax + 1)
    return Bound(a=np.zeros(T), g=np.zeros(m_norm.size), c=x_norm ** 2, h=F64_SLACK * m_norm ** 2,
                 delta=dl, rho=m_norm, rel=rel)


def general_graph_terms(m_norm: np.ndarray, d: int, rmax: int) -> tuple[np.ndarray, float, float]:
    """fp32 graph terms for general adapters: (ε_RB per column, rel, δ²/‖x‖²)."""
    return F64_SLACK * m_norm ** 2, gamma(rmax + 1), gamma(d + 1) ** 2


# --- the fp32 tail of the ONNX graph ------------------------------------------------------

def tail_kappa(tokens: int, modules: int) -> float:
    """Per unit of score magnitude: transform, token mean (γ_T), module sum (γ_M), normalisation."""
    return (tokens + modules + 16) * U32
