"""Scorer cost vs N: seqr vs spectr, arrow and exact brute force, one module, fp32.

Prints a markdown table: time per 1,000 tokens for each method at N ∈ {10, 100, 1000, 4000},
d=4096, r=16; the measured spectr/seqr ratio beside the FLOP ratio N·r·d / (r·d + N·r²); and
seqr's achieved GFLOP/s against this machine's fp32 GEMM peak measured in the same run.

    .venv/bin/python bench/scoring.py [--quick] [--out FILE]   # table to stdout + bench/out/scoring.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from seqr_core import Adapter, BaseModelSignature, LibraryIndex, ModuleFactors, ModuleSpec
from seqr_core.energies import ModuleInput, arrow_energies, exact_energies, seqr_energies, spectr_energies


def best_time(fn, *, repeats: int, min_time: float = 0.2) -> float:
    fn()  # warm-up: caches, lazy SVD factors, BLAS threads
    best, spent, n = float("inf"), 0.0, 0
    while n < repeats or spent < min_time:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent, n = min(best, dt), spent + dt, n + 1
        if n >= 50:
            break
    return best


def gemm_peak(n: int = 2048) -> float:
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return 2 * n ** 3 / best_time(lambda: a @ a, repeats=5) / 1e9


def build(N: int, d: int, r: int, rng) -> LibraryIndex:
    sig = BaseModelSignature("bench", (ModuleSpec("m", d, d),))
    A = (rng.uniform(-1, 1, (r, d)) / np.sqrt(d)).astype(np.float32)
    idx = LibraryIndex.create(name="bench", signature=sig, shared_a={"m": A})
    items = [(Adapter(name=f"a{i}", factors={"m": ModuleFactors(
        A=A, B=rng.standard_normal((d, r)).astype(np.float32) * 0.02, scale=2.0)}), i + 1, "F32")
        for i in range(N)]
    return idx.add_adapters(items)[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=1000, help="tokens per scoring call (seqr, arrow)")
    ap.add_argument("--slow-tokens", type=int, default=128, help="tokens per call for exact/spectr")
    ap.add_argument("--ns", default="10,100,1000,4000")
    ap.add_argument("--quick", action="store_true", help="N up to 1000, fewer repeats")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "scoring.md",
                    help="where to write the table (bench/results/scoring.md refreshes the committed one)")
    a = ap.parse_args(argv)
    ns = [int(x) for x in a.ns.split(",")]
    if a.quick:
        ns = [n for n in ns if n <= 1000]
    rng = np.random.default_rng(0)
    peak = gemm_peak()
    d, r = a.d, a.r
    K = r * (r + 1) // 2
    x = rng.standard_normal((a.tokens, d)).astype(np.float32)
    xs = x[: a.slow_tokens]
    rows = []
    for N in ns:
        idx = build(N, d, r, rng)
        mi = idx.modules["m"]
        full, short = ModuleInput("activations", x, a.tokens), ModuleInput("activations", xs, a.slow_tokens)
        per1k = lambda t, T: t * 1000 / T  # noqa: E731
        t_seqr = per1k(best_time(lambda: seqr_energies(mi, full, precise=False, bounds=False), repeats=5), a.tokens)
        t_bound = per1k(best_time(lambda: seqr_energies(mi, full, precise=False), repeats=5), a.tokens)
        t_prec = per1k(best_time(lambda: seqr_energies(mi, full), repeats=5), a.tokens)
        t_mean = per1k(best_time(lambda: seqr_energies(mi, full, token_mean=True), repeats=5), a.tokens)
        t_arrow = per1k(best_time(lambda: arrow_energies(idx, "m", full), repeats=3), a.tokens)
        t_spectr = per1k(best_time(lambda: spectr_energies(idx, "m", short), repeats=2), a.slow_tokens)
        t_exact = per1k(best_time(lambda: exact_energies(idx, "m", short), repeats=1, min_time=0), a.slow_tokens)
        flops_seqr = 2 * (r * d + N * K) * 1000           # z = A·x, then (T×K)·(K×N)
        flop_ratio = N * r * d / (r * d + N * r * r)
        rows.append((N, t_seqr, t_spectr, t_arrow, t_exact, t_spectr / t_seqr, flop_ratio,
                     flops_seqr / t_seqr / 1e9, t_bound, t_prec, t_mean))
        print(f"N={N}: seqr {t_seqr*1e3:.2f} ms/1k tok", flush=True)
        del idx, mi
    lines = [f"fp32 GEMM peak (2048³, numpy, this run): **{peak:.1f} GFLOP/s**; d={d}, r={r}, one module.",
             "",
             "| N | seqr ms/1k tok | spectr ms/1k tok | arrow ms/1k tok | exact ms/1k tok | spectr/seqr | FLOP ratio N·r·d/(r·d+N·r²) | measured/FLOP ratio | seqr GFLOP/s | % of peak | seqr +bounds | seqr precise +bounds | seqr token-mean |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for N, ts, tp, ta, te, ratio, fr, gf, tb, tpr, tm in rows:
        lines.append(f"| {N} | {ts*1e3:.2f} | {tp*1e3:.1f} | {ta*1e3:.2f} | {te*1e3:.1f} | {ratio:.1f} | "
                     f"{fr:.1f} | {ratio/fr:.2f} | {gf:.1f} | {100*gf/peak:.0f}% | {tb*1e3:.2f} | {tpr*1e3:.2f} | {tm*1e3:.2f} |")
    lines += ["", "seqr = the float32 kernel (z = A·x, features of z·zᵀ, one (T×K)·(K×N) GEMM, K = r(r+1)/2); "
              "+bounds adds the rigorous float32 error bounds routing uses to decide float64 re-checks; "
              "precise computes z in float64 (the default for per-token routing: bounds tight enough that "
              "re-checks are rare); token-mean is sequence routing with a linear normalisation "
              "(tr(RᵢᵀRᵢ·ZᵀZ/T), float64). All ms per 1,000 tokens."]
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
