"""Client commands of `seqr`: libraries, adapters, route, describe, calibrate, health, train.

They talk to a running server through seqr_client (never to the store directly); ``seqr_cli``
mounts them with :func:`add_commands`. Heavy imports (tqdm, torch) happen inside the commands.
"""

from __future__ import annotations

import argparse
import logging
import json
import os
import sys
from pathlib import Path

import numpy as np

from . import training
from seqr_core.config_values import env_default, positive, seconds

FORMS = ("activations", "projected", "moments")


def env(name: str, default=None):
    """The SEQR_<name> environment variable (every flag's default); a value that does not parse
    is reported under the variable's name (seqr_core.config_values)."""
    return env_default(os.environ, f"SEQR_{name}", default)


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    """--target, --token, TLS, --timeout, --json: how every client command reaches the server."""
    g = p.add_argument_group("connection")
    g.add_argument("--target", default=env("TARGET", "localhost:50051"),
                   help="server address; dns:///svc:50051 behind a headless service [SEQR_TARGET]")
    g.add_argument("--token", default=env("TOKEN"), help="bearer token [SEQR_TOKEN]")
    g.add_argument("--tls-ca", default=env("TLS_CA"), help="CA bundle to verify the server (enables TLS) [SEQR_TLS_CA]")
    g.add_argument("--tls-client-cert", default=env("CLIENT_CERT"), help="client certificate for mTLS [SEQR_CLIENT_CERT]")
    g.add_argument("--tls-client-key", default=env("CLIENT_KEY"), help="client key for mTLS [SEQR_CLIENT_KEY]")
    g.add_argument("--timeout", type=seconds, default=env("TIMEOUT", 10.0),
                   help="deadline of each call in seconds [SEQR_TIMEOUT]")
    g.add_argument("--json", action="store_true", help="print JSON")


def _common(p: argparse.ArgumentParser, *, library: bool = True) -> None:
    add_connection_flags(p)
    if library:     # never a silent default: a command must not act on a library nobody named
        lib = env("LIBRARY")
        p.add_argument("--library", "-l", default=lib, required=lib is None,
                       help="library name (required unless SEQR_LIBRARY is set) [SEQR_LIBRARY]")


def _client(a):
    from seqr_client import RouterClient, tls_credentials
    creds = None
    if a.tls_ca or a.tls_client_cert:
        creds = tls_credentials(ca_file=a.tls_ca, cert_file=a.tls_client_cert, key_file=a.tls_client_key)
    return RouterClient(a.target, creds, token=a.token, timeout=a.timeout)


def _print(a, obj, text: str) -> None:
    if a.json:
        from dataclasses import asdict, is_dataclass
        conv = [asdict(o) if is_dataclass(o) else o for o in obj] if isinstance(obj, list) else (
            asdict(obj) if is_dataclass(obj) else obj)
        print(json.dumps(conv, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v), indent=2))
    else:
        print(text)


def _run(fn):
    """Client errors become one line on stderr and exit code 1 (no traceback)."""
    def run(a) -> int:
        from seqr_client import SeqrError
        try:
            return int(fn(a) or 0)
        except SeqrError as e:
            print(f"error: {e.code}: {e}", file=sys.stderr)
            return 1
    return run


# ---------------------------------------------------------------------------- commands
def _target_modules(a) -> list[str] | None:
    """Module name suffixes that get a shared A (None: every module); warns on --targets."""
    given = a.target_modules
    if a.targets_deprecated is not None:
        print("seqr libraries create: --targets is deprecated (it meant modules, while --target is the "
              "server); use --target-modules", file=sys.stderr)
        given = [a.targets_deprecated]
    names = [n for item in given for n in item.split(",") if n]
    return None if not names or names == ["all"] else names


