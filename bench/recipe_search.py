"""Recipe search for adapters made to be found (issue 13 item 3), on either domain set.

    nice -n 10 python bench/recipe_search.py capture --set hard   # q/v inputs of test + calibration chunks (cached)
    python bench/recipe_search.py oracle --set hard               # what plain-like / ideal shared-A adapters could route
    python bench/recipe_search.py report --set hard               # every finished adapter set -> bench/results/recipe_search-<set>.json
    python bench/recipe_search.py curve --set hard                # weight -> accuracy, perplexity: evaluation-<set>.json

Adapter sets are the folders ``seqr_eval.train_adapters`` makes under ``<cache>/adapters/smollm2-135m/``
(``--set hard --contrast W [--variant V]``). The harness (eval/eval_lib.py) scores every sample in
float64 exactly as the core does (bench/results/research.md cross-checks it against seqr_core and
the service); ``activation`` is the service's default normalisation.
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
from seqr_eval.corpora import DOMAIN_SETS, build_corpora

sys.path.insert(0, str(Path(__file__).resolve().parent))
from research import model_signature, own_perplexity, whitened_a  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NORMS = (("activation", "adapter_module", "e"), ("frobenius", "adapter_module", "e"),
         ("zscore", "adapter_module", "e"), ("zscore", "adapter_module", "log"), ("zscore", "adapter", "log"))


def norm_label(n, g, t):
    return n if n in ("activation", "frobenius", "none") else f"{n}/{g}/{t}"


def data(domain_set: str, progress: bool = True, per_domain: int = 50):
    """(model, tok, corpora, test capture, test labels, calibration capture, hidden calib labels).
    ``per_domain``: the first n test chunks of every domain (50 = all)."""
    import torch
    from seqr_client.hf_models import load_smollm2
    torch.set_num_threads(int(os.environ.get("SEQR_TORCH_THREADS", "1")))  # 2 shared cores: 1 thread is 4x faster
    model, tok = load_smollm2(verbose=False)
    cs = build_corpora(domain_set=domain_set, progress=False)
    test, ty = L.test_split(cs)
    if per_domain < 50:
        keep = L.first_per_domain(ty, per_domain)
        test, ty = [test[i] for i in keep], ty[keep]
    cal, cy = L.calibration_split(cs)
    pre = "" if domain_set == "easy" else f"{domain_set}-"
    cc = L.captures(model, tok, cal, tag=f"{pre}calib", progress=progress)
    ct = L.captures(model, tok, test, tag=f"{pre}test{per_domain if per_domain < 50 else ''}", progress=progress)
    return model, tok, cs, ct, ty, cc, cy


# --------------------------------------------------------------------------- representation (no training)

def quadratic_oracle(ct, ty, cc, cy, *, n_domains: int, variant: str, rank: int = 8, seed: int = 2509,
                     whiten: bool = False):
    """Route with per-module quadratic forms M_d on z = A·x, scored like seqr's ``activation``
    normalisation (e / its calibration mean, mean over modules and tokens).

    ``own``: M_d = G_d, domain d's second moment of z on its calibration chunks — the direction a
    plain, lightly trained B drifts towards (a proxy for plain adapters; 94.0% vs plain 95.1% on
    the easy set). ``gen``: the generalised eigenvectors of (G_d, G_bg) weighted by their
    eigenvalues — the most distinguishable r×r Gram an adapter could have (label-fitted: a
    ceiling for what the distinguishability term can buy). ``whiten``: a data-whitened shared A
    (research.whitened_a), ``rank``: another shared-A rank — levers outside the training recipe. Returns (accuracy, per-domain, per-layer
    scores (L, S, D)) — a layer band's decision is the argmax of its layers' summed scores."""
    from seqr_core.shared_a import SharedARecipe, generate_shared_a
    rec = SharedARecipe(seed=seed)
    S = np.zeros((len(ct.layers), len(ct), n_domains))
    tok_lab = np.repeat(cy, cc.lengths)
    for lp, layer in enumerate(ct.layers):
        for kind in ("q_proj", "v_proj"):
            A = generate_shared_a(rec, module=f"model.layers.{layer}.self_attn.{kind}", rank=rank,
                                  d_in=ct.x.shape[-1]).astype(np.float64)
            if whiten:
                A = whitened_a(A, cc.x[:, lp])
            zc = np.asarray(cc.x[:, lp], np.float64) @ A.T
            zt = np.asarray(ct.x[:, lp], np.float64) @ A.T
            Gbg = zc.T @ zc / zc.shape[0] + 1e-9 * np.eye(rank)
            Li = np.linalg.inv(np.linalg.cholesky(Gbg))
            for d in range(n_domains):
                zd = zc[tok_lab == d]
                Gd = zd.T @ zd / zd.shape[0]
                if variant == "gen":
                    lam, V = np.linalg.eigh(Li @ Gd @ Li.T)
                    W = Li.T @ V
                    M = (W * lam) @ W.T
                else:
                    M = Gd
                mu = np.einsum("tr,rs,ts->", zc, M, zc) / zc.shape[0]
                et = np.einsum("tr,rs,ts->t", zt, M, zt) / mu
                S[lp, :, d] += np.add.reduceat(et, ct.offsets[:-1]) / ct.lengths
    pred = S.sum(0).argmax(1)
    return float((pred == ty).mean()), [float((pred[ty == d] == d).mean()) for d in range(n_domains)], S


def gram_features(cap, *, rank: int = 8, seed: int = 2509) -> np.ndarray:
    """(S, 60·r(r+1)/2) per sample: the token-mean second moment of z = A·x, upper triangle, every
    q/v module — everything a shared-A adapter's score can depend on (its score is linear in it)."""
    from seqr_core.shared_a import SharedARecipe, generate_shared_a
    rec = SharedARecipe(seed=seed)
    iu = np.triu_indices(rank)
    feats = []
    for lp, layer in enumerate(cap.layers):
        for kind in ("q_proj", "v_proj"):
            A = generate_shared_a(rec, module=f"model.layers.{layer}.self_attn.{kind}", rank=rank,
                                  d_in=cap.x.shape[-1]).astype(np.float64)
            z = np.asarray(cap.x[:, lp], np.float64) @ A.T
            zz = (z[:, :, None] * z[:, None, :])[:, iu[0], iu[1]]
            feats.append(np.add.reduceat(zz, cap.offsets[:-1]) / cap.lengths[:, None])
    return np.concatenate(feats, 1)


