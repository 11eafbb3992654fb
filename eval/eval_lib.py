"""Research harness for the real-model evaluation: capture once, score every variant in-process.

Capturing is the slow part (one SmolLM2 forward per chunk); everything after it is numpy on
cached arrays, so a method x normalisation x aggregation sweep takes seconds:

* :func:`captures` — the inputs of every layer's attention projections (q/k/v read the same
  post-norm hidden state) for a list of texts, first ``max_tokens`` tokens, cached as fp16 under
  ``<cache>/eval/captures/`` (outside git). Optional ``site="mlp"``: the input of gate/up_proj.
* :class:`Energies` / :func:`energies` — e[t, m, i] = ‖ΔW_im x_t‖² for every token t, module m and
  adapter i (float64 accumulation of the same quantity seqr_core scores).
* :func:`scores` — sequence scores under one normalisation/aggregation; :func:`accuracy`.
* :func:`core_decisions` — the same samples through ``seqr_core.route`` (to prove the
  harness and the core agree, and seqr == exact).

Nothing here is imported by the service; ``bench/evaluate.py`` and ``bench/research.py`` use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from seqr_client.hf_models import default_cache_dir

CAPTURE_VERSION = 1
SITES = {"attn": "q_proj", "mlp": "up_proj"}   # a module whose input is the site's hidden state
LOG_FLOOR = 1e-8                                # as seqr_core.calibration


# --------------------------------------------------------------------------- data

N_CALIB_PER_DOMAIN = 30
CALIB_SEED = 7


def calibration_split(corpora, *, n_per_domain: int = N_CALIB_PER_DOMAIN, seed: int = CALIB_SEED):
    """The library's unlabeled traffic: ``n_per_domain`` train chunks of every domain, shuffled
    into one stream (labels returned only for analysis). Test chunks are never in it."""
    rng = np.random.Generator(np.random.PCG64(seed))
    texts, labels = [], []
    for k, (d, c) in enumerate(corpora.items()):
        pick = sorted(rng.choice(len(c.train), min(n_per_domain, len(c.train)), replace=False))
        texts += [c.train[i] for i in pick]
        labels += [k] * len(pick)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], np.array(labels, np.int64)[order]


def calibration_texts(corpora, **kw) -> list[str]:
    return calibration_split(corpora, **kw)[0]


def test_split(corpora):
    """(texts, labels) of every domain's test chunks, domain order."""
    texts, labels = [], []
    for k, (d, c) in enumerate(corpora.items()):
        texts += c.test
        labels += [k] * len(c.test)
    return texts, np.array(labels, np.int64)


def first_per_domain(labels: np.ndarray, n: int | None) -> np.ndarray:
    """Indices of the first ``n`` samples of every label, in label order (``None``: all, in order).
    The cheap subsets of an evaluation (perplexity on a few chunks per domain) are these, so a
    subset's numbers are comparable across recipes and reuse one another's cached NLLs."""
    labels = np.asarray(labels)
    if n is None:
        return np.arange(len(labels))
    return np.concatenate([np.flatnonzero(labels == k)[:n] for k in np.unique(labels)]).astype(np.int64)


# --------------------------------------------------------------------------- capture

@dataclass
class Capture:
    """Captured inputs of a list of texts: x[offsets[k]:offsets[k+1]] are text k's tokens.

    ``x``: (ΣT, L, d) float16, one hidden state per layer (the input of every module at ``site``).
    ``layers``: the layer indices; ``ids`` the token ids (ΣT,) for perplexity bookkeeping.
    """

    x: np.ndarray
    offsets: np.ndarray
    layers: tuple[int, ...]
    site: str

    def __len__(self) -> int:
        return self.offsets.size - 1

    def sample(self, k: int) -> np.ndarray:
        return self.x[self.offsets[k]:self.offsets[k + 1]]          # (T, L, d)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _key(texts: Sequence[str], **params) -> str:
    h = hashlib.sha256(json.dumps({"v": CAPTURE_VERSION, **params}, sort_keys=True).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:16]


def captures(model, tok, texts: Sequence[str], *, max_tokens: int = 128, site: str = "attn",
             cache_dir=None, tag: str = "", progress: bool = True) -> Capture:
    """The site's input for every layer on every text (cached; the model's fingerprint is in the key)."""
    from tqdm import tqdm

    from seqr_client.hf_host import capture_inputs
    from seqr_client.training import base_fingerprint

    key = _key(texts, max_tokens=max_tokens, site=site, base=base_fingerprint(model))
    root = default_cache_dir(cache_dir) / "eval" / "captures"
    path = root / f"{tag}{'-' if tag else ''}{site}-{key}"
    if (path / "done").is_file():
        meta = json.loads((path / "meta.json").read_text())
        return Capture(x=np.load(path / "x.npy", mmap_mode="r"), offsets=np.load(path / "offsets.npy"),
                       layers=tuple(meta["layers"]), site=site)
    mod = SITES[site]
    xs, offs = [], [0]
    layers = None
    for t in tqdm(texts, desc=f"capture {tag or site}", disable=not progress):
        got = capture_inputs(model, t, modules=(mod,), tokenizer=tok, max_length=max_tokens)
        if layers is None:
            layers = tuple(int(n.split(".")[2]) for n in got)
        x = np.stack(list(got.values()), axis=1).astype(np.float16)          # (T, L, d)
        xs.append(x)
        offs.append(offs[-1] + x.shape[0])
    x = np.concatenate(xs, 0)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "x.npy", x)
    np.save(path / "offsets.npy", np.array(offs, np.int64))
    (path / "meta.json").write_text(json.dumps({"layers": layers, "n": len(texts), "site": site,
                                                "max_tokens": max_tokens}))
    (path / "done").write_text("ok")
    return Capture(x=x, offsets=np.array(offs, np.int64), layers=layers, site=site)