@_run
def cmd_libraries_create(a) -> int:
    from seqr_core import signature_from_hf_config
    from seqr_core.signature import BaseModelSignature
    if a.hf_config:
        sig = signature_from_hf_config(json.loads(Path(a.hf_config).read_text()), base_model=a.base_model or "")
    else:
        sig = BaseModelSignature.from_dict(json.loads(Path(a.signature).read_text()))
    targets = _target_modules(a)
    modules = [m.name for m in sig.modules if targets is None or m.name.rsplit(".", 1)[-1] in targets]
    shared = dict(np.load(a.shared_a_file)) if a.shared_a_file else None
    with _client(a) as c:
        info = c.create_library(a.name, signature=sig, shared_a_seed=a.shared_a_seed if shared is None else None,
                               shared_a_rank=a.rank, shared_a_modules=None if targets is None else modules,
                               shared_a=shared, shared_a_only=a.shared_a_only)
    _print(a, info, f"created {info.name} v{info.version}: {len(info.modules)} modules, "
                    f"{sum(1 for m in info.modules if m.shared_rank)} with a shared A")
    return 0


@_run
def cmd_libraries_shared_a(a) -> int:
    from .shared_a_files import write_shared_a
    with _client(a) as c:
        info = c.describe(a.library, include_shared_a=True)
    doc = write_shared_a(info, Path(a.out), force=a.force)
    _print(a, doc, f"wrote {a.out}: the shared A of {info.name} v{info.version} for {len(doc['modules'])} "
                   f"modules, rank {doc['rank']} (PEFT lora_A naming; see {Path(a.out) / 'README.md'})")
    return 0


@_run
def cmd_libraries_ls(a) -> int:
    with _client(a) as c:
        libs = c.list_libraries()
    _print(a, libs, "\n".join(f"{x.name}\tv{x.version}\t{x.adapters} adapters\t{x.base_model}"
                               + (f"\tDEGRADED ({x.damaged_adapters} damaged adapters)" if x.degraded else "")
                               for x in libs) or "(no libraries)")
    return 0


@_run
def cmd_adapters_put(a) -> int:
    from tqdm import tqdm
    dirs = [Path(d) for d in a.dirs]
    if a.name and len(dirs) > 1:
        raise SystemExit("--name works with a single adapter folder only")
    from seqr_client import read_peft_dir
    files = {d: read_peft_dir(d) for d in dirs}
    total = sum(len(b) for f in files.values() for b in f.values())
    out = []
    with _client(a) as c, tqdm(total=total, unit="B", unit_scale=True, disable=a.json or None,
                               desc=f"uploading {len(dirs)} adapter(s)") as bar:
        for d in dirs:
            bar.set_postfix_str(d.name)
            out.append(c.put_adapter_files(files[d], name=a.name or d.name, library=a.library,
                                           progress=bar.update, allow_general=a.allow_general, replace=a.replace))
    _print(a, out, "\n".join(f"{i.name}\tid={i.adapter_id}\tv{i.version}\t{i.kind}\tr={i.rank}\t"
                             f"{len(i.modules)} modules" for i in out))
    return 0


@_run
def cmd_adapters_ls(a) -> int:
    with _client(a) as c:
        ads = c.list_adapters(a.library)
    _print(a, ads, "\n".join(f"{i.adapter_id}\t{i.name}\tDAMAGED (quarantined; delete it): {i.damaged_reason}"
                             if i.status == "damaged" else
                             f"{i.adapter_id}\t{i.name}\tv{i.version}\t{i.kind}\tr={i.rank}\t{len(i.modules)} modules\t"
                             f"{'calibrated' if i.calibrated else ''}" for i in ads) or "(no adapters)")
    return 0


@_run
def cmd_adapters_rm(a) -> int:
    with _client(a) as c:
        res = [c.delete_adapter(n, library=a.library) for n in a.names]
    _print(a, res, "\n".join(f"deleted {r.name} (id {r.adapter_id}); library now v{r.library_version}" for r in res))
    return 0


def _random_inputs(c, library: str, tokens: int) -> dict:
    info = c.describe(library)
    rng = np.random.default_rng()
    x = {}
    for m in info.modules:
        if m.shared_rank:
            x[m.name] = rng.standard_normal((tokens, m.d_in)).astype(np.float32)
    return x


