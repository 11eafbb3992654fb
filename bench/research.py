"""Research sweeps behind bench/results/research.md (see eval/eval_lib.py, seqr_eval.eval_lib).

    nice -n 19 python bench/research.py capture      # captures test + calibration chunks (cached)
    python bench/research.py sweep [--set NAME] [--general NAME] [--layers]
                                                     # every normalisation x aggregation, one adapter set
    python bench/research.py oracle [--ranks 8 16] [--variant gen|own] [--whiten]
                                                     # capacity of the representation (no adapters)
    python bench/research.py report [--sets A B ...] # everything -> bench/out/research.md or --out (~6 min)

Adapter sets are folders under <cache>/adapters/smollm2-135m/ (bench/train_adapters.py makes them:
``--contrast 0`` plain, ``--contrast 0.1`` the default, ``--contrast 0.5``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from seqr_eval import eval_lib as L
from seqr_eval.corpora import DOMAINS, build_corpora

N_CALIB_PER_DOMAIN = 30


def splits(cache_dir=None):
    """(test texts, test labels, calibration texts (unlabeled mix), their hidden labels)."""
    cs = build_corpora(cache_dir=cache_dir, progress=False)
    test, ty = L.test_split(cs)
    cal, cy = L.calibration_split(cs)
    return test, ty, cal, cy


def load_caps(site="attn", progress=True):
    from seqr_client.hf_models import load_smollm2
    model, tok = load_smollm2(verbose=False)
    test, ty, cal, cy = splits()
    ct = L.captures(model, tok, test, site=site, tag="test", progress=progress)
    cc = L.captures(model, tok, cal, site=site, tag="calib", progress=progress)
    return model, tok, ct, ty, cc, cy


if __name__ == "__main__" and sys.argv[1:2] == ["capture"]:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["capture"])
    ap.add_argument("--site", default="attn")
    a = ap.parse_args()
    if a.cmd == "capture":
        _, _, ct, ty, cc, cy = load_caps(a.site)
        print("test", ct.x.shape, "calib", cc.x.shape, "mean T", ct.lengths.mean())


# --------------------------------------------------------------------------- sweep

def model_signature(model):
    from seqr_core import signature_from_hf_config
    return signature_from_hf_config(model.config.to_dict(), base_model="SmolLM2-135M-Instruct")


def adapter_root(name: str) -> Path:
    from seqr_client.hf_models import default_cache_dir
    return default_cache_dir() / "adapters" / "smollm2-135m" / name


def ready_dirs(root: Path, domains=DOMAINS) -> dict:
    from seqr_client.training import read_seqr_json
    return {d: root / d for d in domains if (read_seqr_json(root / d) or {}).get("finished")}


GRID = ([("none", "adapter_module", "e"), ("frobenius", "adapter_module", "e"),
         ("activation", "adapter_module", "e")]
        + [("zscore", g, t) for g in ("adapter_module", "adapter") for t in ("e", "sqrt", "log")])


def sweep(ad, ct, ty, cc, cy, *, domains, extra=True, out=print):
    """Accuracy of every normalisation x aggregation on the captured test set."""
    lab = {d: k for k, d in enumerate(DOMAINS)}
    cols = np.array([lab[d.split("/")[-1]] for d in ad.names])
    keep = np.isin(ty, cols)
    t = L.timer()
    et, ec = L.energies(ct, ad), L.energies(cc, ad)
    cal = L.calibrate(ec)
    out(f"energies+calibration {t():.1f}s; {keep.sum()} test samples, {len(ad.names)} adapters")
    res = {}
    for norm, g, tr in GRID:
        for agg in ("mean", "vote"):
            S = L.scores(et, norm, cal=cal, gran=g, transform=tr, aggregation=agg)
            acc = L.accuracy(S[keep], ty[keep], cols)
            res[(norm, g, tr, agg)] = acc
    for tr in ("e", "log"):
        S = L.seq_module_zscores(et, ec, tr)
        res[("zscore-seq", "adapter_module", tr, "mean")] = L.accuracy(S[keep], ty[keep], cols)
        res[("zscore-seq", "adapter_module", tr, "vote")] = float("nan")
    out("| normalisation | mean | vote |\n|---|---|---|")
    for norm, g, tr in GRID + [("zscore-seq", "adapter_module", "e"), ("zscore-seq", "adapter_module", "log")]:
        lbl = norm if norm not in ("zscore", "zscore-seq") else f"{norm}/{g}/{tr}"
        if norm == "zscore-seq":
            lbl += " (research: per-module z of the sequence mean; not in the core)"
        out(f"| {lbl} | {res[(norm, g, tr, 'mean')]:.3f} | {res[(norm, g, tr, 'vote')]:.3f} |")
    return et, ec, cal, res, cols, keep


def per_layer(et, cal, ty, cols, keep, norm="zscore", tr="log", out=print):
    """Accuracy using one layer at a time (q+v) and layer bands."""
    L_ = sorted({L.module_layer(m) for m in et.modules})
    lay = np.array([L.module_layer(m) for m in et.modules])
    accs = []
    for l in L_:
        S = L.scores(et, norm, cal=cal, transform=tr, module_mask=lay == l)
        accs.append(L.accuracy(S[keep], ty[keep], cols))
    out("per-layer acc (zscore/adapter_module/log): " + " ".join(f"{l}:{a:.2f}" for l, a in zip(L_, accs)))
    for lo, hi in ((0, 10), (10, 20), (20, 30), (0, 15), (15, 30), (5, 25)):
        S = L.scores(et, norm, cal=cal, transform=tr, module_mask=(lay >= lo) & (lay < hi))
        out(f"layers [{lo},{hi}): {L.accuracy(S[keep], ty[keep], cols):.3f}")
    for kind in ("q_proj", "v_proj"):
        S = L.scores(et, norm, cal=cal, transform=tr, module_mask=np.array([m.endswith(kind) for m in et.modules]))
        out(f"only {kind}: {L.accuracy(S[keep], ty[keep], cols):.3f}")


def cmd_sweep(a):
    model, tok, ct, ty, cc, cy = load_caps(progress=False)
    sig = model_signature(model)
    root = adapter_root(a.set)
    dirs = ready_dirs(root)
    if a.general:
        g = ready_dirs(adapter_root(a.general))
        dirs.update({f"general/{d}": p for d, p in g.items()})
    print(f"## {a.set}: {list(dirs)}")
    ad = L.load_adapter_set(dirs, sig)
    et, ec, cal, res, cols, keep = sweep(ad, ct, ty, cc, cy, domains=list(dirs))
    sh = [i for i, n in enumerate(ad.names) if "/" not in n]
    C = L.gram_cosines(ad, sh)
    off = C[~np.eye(len(sh), dtype=bool)]
    print(f"Gram cosines (RᵀR, mean over modules) off-diagonal: mean {off.mean():.3f} "
          f"min {off.min():.3f} max {off.max():.3f}")
    if a.layers:
        per_layer(et, cal, ty, cols, keep)
    S = L.scores(et, "zscore", cal=cal, gran="adapter", transform="log")
    pred = cols[S.argmax(1)]
    C = L.confusion(pred[keep], ty[keep], len(DOMAINS))
    print("confusion zscore/adapter/log (rows true):\n" + "\n".join(
        f"{DOMAINS[i]:>10s} " + " ".join(f"{v:3d}" for v in row) for i, row in enumerate(C)))


if __name__ == "__main__" and sys.argv[1:2] == ["sweep"]:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("--set", default="shared_a-seed2509-r8-s40")
    ap.add_argument("--general", default=None)
    ap.add_argument("--layers", action="store_true")
    cmd_sweep(ap.parse_args())


# --------------------------------------------------------------------------- capacity (oracle)

def projected_moments(cap, A: np.ndarray, layer_pos: int, labels=None, n_labels=9):
    """Per-sample z and second moments for one module: z = x Aᵀ."""
    z = np.asarray(cap.x[:, layer_pos], dtype=np.float64) @ A.T.astype(np.float64)      # (ΣT, r)
    return z


def whitened_a(A: np.ndarray, x: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """A·Σ^{-1/2} (Σ = the calibration hidden states' covariance around 0, ridge eps·tr/d),
    rescaled to A's Frobenius norm: a data-aware shared A (research)."""
    x = np.asarray(x, np.float64)
    S = x.T @ x / x.shape[0]
    S += eps * np.trace(S) / S.shape[0] * np.eye(S.shape[0])
    w, V = np.linalg.eigh(S)
    Aw = A.astype(np.float64) @ (V / np.sqrt(w)) @ V.T
    return Aw * (np.linalg.norm(A) / np.linalg.norm(Aw))


def oracle(ct, ty, cc, cy, *, rank=8, seed=2509, kinds=("q_proj", "v_proj"), top=None, out=print,
           layers=None, variant="gen", whiten=False):
    """Best-case routing from shared-A quadratic forms: M_d from domain d's own calibration
    chunks against the unlabeled mix (generalised eigenvectors), scored like seqr with
    'activation' normalisation (e / calibration mean). An upper-bound-style capacity check of the
    representation (site, rank, modules), not an adapter."""
    from seqr_core.shared_a import SharedARecipe, generate_shared_a
    rec = SharedARecipe(seed=seed)
    layers = layers or ct.layers
    nd = len(DOMAINS)
    S_act = np.zeros((len(ct), nd))
    S_log = np.zeros((len(ct), nd))
    nmod = 0
    for lp, l in enumerate(ct.layers):
        if l not in layers:
            continue
        for kind in kinds:
            m = f"model.layers.{l}.self_attn.{kind}" if ct.site == "attn" else f"model.layers.{l}.mlp.{kind}"
            A = generate_shared_a(rec, module=m, rank=rank, d_in=ct.x.shape[-1])
            if whiten:
                A = whitened_a(A, cc.x[:, lp])
            zc = projected_moments(cc, A, lp)
            zt = projected_moments(ct, A, lp)
            tok_lab = np.repeat(cy, cc.lengths)
            Gbg = zc.T @ zc / zc.shape[0] + 1e-9 * np.eye(rank)
            et = np.zeros((zt.shape[0], nd))
            ec = np.zeros((zc.shape[0], nd))
            for d in range(nd):
                zd = zc[tok_lab == d]
                Gd = zd.T @ zd / zd.shape[0]
                if variant == "gen":
                    Lc = np.linalg.cholesky(Gbg)               # Gd w = λ Gbg w via whitening
                    Li = np.linalg.inv(Lc)
                    lam, V = np.linalg.eigh(Li @ Gd @ Li.T)    # ascending
                    W = Li.T @ V
                    k = top or rank
                    W, lam = W[:, -k:], lam[-k:]
                    M = (W * lam) @ W.T
                else:                                          # "own": M = G_d (what plain LM drift gives)
                    M = Gd
                et[:, d] = np.einsum("tr,rs,ts->t", zt, M, zt)
                ec[:, d] = np.einsum("tr,rs,ts->t", zc, M, zc)
            mu = ec.mean(0)
            S_act += np.add.reduceat(et / mu, ct.offsets[:-1], axis=0) / ct.lengths[:, None]
            lc = np.log(ec + 1e-12)
            seq_c = np.add.reduceat(lc, cc.offsets[:-1], axis=0) / cc.lengths[:, None]
            S_log += (np.add.reduceat(np.log(et + 1e-12), ct.offsets[:-1], axis=0) / ct.lengths[:, None]
                      - seq_c.mean(0)) / seq_c.std(0)
            nmod += 1
    a1 = float((S_act.argmax(1) == ty).mean())
    a2 = float((S_log.argmax(1) == ty).mean())
    out(f"oracle site={ct.site} r={rank} kinds={kinds} top={top} variant={variant} whiten={whiten} modules={nmod}: "
        f"activation {a1:.3f}  zscore-log(per module) {a2:.3f}")
    return a1, a2


def cmd_oracle(a):
    _, _, ct, ty, cc, cy = load_caps(a.site, progress=False)
    kinds = ("q_proj", "v_proj") if a.site == "attn" else ("up_proj",)
    for r in a.ranks:
        for top in a.tops:
            oracle(ct, ty, cc, cy, rank=r, kinds=kinds, top=top, variant=a.variant, whiten=a.whiten)


if __name__ == "__main__" and sys.argv[1:2] == ["oracle"]:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("--site", default="attn")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8])
    ap.add_argument("--tops", type=int, nargs="+", default=[8])
    ap.add_argument("--variant", default="gen")
    ap.add_argument("--whiten", action="store_true")
    cmd_oracle(ap.parse_args())


