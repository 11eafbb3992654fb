"""Export a library snapshot as a self-contained ONNX scorer (the QR index as initializers).

The graph computes, for the modules and input forms chosen at export, the same normalised
scores as ``seqr_core.normalise.combine`` over ``energies.seqr_energies`` — fp32 throughout,
whatever the input dtype — plus a rigorous per-score error bound (``score_bounds``: the
float64 score lies within ±bound), so a host can tell which top-k decisions are within
rounding. The contract (input/output names and shapes, adapter order and ids, normalisation)
is written into the model's ``metadata_props`` (``_metadata``, ``OUTPUT_DOCS``) and
``doc_string`` (``SCORER_DOC``), so a host needs no project code. No I/O here: bytes out.

The graph itself is built in seqr_core.onnx_graph; this module plans it (which adapters are
scored on which module, with which normalisation constants — the numpy path's own) and writes
the contract.

Why onnx.helper and not torch.onnx.export: the server re-exports on every library change,
so export must be fast and light. The dynamo exporter takes seconds per graph (6.5 s for a
one-module toy here) and would pull torch into the server process; the TorchScript exporter
is deprecated. Building the ~20 standard ops directly takes milliseconds, keeps every dtype,
name and dynamic axis exactly as documented, and gives byte-identical output for a snapshot.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import bounds as bd
from . import onnx_graph as og
from .energies import FORMS, module_view
from .errors import FailedPreconditionError, InvalidArgumentError, LimitExceededError
from .normalise import Normalisation, adapter_stats, effective, module_constants
from .qr_index import LibraryIndex

FORMAT = "seqr-onnx-scorer/1"
MASK = "candidate_mask"
INPUT_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
                "bfloat16": TensorProto.BFLOAT16}
_MAX_BYTES = (2 << 30) - (64 << 20)   # protobuf's 2 GiB limit, with room for the graph


def input_name(module: str, form: str) -> str:
    return f"{module}:{form}"


# --- planning: which adapters are scored where, and with which constants -----------------

def _resolve(index: LibraryIndex, modules, forms, default_form: str) -> list[tuple[str, str]]:
    if modules is None:
        modules = [m for m in index.signature.names if index.module_ids(m).size]
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
            g = index.general.get(m)
            for i in (g.ids if g is not None else ()):
                why.setdefault(_name(index, i), f"has its own A on {m}: needs activations")
    if not norm.needs_calibration:
        return why
    adapter_level = norm.kind == "zscore" and norm.granularity == "adapter"
    for e in index.adapters:
        targeted = tuple(sorted(set(e.modules) & mods))
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


def _plans(index: LibraryIndex, mforms, skip: set[str]) -> list[og.ModuleData]:
    """Per exported module: the arrays its graph needs, for the adapters not skipped."""
    names, plans = index.names, []
    keep = (lambda ids: np.array([names[p] not in skip for p in index.positions(ids)], bool))
    ids_all = index.columns.view("ids")
    for m, form in mforms:
        v = module_view(index, m)
        slots = v.slots[keep(v.shared_ids)] if v.slots.size else v.slots
        blk = v.general
        gk = np.flatnonzero(keep(blk.ids)) if blk is not None else np.zeros(0, np.int64)
        r, d = v.rank, v.d
        K = r * (r + 1) // 2
        W = index.table(f"W{v.group}")[v.j][:, slots] if slots.size else np.zeros((K, 0))
        Mp, rmax, mnorm = np.zeros((0, d), np.float32), 0, np.zeros(0)
        if gk.size:
            rows = [np.arange(blk.offsets[k], blk.offsets[k + 1]) for k in gk]
            rmax = max(x.size for x in rows)
            Mp = np.zeros((gk.size * rmax, d), np.float32)
            for j, x in enumerate(rows):
                Mp[j * rmax: j * rmax + x.size] = blk.M[x]
            mnorm = blk.mnorm[gk]
        gids = blk.ids[gk] if blk is not None else np.zeros(0, np.int64)
        cols = index.positions(np.concatenate([ids_all[slots], gids]))
        plans.append(og.ModuleData(
            module=m, form=form, d=d, cols=cols.astype(np.int64), shared_a=v.shared_a,
            a_norm=index.layout.a_norm.get(m, 0.0), gram32=W.astype(np.float32), gram64=W,
            wnorm=index.table("wnorm")[v.row, slots], rf2=index.table("rf2")[v.row, slots],
            general_M=Mp, general_n=int(gk.size), general_rmax=rmax, general_mnorm=mnorm))
    return plans


def _column_constants(index: LibraryIndex, p: og.ModuleData, norm: Normalisation):
    """Per module column (μ, c, δ) with u = (f(e) − μ)/c: the numpy path's own constants."""
    return module_constants(index, p.module, index.slots[p.cols], norm)


