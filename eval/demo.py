"""`seqr demo`: the real-model demo — SmolLM2-135M-Instruct routed by the service, end to end.

1. starts the service on its embedded, encrypted store (``<cache>/demo-store``, its own key file),
   on 127.0.0.1 (a free port);
2. builds the demo library on the first run, with progress bars — corpora from the package
   registries, the 9 domain adapters trained with the library's shared frozen A (see
   seqr_eval.train_adapters), uploaded with PutAdapter and calibrated on unlabeled traffic through
   Calibrate — and reuses it afterwards (adapters are re-uploaded only if their files changed);
3. routes a few prompts from different domains through the real client, as a model host would:
   capture the q/v inputs with forward hooks, Route, show what was chosen and why (top scores,
   margin, normalisation, server time), set the adapter on the PEFT model and generate.

Building the library needs the ``host`` extra (torch, transformers, peft) besides ``server``;
``./dev demo`` has both. Corpora and the training recipe come from this package (seqr_eval).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

LIBRARY = "smollm2-demo"
# The recommended routing setting (bench/results/research.md).
NORMALISATION = "zscore/adapter_module/e"
PROMPTS = (
    ("python", 'def load_settings(path):\n    """Read the INI file at path and return a dict of sections."""\n'
               "    parser = configparser.ConfigParser()\n    with open(path, encoding='utf-8') as f:\n"),
    ("legal", "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
              "software and associated documentation files (the \"Software\"), to deal in the Software "
              "without restriction, including without limitation the rights"),
    ("scripture", "And the LORD spake unto Moses, saying, Speak unto the children of Israel, that they "
                  "bring me an offering: of every man that giveth it willingly with his heart"),
    ("medical", "E11.22 Type 2 diabetes mellitus with diabetic chronic kidney disease\n"
                "  Use additional code to identify stage of chronic kidney disease\n"
                "E11.29 Type 2 diabetes mellitus with other diabetic kidney complication"),
    ("drama", "HAMLET. To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to "
              "suffer\nThe slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles"),
    ("c", "#include <stdint.h>\n\nextern int pthread_mutex_lock (pthread_mutex_t *__mutex)\n"
          "     __THROWNL __nonnull ((1));\n\n/* Unlock a mutex.  */\nextern int pthread_mutex_unlock ("),
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--cache-dir", default=None,
                    help="cache root: base model, corpora, adapters, demo store (default $SEQR_CACHE_DIR "
                         "or ~/.cache/seqr-router)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="the demo's store (default <cache>/demo-store; its key file sits beside it)")
    ap.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                    help="route this prompt instead of the built-in ones (repeatable)")
    ap.add_argument("--normalisation", default=NORMALISATION,
                    help="routing normalisation: none, frobenius, activation, zscore/<adapter_module|adapter>/<e|sqrt|log>")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt")
    ap.add_argument("--rebuild", action="store_true", help="re-upload every adapter and recalibrate")
    return ap


def build_library(client, model, tok, *, cache_dir, rebuild: bool) -> dict[str, Path]:
    """Create or refresh the demo library; returns {adapter name: PEFT folder}."""
    from tqdm import tqdm

    from seqr_client.errors import NotFoundError
    from seqr_client.hf_models import signature_of

    from . import eval_lib, pipeline
    from .corpora import build_corpora
    from .train_adapters import DEFAULT_SHARED_A_SEED, RECIPE, train_all

    corpora = build_corpora(cache_dir=cache_dir, progress=True)
    dirs = train_all(cache_dir=cache_dir, model=model, tokenizer=tok, general_domains=(), progress=True)
    adapters = {d: Path(p) for d, p in dirs["shared_a"].items()}
    targets = tuple(RECIPE["target_modules"])
    sig = signature_of(model, targets)
    modules = [m for m, _, _ in sig]
    try:
        info = client.describe(LIBRARY)
        have = {a.name: a for a in info.adapters}
    except NotFoundError:
        client.create_library(LIBRARY, signature={"base_model": "SmolLM2-135M-Instruct", "modules": sig},
                              shared_a_seed=DEFAULT_SHARED_A_SEED, shared_a_rank=RECIPE["rank"],
                              shared_a_modules=modules, meta={"demo": "seqr demo: 9 domains"})
        info, have = client.describe(LIBRARY), {}
    changed = False
    for name, path in tqdm(adapters.items(), desc="upload adapters"):
        want = _sha256(path / "adapter_model.safetensors")
        cur = have.get(name)
        if cur is not None and not rebuild and cur.sha256.get("adapter_model.safetensors") == want:
            continue
        if cur is not None:
            client.delete_adapter(name, library=LIBRARY)
        client.put_adapter(path, name=name, library=LIBRARY)
        changed = True
    info = client.describe(LIBRARY)
    if changed or rebuild or set(info.calibrated_adapters) != set(adapters):
        texts = eval_lib.calibration_texts(corpora)
        cap = eval_lib.captures(model, tok, texts, tag="calib", cache_dir=cache_dir)
        seqs = (pipeline.layer_inputs(cap.sample(k), cap.layers, modules) for k in range(len(cap)))
        res = client.calibrate(tqdm(seqs, total=len(cap), desc="calibrate (unlabeled traffic)"), library=LIBRARY)
        print(f"calibrated on {res.sequences} unlabeled sequences")
    return adapters


def run(a: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from seqr_client.hf_host import (apply_decision, capture_inputs, generate_text, group_shared_inputs,
                                         load_adapters)
        from seqr_client.hf_models import default_cache_dir, load_smollm2
    except ImportError as e:
        print(f"seqr demo needs the model extras (torch, transformers, peft): {e}", file=sys.stderr)
        return 2
    from seqr_client import RouterClient

    from seqr_server.app import create_server
    from seqr_server.config import KeySource, ServerConfig
    from seqr_server.store import init_key_file

    cache = default_cache_dir(a.cache_dir)
    data = a.data_dir or cache / "demo-store"
    data.mkdir(parents=True, exist_ok=True)
    kek = data.parent / f"{data.name}.kek"
    if not kek.exists():
        init_key_file(kek)
    print(f"[demo] starting the service on its embedded store {data} (key {kek})")
    _, handles = create_server(ServerConfig(listen="127.0.0.1:0", data_dir=data, metrics_port=None, demo=False,
                                            keys=KeySource(key_file=kek), workers=4))
    handles.start()
    if not handles.wait_ready(120):
        print(f"seqr demo: the service did not start: {handles.load_error}", file=sys.stderr)
        handles.stop(grace=0)
        return 1
    client = RouterClient(handles.target, timeout=120)
    try:
        print(f"[demo] service up at {handles.target}")
        model, tok = load_smollm2(cache_dir=a.cache_dir)
        t0 = time.perf_counter()
        adapters = build_library(client, model, tok, cache_dir=a.cache_dir, rebuild=a.rebuild)
        info = client.describe(LIBRARY)
        print(f"[demo] library {LIBRARY!r} v{info.version}: {len(info.adapters)} adapters "
              f"({', '.join(x.name for x in info.adapters)}), shared A seed "
              f"{info.shared_a_recipe.seed if info.shared_a_recipe else '-'}, calibrated on "
              f"{info.calibration_sequences} sequences [{time.perf_counter() - t0:.1f}s]")
        peft_model = load_adapters(model, adapters)
        prompts = [(None, p) for p in a.prompt] if a.prompt else list(PROMPTS)
        for expected, prompt in prompts:
            captured = capture_inputs(peft_model, prompt, modules=("q_proj", "v_proj"), tokenizer=tok,
                                      max_length=128)
            groups = group_shared_inputs(captured)
            t1 = time.perf_counter()
            r = client.route(LIBRARY, dict(groups), shared={g: captured[g] for g in set(groups.values())},
                             top_k=3, normalisation=a.normalisation)
            ms = (time.perf_counter() - t1) * 1e3
            best = r.best.name
            apply_decision(peft_model, best)
            text = generate_text(peft_model, tok, prompt, max_new_tokens=a.max_new_tokens)
            show = prompt.replace("\n", "⏎ ")
            print()
            print(f"prompt{f' ({expected} text)' if expected else ''}: {show[:110]}{'…' if len(show) > 110 else ''}")
            print(f"  routed -> {best}  (score {r.best.score:.3f}, margin {r.margin:.3f} over "
                  f"{r.choices[1].name if len(r.choices) > 1 else '-'}; {r.normalisation}"
                  f"{', fallback: ' + r.fallback if r.fallback else ''}; {next(iter(captured.values())).shape[0]} tokens, "
                  f"{len(groups)} modules; route {ms:.1f} ms, server {r.timings.total_ms:.1f} ms)")
            print("  runner-up: " + ", ".join(f"{c.name} {c.score:.3f}" for c in r.choices[1:]))
            cont = text.replace("\n", "⏎ ")
            print(f"  continuation with {best}: {cont[:160]}")
        peft_model.unload()
        return 0
    finally:
        client.close()
        handles.stop(grace=1.0)


def add_commands(sub) -> None:
    """Mount ``seqr demo`` on a ``seqr`` sub-command set (seqr_cli does)."""
    p = sub.add_parser("demo", help="real-model demo: SmolLM2-135M + trained adapters, routed by the service",
                       description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="seqr demo", description=__doc__.split("\n\n")[0])
    return run(add_arguments(ap).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