# --------------------------------------------------------------------------- prompt length, core check

def truncated(en: L.Energies, n_tok: int) -> L.Energies:
    """The same energies, keeping only the first ``n_tok`` tokens of every sample."""
    keep = np.concatenate([np.arange(s, min(e, s + n_tok)) for s, e in zip(en.offsets[:-1], en.offsets[1:])])
    lens = np.minimum(np.diff(en.offsets), n_tok)
    return L.Energies(e=en.e[keep], offsets=np.concatenate([[0], np.cumsum(lens)]), modules=en.modules,
                      names=en.names, frob2=en.frob2)


def core_check(ad_dirs, sig, ct, cc, *, samples, norms, shared_seed=2509, rank=8):
    """Route ``samples`` through seqr_core.route (calibrated in-process with seqr_core.Calibrator);
    returns {norm: [top-1 names]} for seqr and exact."""
    from seqr_core import (Calibrator, LibraryIndex, ModuleInput, Normalisation, RouteOptions,
                           SharedARecipe, generate_shared_a, parse_peft_adapter, route)
    from seqr_eval import pipeline as P
    mods = [m for m in sig.names if m.endswith(("q_proj", "v_proj"))]
    rec = SharedARecipe(seed=shared_seed)
    A = {m: generate_shared_a(rec, module=m, rank=rank, d_in=sig.spec(m).d_in) for m in mods}
    idx = LibraryIndex.create(name="x", signature=sig, shared_a=A)
    for i, (n, d) in enumerate(ad_dirs.items()):
        d = Path(d)
        files = {f: (d / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
        p = parse_peft_adapter(files, name=n.replace("/", "-"), signature=sig)
        idx, _ = idx.add_adapter(p.adapter, adapter_id=i + 1, upload_dtype=p.upload_dtype)
    cal = Calibrator(idx)
    for k in range(len(cc)):
        x = P.layer_inputs(cc.sample(k), cc.layers, mods)
        cal.update({m: ModuleInput("activations", v.astype(np.float32), v.shape[0]) for m, v in x.items()})
    idx = idx.with_calibration(cal.finish())
    out = {}
    for nm in norms:
        parts = nm.split("/")
        norm = Normalisation(parts[0], *(parts[1:] if len(parts) > 1 else []))
        for method in ("seqr", "exact"):
            names = []
            for k in samples:
                x = P.layer_inputs(ct.sample(k), ct.layers, mods)
                dcs = route(idx, {m: ModuleInput("activations", v.astype(np.float32), v.shape[0]) for m, v in x.items()},
                            RouteOptions(method=method, normalisation=norm))
                names.append(dcs.choices[0].name)
            out[(method, nm)] = names
    return out


# --------------------------------------------------------------------------- report

def own_perplexity(model, tok, cs, dirs, *, per_domain: int | None = None):
    """{domain: (oracle ppl, base ppl)} of the test chunks (first 256 tokens; the first
    ``per_domain`` of every domain, None: all), NLLs cached."""
    from seqr_client.hf_host import load_adapters
    from seqr_eval import pipeline as P
    texts, y = L.test_split(cs)
    keep = L.first_per_domain(y, per_domain)
    texts, y = [texts[i] for i in keep], y[keep]
    doms = list(cs)
    labels = [doms[k] for k in y]
    cache = P.NLLCache(L.default_cache_dir() / "eval" / "nll-cache.json")
    pm = load_adapters(model, dict(dirs))
    try:
        own = P.perplexities(pm, tok, texts, labels, dirs, cache, max_length=256)
        base = P.perplexities(pm, tok, texts, [None] * len(texts), dirs, cache, max_length=256)
    finally:
        pm.unload()
    ppl = lambda v, ks: float(np.exp(sum(v[k][0] for k in ks) / sum(v[k][1] for k in ks)))  # noqa: E731
    return {d: (ppl(own, [k for k, l in enumerate(labels) if l == d]),
                ppl(base, [k for k, l in enumerate(labels) if l == d])) for d in doms}


def oracle_perplexity(model, tok, dirs):
    """{domain: perplexity of its test chunks with its own adapter}, {domain: base perplexity}
    (NLLs cached beside the evaluation's)."""
    pp = own_perplexity(model, tok, build_corpora(progress=False), dirs)
    return {d: pp[d][0] for d in DOMAINS}, {d: pp[d][1] for d in DOMAINS}


def cmd_report(a):
    """Run every analysis on the finished adapter sets and write ``a.out`` (research.md)."""
    from seqr_client.training import read_seqr_json
    t_all = L.timer()
    model, tok, ct, ty, cc, cy = load_caps(progress=False)
    sig = model_signature(model)
    lines = ["# Research: what moves SEQR's routing accuracy (SmolLM2-135M, 9 domains)", "",
             "Generated by `python bench/research.py report` (eval/eval_lib.py harness: q/v inputs "
             "captured once on the first 128 tokens of each of the 450 test chunks and 270 unlabeled "
             "calibration chunks, every variant scored in-process in float64). Top-1 over the 9 domains, "
             "chance 11.1%. The service-level numbers are in evaluation.md; the harness reproduces the "
             "core's decisions (cross-check at the end).", ""]
    out = lines.append
    intro_len = len(lines)
    sets = [s for s in a.sets if ready_dirs(adapter_root(s))]
    results = {}
    summary = {}
    for s in sets:
        dirs = ready_dirs(adapter_root(s))
        if len(dirs) < 9:
            out(f"(set {s}: only {len(dirs)} of 9 adapters ready — skipped)")
            continue
        ad = L.load_adapter_set(dirs, sig)
        out(f"## Adapter set `{s}`")
        metas = [read_seqr_json(p) for p in dirs.values()]
        k = 8
        lm0 = np.mean([np.mean(m["losses"][:k]) for m in metas])
        lm1 = np.mean([np.mean(m["losses"][-k:]) for m in metas])
        out("")
        out(f"Training: {metas[0]['steps']} steps, lr {metas[0]['lr']}, r={metas[0]['rank']}, "
            f"{'+'.join(metas[0]['target_modules'])}; contrast {metas[0].get('contrast')}; "
            f"mean LM loss over the 9 adapters, first/last {k} steps: {lm0:.3f} -> {lm1:.3f}.")
        out("")
        ppl, base = oracle_perplexity(model, tok, dirs)
        out(f"Task quality: perplexity of the 450 test chunks (first 256 tokens) with each domain's own adapter "
            f"(oracle), mean of domains **{np.mean(list(ppl.values())):.2f}** (base model {np.mean(list(base.values())):.2f}); "
            + ", ".join(f"{d} {v:.2f}" for d, v in ppl.items()) + ".")
        out("")
        et, ec, cal, res, cols, keep = sweep(ad, ct, ty, cc, cy, domains=list(dirs), out=out)
        results[s] = (ad, et, ec, cal, res)
        C = L.gram_cosines(ad)
        off = C[~np.eye(len(ad.names), dtype=bool)]
        summary[s] = {"contrast": metas[0].get("contrast", {}).get("weight", 0) if metas[0].get("contrast") else 0,
                      "none": res[("none", "adapter_module", "e", "mean")],
                      "frobenius": res[("frobenius", "adapter_module", "e", "mean")],
                      "activation": res[("activation", "adapter_module", "e", "mean")],
                      "z_am_e": res[("zscore", "adapter_module", "e", "mean")],
                      "z_am_log": res[("zscore", "adapter_module", "log", "mean")],
                      "z_a_log": res[("zscore", "adapter", "log", "mean")],
                      "vote": res[("activation", "adapter_module", "e", "vote")],
                      "gram": float(off.mean()), "ppl": float(np.mean(list(ppl.values()))),
                      "base_ppl": float(np.mean(list(base.values())))}
        out("")
        out(f"Gram cosines cos(RᵢᵀRᵢ, RⱼᵀRⱼ), mean over the 60 modules, off-diagonal: mean {off.mean():.3f}, "
            f"min {off.min():.3f}, max {off.max():.3f}.")
        seq = ec.seq_mean()
        r_own = []
        for i in range(len(ad.names)):
            own = seq[cy == i, :, i].mean(0)
            bg = seq[:, :, i].mean(0)
            r_own.append(np.exp(np.log(own / bg).mean()))
        out(f"Own-domain energy over background energy (geometric mean over modules, calibration chunks): "
            + ", ".join(f"{n} {r:.2f}" for n, r in zip(ad.names, r_own)) + ".")
        out("")
        out("Layers (zscore/adapter_module/log, mean aggregation):")
        out("")
        per_layer(et, cal, ty, cols, keep, out=lambda x: out(f"- {x}"))
        out("")
        out("Prompt length (first n tokens of each test chunk; calibration unchanged):")
        out("")
        out("| tokens | frobenius | activation | zscore/adapter_module/log | zscore/adapter/log |")
        out("|---|---|---|---|---|")
        for n_tok in (8, 16, 32, 64, 128):
            e2 = truncated(et, n_tok)
            row = [L.accuracy(L.scores(e2, nm, cal=cal, gran=g, transform=t)[keep], ty[keep], cols)
                   for nm, g, t in (("frobenius", "adapter_module", "e"), ("activation", "adapter_module", "e"),
                                    ("zscore", "adapter_module", "log"), ("zscore", "adapter", "log"))]
            out(f"| {n_tok} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
        S = L.scores(et, "zscore", cal=cal, gran="adapter_module", transform="log")
        Cm = L.confusion(cols[S.argmax(1)][keep], ty[keep], len(DOMAINS))
        out("")
        out("Confusion, zscore/adapter_module/log (rows: true domain):")
        out("")
        out("| | " + " | ".join(DOMAINS) + " |")
        out("|---|" + "---|" * len(DOMAINS))
        for d, row in zip(DOMAINS, Cm):
            out(f"| {d} | " + " | ".join(str(x) for x in row) + " |")
        out("")
        if a.general:
            g = ready_dirs(adapter_root(a.general), ("python", "legal", "scripture"))
            if len(g) == 3:
                mixed = dict(dirs)
                mixed.update({f"general/{d}": p for d, p in g.items()})
                adm = L.load_adapter_set(mixed, sig)
                out(f"Mixed library (these 9 + 3 general adapters `{a.general}`; a general adapter counts for its domain):")
                out("")
                etm, ecm, calm, resm, colsm, keepm = sweep(adm, ct, ty, cc, cy, domains=list(mixed), out=out)
                S = L.scores(etm, "zscore", cal=calm, transform="log")
                share = np.isin(S.argmax(1), [i for i, n in enumerate(adm.names) if "/" in n]).mean()
                summary[s]["mixed_activation"] = resm[("activation", "adapter_module", "e", "mean")]
                summary[s]["mixed_z_am_e"] = resm[("zscore", "adapter_module", "e", "mean")]
                summary[s]["mixed_frobenius"] = resm[("frobenius", "adapter_module", "e", "mean")]
                out("")
                out(f"General adapters win {share:.1%} of samples under zscore/adapter_module/log "
                    f"(frobenius: {np.isin(L.scores(etm, 'frobenius').argmax(1), [i for i, n in enumerate(adm.names) if '/' in n]).mean():.1%}).")
                out("")
    if summary:
        body = lines[intro_len:]
        del lines[intro_len:]
        if a.findings and Path(a.findings).is_file():
            lines.extend(Path(a.findings).read_text().rstrip("\n").split("\n") + [""])
        out("## Summary across training recipes (top-1 over 450 test chunks; harness = the service's numbers)")
        out("")
        out("| adapter set | contrast weight | none | frobenius (data-free) | activation | **zscore/adapter_module/e** "
            "| zscore/adapter_module/log | zscore/adapter/log | activation, per-token vote | mixed12 zscore/adapter_module/e "
            "| mixed12 activation | mixed12 frobenius | Gram cosine | oracle perplexity (base) |")
        out("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        nan = float("nan")
        for s, v in summary.items():
            out(f"| `{s}` | {v['contrast']} | {v['none']:.1%} | {v['frobenius']:.1%} | {v['activation']:.1%} | "
                f"**{v['z_am_e']:.1%}** | {v['z_am_log']:.1%} | {v['z_a_log']:.1%} | {v['vote']:.1%} | "
                f"{v.get('mixed_z_am_e', nan):.1%} | {v.get('mixed_activation', nan):.1%} | "
                f"{v.get('mixed_frobenius', nan):.1%} | {v['gram']:.2f} | {v['ppl']:.2f} ({v['base_ppl']:.2f}) |")
        out("")
        lines.extend(body)
    out("## Capacity of the representation (no adapter: quadratic forms fitted on labelled calibration chunks)")
    out("")
    out("For every module, M_d = the top generalised eigenvectors of (G_d, G_bg) — the second moment of z = A·x on "
        "domain d's 30 calibration chunks against the unlabeled mix — or simply M_d = G_d; scored as seqr scores "
        "an adapter with Gram RᵀR = M_d. This estimates what shared-A adapters on these modules could reach as routers "
        "(whiten=True: a data-whitened shared A, A·Σ^{-1/2} rescaled). Calibrated adapters of every recipe "
        "above already reach it on these domains.")
    out("")
    for r, variant, wh in ((8, "own", False), (8, "gen", False), (16, "gen", False), (8, "gen", True)):
        oracle(ct, ty, cc, cy, rank=r, variant=variant, whiten=wh, out=lambda x: out(f"- {x}"))
    if results:
        s0 = sets[0]
        dirs = ready_dirs(adapter_root(s0))
        out("")
        out("## Cross-check against seqr_core.route")
        out("")
        ks = list(range(0, len(ct), 10))
        norms = ("frobenius", "zscore/adapter_module/log", "zscore/adapter/log")
        got = core_check(dirs, sig, ct, cc, samples=ks, norms=norms)
        ad, et, ec, cal, _ = results[s0]
        lab = {d: k for k, d in enumerate(DOMAINS)}
        for nm in norms:
            p = nm.split("/")
            S = L.scores(et, p[0], cal=cal, gran=p[1] if len(p) > 1 else "adapter_module",
                         transform=p[2] if len(p) > 2 else "e")
            harness = [ad.names[i] for i in S[ks].argmax(1)]
            same = np.mean([x == y for x, y in zip(harness, got[("seqr", nm)])])
            se = np.mean([x == y for x, y in zip(got[("seqr", nm)], got[("exact", nm)])])
            out(f"- `{s0}`, {nm}, {len(ks)} samples: harness == seqr_core {same:.0%}; core seqr == exact {se:.0%}")
    out("")
    out(f"(report generated in {t_all():.0f}s)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__" and sys.argv[1:2] == ["report"]:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("--sets", nargs="+", default=["shared_a-seed2509-r8-s40"])
    ap.add_argument("--general", default="general-r8-s40")
    ap.add_argument("--findings", default=str(Path(__file__).resolve().parent / "results" / "research_findings.md"),
                    help="hand-written findings inserted at the top")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "research.md"),
                    help="where to write the report (bench/results/research.md refreshes the committed one)")
    cmd_report(ap.parse_args())


if __name__ == "__main__" and sys.argv[1:2] not in (["capture"], ["sweep"], ["oracle"], ["report"]):
    print(__doc__)
    sys.exit(0 if sys.argv[1:2] in ([], ["-h"], ["--help"]) else 2)