@_run
def cmd_route(a) -> int:
    with _client(a) as c:
        if a.random:
            data, form = _random_inputs(c, a.library, a.random), "activations"
        elif a.npz:
            data, form = dict(np.load(a.npz)), a.form
        else:
            raise SystemExit("seqr route: give an .npz of module -> array, or --random T")
        kw = {"inputs" if form == "activations" else form: data}
        r = c.route(a.library, **kw, tokens=a.tokens, top_k=a.top_k, method=a.method,
                    normalisation=a.normalisation, granularity=a.granularity,
                    candidates=a.candidates.split(",") if a.candidates else None)
    lines = [f"{i + 1}. {ch.name}\tid={ch.adapter_id}\tscore={ch.score:.6g}\tweight={ch.weight:.3f}"
             for i, ch in enumerate(r.choices)]
    lines.append(f"margin={r.margin:.4g}  library v{r.library_version}  {r.method}/{r.normalisation}"
                 f"{'  fallback: ' + r.fallback if r.fallback else ''}  server {r.timings.total_ms:.2f} ms")
    _print(a, r, "\n".join(lines))
    return 0


@_run
def cmd_describe(a) -> int:
    with _client(a) as c:
        info = c.describe(a.library)
    shared = [m for m in info.modules if m.shared_rank]
    recipe = f"seed {info.shared_a_recipe.seed}" if info.shared_a_recipe else "uploaded/none"
    text = [f"{info.name} v{info.version}  base model {info.base_model}",
            f"  {len(info.modules)} modules, {len(shared)} with shared A ({recipe})",
            f"  calibration: {info.calibration_sequences} sequences, {len(info.calibrated_adapters)} adapters"
            + (f" ({len(info.derived_adapters)} from the pooled moments of {info.pooled_sequences} sequences)"
               if info.pooled_sequences else ""),
            *(["  shared-A adapters only"] if info.shared_a_only else []),
            *([f"  DEGRADED: damaged objects {list(info.damaged_objects)}, damaged adapters "
               f"{[x.name for x in info.adapters if x.status == 'damaged']}"] if info.degraded else []),
            f"  {len(info.adapters)} adapters:"]
    text += [f"    {x.adapter_id}\t{x.name}\t{x.kind}\tr={x.rank}" for x in info.adapters]
    _print(a, info, "\n".join(text))
    return 0


@_run
def cmd_calibrate(a) -> int:
    if bool(a.files) == bool(a.texts):
        print("seqr calibrate: give either .npz files or --texts FILE (not both)", file=sys.stderr)
        return 2
    if a.texts:
        from .text_calibration import calibrate_from_texts
        try:
            r = calibrate_from_texts(lambda: _client(a), a.library, a.texts, model=a.model, cache_dir=a.cache_dir,
                                     form=a.form, max_tokens=a.max_tokens, chunk_chars=a.chunk_chars,
                                     limit=a.limit, max_memory_mb=a.max_memory_mb, deadline=a.deadline,
                                     progress=not a.json)
        except (ValueError, OSError) as e:   # unreadable texts, a model folder that is not one, wrong model
            print(f"seqr calibrate: {e}", file=sys.stderr)
            return 2
    else:
        def sequences():
            for f in a.files:
                yield dict(np.load(f))
        with _client(a) as c:
            r = c.calibrate(sequences(), library=a.library,
                            form="activations" if a.form == "auto" else a.form, timeout=a.deadline)
    _print(a, r, f"calibrated {len(r.adapters)} adapters on {r.sequences} sequences; library v{r.library_version}")
    return 0


@_run
def cmd_health(a) -> int:
    with _client(a) as c:
        s = c.health()
    print(s)
    return 0 if s == "SERVING" else 1


@_run
def cmd_host(a) -> int:
    from seqr_client.host_engine import adapter_folders
    from seqr_client.openai_host import HostConfig, HostServer, build_host

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    adapters = adapter_folders(a.adapters, a.adapter or [])
    cfg = HostConfig(served_name=a.served_model_name, router_required=a.router_required,
                     max_new_tokens=a.max_new_tokens, max_prompt_tokens=a.max_prompt_tokens, max_queue=a.max_queue)
    client = None if a.no_routing else _client(a)
    host = build_host(model=a.model, adapters=adapters, client=client, library=a.library, config=cfg,
                      top_k=a.top_k, min_margin=a.min_margin, form=a.form, route_tokens=a.route_tokens, router_timeout=a.router_timeout)
    print(f"seqr host: {len(adapters)} adapters on {a.model}; model {a.served_model_name!r} routes "
          f"{'nowhere (--no-routing)' if client is None else f'through {a.target}, library {a.library}'}",
          file=sys.stderr)
    HostServer(host, listen=a.listen, log_level=a.log_level).run()
    return 0