def ridge_oracle(ct, ty, cc, cy, *, n_domains: int, lams=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1)):
    """A discriminative check of the representation: one-vs-rest ridge regression on
    :func:`gram_features`, fitted on the labelled calibration chunks (30 per domain), lambda by
    5-fold cross-validation there. A linear score on these features is what a set of adapters
    computes (without the PSD / rank-r constraint), so this bounds what *training* could reach
    from below only by its small fitting set. Returns (accuracy, per-domain, chosen lambda)."""
    Xc, Xt = gram_features(cc), gram_features(ct)
    mu, sd = Xc.mean(0), Xc.std(0) + 1e-12
    Xc, Xt = (Xc - mu) / sd, (Xt - mu) / sd
    Y = np.eye(n_domains)[cy] * 2 - 1

    def fit(X, Yy, lam):
        # dual form: few samples, many features
        K = X @ X.T
        alpha = np.linalg.solve(K + lam * X.shape[1] * np.eye(len(X)), Yy)
        return X.T @ alpha

    folds = np.arange(len(cy)) % 5
    cv = {}
    for lam in lams:
        hit = 0
        for f in range(5):
            W = fit(Xc[folds != f], Y[folds != f], lam)
            hit += int(((Xc[folds == f] @ W).argmax(1) == cy[folds == f]).sum())
        cv[lam] = hit / len(cy)
    lam = max(cv, key=cv.get)
    pred = (Xt @ fit(Xc, Y, lam)).argmax(1)
    return float((pred == ty).mean()), [float((pred[ty == d] == d).mean()) for d in range(n_domains)], lam


def cmd_oracle(a):
    _, _, cs, ct, ty, cc, cy = data(a.set, progress=False, per_domain=a.per_domain)
    doms = list(cs)
    out = {"n_test": len(ct), "domains": doms}
    for v, kw in (("own", {}), ("gen", {}), ("gen-r16", {"rank": 16}), ("gen-whitened", {"whiten": True})):
        acc, per, S = quadratic_oracle(ct, ty, cc, cy, n_domains=len(doms), variant=v.split("-")[0], **kw)
        bands = {f"layers {lo}-{hi - 1}": float((S[lo:hi].sum(0).argmax(1) == ty).mean())
                 for lo, hi in ((0, 10), (10, 20), (20, 30), (10, 30), (15, 30))}
        pred = S.sum(0).argmax(1)
        out[v] = {"accuracy": acc, "per_domain": dict(zip(doms, per)), "bands": bands,
                  "confusion": L.confusion(pred, ty, len(doms)).tolist()}
        print(f"{a.set} oracle {v}: {acc:.3f}  " + " ".join(f"{d} {p:.2f}" for d, p in zip(doms, per))
              + "  | " + " ".join(f"{k}: {x:.3f}" for k, x in bands.items()), flush=True)
    acc, per, lam = ridge_oracle(ct, ty, cc, cy, n_domains=len(doms))
    out["ridge"] = {"accuracy": acc, "per_domain": dict(zip(doms, per)), "lambda": lam}
    print(f"{a.set} oracle ridge (lambda {lam:g}): {acc:.3f}  " + " ".join(f"{d} {p:.2f}" for d, p in zip(doms, per)))
    (RESULTS / f"recipe_search-{a.set}-oracle.json").write_text(json.dumps(out, indent=1))