def _adapter_stats(index: LibraryIndex, valid: np.ndarray, per_token: bool, norm: Normalisation):
    """Adapter-level zscore (μ_i, σ_i) per library position (0, 1 where not scored)."""
    mu, sd = np.zeros(valid.size), np.ones(valid.size)
    p = np.flatnonzero(valid)
    mu[p], sd[p] = adapter_stats(index, index.slots[p], norm, per_token=per_token)
    return mu, sd


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
    g = og.Graph(opset)
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
        e, b = og.energies(g, p, x, bounds=bounds, pooled=pooled, precise=precise)
        mu, c, delta = _column_constants(index, p, norm)
        f, tb, absf = og.transform(g, e, b, t, delta)
        amu = g.const(np.abs(mu).astype(np.float32), "amu")
        # Sequence: token mean first, then the affine normalisation (the mean is linear).
        if pooled:
            fm, bm, am = f, tb, f                                                 # (B, n)
        else:
            fm = g.reduce("ReduceMean", f, [1], 0)                                # (B, n)
            bm = g.reduce("ReduceMean", tb, [1], 0) if bounds else None
            am = fm if absf == f else g.reduce("ReduceMean", absf, [1], 0)
        seq["s"].append(og.scatter(g, og.affine(g, fm, mu, c), p.cols, N, 2))
        if bounds:
            seq["b"].append(og.scatter(g, og.affine(g, bm, 0 * mu, c), p.cols, N, 2))
            seq["m"].append(og.scatter(g, og.affine(g, g.op("Add", am, amu), 0 * mu, c), p.cols, N, 2))
        if per_token:
            tok["s"].append(og.scatter(g, og.affine(g, f, mu, c), p.cols, N, 3))       # (B, T, N)
            if bounds:
                tok["b"].append(og.scatter(g, og.affine(g, tb, 0 * mu, c), p.cols, N, 3))
                tok["m"].append(og.scatter(g, og.affine(g, g.op("Add", absf, amu), 0 * mu, c), p.cols, N, 3))
    valid = cnt > 0
    if not valid.any():
        raise FailedPreconditionError("no adapter can be scored on the exported modules",
                                      field="export.modules", actual=[m for m, _ in mforms][:4])
    M = len(plans)
    # Rounding of the fp32 tail (transform, token mean, module sum, normalisation): per
    # element a few u of its magnitude, plus γ_T for the token mean, γ_M for the module sum.
    kappa_seq = g.scalar(bd.tail_kappa(1, M)) if T == 1 else \
        g.op("Mul", g.op("Add", T, g.scalar(M + 16)), g.scalar(bd.U32))          # bounds.tail_kappa(T, M)
    mask = MASK
    ids = g.const(index.ids.astype(np.int64), "adapter_ids")
    S, B = og.pool(g, seq, valid=valid, cnt=cnt, kappa=kappa_seq, bounds=bounds,
                   mu_sd=_adapter_stats(index, valid, False, norm) if adapter_level else None)
    outs = og.outputs(g, S, B, mask, ids, k, "", 1)
    if per_token:
        St, Bt = og.pool(g, tok, valid=valid, cnt=cnt, kappa=g.scalar(bd.tail_kappa(0, M)), bounds=bounds,
                         mu_sd=_adapter_stats(index, valid, True, norm) if adapter_level else None)
        mask3 = g.op("Unsqueeze", mask, g.const(np.array([1], np.int64), "axes"))
        outs.update(og.outputs(g, St, Bt, mask3, ids, k, "token_", 2))
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