# --------------------------------------------------------------------------- adapters

@dataclass
class AdapterSet:
    """Factors of a set of PEFT adapters on the captured modules, as seqr_core parses them.

    ``factors[i][m] = (A (r, d) f64, sB (o, r) f64)``; modules are canonical names.
    """

    names: list[str]
    modules: list[str]
    factors: list[dict]
    kinds: list[str]

    def R(self, i: int, m: str) -> np.ndarray:
        A, sB = self.factors[i][m]
        return np.linalg.qr(sB, mode="r")


def load_adapter_set(dirs: Mapping[str, os.PathLike], signature) -> AdapterSet:
    from seqr_core import parse_peft_adapter

    names, factors, kinds, mods = [], [], [], None
    for name, d in dirs.items():
        d = Path(d)
        files = {f: (d / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
        ad = parse_peft_adapter(files, name=name.replace("/", "-"), signature=signature).adapter
        fac = {m: (f.A.astype(np.float64), float(f.scale) * f.B.astype(np.float64))
               for m, f in ad.factors.items()}
        meta = json.loads((d / "seqr.json").read_text()) if (d / "seqr.json").is_file() else {}
        names.append(name)
        factors.append(fac)
        kinds.append(meta.get("kind", "?"))
        mods = sorted(fac) if mods is None else mods
    return AdapterSet(names=names, modules=mods, factors=factors, kinds=kinds)


def module_layer(m: str) -> int:
    return int(m.split(".")[2])


# --------------------------------------------------------------------------- energies

@dataclass
class Energies:
    """e (ΣT, M, N) float32: ‖ΔW x‖² per token, module, adapter; offsets as the Capture."""

    e: np.ndarray
    offsets: np.ndarray
    modules: list[str]
    names: list[str]
    frob2: np.ndarray      # (M, N) ‖ΔW‖_F²

    def seq_mean(self, f=None) -> np.ndarray:
        """(S, M, N) token mean of f(e) per sample."""
        e = self.e if f is None else f(self.e)
        return np.add.reduceat(e, self.offsets[:-1], axis=0) / np.diff(self.offsets)[:, None, None]


def energies(cap: Capture, ad: AdapterSet, *, chunk: int = 4096) -> Energies:
    """e[t, m, i] = ‖sB_i A_i x_t‖² computed as ‖R_i (A_i x_t)‖² in float64 blocks."""
    layer_pos = {l: k for k, l in enumerate(cap.layers)}
    M, N = len(ad.modules), len(ad.names)
    out = np.zeros((cap.x.shape[0], M, N), np.float32)
    frob2 = np.zeros((M, N))
    for j, m in enumerate(ad.modules):
        RA = np.stack([ad.R(i, m) @ ad.factors[i][m][0] for i in range(N)])   # (N, r, d)
        frob2[j] = np.einsum("nrd,nrd->n", RA, RA)
        W = RA.reshape(-1, RA.shape[-1]).T                                     # (d, N·r)
        lp = layer_pos[module_layer(m)]
        for s in range(0, cap.x.shape[0], chunk):
            x = np.asarray(cap.x[s:s + chunk, lp], dtype=np.float64)           # (t, d)
            y = (x @ W).reshape(x.shape[0], N, -1)                             # (t, N, r)
            out[s:s + chunk, j] = np.einsum("tnr,tnr->tn", y, y)
    return Energies(e=out, offsets=cap.offsets, modules=list(ad.modules), names=list(ad.names),
                    frob2=frob2)


# --------------------------------------------------------------------------- scoring variants

def _tf(e, t, floor):
    if t == "e":
        return e
    if t == "sqrt":
        return np.sqrt(np.maximum(e, 0))
    return np.log(np.maximum(e, 0) + floor)


@dataclass
class Calib:
    """Calibration moments fitted on unlabeled traffic (as seqr_core.Calibrator)."""

    mod_mean: dict      # transform -> (M, N) mean over tokens of f(e)
    mod_std: dict
    seq_mean: dict      # transform -> (N,) mean over sequences of Σ_m mean_t f(e)
    seq_std: dict
    tok_mean: dict      # per token Σ_m f(e)
    tok_std: dict


def calibrate(en: Energies) -> Calib:
    floor = LOG_FLOOR * en.frob2[None] + 1e-30
    cm, cs, sm, ss, tm, ts = {}, {}, {}, {}, {}, {}
    for t in ("e", "sqrt", "log"):
        fe = _tf(en.e.astype(np.float64), t, floor)                             # (ΣT, M, N)
        cm[t], cs[t] = fe.mean(0), fe.std(0, ddof=1)
        v = (np.add.reduceat(fe, en.offsets[:-1], axis=0) / np.diff(en.offsets)[:, None, None]).sum(1)
        sm[t], ss[t] = v.mean(0), v.std(0, ddof=1)
        tk = fe.sum(1)
        tm[t], ts[t] = tk.mean(0), tk.std(0, ddof=1)
    return Calib(cm, cs, sm, ss, tm, ts)


def scores(en: Energies, norm: str = "frobenius", *, cal: Calib | None = None,
           gran: str = "adapter_module", transform: str = "e", aggregation: str = "mean",
           module_mask: np.ndarray | None = None) -> np.ndarray:
    """(S, N) sequence scores as seqr_core.route computes them (mean over modules), or
    per-token vote fractions (``aggregation="vote"``). ``module_mask`` (M,) bool restricts modules
    (adapter-level z-scores then need calibration on the same subset — the caller's business)."""
    floor = LOG_FLOOR * en.frob2[None] + 1e-30
    mask = np.ones(len(en.modules), bool) if module_mask is None else module_mask
    t = transform if norm == "zscore" else "e"
    fe = _tf(en.e.astype(np.float64)[:, mask], t, floor[:, mask])              # (ΣT, M', N)
    if norm == "frobenius":
        u = fe / en.frob2[mask][None]
    elif norm == "activation":
        u = fe / cal.mod_mean["e"][mask][None]
    elif norm == "zscore" and gran == "adapter_module":
        u = (fe - cal.mod_mean[t][mask][None]) / cal.mod_std[t][mask][None]
    else:
        u = fe
    if norm == "zscore" and gran == "adapter":
        if aggregation == "vote":
            tok = (u.sum(1) - cal.tok_mean[t]) / cal.tok_std[t]                 # (ΣT, N)
        else:
            v = (np.add.reduceat(u, en.offsets[:-1], axis=0) / np.diff(en.offsets)[:, None, None]).sum(1)
            return (v - cal.seq_mean[t]) / cal.seq_std[t]
    else:
        tok = u.mean(1)                                                         # (ΣT, N)
    if aggregation == "vote":
        win = tok.argmax(1)
        onehot = np.zeros_like(tok)
        onehot[np.arange(tok.shape[0]), win] = 1
        return np.add.reduceat(onehot, en.offsets[:-1], axis=0) / np.diff(en.offsets)[:, None]
    return np.add.reduceat(tok, en.offsets[:-1], axis=0) / np.diff(en.offsets)[:, None]


def accuracy(S: np.ndarray, labels: np.ndarray, cols: np.ndarray | None = None) -> float:
    """Top-1 accuracy; ``cols`` maps score columns to label ids (default: identity)."""
    pred = S.argmax(1)
    if cols is not None:
        pred = cols[pred]
    return float((pred == labels).mean())


def confusion(pred: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    c = np.zeros((n, n), np.int64)
    np.add.at(c, (labels, pred), 1)
    return c


def gram_cosines(ad: AdapterSet, idx: Sequence[int] | None = None) -> np.ndarray:
    """Mean over modules of cos(RᵢᵀRᵢ, RⱼᵀRⱼ) (Frobenius inner product), (N, N)."""
    idx = list(range(len(ad.names))) if idx is None else list(idx)
    acc = np.zeros((len(idx), len(idx)))
    for m in ad.modules:
        G = np.stack([(lambda R: (R.T @ R).ravel())(ad.R(i, m)) for i in idx])
        G /= np.linalg.norm(G, axis=1, keepdims=True)
        acc += G @ G.T
    return acc / len(ad.modules)


def timer():
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def seq_module_zscores(en: Energies, cal_en: Energies, transform: str = "log") -> np.ndarray:
    """Variant not in the core (research only): z-score per (adapter, module) of the *sequence*
    mean of f(e), with mean/std over calibration sequences; then mean over modules. (S, N)."""
    fl = LOG_FLOOR * en.frob2[None] + 1e-30
    s_t = (np.add.reduceat(_tf(en.e.astype(np.float64), transform, fl), en.offsets[:-1], axis=0)
           / np.diff(en.offsets)[:, None, None])
    s_c = (np.add.reduceat(_tf(cal_en.e.astype(np.float64), transform, fl), cal_en.offsets[:-1], axis=0)
           / np.diff(cal_en.offsets)[:, None, None])
    return ((s_t - s_c.mean(0)) / s_c.std(0, ddof=1)).mean(1)