# --------------------------------------------------------------------------- adapter sets

def adapter_root(name: str) -> Path:
    from seqr_client.hf_models import default_cache_dir
    return default_cache_dir() / "adapters" / "smollm2-135m" / name


def ready(root: Path, domains) -> dict:
    from seqr_client.training import read_seqr_json
    return {d: root / d for d in domains if (read_seqr_json(root / d) or {}).get("finished")}


def evaluate_set(name, model, tok, cs, ct, ty, cc, cy, sig, general: str | None = None,
                 ppl_per_domain: int | None = None) -> dict:
    from seqr_client.training import read_seqr_json
    doms = list(cs)
    dirs = ready(adapter_root(name), doms)
    if len(dirs) < len(doms):
        return {}
    meta = read_seqr_json(next(iter(dirs.values())))
    ad = L.load_adapter_set(dirs, sig)
    et, ec = L.energies(ct, ad), L.energies(cc, ad)
    cal = L.calibrate(ec)
    cols = np.arange(len(doms))
    out = {"set": name, "contrast": (meta.get("contrast") or {}).get("weight", 0.0),
           "contrast_recipe": meta.get("contrast"), "accuracy": {}, "per_domain": {}}
    for n, g, t in NORMS:
        S = L.scores(et, n, cal=cal, gran=g, transform=t)
        out["accuracy"][norm_label(n, g, t)] = L.accuracy(S, ty, cols)
        pred = S.argmax(1)
        out["per_domain"][norm_label(n, g, t)] = {d: float((pred[ty == k] == k).mean()) for k, d in enumerate(doms)}
        if n == "activation":
            out["confusion_activation"] = L.confusion(pred, ty, len(doms)).tolist()
    C = L.gram_cosines(ad)
    out["gram_cosine"] = float(C[~np.eye(len(doms), dtype=bool)].mean())
    pp = own_perplexity(model, tok, cs, dirs, per_domain=ppl_per_domain)
    out["ppl_chunks_per_domain"] = ppl_per_domain or min(len(c.test) for c in cs.values())
    out["oracle_ppl"] = float(np.mean([v[0] for v in pp.values()]))
    out["base_ppl"] = float(np.mean([v[1] for v in pp.values()]))
    out["oracle_ppl_per_domain"] = {d: v[0] for d, v in pp.items()}
    if general:
        g = ready(adapter_root(general), doms)
        if g:
            mixed = {**dirs, **{f"general/{d}": p for d, p in g.items()}}
            adm = L.load_adapter_set(mixed, sig)
            etm, ecm = L.energies(ct, adm), L.energies(cc, adm)
            calm = L.calibrate(ecm)
            colsm = np.array([doms.index(n.split("/")[-1]) for n in adm.names])
            out["mixed"] = {"general": sorted(g), "accuracy": {}, "per_domain": {}}
            for n, gr, t in NORMS:
                S = L.scores(etm, n, cal=calm, gran=gr, transform=t)
                out["mixed"]["accuracy"][norm_label(n, gr, t)] = L.accuracy(S, ty, colsm)
                pred = colsm[S.argmax(1)]
                out["mixed"]["per_domain"][norm_label(n, gr, t)] = {
                    d: float((pred[ty == k] == k).mean()) for k, d in enumerate(doms)}
            S = L.scores(etm, "activation", cal=calm)
            out["mixed"]["general_share_activation"] = float(np.isin(S.argmax(1), np.flatnonzero(
                ["/" in n for n in adm.names])).mean())
    return out


def cmd_report(a):
    from seqr_eval.train_adapters import general_domains_of  # noqa: F401  (documents the mixed library)
    model, tok, cs, ct, ty, cc, cy = data(a.set, progress=False, per_domain=a.per_domain)
    sig = model_signature(model)
    pre = "" if a.set == "easy" else f"{a.set}-"
    root = adapter_root("")
    names = a.sets or sorted(p.name for p in (root.iterdir() if root.is_dir() else ())
                             if p.name.startswith(f"{pre}shared_a-"))
    if not names:
        print(f"no {a.set}-set adapter folders under {root}: train them first (seqr_eval.train_adapters --set {a.set})")
        return 1
    path = RESULTS / f"recipe_search-{a.set}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    for name in names:
        r = evaluate_set(name, model, tok, cs, ct, ty, cc, cy, sig, general=f"{pre}general-r8-s40",
                         ppl_per_domain=a.ppl_per_domain)
        if r:
            old[name] = r
            print(f"{name}: activation {r['accuracy']['activation']:.3f} ppl {r['oracle_ppl']:.2f} "
                  f"gram {r['gram_cosine']:.2f}" + (f" mixed {r['mixed']['accuracy']['activation']:.3f}"
                                                    if "mixed" in r else ""), flush=True)
    path.write_text(json.dumps(old, indent=1))
    return 0


