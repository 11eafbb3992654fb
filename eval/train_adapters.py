"""Train (or reuse) the evaluation's adapters on SmolLM2-135M-Instruct.

* 9 SEQR adapters, one per domain of ``seqr_eval.corpora``, all with ONE shared frozen A per
  module (recipe seed ``--shared-a-seed``), only B trained;
* 3 general (ordinary LoRA) adapters for python, legal and scripture.

``--set hard`` does the same for the 8 close domains of ``seqr_eval.corpora_hard`` (4 general:
man-fr, man-api, info, news), in folders prefixed ``hard-``.

Default recipe: r=8, alpha 16, q_proj+v_proj, 40 steps, batch 8, 128 tokens; the shared-A adapters
add the distinguishability term (``seqr_client.training.Contrast``, weight ``DEFAULT_CONTRAST`` =
0.1) against the library's background moments — E[z zᵀ] per module over its unlabeled calibration
traffic — which costs +0.9% oracle perplexity and makes the adapters routable in mixed libraries
and far better before calibration (bench/results/research.md). ``--contrast 0``: plain LM loss.
Every adapter is
cached under ``<cache>/adapters/`` and reused when its recipe hash matches, so an interrupted run
resumes where it stopped. About 3 minutes per adapter on 2 CPU cores; run it under
``nice -n 19`` on a shared machine::

    nice -n 19 python -m seqr_eval.train_adapters        # all 12 (or ./dev bench train_adapters)
    python -m seqr_eval.train_adapters --list            # where they are / which are done
    OMP_NUM_THREADS=1 nice -n 10 python -m seqr_eval.train_adapters --set hard --contrast 0   # busy 2-core hosts

The bench scripts and ``seqr demo`` import :func:`adapter_dirs` / :func:`train_all`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from seqr_client.hf_models import default_cache_dir, load_smollm2  # noqa: E402
from seqr_client.training import (DEFAULT_CONTRAST_WEIGHT, DEFAULT_LR, Contrast,  # noqa: E402
                                  background_moments, read_seqr_json, train_lora)
from seqr_core.shared_a import SharedARecipe  # noqa: E402

from .corpora import DOMAIN_SETS, DOMAINS, build_corpora, set_domains  # noqa: E402

DEFAULT_SHARED_A_SEED = 2509
GENERAL_DOMAINS = ("python", "legal", "scripture")


def general_domains_of(domain_set: str = "easy") -> tuple[str, ...]:
    """Domains that also get an ordinary LoRA in the set's mixed library."""
    if domain_set == "hard":
        from .corpora_hard import HARD_GENERAL
        return HARD_GENERAL
    return GENERAL_DOMAINS
RECIPE = dict(rank=8, alpha=16, target_modules=("q_proj", "v_proj"), steps=40, batch_size=8,
              seq_len=128, lr=DEFAULT_LR, seed=0)
DEFAULT_CONTRAST = DEFAULT_CONTRAST_WEIGHT  # the term's weight (0.1): bench/results/recipe_search-hard.md
# Schedule variants of the term for the recipe search (bench/results/recipe_search-hard.md; not yet trained):
# label -> extra Contrast options. "" is the plain schedule (constant weight, every module).
VARIANTS: dict[str, dict] = {"": {}, "late": {"start": 20},        # LM loss alone for the first half
                             "ramp": {"ramp": 20},                  # weight grows over the first half
                             "deep": {"min_layer": 15}}             # term on layers 15-29 only


def adapter_dirs(*, cache_dir=None, shared_a_seed: int = DEFAULT_SHARED_A_SEED, domains=None,
                 general_domains=None, rank: int = RECIPE["rank"], steps: int = RECIPE["steps"],
                 contrast: float | None = DEFAULT_CONTRAST, domain_set: str = "easy",
                 variant: str = "") -> dict[str, dict[str, Path]]:
    """``{"shared_a": {domain: dir}, "general": {domain: dir}}`` — where the adapters live.
    ``variant``: a label of a contrast schedule variant (:func:`contrast_spec`), part of the folder."""
    domains = set_domains(domain_set) if domains is None else domains
    general_domains = general_domains_of(domain_set) if general_domains is None else general_domains
    root = default_cache_dir(cache_dir) / "adapters" / "smollm2-135m"
    pre = "" if domain_set == "easy" else f"{domain_set}-"
    sa = root / (f"{pre}shared_a-seed{shared_a_seed}-r{rank}-s{steps}"
                 + (f"-contrast{contrast:g}" if contrast else "") + (f"-{variant}" if variant and contrast else ""))
    ge = root / f"{pre}general-r{rank}-s{steps}"
    return {"shared_a": {d: sa / d for d in domains}, "general": {d: ge / d for d in general_domains}}


def library_background(model, tokenizer, corpora, *, cache_dir=None, shared_a_seed: int = DEFAULT_SHARED_A_SEED,
                       rank: int = RECIPE["rank"], target_modules=RECIPE["target_modules"],
                       progress: bool = True) -> dict:
    """The library's background moments G_bg = E[z zᵀ] per module over its unlabeled calibration
    traffic (:func:`eval_lib.calibration_texts`), cached under ``<cache>/eval``."""
    import hashlib
    import json

    import numpy as np

    from .eval_lib import calibration_texts
    from seqr_client.training import base_fingerprint

    texts = calibration_texts(corpora)
    h = hashlib.sha256(json.dumps([shared_a_seed, rank, list(target_modules), base_fingerprint(model)]).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    path = default_cache_dir(cache_dir) / "eval" / f"background-{h.hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    bg = background_moments(model, tokenizer, texts, shared_a=SharedARecipe(seed=shared_a_seed), rank=rank,
                            target_modules=target_modules, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **bg)
    os.replace(tmp, path)
    return bg


