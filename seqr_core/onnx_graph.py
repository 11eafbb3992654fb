"""The ONNX scorer graph, built from standard ops with onnx.helper (see onnx_export for why).

Per exported module (shapes beside each op): shared-A adapters go through z = A·x (float64
by default), the upper-triangle features of z·zᵀ and one GEMM with the Gram weights; own-A
adapters through ‖M_i·x‖² with M rank-padded; then the transform (e, √e, log e), the
per-column normalisation, a Gather into library positions, the sum over modules and the
per-adapter division; NaN where an adapter is masked or unscored; TopK. For linear
transforms and sequence-only outputs the token mean is taken before the Gram product.
Every error-bound constant comes from seqr_core.bounds, as the numpy scorer's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from . import bounds as bd


@dataclass(frozen=True)
class ModuleData:
    """What the graph of one exported module needs, as arrays (planned by onnx_export)."""

    module: str
    form: str
    d: int
    cols: np.ndarray               # library positions of the columns (shared, then general)
    shared_a: np.ndarray | None    # (r, d) float32
    a_norm: float
    gram32: np.ndarray             # (K, Ns) float32 Gram weights
    gram64: np.ndarray             # (K, Ns) float64
    wnorm: np.ndarray              # (Ns,) ‖w‖
    rf2: np.ndarray                # (Ns,) ‖R‖_F²
    general_M: np.ndarray          # (Ng·rmax, d) float32, ranks zero-padded
    general_n: int
    general_rmax: int
    general_mnorm: np.ndarray      # (Ng,) ‖M_i‖_F


class Graph:
    """A tiny node/initializer accumulator; every op returns its (unique) output name."""

    def __init__(self, opset: int):
        self.opset, self.nodes, self.inits, self._n, self._scalars = opset, [], [], 0, {}

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, arr, hint: str) -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def scalar(self, v: float) -> str:
        key = repr(float(v))
        if key not in self._scalars:
            self._scalars[key] = self.const(np.array(v, np.float32), "c")
        return self._scalars[key]

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int) -> str:
        # Opset 18 moved the axes of ReduceMean/L2/SumSquare from an attribute to an input.
        if self.opset >= 18:
            return self.op(op_type, x, self.const(np.array(axes, np.int64), "axes"), keepdims=keepdims)
        return self.op(op_type, x, axes=list(axes), keepdims=keepdims)



# --- graph pieces ------------------------------------------------------------------------

def z_term(g: Graph, e: str, q: str, rho: np.ndarray) -> str:
    """2·√(e·q)·ρ + q·ρ²: the rounding of z (or y) carried into e, q = δ² (Cauchy–Schwarz
    gives the token mean the same form with q = mean δ²), as bounds.Bound."""
    rho32 = g.const(rho.astype(np.float32), "rho")
    two_root = g.op("Mul", g.op("Sqrt", g.op("Mul", e, q)), g.scalar(2.0))
    rho2 = g.const((rho ** 2).astype(np.float32), "rho2")
    return g.op("Add", g.op("Mul", two_root, rho32), g.op("Mul", q, rho2))


def shared(g: Graph, md: ModuleData, x: str, xn2: str | None, *, bounds: bool, pooled: bool,
           precise: bool):
    """Shared-A energies: e (B, T, Ns), or token means (B, Ns) when ``pooled``, and bounds."""
    r = md.shared_a.shape[0]
    iu, ju = np.triu_indices(r)
    K = iu.size
    if md.form == "moments":
        Gs = g.op("Mul", g.op("Add", x, g.op("Transpose", x, perm=[0, 2, 1])), g.scalar(0.5))
        flat = g.op("Reshape", Gs, g.const(np.array([0, r * r], np.int64), "shape"))  # (B, r·r)
        feat = g.op("Gather", flat, g.const((iu * r + ju).astype(np.int64), "triu"), axis=1)
        feat = g.op("Unsqueeze", feat, g.const(np.array([1], np.int64), "axes"))        # (B, 1, K)
    elif md.form == "projected":
        z = x
    elif precise:
        # z = A·x in float64, rounded once: its error is ~u·‖z‖ instead of γ_d·‖A‖·‖x‖
        # (~1% at d=4096), which would leave most candidates to the float64 re-check.
        A64 = g.const(md.shared_a.T.astype(np.float64), "A_T64")
        z = g.op("Cast", g.op("MatMul", g.op("Cast", x, to=TensorProto.DOUBLE), A64),
                 to=TensorProto.FLOAT)                       # (B, T, d)·(d, r) -> (B, T, r)
    else:
        z = g.op("MatMul", x, g.const(md.shared_a.T.copy(), "A_T"))  # (B, T, d)·(d, r) -> (B, T, r)
    if md.form != "moments":
        feat = g.op("Mul", g.op("Gather", z, g.const(iu.astype(np.int64), "iu"), axis=2),
                    g.op("Gather", z, g.const(ju.astype(np.int64), "ju"), axis=2))  # (B, T, K)
    delta2 = None                                              # (B, T, 1) bound on ‖δz_t‖²
    if bounds and md.form == "activations":
        if precise:
            # bounds.z_delta_precise = u·‖z‖ + γ₆₄(d)·‖A‖·‖x‖, its two terms padded for the
            # graph's own fp32 evaluation of ‖z‖ and ‖x‖
            cz, cx = bd.U32, bd.z_delta_precise(np.zeros(1), np.ones(1), md.d, md.a_norm)[0]
            zn = g.reduce("ReduceL2", z, [2], 1)                                  # (B, T, 1)
            delta = g.op("Add", g.op("Mul", zn, g.scalar(cz * (1 + (r + 8) * bd.U32))),
                         g.op("Mul", g.op("Sqrt", xn2), g.scalar(cx * 1.01)))
            delta2 = g.op("Mul", delta, delta)
        else:
            # bounds.z_delta_fp32 squared (xn2 already carries its 1 + γ_d)
            delta2 = g.op("Mul", xn2, g.scalar(bd.z_delta_fp32(np.ones(1), md.d, md.a_norm)[0] ** 2))
    if pooled:
        # The token mean is linear: mean_t(feat)·gram is one (B, K)·(K, Ns) product, not T of
        # them. Done in float64 (T·K + K·Ns double ops): the only fp32 roundings left are
        # feat's products, gram's entries and the result's — 4u, not γ_{T+K}.
        fbar = g.reduce("ReduceMean", g.op("Cast", feat, to=TensorProto.DOUBLE), [1], 0)  # (B, K)
        gram64 = g.const(md.gram64, "gram64")
        e64 = g.op("MatMul", fbar, gram64)                                        # (B, K)·(K, Ns) -> (B, Ns)
        e = g.op("Cast", g.op("Relu", e64), to=TensorProto.FLOAT)
        if not bounds:
            return e, None
        mfz = g.reduce("ReduceMean", g.reduce("ReduceL2", feat, [2], 0), [1], 1)  # (B, 1) mean ‖feat_t‖
        w = g.const(bd.gram_mean_columns(md.wnorm, md.rf2).astype(np.float32), "w")
        b = g.op("Add", g.op("Mul", mfz, w), g.op("Mul", e, g.scalar(2 * bd.U32)))  # (B, Ns)
        if delta2 is not None:
            q = g.reduce("ReduceMean", delta2, [1], 0)                            # (B, 1) mean δ²
            b = g.op("Add", b, z_term(g, g.op("Add", e, b), q, np.sqrt(md.rf2)))
        return e, b
    gram = g.const(md.gram32, "gram")
    e = g.op("Relu", g.op("MatMul", feat, gram))                # (B, T, K)·(K, Ns) -> (B, T, Ns)
    if not bounds:
        return e, None
    w1 = g.const(np.add(*bd.gram_token_columns(K, md.wnorm, md.rf2)).astype(np.float32), "w1")
    b = g.op("Mul", g.reduce("ReduceL2", feat, [2], 1), w1)                      # (B, T, Ns)
    if delta2 is not None:
        b = g.op("Add", b, z_term(g, g.op("Add", e, b), delta2, np.sqrt(md.rf2)))
    return e, b


def general(g: Graph, md: ModuleData, x: str, xn2: str | None, *, bounds: bool, pooled: bool):
    """Own-A energies ‖M_i x‖² (ranks zero-padded to rmax: exact), token means if ``pooled``."""
    Mp, ng, rmax = md.general_M, md.general_n, md.general_rmax
    y = g.op("MatMul", x, g.const(Mp.T.copy(), "M_T"))  # (B, T, d)·(d, Ng·rmax) -> (B, T, Ng·rmax)
    y4 = g.op("Reshape", y, g.const(np.array([0, 0, ng, rmax], np.int64), "shape"))
    e = g.reduce("ReduceSumSquare", y4, [3], 0)                                   # (B, T, Ng)
    if pooled:
        e = g.reduce("ReduceMean", e, [1], 0)                                     # (B, Ng)
        xn2 = g.reduce("ReduceMean", xn2, [1], 0) if bounds else None            # (B, 1)
    if not bounds:
        return e, None
    slack, rel, dx2 = bd.general_graph_terms(md.general_mnorm, md.d, rmax)
    b = g.op("Add", g.op("Mul", xn2, g.const(slack.astype(np.float32), "slack")),
             g.op("Mul", e, g.scalar(rel)))
    q = g.op("Mul", xn2, g.scalar(dx2))                                           # δ² = γ²·‖x‖²
    return e, g.op("Add", b, z_term(g, e, q, md.general_mnorm))


def energies(g: Graph, md: ModuleData, x: str, *, bounds: bool, pooled: bool, precise: bool):
    """Module energies in column order (shared, then general) and their bounds."""
    xn2 = None
    if bounds and md.form == "activations":
        # ‖x_t‖² in fp32 is within γ_d of the true value: scale up once, as energies does.
        xn2 = g.op("Mul", g.reduce("ReduceSumSquare", x, [2], 1), g.scalar(1 + bd.gamma(md.d)))  # (B, T, 1)
    es, bs = [], []
    if md.gram32.shape[1]:
        e, b = shared(g, md, x, xn2, bounds=bounds, pooled=pooled, precise=precise)
        es.append(e)
        bs.append(b)
    if md.general_n:
        e, b = general(g, md, x, xn2, bounds=bounds, pooled=pooled)
        es.append(e)
        bs.append(b)
    cat = (lambda ts: ts[0] if len(ts) == 1 else g.op("Concat", *ts, axis=-1))
    return cat(es), (cat(bs) if bounds else None)


def transform(g: Graph, e: str, b: str | None, t: str, delta: np.ndarray):
    """f(e), a bound on |f(e_true) − f(e)|, and |f| plus f's absolute evaluation error scale."""
    if t == "e":
        return e, b, e
    if t == "sqrt":
        f = g.op("Sqrt", e)
        # |√(e±b) − √e| ≤ min(√b, b/√e)
        tb = None if b is None else g.op("Min", g.op("Sqrt", b),
                                         g.op("Div", b, g.op("Max", f, g.scalar(1e-30))))
        return f, tb, f
    delta = g.const(delta.astype(np.float32), "delta")
    f = g.op("Log", g.op("Add", e, delta))
    # |log(e±b+δ) − log(e+δ)| ≤ b / (max(e−b, 0) + δ)
    tb = None if b is None else g.op("Div", b, g.op("Add", g.op("Relu", g.op("Sub", e, b)), delta))
    return f, tb, g.op("Add", g.op("Abs", f), g.scalar(1.0))


