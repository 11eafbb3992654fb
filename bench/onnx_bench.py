"""Scorer throughput, numpy vs onnxruntime: tokens/s of a full routing decision.

One module, SEQR shared-A libraries, activations (T, d) in, frobenius normalisation, exact
top-1 (float64 re-check included on both paths). Grid: N ∈ {100, 1000}, d ∈ {576, 4096},
r ∈ {8, 16}. Prints a markdown table and writes it to bench/out/onnx.md (git-ignored) or ``--out FILE``.

    nice .venv/bin/python bench/onnx_bench.py                 # CPU provider (default)
    SEQR_ONNX_PROVIDER=cuda python bench/onnx_bench.py       # on a GPU machine

Both paths use every core (OpenBLAS threads for numpy, ORT intra-op threads for onnx).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from seqr_core import (Adapter, BaseModelSignature, LibraryIndex, ModuleFactors, ModuleInput,
                       ModuleSpec, RouteOptions, route)
from seqr_server.onnx_backend import OnnxBackend
from seqr_server.onnx_scoring import Profile

MODULE = "model.layers.0.self_attn.q_proj"


def library(*, n: int, d: int, r: int, seed: int = 0, d_out: int = 64) -> LibraryIndex:
    rng = np.random.default_rng(seed)
    sig = BaseModelSignature(base_model="bench", modules=(ModuleSpec(MODULE, d, d_out),))
    A = rng.uniform(-1 / np.sqrt(d), 1 / np.sqrt(d), (r, d)).astype(np.float32)   # PEFT's init
    idx = LibraryIndex.create(name=f"bench-{n}-{d}-{r}", signature=sig, shared_a={MODULE: A})
    for i in range(n):
        B = (rng.standard_normal((d_out, r)) * rng.uniform(0.5, 2)).astype(np.float32)
        idx, _ = idx.add_adapter(Adapter(name=f"a{i}", factors={MODULE: ModuleFactors(A=A, B=B, scale=2.0)}),
                                 adapter_id=i + 1)
    return idx


def timed_pair(fa, fb, *, min_reps: int, budget_s: float) -> tuple[float, float]:
    """Median seconds per call of fa and fb, calls interleaved so both see the same load
    (this machine is shared); one warm-up call each."""
    fa(), fb()
    ta, tb, start = [], [], time.perf_counter()
    while len(ta) < min_reps or time.perf_counter() - start < 2 * budget_s:
        for fn, acc in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
        if len(ta) >= 200:
            break
    return statistics.median(ta), statistics.median(tb)


def bench_one(be: OnnxBackend, *, n: int, d: int, r: int, T: int, granularity: str, budget_s: float) -> dict:
    idx = library(n=n, d=d, r=r)
    x = np.random.default_rng(1).standard_normal((T, d)).astype(np.float32)
    inputs = {MODULE: ModuleInput("activations", x, T)}
    row = {"N": n, "d": d, "r": r}
    for verify in (True, False):
        opts = RouteOptions(granularity=granularity, verify=verify)
        be.prepare(idx, profiles=[Profile(((MODULE, "activations"),), opts.normalisation,
                                          granularity == "token", verify)], wait=True)
        served = sum(v for k, v in be.stats().items() if k.startswith("onnx:"))
        d_np, d_ox = route(idx, inputs, opts), be.route(idx, inputs, opts)
        if sum(v for k, v in be.stats().items() if k.startswith("onnx:")) != served + 1:
            raise RuntimeError(f"onnx backend did not serve: {be.stats()}")
        if verify and [c.adapter_id for c in d_np.choices] != [c.adapter_id for c in d_ox.choices]:
            raise RuntimeError("numpy and onnx disagree")
        reps = 3 if d_np.rechecked > 100 else 10
        key = "" if verify else "_fast"
        t_np, t_ox = timed_pair(lambda: route(idx, inputs, opts), lambda: be.route(idx, inputs, opts),
                                min_reps=reps, budget_s=budget_s)
        row["numpy" + key], row["onnx" + key] = T / t_np, T / t_ox
        if verify:
            row["rechecked"] = f"{d_np.rechecked} / {d_ox.rechecked}"
    return row


def table(rows, *, provider: str, T: int, granularity: str) -> str:
    out = [f"tokens/s per routing decision (T={T}, {granularity}, one module, shared-A, activations in, "
           f"frobenius, top-1; onnx on {provider})", "",
           "| N | d | r | numpy | onnx | onnx/numpy | re-checked numpy / onnx | numpy, no verify "
           "| onnx, no verify | onnx/numpy |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w in rows:
        out.append(f"| {w['N']} | {w['d']} | {w['r']} | {w['numpy']:,.0f} | {w['onnx']:,.0f} | "
                   f"{w['onnx'] / w['numpy']:.2f}× | {w['rechecked']} | {w['numpy_fast']:,.0f} | "
                   f"{w['onnx_fast']:,.0f} | {w['onnx_fast'] / w['numpy_fast']:.2f}× |")
    out += ["", "numpy/onnx: exact decisions (fp32 scores + float64 re-check of the candidates the "
            "error bounds leave in doubt); no verify: fp32 ranking only (RouteOptions(verify=False))."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--granularity", choices=("sequence", "token"), default="sequence")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per path and cell")
    ap.add_argument("--provider", default=None, help="auto | cuda | cpu (default $SEQR_ONNX_PROVIDER or cpu)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "onnx.md"),
                    help="where to write the table (bench/results/onnx.md refreshes the committed one)")
    args = ap.parse_args(argv)
    be = OnnxBackend(prefer=args.provider or None) if args.provider else OnnxBackend()
    provider = be.providers[0] if isinstance(be.providers[0], str) else be.providers[0][0]
    rows = []
    try:
        for n in (100, 1000):
            for d in (576, 4096):
                for r in (8, 16):
                    rows.append(bench_one(be, n=n, d=d, r=r, T=args.tokens,
                                          granularity=args.granularity, budget_s=args.budget))
                    print(f"N={n} d={d} r={r}: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        be.close()
    text = table(rows, provider=provider, T=args.tokens, granularity=args.granularity)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
