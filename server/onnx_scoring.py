"""The ONNX scorer as a routing backend: which graph serves a plan, and its scores and bounds.

Routing itself — validation, candidates, the uncalibrated fallback, exact ranking with the
float64 re-check, per-token decisions, softmax and margin — is seqr_core.routing's one
pipeline (``plan`` -> scores -> ``decide``); this module only supplies the scores and bounds
an exported graph computes. Pure functions: the session is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seqr_core.normalise import Normalisation, effective
from seqr_core.onnx_export import MASK, input_name
from seqr_core.qr_index import LibraryIndex
from seqr_core.routing import Plan, Scores


@dataclass(frozen=True)
class Profile:
    """What one graph is specialised to: supplied modules + forms, effective normalisation,
    per-token outputs or not."""

    modules: tuple[tuple[str, str], ...]   # sorted (module, form)
    normalisation: Normalisation
    per_token: bool
    precise: bool = True                   # z = A·x in float64: tight bounds (verify=True)

    @property
    def key(self) -> str:
        mods = ",".join(f"{m}:{f}" for m, f in self.modules)
        return (f"{self.normalisation.label}|{'token' if self.per_token else 'seq'}|"
                f"{'z64' if self.precise else 'z32'}|{mods}")

    def export_options(self) -> dict:
        return {"modules": [m for m, _ in self.modules], "forms": dict(self.modules),
                "normalisation": self.normalisation, "per_token": self.per_token, "top_k": 1,
                "bounds": True, "precise_z": self.precise, "on_unscorable": "exclude",
                "profile": self.key}


def default_profile(index: LibraryIndex, norm: Normalisation | None = None) -> Profile:
    """Every module that has adapters, as activations, sequence scores; the default
    normalisation as routing would apply it (frobenius while adapters are uncalibrated)."""
    mods = tuple((m, "activations") for m in sorted(index.signature.names) if index.module_ids(m).size)
    if norm is None:
        norm = effective(index, Normalisation(), [m for m, _ in mods])[0]
    return Profile(mods, norm, False)


def profile(p: Plan) -> Profile | str:
    """The graph profile serving plan ``p``, or why numpy must serve it (numpy then answers,
    or raises the error it always raises for such requests)."""
    if p.options.method != "seqr":
        return f"method {p.options.method} runs on numpy"
    forms = {m: i.form for m, i in p.inputs.items()}
    if "moments" in forms.values() and p.norm.kind == "zscore" and p.norm.transform != "e":
        return "zscore of sqrt/log on moments (rejected by numpy)"
    for m, f in forms.items():
        g = p.index.general.get(m)
        if f != "activations" and g is not None and np.isin(g.ids, p.ids).any():
            return "own-A adapters with projected/moments input (rejected by numpy)"
    return Profile(tuple(sorted(forms.items())), p.norm, p.per_token, p.options.verify)


def scores(p: Plan, session) -> Scores:
    """Run the graph for one request (batch of 1): scores and bounds of the plan's candidates
    (per token: (T, n) each)."""
    all_ids = p.index.ids
    full = p.ids.size == all_ids.size
    pos = np.arange(all_ids.size) if full else p.index.positions(p.ids)
    feeds = {input_name(m, i.form): i.data[None] for m, i in p.inputs.items()}   # (1, T, ·)
    mask = np.ones(all_ids.size, bool) if full else np.isin(all_ids, p.ids)
    feeds[MASK] = mask[None]                                                     # (1, N)
    names = ["token_scores", "token_score_bounds"] if p.per_token else ["scores", "score_bounds"]
    S, B = session.run(names, feeds)                                             # (1, [T,] N) each
    S, B = S[0][..., pos].astype(np.float64), B[0][..., pos].astype(np.float64)
    return Scores(p.ids, S, B)