def scatter(g: Graph, t: str, cols: np.ndarray, n: int, rank: int) -> str:
    """Module columns -> library positions (last axis); absent positions read a zero column."""
    idx = np.full(n, cols.size, np.int64)
    idx[cols] = np.arange(cols.size)
    pads = np.zeros(2 * rank, np.int64)
    pads[-1] = 1
    padded = g.op("Pad", t, g.const(pads, "pads"), g.scalar(0.0))
    return g.op("Gather", padded, g.const(idx, "cols"), axis=rank - 1)


def affine(g: Graph, t: str, mu: np.ndarray, c: np.ndarray) -> str:
    if mu.any():
        t = g.op("Sub", t, g.const(mu.astype(np.float32), "mu"))
    if (c != 1).any():
        t = g.op("Div", t, g.const(c.astype(np.float32), "c"))
    return t


def pool(g: Graph, parts: dict, *, valid, cnt, mu_sd, kappa: str, bounds: bool):
    """Sum module parts, normalise per adapter, NaN where unscored; bound += κ·magnitude."""
    total = {k: (v[0] if len(v) == 1 else g.op("Sum", *v)) for k, v in parts.items() if v}
    nan_pad = g.const(np.where(valid, 0.0, np.nan).astype(np.float32), "nan_pad")
    if mu_sd is not None:
        mu = g.const(mu_sd[0].astype(np.float32), "mu_i")
        sd = g.const(mu_sd[1].astype(np.float32), "sd_i")
        amu = g.const(np.abs(mu_sd[0]).astype(np.float32), "amu_i")
        S = g.op("Div", g.op("Sub", total["s"], mu), sd)
        B = g.op("Div", total["b"], sd) if bounds else None
        mag = g.op("Div", g.op("Add", total["m"], amu), sd) if bounds else None
    else:
        inv = g.const(np.where(valid, 1.0 / np.maximum(cnt, 1), 0.0).astype(np.float32), "inv_cnt")
        S = g.op("Mul", total["s"], inv)
        B = g.op("Mul", total["b"], inv) if bounds else None
        mag = g.op("Mul", total["m"], inv) if bounds else None
    S = g.op("Add", S, nan_pad)
    if bounds:
        B = g.op("Mul", g.op("Add", B, g.op("Mul", mag, kappa)), g.scalar(bd.BOUND_SAFETY))
    return S, B


def outputs(g: Graph, S: str, B: str | None, mask: str, ids: str, k: int, prefix: str, axis: int):
    nan = g.scalar(np.nan)
    Sm = g.op("Where", mask, S, nan)
    top = g.op("Where", g.op("IsNaN", Sm), g.scalar(-np.inf), Sm)
    vals, idx = g.op("TopK", top, g.const(np.array([k], np.int64), "k"), n_out=2, axis=axis,
                     largest=1, sorted=1)
    out = {f"{prefix}scores": Sm, f"{prefix}topk_scores": vals, f"{prefix}topk_indices": idx,
           f"{prefix}topk_adapter_ids": g.op("Gather", ids, idx, axis=0)}
    if B is not None:
        out[f"{prefix}score_bounds"] = g.op("Where", mask, B, nan)
    return out
