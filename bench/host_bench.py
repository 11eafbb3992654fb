"""Generation throughput of `seqr host` with and without routing, in one run.

A real `seqr serve` process holds a library of N shared-A adapters (random B against the
library's A, q_proj/v_proj, r=8) for the chosen base model; `seqr host` (in this process) loads
the same adapter folders and the official `openai` client sends the same prompts, interleaved,
as four kinds of request:

* ``base``    model="base": adapters off, no routing (the floor);
* ``pinned``  model=<adapter>: one LoRA applied, no routing (what LoRA itself costs);
* ``routed``  model="seqr": capture + route (moments) + apply the top-1 adapter;
* ``mixed``   model="seqr" with top-2: the weighted mix is rebuilt per request.

Reported: completion tokens per second (generated tokens ÷ wall time of the requests),
mean end-to-end latency, and for routed requests what the host measured: the capture (the
prompt's forward pass up to the last targeted module) and the router call (wire + server).

    .venv/bin/python bench/host_bench.py                   # SmolLM2-135M-Instruct (default)
    .venv/bin/python bench/host_bench.py --model tiny      # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from load import start_server   # bench/load.py: `seqr serve` as its own process

from seqr_client import RouterClient
from seqr_client.host_engine import Engine, load_model
from seqr_client.host_routing import HostRouter, weights_sha256
from seqr_client.openai_host import HostConfig, HostServer, OpenAIHost
from seqr_core import SharedARecipe, generate_shared_a, signature_from_hf_config

LIB, SEED, RANK = "host-bench", 4242, 8
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Summarise the main duties of a software licence's licensee.",
    "And it came to pass in those days, that",
    "What is the ICD-10 code family for diabetes mellitus?",
    "Explain what a Debian package's postinst script is for.",
    "Shall I compare thee to a summer's day?",
]


def make_adapters(model, out: Path, n: int) -> dict[str, Path]:
    """n shared-A PEFT adapters (the library's A, random B) saved as safetensors folders."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0,
                                                                 target_modules=["q_proj", "v_proj"]))
    recipe, rng, dirs = SharedARecipe(seed=SEED), torch.Generator().manual_seed(0), {}
    layers = [(name.removeprefix("base_model.model."), mod) for name, mod in peft_model.named_modules()
              if hasattr(mod, "lora_A") and "default" in mod.lora_A]
    for k in range(n):
        with torch.no_grad():
            for canonical, mod in layers:
                A = mod.lora_A["default"].weight
                A.copy_(torch.from_numpy(generate_shared_a(recipe, module=canonical, rank=RANK, d_in=A.shape[1])))
                B = mod.lora_B["default"].weight
                B.copy_(torch.randn(B.shape, generator=rng) * 0.02)
        dirs[f"adapter-{k}"] = out / f"adapter-{k}"
        peft_model.save_pretrained(str(dirs[f"adapter-{k}"]), safe_serialization=True)
    return dirs


def run(args) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="seqr-host-bench-"))
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    sig = signature_from_hf_config(model.config.to_dict(), base_model=args.model)
    qv = [m.name for m in sig.modules if m.name.endswith(("q_proj", "v_proj"))]
    dirs = make_adapters(model, tmp / "adapters", args.adapters)
    proc, port, _ = start_server(tmp / "data", "seqr")
    target = f"127.0.0.1:{port}"
    try:
        with RouterClient(target, timeout=60) as c:
            c.create_library(LIB, signature=sig, shared_a_seed=SEED, shared_a_rank=RANK, shared_a_modules=qv)
            for name, path in dirs.items():
                c.put_adapter(path, name=name, library=LIB)
        engine = Engine(model, tok, dirs)
        local = {n: weights_sha256(p) for n, p in dirs.items()}
        hosts = {}
        for kind, top_k in (("routed", 1), ("mixed", 2)):
            r = HostRouter(RouterClient(target, timeout=10), library=LIB, local=local, top_k=top_k, timeout=10)
            hosts[kind] = HostServer(OpenAIHost(engine, r, HostConfig()), listen="127.0.0.1:0").start()
        setup_s = time.perf_counter() - t0
        rows = measure(hosts, args, next(iter(dirs)))
    finally:
        for h in locals().get("hosts", {}).values():
            h.stop()
        proc.terminate()
        proc.wait(30)
    return report(rows, args, setup_s, n_modules=len(qv))


def measure(hosts: dict, args, pinned: str) -> dict:
    import openai
    clients = {k: openai.OpenAI(base_url=h.url, api_key="unused", timeout=600, max_retries=0)
               for k, h in hosts.items()}
    kinds = {"base": ("routed", "base"), "pinned": ("routed", pinned), "routed": ("routed", "seqr"),
             "mixed": ("mixed", "seqr")}
    rows = {k: {"tokens": 0, "seconds": 0.0, "latency": [], "route_ms": [], "capture_ms": []} for k in kinds}
    for warm in (True, False):
        for rep in range(1 if warm else args.repeats):
            for prompt in PROMPTS[:1] if warm else PROMPTS:
                for kind, (host, model) in kinds.items():          # interleaved: drift hits all alike
                    t = time.perf_counter()
                    resp = clients[host].chat.completions.create(
                        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                        temperature=0)
                    dt = time.perf_counter() - t
                    if warm:
                        continue
                    row = rows[kind]
                    row["tokens"] += resp.usage.completion_tokens
                    row["seconds"] += dt
                    row["latency"].append(dt)
                    seqr = resp.model_extra["seqr"]
                    if seqr["route_ms"] is not None:
                        row["route_ms"].append(seqr["route_ms"])
                        row["capture_ms"].append(seqr["capture_ms"])
    return rows


def report(rows: dict, args, setup_s: float, *, n_modules: int) -> str:
    base = rows["base"]["tokens"] / rows["base"]["seconds"]
    lines = [f"`seqr host` on {args.model}: {args.adapters} shared-A adapters (r={RANK}, {n_modules} modules), "
             f"{len(PROMPTS)} chat prompts x {args.repeats}, max_tokens={args.max_tokens}, greedy; "
             f"one request at a time; `seqr serve` in its own process on the same machine "
             f"({torch.get_num_threads()} torch threads; setup {setup_s:.0f} s)", "",
             "| request | model | tokens | tokens/s | vs base | mean latency s | capture ms p50 | router call ms p50 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    names = {"base": "base", "pinned": "adapter-0", "routed": "seqr (top-1)", "mixed": "seqr (top-2 mix)"}
    for kind, row in rows.items():
        tps = row["tokens"] / row["seconds"]
        route = f"{statistics.median(row['route_ms']):.1f}" if row["route_ms"] else "–"
        capture = f"{statistics.median(row['capture_ms']):.1f}" if row["capture_ms"] else "–"
        lines.append(f"| {kind} | {names[kind]} | {row['tokens']} | {tps:.1f} | {tps / base:.2f} | "
                     f"{np.mean(row['latency']):.2f} | {capture} | {route} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 | tiny | a local HF causal-LM folder")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (markdown); none by default")
    args = ap.parse_args(argv)
    text = run(args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
