"""Export a library snapshot as a self-contained ONNX scorer (the QR index as initializers).

The graph computes, for the modules and input forms chosen at export, the same normalised
scores as ``seqr_core.normalise.combine`` over ``energies.seqr_energies`` — fp32 throughout,
whatever the input dtype — plus a rigorous per-score error bound (``score_bounds``: the
float64 score lies within ±bound), so a host can tell which top-k decisions are within
rounding. The contract (input/output names and shapes, adapter order and ids, normalisation)
is written into the model's ``metadata_props`` (``_metadata``, ``OUTPUT_DOCS``) and
``doc_string`` (``SCORER_DOC``), so a host needs no project code. No I/O here: bytes out.

How the graph is built, per exported module (shapes beside each op below): shared-A adapters
go through z = A·x (float64 by default, see ``precise_z``), the upper-triangle features of
z·zᵀ and one GEMM with the Gram weights; own-A adapters through ‖M_i·x‖² with M rank-padded;
then the transform (e, √e, log e), the per-column normalisation, a Gather into library
positions, the sum over modules and the per-adapter division; NaN where an adapter is masked
or unscored; TopK. For linear transforms and sequence-only outputs the token mean is taken
before the Gram product (one GEMV instead of a T×N GEMM).

Why onnx.helper and not torch.onnx.export: the server re-exports on every library change,
so export must be fast and light. The dynamo exporter takes seconds per graph (6.5 s for a
one-module toy here) and would pull torch into the server process; the TorchScript exporter
is deprecated. Building the ~20 standard ops directly takes milliseconds, keeps every dtype,
name and dynamic axis exactly as documented, and gives byte-identical output for a snapshot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .calibration import LOG_FLOOR
from .energies import FORMS, gamma
from .errors import FailedPreconditionError, InvalidArgumentError, LimitExceededError
from .normalise import Normalisation, effective
from .qr_index import LibraryIndex, triu_pairs

FORMAT = "seqr-onnx-scorer/1"
MASK = "candidate_mask"
INPUT_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
                "bfloat16": TensorProto.BFLOAT16}
_U32 = 2.0 ** -24
_SLACK = 1e-12              # energies._F64_SLACK: QR route vs B route in float64
_BOUND_SAFETY = 1.0 + 1e-3  # absorbs first-order fp32 rounding of the bound arithmetic itself
_MAX_BYTES = (2 << 30) - (64 << 20)   # protobuf's 2 GiB limit, with room for the graph


def input_name(module: str, form: str) -> str:
    return f"{module}:{form}"


@dataclass(frozen=True)
class _Plan:
    """One exported module: its input and the library positions of its scored columns."""

    module: str
    form: str
    d: int
    shared_k: np.ndarray      # indices into ModuleIndex.shared_ids that are scored
    general_k: np.ndarray     # indices into ModuleIndex.general_ids that are scored
    cols: np.ndarray          # library positions of the module's columns (shared, general)


class _Graph:
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


# --- planning: which adapters are scored where, and with which constants -----------------

def _resolve(index: LibraryIndex, modules, forms, default_form: str) -> list[tuple[str, str]]:
    if modules is None:
        modules = [m for m in index.signature.names if index.modules[m].ids.size]
    modules = sorted(set(modules))       # combine() sums modules in sorted order too
    if not modules:
        raise FailedPreconditionError("nothing to export: no module has adapters",
                                      field="export.modules", limit=">=1", actual=0)
    forms = dict(forms or {})
    for m in list(modules) + list(forms):
        if not index.signature.has(m):
            raise InvalidArgumentError("unknown module", field="export.modules", actual=m)
    extra = sorted(set(forms) - set(modules))
    if extra:
        raise InvalidArgumentError("forms given for modules not exported", field="export.forms",
                                   actual=extra[:4])
    out = []
    for m in modules:
        form = forms.get(m, default_form)
        if form not in FORMS:
            raise InvalidArgumentError(f"form must be one of {FORMS}", field=f"export.forms[{m}]",
                                       actual=form)
        if form != "activations" and index.shared_a.get(m) is None:
            raise InvalidArgumentError("module has no shared A; only activations can be scored",
                                       field=f"export.forms[{m}]", limit="activations", actual=form)
        out.append((m, form))
    return out


def _unscorable(index: LibraryIndex, mforms, norm: Normalisation) -> dict[str, str]:
    """Adapters the graph cannot score as the numpy path would, with the reason."""
    mods = {m for m, _ in mforms}
    why = {}
    for m, form in mforms:
        if form != "activations":
            for i in index.modules[m].general_ids:
                why.setdefault(_name(index, i), f"has its own A on {m}: needs activations")
    if not norm.needs_calibration:
        return why
    adapter_level = norm.kind == "zscore" and norm.granularity == "adapter"
    for e in index.adapters:
        targeted = tuple(sorted(set(e.adapter.factors) & mods))
        st = index.calibration.get(e.name) if index.calibration is not None else None
        if not targeted:
            continue
        if st is None or not set(targeted) <= set(st.modules) or \
                not st.serves(norm.kind, norm.granularity, norm.transform):
            why.setdefault(e.name, "uncalibrated on the exported modules")
        elif adapter_level and targeted != tuple(st.modules):
            why.setdefault(e.name, "adapter-level zscore calibrated on other modules")
    return why


def _name(index: LibraryIndex, adapter_id) -> str:
    return index.adapters[int(index.positions(np.array([adapter_id]))[0])].name


def _plans(index: LibraryIndex, mforms, skip: set[str]) -> list[_Plan]:
    pos = {int(i): p for p, i in enumerate(index.ids)}
    names = index.names
    plans = []
    for m, form in mforms:
        mi = index.modules[m]
        sk = np.array([k for k, i in enumerate(mi.shared_ids) if names[pos[int(i)]] not in skip], np.int64)
        gk = np.array([k for k, i in enumerate(mi.general_ids) if names[pos[int(i)]] not in skip], np.int64)
        cols = np.array([pos[int(i)] for i in mi.shared_ids[sk]] + [pos[int(i)] for i in mi.general_ids[gk]],
                        np.int64)
        plans.append(_Plan(m, form, index.signature.spec(m).d_in, sk, gk, cols))
    return plans


def _column_constants(index: LibraryIndex, p: _Plan, norm: Normalisation):
    """Per module column (μ, c, δ) with u = (f(e) − μ)/c, as normalise._module_constants."""
    mi = index.modules[p.module]
    f2 = np.concatenate([mi.frob2_shared[p.shared_k], mi.frob2_general[p.general_k]])
    n = f2.size
    mu, c = np.zeros(n), np.ones(n)
    if norm.kind == "frobenius":
        c = np.maximum(f2, 1e-30)
    elif norm.kind == "activation" or (norm.kind == "zscore" and norm.granularity == "adapter_module"):
        t = "e" if norm.kind == "activation" else norm.transform
        for j, col in enumerate(p.cols):
            st = index.calibration.get(index.adapters[int(col)].name)
            m_, s_ = st.mean_std(st.module_stats[p.module], t)
            mu[j], c[j] = (0.0, max(m_, 1e-30)) if norm.kind == "activation" else (m_, s_)
    return mu, c, LOG_FLOOR * f2 + 1e-30


# --- graph pieces ------------------------------------------------------------------------

def _z_term(g: _Graph, e: str, q: str, rho: np.ndarray) -> str:
    """2·√(e·q)·ρ + q·ρ²: the rounding of z (or y) carried into e, q = δ² (Cauchy–Schwarz
    gives the token mean the same form with q = mean δ²), as energies.Bound."""
    rho32 = g.const(rho.astype(np.float32), "rho")
    two_root = g.op("Mul", g.op("Sqrt", g.op("Mul", e, q)), g.scalar(2.0))
    rho2 = g.const((rho ** 2).astype(np.float32), "rho2")
    return g.op("Add", g.op("Mul", two_root, rho32), g.op("Mul", q, rho2))


def _shared(g: _Graph, mi, p: _Plan, x: str, xn2: str | None, *, bounds: bool, pooled: bool,
            precise: bool):
    """Shared-A energies: e (B, T, Ns), or token means (B, Ns) when ``pooled``, and bounds."""
    r = mi.shared_a.shape[0]
    iu, ju = triu_pairs(r)
    K = iu.size
    if p.form == "moments":
        Gs = g.op("Mul", g.op("Add", x, g.op("Transpose", x, perm=[0, 2, 1])), g.scalar(0.5))
        flat = g.op("Reshape", Gs, g.const(np.array([0, r * r], np.int64), "shape"))  # (B, r·r)
        feat = g.op("Gather", flat, g.const((iu * r + ju).astype(np.int64), "triu"), axis=1)
        feat = g.op("Unsqueeze", feat, g.const(np.array([1], np.int64), "axes"))        # (B, 1, K)
    elif p.form == "projected":
        z = x
    elif precise:
        # z = A·x in float64, rounded once: its error is ~u·‖z‖ instead of γ_d·‖A‖·‖x‖
        # (~1% at d=4096), which would leave most candidates to the float64 re-check.
        A64 = g.const(mi.shared_a.T.astype(np.float64), "A_T64")
        z = g.op("Cast", g.op("MatMul", g.op("Cast", x, to=TensorProto.DOUBLE), A64),
                 to=TensorProto.FLOAT)                       # (B, T, d)·(d, r) -> (B, T, r)
    else:
        z = g.op("MatMul", x, g.const(mi.shared_a.T.copy(), "A_T"))  # (B, T, d)·(d, r) -> (B, T, r)
    if p.form != "moments":
        feat = g.op("Mul", g.op("Gather", z, g.const(iu.astype(np.int64), "iu"), axis=2),
                    g.op("Gather", z, g.const(ju.astype(np.int64), "ju"), axis=2))  # (B, T, K)
    R = mi.R[p.shared_k]
    rf = np.sqrt(np.einsum("nab,nab->n", R, R))                               # (Ns,) ‖R‖_F
    gn = np.linalg.norm(mi.gram[:, p.shared_k].astype(np.float64), axis=0)    # (Ns,)
    delta2 = None                                              # (B, T, 1) bound on ‖δz_t‖²
    if bounds and p.form == "activations":
        af = float(np.linalg.norm(mi.shared_a.astype(np.float64)))
        if precise:
            g64 = p.d * 2.0 ** -53 / (1 - p.d * 2.0 ** -53)
            zn = g.reduce("ReduceL2", z, [2], 1)                                  # (B, T, 1)
            delta = g.op("Add", g.op("Mul", zn, g.scalar(_U32 * (1 + (r + 8) * _U32))),
                         g.op("Mul", g.op("Sqrt", xn2), g.scalar(g64 * af * 1.01)))
            delta2 = g.op("Mul", delta, delta)
        else:
            delta2 = g.op("Mul", xn2, g.scalar(gamma(p.d) ** 2 * af ** 2 * (1 + gamma(p.d))))
    if pooled:
        # The token mean is linear: mean_t(feat)·gram is one (B, K)·(K, Ns) product, not T of
        # them. Done in float64 (T·K + K·Ns double ops): the only fp32 roundings left are
        # feat's products, gram's entries and the result's — 4u, not γ_{T+K}.
        fbar = g.reduce("ReduceMean", g.op("Cast", feat, to=TensorProto.DOUBLE), [1], 0)  # (B, K)
        gram64 = g.const(mi.gram[:, p.shared_k].astype(np.float64), "gram64")
        e64 = g.op("MatMul", fbar, gram64)                                        # (B, K)·(K, Ns) -> (B, Ns)
        e = g.op("Cast", g.op("Relu", e64), to=TensorProto.FLOAT)
        if not bounds:
            return e, None
        mfz = g.reduce("ReduceMean", g.reduce("ReduceL2", feat, [2], 0), [1], 1)  # (B, 1) mean ‖feat_t‖
        w = g.const((gamma(4) * gn + _SLACK * rf ** 2).astype(np.float32), "w")
        b = g.op("Add", g.op("Mul", mfz, w), g.op("Mul", e, g.scalar(2 * _U32)))  # (B, Ns)
        if delta2 is not None:
            q = g.reduce("ReduceMean", delta2, [1], 0)                            # (B, 1) mean δ²
            b = g.op("Add", b, _z_term(g, g.op("Add", e, b), q, rf))
        return e, b
    gram = g.const(mi.gram[:, p.shared_k], "gram")
    e = g.op("Relu", g.op("MatMul", feat, gram))                # (B, T, K)·(K, Ns) -> (B, T, Ns)
    if not bounds:
        return e, None
    w1 = g.const((gamma(K + 2) * gn + _SLACK * rf ** 2).astype(np.float32), "w1")
    b = g.op("Mul", g.reduce("ReduceL2", feat, [2], 1), w1)                      # (B, T, Ns)
    if delta2 is not None:
        b = g.op("Add", b, _z_term(g, g.op("Add", e, b), delta2, rf))
    return e, b


def _general(g: _Graph, mi, p: _Plan, x: str, xn2: str | None, *, bounds: bool, pooled: bool):
    """Own-A energies ‖M_i x‖² (ranks zero-padded to rmax: exact), token means if ``pooled``."""
    rows = [np.arange(mi.M_offsets[k], mi.M_offsets[k + 1]) for k in p.general_k]
    rmax = max(r_.size for r_ in rows)
    ng = p.general_k.size
    Mp = np.zeros((ng * rmax, p.d), np.float32)
    for j, r_ in enumerate(rows):
        Mp[j * rmax: j * rmax + r_.size] = mi.M[r_]
    y = g.op("MatMul", x, g.const(Mp.T.copy(), "M_T"))  # (B, T, d)·(d, Ng·rmax) -> (B, T, Ng·rmax)
    y4 = g.op("Reshape", y, g.const(np.array([0, 0, ng, rmax], np.int64), "shape"))
    e = g.reduce("ReduceSumSquare", y4, [3], 0)                                   # (B, T, Ng)
    if pooled:
        e = g.reduce("ReduceMean", e, [1], 0)                                     # (B, Ng)
        xn2 = g.reduce("ReduceMean", xn2, [1], 0) if bounds else None            # (B, 1)
    if not bounds:
        return e, None
    mf = np.sqrt((Mp.astype(np.float64) ** 2).reshape(ng, rmax * p.d).sum(1))    # (Ng,) ‖M_i‖_F
    b = g.op("Add", g.op("Mul", xn2, g.const((_SLACK * mf ** 2).astype(np.float32), "slack")),
             g.op("Mul", e, g.scalar(gamma(rmax + 1))))
    q = g.op("Mul", xn2, g.scalar(gamma(p.d + 1) ** 2))                          # δ² = γ²·‖x‖²
    return e, g.op("Add", b, _z_term(g, e, q, mf))


def _energies(g: _Graph, index: LibraryIndex, p: _Plan, x: str, *, bounds: bool, pooled: bool,
              precise: bool):
    """Module energies in column order (shared, then general) and their bounds."""
    mi = index.modules[p.module]
    xn2 = None
    if bounds and p.form == "activations":
        # ‖x_t‖² in fp32 is within γ_d of the true value: scale up once, as energies does.
        xn2 = g.op("Mul", g.reduce("ReduceSumSquare", x, [2], 1), g.scalar(1 + gamma(p.d)))  # (B, T, 1)
    es, bs = [], []
    if p.shared_k.size:
        e, b = _shared(g, mi, p, x, xn2, bounds=bounds, pooled=pooled, precise=precise)
        es.append(e)
        bs.append(b)
    if p.general_k.size:
        e, b = _general(g, mi, p, x, xn2, bounds=bounds, pooled=pooled)
        es.append(e)
        bs.append(b)
    cat = (lambda ts: ts[0] if len(ts) == 1 else g.op("Concat", *ts, axis=-1))
    return cat(es), (cat(bs) if bounds else None)


def _transform(g: _Graph, e: str, b: str | None, t: str, delta: np.ndarray):
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


def _scatter(g: _Graph, t: str, cols: np.ndarray, n: int, rank: int) -> str:
    """Module columns -> library positions (last axis); absent positions read a zero column."""
    idx = np.full(n, cols.size, np.int64)
    idx[cols] = np.arange(cols.size)
    pads = np.zeros(2 * rank, np.int64)
    pads[-1] = 1
    padded = g.op("Pad", t, g.const(pads, "pads"), g.scalar(0.0))
    return g.op("Gather", padded, g.const(idx, "cols"), axis=rank - 1)


def _affine(g: _Graph, t: str, mu: np.ndarray, c: np.ndarray) -> str:
    if mu.any():
        t = g.op("Sub", t, g.const(mu.astype(np.float32), "mu"))
    if (c != 1).any():
        t = g.op("Div", t, g.const(c.astype(np.float32), "c"))
    return t


def _adapter_stats(index: LibraryIndex, valid: np.ndarray, which: str, t: str):
    """Adapter-level zscore (μ_i, σ_i) per library position (0, 1 where not scored)."""
    mu, sd = np.zeros(valid.size), np.ones(valid.size)
    for p in np.flatnonzero(valid):
        st = index.calibration.get(index.adapters[int(p)].name)
        mu[p], sd[p] = st.mean_std(getattr(st, which), t)
    return mu, sd


def _pool(g: _Graph, parts: dict, *, valid, cnt, mu_sd, kappa: str, bounds: bool):
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
        B = g.op("Mul", g.op("Add", B, g.op("Mul", mag, kappa)), g.scalar(_BOUND_SAFETY))
    return S, B


def _outputs(g: _Graph, S: str, B: str | None, mask: str, ids: str, k: int, prefix: str, axis: int):
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


OUTPUT_DOCS = {
    "scores": "(batch, N) float32 sequence score per adapter, library order; NaN: not a "
              "candidate (mask false), targets no exported module, or excluded",
    "score_bounds": "(batch, N) float32: |scores − float64 score| <= score_bounds",
    "topk_indices": "(batch, k) int64 positions into the adapter list (metadata seqr.adapters), "
                    "best first; ties break by position; entries with topk_scores = -inf are padding",
    "topk_scores": "(batch, k) float32 the scores of topk_indices (-inf: fewer than k candidates)",
    "topk_adapter_ids": "(batch, k) int64 stable adapter ids of topk_indices (vLLM LoRA int ids)",
    "token_scores": "(batch, tokens, N) float32 per-token scores",
    "token_score_bounds": "(batch, tokens, N) float32 bounds of token_scores",
    "token_topk_indices": "(batch, tokens, k) int64 per-token top-k positions",
    "token_topk_scores": "(batch, tokens, k) float32",
    "token_topk_adapter_ids": "(batch, tokens, k) int64",
}


def _build(index: LibraryIndex, mforms, norm: Normalisation, *, k: int, per_token: bool,
           bounds: bool, input_dtype: str, skip: dict[str, str], opset: int, tokens: int | None,
           precise: bool):
    g = _Graph(opset)
    N = len(index.adapters)
    plans = _plans(index, mforms, set(skip))
    t = norm.transform if norm.kind == "zscore" else "e"
    adapter_level = norm.kind == "zscore" and norm.granularity == "adapter"
    # Linear transform, sequence only: energies arrive already token-averaged (cheap path).
    pooled = t == "e" and not per_token
    first = next((p for p in plans if p.form != "moments"), None)
    if first is None:
        T = 1                     # moments only: no token axis in the graph
    else:
        shape_t = g.op("Gather", g.op("Shape", input_name(first.module, first.form)),
                       g.const(np.array([1], np.int64), "i1"), axis=0)
        T = g.op("Cast", shape_t, to=TensorProto.FLOAT)                          # (1,) tokens
    seq = {"s": [], "b": [], "m": []}
    tok = {"s": [], "b": [], "m": []}
    cnt = np.zeros(N)
    inputs = []
    for p in plans:
        r = index.shared_a[p.module].shape[0] if p.form != "activations" else 0
        tdim = tokens or "tokens"
        shape = {"activations": ["batch", tdim, p.d], "projected": ["batch", tdim, r],
                 "moments": ["batch", r, r]}[p.form]
        name = input_name(p.module, p.form)
        inputs.append(helper.make_tensor_value_info(name, INPUT_DTYPES[input_dtype], shape))
        if not p.cols.size:
            continue
        x = name if input_dtype == "float32" else g.op("Cast", name, to=TensorProto.FLOAT)
        cnt[p.cols] += 1
        e, b = _energies(g, index, p, x, bounds=bounds, pooled=pooled, precise=precise)
        mu, c, delta = _column_constants(index, p, norm)
        f, tb, absf = _transform(g, e, b, t, delta)
        amu = g.const(np.abs(mu).astype(np.float32), "amu")
        # Sequence: token mean first, then the affine normalisation (the mean is linear).
        if pooled:
            fm, bm, am = f, tb, f                                                 # (B, n)
        else:
            fm = g.reduce("ReduceMean", f, [1], 0)                                # (B, n)
            bm = g.reduce("ReduceMean", tb, [1], 0) if bounds else None
            am = fm if absf == f else g.reduce("ReduceMean", absf, [1], 0)
        seq["s"].append(_scatter(g, _affine(g, fm, mu, c), p.cols, N, 2))
        if bounds:
            seq["b"].append(_scatter(g, _affine(g, bm, 0 * mu, c), p.cols, N, 2))
            seq["m"].append(_scatter(g, _affine(g, g.op("Add", am, amu), 0 * mu, c), p.cols, N, 2))
        if per_token:
            tok["s"].append(_scatter(g, _affine(g, f, mu, c), p.cols, N, 3))       # (B, T, N)
            if bounds:
                tok["b"].append(_scatter(g, _affine(g, tb, 0 * mu, c), p.cols, N, 3))
                tok["m"].append(_scatter(g, _affine(g, g.op("Add", absf, amu), 0 * mu, c), p.cols, N, 3))
    valid = cnt > 0
    if not valid.any():
        raise FailedPreconditionError("no adapter can be scored on the exported modules",
                                      field="export.modules", actual=[m for m, _ in mforms][:4])
    M = len(plans)
    # Rounding of the fp32 tail (transform, token mean, module sum, normalisation): per
    # element a few u of its magnitude, plus γ_T for the token mean, γ_M for the module sum.
    kappa_seq = g.scalar((1 + M + 16) * _U32) if T == 1 else \
        g.op("Mul", g.op("Add", T, g.scalar(M + 16)), g.scalar(_U32))
    mask = MASK
    ids = g.const(index.ids.astype(np.int64), "adapter_ids")
    S, B = _pool(g, seq, valid=valid, cnt=cnt, kappa=kappa_seq, bounds=bounds,
                 mu_sd=_adapter_stats(index, valid, "seq_stats", t) if adapter_level else None)
    outs = _outputs(g, S, B, mask, ids, k, "", 1)
    if per_token:
        St, Bt = _pool(g, tok, valid=valid, cnt=cnt, kappa=g.scalar((M + 16) * _U32), bounds=bounds,
                       mu_sd=_adapter_stats(index, valid, "tok_stats", t) if adapter_level else None)
        mask3 = g.op("Unsqueeze", mask, g.const(np.array([1], np.int64), "axes"))
        outs.update(_outputs(g, St, Bt, mask3, ids, k, "token_", 2))
    inputs.append(helper.make_tensor_value_info(MASK, TensorProto.BOOL, ["mask_batch", N]))
    outputs = []
    for name, src in outs.items():
        g.nodes.append(helper.make_node("Identity", [src], [name]))
        elem = TensorProto.INT64 if "indices" in name or "adapter_ids" in name else TensorProto.FLOAT
        last = k if "topk" in name else N
        shape = ["batch", tokens or "tokens", last] if name.startswith("token_") else ["batch", last]
        outputs.append(helper.make_tensor_value_info(name, elem, shape))
    return g, inputs, outputs, plans


# --- the public face ---------------------------------------------------------------------

def _dims(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _metadata(index: LibraryIndex, plans, norm: Normalisation, *, k: int, per_token: bool,
              bounds: bool, input_dtype: str, skip: Mapping[str, str], inputs, outputs,
              profile: str) -> dict:
    scored = set()
    for p in plans:
        scored.update(int(c) for c in p.cols)
    adapters = [{"position": pos, "name": e.name, "id": e.adapter_id, "kind": e.kind,
                 "scored": pos in scored, "excluded": skip.get(e.name)}
                for pos, e in enumerate(index.adapters)]
    ins = [{"name": input_name(p.module, p.form), "module": p.module, "form": p.form,
            "dtype": input_dtype, "shape": _dims(vi)} for p, vi in zip(plans, inputs)]
    ins.append({"name": MASK, "dtype": "bool", "shape": _dims(inputs[-1]),
                "meaning": "true = may be routed to (request candidates / ACL); mask_batch is 1 or batch"})
    dump = (lambda o: json.dumps(o, sort_keys=True, separators=(",", ":")))
    return {
        "seqr.format": FORMAT, "seqr.library": index.name, "seqr.version": str(index.version),
        "seqr.base_model": index.signature.base_model,
        "seqr.adapters": dump(adapters),
        "seqr.normalisation": dump({"kind": norm.kind, "granularity": norm.granularity,
                                    "transform": norm.transform, "label": norm.label}),
        "seqr.inputs": dump(ins),
        "seqr.outputs": dump({o.name: OUTPUT_DOCS[o.name] for o in outputs}),
        "seqr.top_k": str(k), "seqr.per_token": str(per_token).lower(),
        "seqr.bounds": str(bounds).lower(), "seqr.profile": profile,
    }


SCORER_DOC = """SEQR adapter scorer (seqr-router). Inputs: one tensor per exported module, named
'<module>:<form>' — activations (batch, tokens, d_in) = the module's input x; projected
(batch, tokens, r) = z = A_shared·x; moments (batch, r, r) = ZᵀZ/tokens — plus candidate_mask
(1 or batch, N) bool. All sequences of a batch share one token count. Outputs (fp32 scores
whatever the input dtype): see metadata 'seqr.outputs'; adapter order and ids in
'seqr.adapters'; the normalisation in 'seqr.normalisation'. Exactness: the float64 score of
adapter i lies in scores[i] ± score_bounds[i]; where the top-k margin is inside the bounds the
order is within fp32 rounding (seqr-router re-checks those candidates in float64)."""


def build_scorer_model(index: LibraryIndex, *, modules: Sequence[str] | None = None,
                       form: str = "activations", forms: Mapping[str, str] | None = None,
                       normalisation: Normalisation | None = None, top_k: int = 1,
                       per_token: bool | None = None, tokens: int | None = None,
                       bounds: bool = True, precise_z: bool = True, input_dtype: str = "float32",
                       on_unscorable: str = "error", opset: int = 18,
                       profile: str = "") -> onnx.ModelProto:
    """The scorer as an ``onnx.ModelProto``; ``export_scorer`` serialises it. See module doc.

    ``modules``: default every module that has adapters. ``form``: the input form of every
    module not named in ``forms``. ``per_token``: add token_* outputs (default: unless some
    module takes moments). ``tokens``: a static token count (None/0: dynamic axis).
    ``precise_z``: compute z = A·x in float64 (T·d·r double MACs; tight bounds, few re-checks).

    ``on_unscorable``: 'error' raises FailedPreconditionError when an adapter cannot be scored
    as numpy would (uncalibrated for a data-aware normalisation, or its own A on a module
    exported in a form other than activations); 'exclude' leaves its scores NaN and says why
    in metadata ``seqr.adapters``.
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise InvalidArgumentError("top_k must be an int >= 1", field="export.top_k", limit=">=1",
                                   actual=top_k)
    max_opset = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not 17 <= opset <= max_opset:
        raise InvalidArgumentError("unsupported opset", field="export.opset",
                                   limit=f"[17, {max_opset}]", actual=opset)
    if input_dtype not in INPUT_DTYPES:
        raise InvalidArgumentError(f"input_dtype must be one of {tuple(INPUT_DTYPES)}",
                                   field="export.input_dtype", actual=input_dtype)
    if on_unscorable not in ("error", "exclude"):
        raise InvalidArgumentError("on_unscorable must be 'error' or 'exclude'",
                                   field="export.on_unscorable", actual=on_unscorable)
    if not index.adapters:
        raise FailedPreconditionError("nothing to export: the library has no adapters",
                                      field="export.library", actual=index.name)
    if tokens is not None and (not isinstance(tokens, int) or tokens < 0):
        raise InvalidArgumentError("tokens must be an int >= 0 (0: dynamic)", field="export.tokens",
                                   actual=tokens)
    mforms = _resolve(index, modules, forms, form)
    if normalisation is None:   # the service default, with routing's uncalibrated fallback
        normalisation = effective(index, Normalisation(), [m for m, _ in mforms])[0]
    if per_token is None:
        per_token = all(f != "moments" for _, f in mforms)
    for m, form in mforms:
        if form == "moments" and per_token:
            raise InvalidArgumentError("per-token outputs need per-token inputs, not moments "
                                       "(export with per_token=False)", field=f"export.forms[{m}]",
                                       actual=form)
        if form == "moments" and normalisation.kind == "zscore" and normalisation.transform != "e":
            raise InvalidArgumentError("moments give the token mean of e only; zscore of "
                                       f"{normalisation.transform} needs activations or projected",
                                       field=f"export.forms[{m}]", actual=form)
    skip = _unscorable(index, mforms, normalisation)
    if skip and on_unscorable == "error":
        raise FailedPreconditionError(
            "adapters cannot be scored with this export: " +
            "; ".join(f"{n}: {why}" for n, why in sorted(skip.items())[:8]),
            field="export.normalisation", actual=len(skip))
    k = min(top_k, len(index.adapters))
    g, ins, outs, plans = _build(index, mforms, normalisation, k=k, per_token=per_token,
                                 bounds=bounds, input_dtype=input_dtype, skip=skip, opset=opset,
                                 tokens=tokens or None, precise=precise_z)
    size = sum(len(t.raw_data) for t in g.inits)
    if size > _MAX_BYTES:
        raise LimitExceededError("scorer larger than one ONNX protobuf allows; export fewer "
                                 "modules", field="export.modules", limit=_MAX_BYTES, actual=size)
    graph = helper.make_graph(g.nodes, "seqr_scorer", ins, outs, g.inits)
    ops = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=ops, producer_name="seqr-router",
                              producer_version=FORMAT, doc_string=SCORER_DOC,
                              ir_version=helper.find_min_ir_version_for(ops))
    helper.set_model_props(model, _metadata(index, plans, normalisation, k=k, per_token=per_token,
                                            bounds=bounds, input_dtype=input_dtype, skip=skip,
                                            inputs=ins, outputs=outs, profile=profile))
    return model


def export_scorer(index: LibraryIndex, **options) -> bytes:
    """The scorer of ``index`` as ONNX bytes (options: ``build_scorer_model``). Plaintext
    weights: callers keep it in memory or encrypt it; this function never writes a file."""
    return build_scorer_model(index, **options).SerializeToString()


def scorer_metadata(props: Mapping[str, str]) -> dict:
    """Decode ``metadata_props`` (an ORT session's ``custom_metadata_map``, or
    ``{p.key: p.value for p in model.metadata_props}``) into Python values."""
    out = dict(props)
    for key in ("seqr.adapters", "seqr.normalisation", "seqr.inputs", "seqr.outputs"):
        if key in out:
            out[key] = json.loads(out[key])
    for key in ("seqr.version", "seqr.top_k"):
        if key in out:
            out[key] = int(out[key])
    return out