def train_all(*, cache_dir=None, shared_a_seed: int = DEFAULT_SHARED_A_SEED, domains=None,
              general_domains=None, model=None, tokenizer=None, progress: bool = True,
              contrast: float | None = DEFAULT_CONTRAST, domain_set: str = "easy", variant: str = "",
              **overrides) -> dict[str, dict[str, Path]]:
    """Train what is missing, reuse the rest; returns :func:`adapter_dirs`' mapping.

    ``contrast``: weight of the distinguishability term (``seqr_client.training.Contrast``) for
    the shared-A adapters, against the background moments of the library's unlabeled
    calibration traffic (:func:`eval_lib.calibration_texts`); None or 0 = plain LM loss."""
    recipe = {**RECIPE, **overrides}
    domains = set_domains(domain_set) if domains is None else domains
    general_domains = general_domains_of(domain_set) if general_domains is None else general_domains
    dirs = adapter_dirs(cache_dir=cache_dir, shared_a_seed=shared_a_seed, domains=domains,
                        general_domains=general_domains, rank=recipe["rank"], steps=recipe["steps"],
                        contrast=contrast, domain_set=domain_set, variant=variant)
    corpora = build_corpora(cache_dir=cache_dir, domain_set=domain_set, progress=progress)
    if model is None:
        model, tokenizer = load_smollm2(cache_dir=cache_dir)
    spec = None
    if contrast:
        bg = library_background(model, tokenizer, corpora, cache_dir=cache_dir, shared_a_seed=shared_a_seed,
                                rank=recipe["rank"], target_modules=recipe["target_modules"], progress=progress)
        spec = Contrast(background=bg, weight=float(contrast), **VARIANTS[variant])
    jobs = [("shared_a", d) for d in domains] + [("general", d) for d in general_domains]
    t_all = time.perf_counter()
    for i, (kind, domain) in enumerate(jobs, 1):
        t0 = time.perf_counter()
        out = train_lora(model, tokenizer, corpora[domain].train, out_dir=dirs[kind][domain],
                         shared_a=SharedARecipe(seed=shared_a_seed) if kind == "shared_a" else None,
                         domain=domain, progress=progress,
                         contrast=spec if kind == "shared_a" else None, **recipe)
        meta = read_seqr_json(out) or {}
        dt = time.perf_counter() - t0
        losses = meta.get("losses") or [float("nan")]
        k = max(1, min(8, len(losses) // 4))  # single batches are noisy: mean of first/last k steps
        state = "cached" if dt < 5 else "trained"
        print(f"[{i:2d}/{len(jobs)}] {kind:8s} {domain:10s} {state:7s} {dt:7.1f}s  "
              f"(train {meta.get('train_seconds', 0):.0f}s) loss(mean of {k} steps) "
              f"{sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f}  {out}", flush=True)
    print(f"all {len(jobs)} adapters ready in {time.perf_counter() - t_all:.0f}s", flush=True)
    return dirs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train or reuse the 9 shared-A + 3 general SmolLM2 adapters.")
    ap.add_argument("--cache-dir", default=None, help="cache root (default $SEQR_CACHE_DIR or ~/.cache/seqr-router)")
    ap.add_argument("--shared-a-seed", type=int, default=DEFAULT_SHARED_A_SEED, help="the library's shared-A seed")
    ap.add_argument("--set", dest="domain_set", choices=DOMAIN_SETS, default="easy",
                    help="domain set: easy (9 far-apart domains) or hard (8 close ones)")
    ap.add_argument("--domains", nargs="+", default=None, help="shared-A domains (default: the set's)")
    ap.add_argument("--general-domains", nargs="*", default=None,
                    help="domains that also get an ordinary LoRA (default: the set's)")
    ap.add_argument("--variant", default="", choices=sorted(VARIANTS),
                    help="contrast schedule variant (research; '' = the default schedule)")
    ap.add_argument("--steps", type=int, default=RECIPE["steps"], help="optimizer steps per adapter")
    ap.add_argument("--lr", type=float, default=RECIPE["lr"], help="AdamW learning rate")
    ap.add_argument("--contrast", type=float, default=DEFAULT_CONTRAST,
                    help="weight of the distinguishability term for shared-A adapters (0: plain LM loss)")
    ap.add_argument("--list", action="store_true", help="only list the adapter folders and their state")
    a = ap.parse_args(argv)
    if a.list:
        dirs = adapter_dirs(cache_dir=a.cache_dir, shared_a_seed=a.shared_a_seed, domains=a.domains,
                            general_domains=a.general_domains, steps=a.steps, contrast=a.contrast,
                            domain_set=a.domain_set, variant=a.variant)
        for kind, ds in dirs.items():
            for d, p in ds.items():
                meta = read_seqr_json(p) or {}
                print(f"{kind:8s} {d:10s} {'done' if meta.get('finished') else 'missing':7s} {p}")
        return 0
    train_all(cache_dir=a.cache_dir, shared_a_seed=a.shared_a_seed, domains=a.domains,
              general_domains=a.general_domains, steps=a.steps, lr=a.lr, contrast=a.contrast,
              domain_set=a.domain_set, variant=a.variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