def curve_rows(harness: dict, service: dict[float, dict]) -> list[dict]:
    """One row per trained recipe (weight, schedule): the harness's numbers (recipe_search report)
    beside the service's for the same weight (bench/evaluate.py runs), plain first."""
    rows = []
    for name, r in harness.items():
        w = r.get("contrast") or 0.0
        variant = {k: v for k, v in (r.get("contrast_recipe") or {}).items() if k in ("start", "ramp", "min_layer") and v}
        row = {"set": name, "contrast": w, "schedule": variant or None,
               "activation": r["accuracy"]["activation"], "accuracy": r["accuracy"],
               "per_domain_activation": r["per_domain"]["activation"], "gram_cosine": r["gram_cosine"],
               "oracle_ppl": r["oracle_ppl"], "base_ppl": r["base_ppl"],
               "ppl_chunks_per_domain": r.get("ppl_chunks_per_domain"),
               "mixed_activation": (r.get("mixed") or {}).get("accuracy", {}).get("activation"),
               "mixed_accuracy": (r.get("mixed") or {}).get("accuracy"),
               "mixed_general_share": (r.get("mixed") or {}).get("general_share_activation")}
        ev = service.get(w) if not variant else None
        if ev:
            lib = next(iter(ev["accuracy"]))
            conf = ev["confidence"].get(f"{lib}: seqr · activation", {}).get("thresholds", [])
            row["service"] = {"activation": ev["accuracy"][lib]["seqr · activation"],
                              "seqr_equals_exact": ev["agreement"].get(f"{lib}: activation"),
                              "routed_ppl": ev["perplexity"]["mean (of domains)"]["routed (activation)"],
                              "trust_top1_at_95": conf[0] if conf else None}
        rows.append(row)
    plain = [r for r in rows if not r["contrast"]]
    for r in rows:
        r["oracle_ppl_vs_plain"] = r["oracle_ppl"] / plain[0]["oracle_ppl"] - 1 if plain else None
    return sorted(rows, key=lambda r: (r["contrast"], json.dumps(r["schedule"], sort_keys=True)))


def cmd_curve(a):
    """bench/results/evaluation-<set>.json: the curve (weight -> accuracy, perplexity), from
    recipe_search-<set>.json and the evaluation-<set>-contrast<w>.json runs of bench/evaluate.py."""
    harness = json.loads((RESULTS / f"recipe_search-{a.set}.json").read_text())
    service = {}
    for p in RESULTS.glob(f"evaluation-{a.set}-contrast*.json"):
        ev = json.loads(p.read_text())
        service[ev["recipe"]["contrast"] or 0.0] = ev
    rows = curve_rows(harness, service)
    (RESULTS / f"evaluation-{a.set}.json").write_text(json.dumps({"domain_set": a.set, "curve": rows}, indent=1))
    print("| weight | schedule | activation (harness) | through the service | mixed, activation | Gram cosine | "
          "oracle ppl | vs plain | base ppl |")
    print("|---|---|---|---|---|---|---|---|---|")
    pct = lambda x: "" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for r in rows:
        vs_plain = "" if not r["contrast"] or r["oracle_ppl_vs_plain"] is None else f"{100 * r['oracle_ppl_vs_plain']:+.1f}%"
        print(f"| {r['contrast']:g} | {r['schedule'] or 'constant'} | {pct(r['activation'])} | "
              f"{pct((r.get('service') or {}).get('activation'))} | {pct(r['mixed_activation'])} | "
              f"{r['gram_cosine']:.2f} | {r['oracle_ppl']:.2f} | {vs_plain} | {r['base_ppl']:.2f} |")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["capture", "oracle", "report", "curve"])
    ap.add_argument("--set", default="hard", choices=DOMAIN_SETS)
    ap.add_argument("--per-domain", type=int, default=50, help="test chunks per domain (50: all)")
    ap.add_argument("--sets", nargs="*", default=None, help="adapter set folders (default: every finished one)")
    ap.add_argument("--ppl-per-domain", type=int, default=None, metavar="N",
                    help="oracle and base perplexity on the first N test chunks of every domain (default: all)")
    a = ap.parse_args(argv)
    if a.cmd == "capture":
        _, _, cs, ct, ty, cc, cy = data(a.set, per_domain=a.per_domain)
        print(f"{a.set}: test {ct.x.shape} calib {cc.x.shape} domains {list(cs)}")
        return 0
    return {"oracle": cmd_oracle, "report": cmd_report, "curve": cmd_curve}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