def fetch_scorer(a) -> bytes:
    """The library's ONNX scorer through the ExportScorer RPC (`seqr export ... --target`)."""
    from seqr_client import SeqrError
    try:
        with _client(a) as c:
            return c.export_scorer(a.library, form=a.form, tokens=a.tokens or 0, timeout=a.timeout)
    except SeqrError as e:
        raise SystemExit(f"export failed: {e.code}: {e}") from None


def add_commands(sub) -> None:
    libs = sub.add_parser("libraries", help="create and list libraries, fetch a library's shared A",
                          description="Create and list libraries; write a library's shared A for your own trainer.")
    libs = libs.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = libs.add_parser("create", help="create a library for one base model (with a shared frozen A)",
                          description="Create an empty library for one base model. The signature comes from the model's config.json (Llama family) or a JSON list of modules. With --shared-a-seed the library gets a frozen shared A per targeted module (PEFT's lora_A init, reproducible from the seed): adapter owners train only B against it and take the fast SEQR path. Without it every adapter takes the exact general path.")
    p.add_argument("name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-config", help="the base model's transformers config.json (Llama family)")
    src.add_argument("--signature", help='JSON {"base_model": ..., "modules": [[name, d_in, d_out], ...]}')
    p.add_argument("--base-model", default="", help="base model name recorded in the signature")
    p.add_argument("--shared-a-seed", type=int, help="generate the shared A from this seed (PEFT lora_A init)")
    p.add_argument("--shared-a-file", help=".npz of module -> A (r, d_in) to upload instead of a seed")
    p.add_argument("--rank", type=positive, default=8, help="shared A rank")
    p.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"], metavar="NAME",
                   help="module name suffixes that get a shared A (as PEFT's target_modules; 'all' for every module)")
    p.add_argument("--targets", dest="targets_deprecated", help=argparse.SUPPRESS)   # old spelling: warns
    p.add_argument("--shared-a-only", action="store_true",
                   help="refuse every adapter whose lora_A is not the library's shared A (no general adapters)")
    _common(p, library=False)
    p.set_defaults(func=cmd_libraries_create, targets_deprecated=None)
    p = libs.add_parser("ls", help="list libraries",
                          description='List the libraries visible to the caller with their versions and adapter counts.')
    _common(p, library=False)
    p.set_defaults(func=cmd_libraries_ls)
    p = libs.add_parser("shared-a", help="write a library's shared A as PEFT lora_A tensors (for your own trainer)",
                        description="Write the library's frozen shared A into DIR: shared_a.safetensors with PEFT's "
                                    "tensor names (base_model.model.<module>.lora_A.weight, float32), shared_a.json "
                                    "(library, version, rank, seed, target modules) and a README.md with the recipe: "
                                    "load it into lora_A with peft.set_peft_model_state_dict, freeze lora_A, train "
                                    "only lora_B with any trainer, save with safe_serialization, upload with "
                                    "`seqr adapters put`. The A is not secret (it is random).")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (created)")
    p.add_argument("--force", action="store_true", help="overwrite the files in an existing DIR")
    _common(p)
    p.set_defaults(func=cmd_libraries_shared_a)

    ads = sub.add_parser("adapters", help="upload, replace, list, delete adapters",
                         description="Upload (or replace in place), list and delete a library's adapters.")
    ads = ads.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = ads.add_parser("put", help="upload PEFT adapter folders (progress bar over all bytes)",
                          description='Upload one or more PEFT LoRA folders (adapter_config.json + adapter_model.safetensors; fp32/fp16/bf16). Each is checked (sha256, strict safetensors parsing - pickles are refused, base-model shapes, rank, finiteness) before it is stored encrypted; the name defaults to the folder name. A progress bar covers all bytes. With --replace an existing adapter is updated in place: same name and id, its version goes up by one, the old version is crypto-shredded and its calibration statistics dropped.')
    p.add_argument("dirs", nargs="+", help="folders with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--name", help="adapter name (default: the folder name; one folder only)")
    p.add_argument("--allow-general", action="store_true",
                   help="store an adapter whose lora_A is not the library's shared A as a general adapter "
                        "(exact but slower path; general adapters tend to win over shared-A ones). Without "
                        "it such an upload is refused; better: retrain it with `seqr train --library`")
    p.add_argument("--replace", action="store_true",
                   help="update existing adapters in place (same id, version + 1); NOT_FOUND if one does not exist")
    _common(p)
    p.set_defaults(func=cmd_adapters_put)
    p = ads.add_parser("ls", help="list adapters",
                          description='List the adapters of a library visible to the caller: id (stable, never reused), name, version, kind (shared_a / general / mixed), rank, modules, calibration.')
    _common(p)
    p.set_defaults(func=cmd_adapters_ls)
    p = ads.add_parser("rm", help="delete adapters (crypto-shredded; ids never reused)",
                          description="Delete adapters: each one's data key is destroyed (crypto-shredding) and it is never routed to again. Its id is never reused.")
    p.add_argument("names", nargs="+")
    _common(p)
    p.set_defaults(func=cmd_adapters_rm)

    p = sub.add_parser("route", help="route one request from an .npz (keys = module names)",
                          description='Route one request. The .npz maps module names (e.g. model.layers.0.self_attn.q_proj) to arrays in --form: activations (T, d_in), projected (T, r) or moments (r, r). --random T sends random activations for every shared-A module (a smoke test).')
    p.add_argument("npz", nargs="?", help=".npz of module name -> array in --form")
    p.add_argument("--form", choices=FORMS, default="activations", help="input form of the arrays in the .npz")
    p.add_argument("--tokens", type=positive, help="moments: tokens G was averaged over")
    p.add_argument("--random", type=positive, metavar="T", help="instead of a file: random activations, T tokens")
    p.add_argument("--top-k", type=positive, default=3, help="adapters to return, best first")
    p.add_argument("--method", default="seqr", choices=("seqr", "exact", "spectr", "arrow", "lag"),
                   help="scorer: seqr (exact, fast) or a baseline")
    p.add_argument("--normalisation", default="activation",
                   help="none | frobenius | activation | zscore[/adapter_module|adapter[/e|sqrt|log]]")
    p.add_argument("--granularity", default="sequence", choices=("sequence", "token"),
                   help="one decision for the request, or one per token")
    p.add_argument("--candidates", help="comma-separated adapter names to route among")
    _common(p)
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("describe", help="a library's signature, shared-A recipe, adapters, version",
                          description='Show a library: base model, modules, the shared-A recipe (seed) adapter owners train against, visible adapters, calibration and version.')
    _common(p)
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("calibrate", help="fit normalisation statistics from text (--texts) or .npz captures",
                          description='Fit the data-aware normalisations (activation, zscore) from unlabeled traffic. With --texts the prompts are run through the base model here (--model), the inputs of the modules the adapters target are captured and sent: projected z = A x for shared-A modules, activations where a module has adapters with their own A (--form overrides). Or give .npz files, each one sequence mapping module names to activations (T, d_in) or projected (T, r). The server keeps only streaming statistics, never the inputs. Traffic should look like what the router will see (prompts in the proportions they arrive, all domains mixed, no labels); the evaluation saturated at 270 chunks of ~128 tokens (see README).')
    p.add_argument("files", nargs="*", help=".npz files, one sequence each (instead of --texts)")
    p.add_argument("--texts", nargs="+", metavar="FILE",
                   help="UTF-8 text files (cut into ~--chunk-chars chunks, one sequence each) or .jsonl "
                        "(one prompt per line: a JSON string or an object with 'text' or 'prompt')")
    p.add_argument("--model", default=env("MODEL", "smollm2"),
                   help="with --texts: the base model, 'smollm2' or a local Hugging Face causal-LM folder [SEQR_MODEL]")
    p.add_argument("--cache-dir", default=None, help="cache root for the converted SmolLM2 (default $SEQR_CACHE_DIR or ~/.cache/seqr-router)")
    p.add_argument("--form", choices=("auto", "activations", "projected"), default="auto",
                   help="auto: projected where every adapter on a module shares its A, else activations "
                        "(.npz files: auto means activations)")
    p.add_argument("--max-tokens", type=positive, default=128, help="with --texts: tokens per sequence (longer prompts are cut)")
    p.add_argument("--chunk-chars", type=positive, default=600, help="with --texts: characters per chunk of a text file")
    p.add_argument("--limit", type=positive, help="with --texts: at most this many sequences")
    p.add_argument("--max-memory-mb", type=positive, default=4096,
                   help="with --texts: most memory the captured inputs may take (they are all captured "
                        "before the stream starts, which then finishes within the server's connection age)")
    p.add_argument("--deadline", type=seconds, default=3600.0, help="deadline of the whole calibration stream, seconds")
    _common(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("host", help="serve a model over an OpenAI-compatible HTTP API, routed by seqr",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="A reference OpenAI-compatible server (POST /v1/chat/completions, /v1/completions "
                                   "with stream=true as server-sent events; GET /v1/models) on transformers + PEFT. Per "
                                   "request it captures the prompt's inputs, routes through the service (moments for "
                                   "shared-A libraries), applies the adapter, a weighted top-k mix, or the base model "
                                   "below --min-margin, and generates. model='seqr' routes, 'base' is the base model, an "
                                   "adapter's name pins it. The response's `seqr` object and x-seqr-* headers say what "
                                   "served it. If routing fails the base model answers and says so (--router-required: "
                                   "503). Adapters are routed to only if this host's copy is the library's (sha256).")
    p.add_argument("--model", default=env("HOST_MODEL", "smollm2"),
                   help="local Hugging Face causal-LM folder, 'smollm2' or 'tiny' [SEQR_HOST_MODEL]")
    p.add_argument("--adapters", default=env("HOST_ADAPTERS"),
                   help="folder of PEFT adapter folders; each one's name is its folder name [SEQR_HOST_ADAPTERS]")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="one more adapter (repeatable)")
    p.add_argument("--listen", default=env("HOST_LISTEN", "127.0.0.1:8000"), help="HOST:PORT [SEQR_HOST_LISTEN]")
    p.add_argument("--served-model-name", default="seqr", help="the model id that routes")
    p.add_argument("--top-k", type=int, default=1, help="1: the best adapter; k > 1: a weighted mix of the top k")
    p.add_argument("--min-margin", type=float, default=0.0, help="below this margin the base model answers")
    p.add_argument("--form", choices=("auto", "moments", "projected", "activations"), default="auto",
                   help="what is sent: auto = moments when every adapter shares the library's A, else activations")
    p.add_argument("--route-tokens", type=int, default=512, help="route on the last N prompt tokens")
    p.add_argument("--router-timeout", type=seconds, default=env("ROUTER_TIMEOUT", 2.0),
                   help="deadline of each call to the router, seconds [SEQR_ROUTER_TIMEOUT]")
    p.add_argument("--router-required", action="store_true", help="503 instead of the base model when routing fails")
    p.add_argument("--no-routing", action="store_true", help="serve without the router (base model or pinned adapters)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="the most tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-queue", type=int, default=16, help="requests admitted at once; 429 beyond")
    p.add_argument("--log-level", default="info")
    _common(p)
    p.set_defaults(func=cmd_host)

    p = sub.add_parser("health", help="SERVING / NOT_SERVING (exit code 0 only when SERVING)",
                          description="Ask the server's grpc.health.v1 service. Prints SERVING or NOT_SERVING (loading, or shutting down); exit code 0 only when SERVING.")
    _common(p, library=False)
    p.set_defaults(func=cmd_health)
    add_train_command(sub)


def cmd_train(a) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return int(training.run(a) or 0)
    except ImportError as e:
        print(f"seqr train needs the training extras (torch, transformers, peft): {e}", file=sys.stderr)
        return 2


def add_train_command(sub) -> None:
    tr = sub.add_parser("train", help="train an adapter for a library (only B, against its shared A and background)",
                        description=training.DESCRIPTION)
    training.add_arguments(tr)
    tr.set_defaults(func=_run(cmd_train))
