"""`seqr`: run the service and manage it from the command line.

Every flag has a SEQR_* environment variable (shown in --help); flags win over variables.
Server-side commands (serve, keys, tokens) live here; client commands in cli_client.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seqr_core.errors import SeqrError

from . import cli_client
from .cli_client import env
from .config import KeySource, Limits, ServerConfig, StoreConfig, TLSConfig
from .export_cli import add_export_parser

EPILOG = """quick start:
  seqr serve                      # ./data, dev key, demo library, 127.0.0.1:50051, metrics :9464
  seqr describe --library demo    # in another shell
  seqr route --library demo --random 16
"""


def _bool(v) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    return str(v).lower() in ("1", "true", "yes", "on")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC service", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Run the router. With no flags: ./data, a development key created next to "
                                   "it (loud warning), the demo library on an empty store, open access "
                                   "(loud warning), 127.0.0.1:50051, metrics on 127.0.0.1:9464.")
    p.add_argument("--listen", default=env("LISTEN", "127.0.0.1:50051"),
                   help="HOST:PORT to bind; 0.0.0.0:50051 for all interfaces [SEQR_LISTEN]")
    p.add_argument("--data-dir", type=Path, default=Path(env("DATA_DIR", "data")),
                   help="encrypted store directory (created if missing) [SEQR_DATA_DIR]")
    p.add_argument("--metrics-port", default=env("METRICS_PORT", "9464"),
                   help="Prometheus /metrics port; 'off' disables [SEQR_METRICS_PORT]")
    p.add_argument("--metrics-host", default=env("METRICS_HOST", "127.0.0.1"), help="[SEQR_METRICS_HOST]")
    k = p.add_mutually_exclusive_group()
    k.add_argument("--key-file", type=Path, default=env("KEY_FILE"),
                   help="key-encryption key file made by `seqr keys init` [SEQR_KEY_FILE]")
    k.add_argument("--key-env", default=env("KEY_ENV"),
                   help="NAME of an environment variable holding base64 KEKs [SEQR_KEY_ENV]")
    k.add_argument("--key-command", default=env("KEY_COMMAND"),
                   help="external KMS/HSM plugin command line [SEQR_KEY_COMMAND]")
    p.add_argument("--tokens-file", type=Path, default=env("TOKENS_FILE"),
                   help="bearer tokens -> roles and adapter ACLs (see `seqr tokens new`); without it "
                        "the server is OPEN [SEQR_TOKENS_FILE]")
    p.add_argument("--tls-cert", type=Path, default=env("TLS_CERT"), help="server certificate (PEM) [SEQR_TLS_CERT]")
    p.add_argument("--tls-key", type=Path, default=env("TLS_KEY"), help="server private key (PEM) [SEQR_TLS_KEY]")
    p.add_argument("--tls-client-ca", type=Path, default=env("TLS_CLIENT_CA"),
                   help="require client certificates signed by this CA (mTLS) [SEQR_TLS_CLIENT_CA]")
    p.add_argument("--backend", choices=("numpy", "onnx"), default=env("BACKEND", "numpy"),
                   help="scorer backend [SEQR_BACKEND]")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--demo", dest="demo", action="store_true", default=_bool(env("DEMO")),
                   help="create the synthetic demo library if the store is empty (default: only with "
                        "the dev key) [SEQR_DEMO=1]")
    d.add_argument("--no-demo", dest="demo", action="store_false", help="never create the demo library")
    p.add_argument("--workers", type=int, default=int(env("WORKERS", "16")), help="handler threads [SEQR_WORKERS]")
    p.add_argument("--blas-threads", type=int, default=int(env("BLAS_THREADS", "1")),
                   help="BLAS threads per request; 1 is fastest under concurrent load because requests "
                        "already run in parallel (multi-threaded small GEMMs stall when a core is busy) "
                        "[SEQR_BLAS_THREADS]")
    p.add_argument("--grace", type=float, default=float(env("GRACE_S", "10")),
                   help="seconds in-flight RPCs get at shutdown [SEQR_GRACE_S]")
    p.add_argument("--drain", type=float, default=float(env("DRAIN_S", "0")),
                   help="seconds NOT_SERVING before refusing new RPCs (load balancers) [SEQR_DRAIN_S]")
    lim = Limits()
    p.add_argument("--max-message-mb", type=int, default=int(env("MAX_MESSAGE_MB", lim.max_message_bytes >> 20)),
                   help="largest gRPC message [SEQR_MAX_MESSAGE_MB]")
    p.add_argument("--max-tokens", type=int, default=int(env("MAX_TOKENS", lim.max_tokens)), help="[SEQR_MAX_TOKENS]")
    p.add_argument("--max-modules", type=int, default=int(env("MAX_MODULES", lim.max_modules)), help="[SEQR_MAX_MODULES]")
    p.add_argument("--max-top-k", type=int, default=int(env("MAX_TOP_K", lim.max_top_k)), help="[SEQR_MAX_TOP_K]")
    p.add_argument("--max-concurrent-rpcs", type=int,
                   default=int(env("MAX_CONCURRENT_RPCS", lim.max_concurrent_rpcs)), help="[SEQR_MAX_CONCURRENT_RPCS]")
    p.add_argument("--max-upload-mb", type=int, default=int(env("MAX_UPLOAD_MB", lim.max_upload_bytes >> 20)),
                   help="largest adapter upload [SEQR_MAX_UPLOAD_MB]")
    r = StoreConfig()
    p.add_argument("--processes", type=int, default=int(env("PROCESSES", "1")),
                   help="server processes on the one port (SO_REUSEPORT), each a replica of the store: use a "
                        "host's cores (Python serves one core per process) [SEQR_PROCESSES]")
    dsn = p.add_mutually_exclusive_group()
    dsn.add_argument("--store-dsn", default=None,    # read in store_config: --help must not print a password
                     help="keep the libraries in PostgreSQL (libpq DSN or URI) instead of --data-dir; any number "
                          "of replicas may share it. Prefer --store-dsn-file for passwords [SEQR_STORE_DSN]")
    dsn.add_argument("--store-dsn-file", type=Path, default=env("STORE_DSN_FILE"),
                     help="file holding the PostgreSQL DSN (e.g. a mounted Secret) [SEQR_STORE_DSN_FILE]")
    p.add_argument("--anchor-dir", type=Path, default=env("ANCHOR_DIR"),
                   help="rollback anchor directory (default: beside the key file, else <data-dir>.anchor) "
                        "[SEQR_ANCHOR_DIR]")
    p.add_argument("--poll-interval", type=float, default=float(env("POLL_INTERVAL", r.poll_s)),
                   help="replicas check the store for newer commits this often, seconds (PostgreSQL also "
                        "notifies at once) [SEQR_POLL_INTERVAL]")
    p.add_argument("--max-staleness", default=env("MAX_STALENESS", f"{r.max_staleness_s:g}"),
                   help="seconds a replica may go without reaching its store before it reports NOT_SERVING "
                        "and refuses reads; 'off' never [SEQR_MAX_STALENESS]")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "info"), help="[SEQR_LOG_LEVEL]")
    p.add_argument("--log-format", choices=("json", "text"), default=env("LOG_FORMAT", "json"), help="[SEQR_LOG_FORMAT]")
    p.set_defaults(func=cmd_serve)


def config_from_args(a) -> ServerConfig:
    tls = None
    if a.tls_cert or a.tls_key:
        if not (a.tls_cert and a.tls_key):
            raise SystemExit("seqr serve: --tls-cert and --tls-key go together")
        tls = TLSConfig(cert_file=a.tls_cert, key_file=a.tls_key, client_ca_file=a.tls_client_ca)
    metrics = None if str(a.metrics_port).lower() in ("off", "none", "-1") else int(a.metrics_port)
    return ServerConfig(store=store_config(a),
        listen=a.listen, data_dir=a.data_dir, metrics_port=metrics, metrics_host=a.metrics_host,
        keys=KeySource(key_file=Path(a.key_file) if a.key_file else None, key_env=a.key_env,
                       key_command=a.key_command),
        tokens_file=Path(a.tokens_file) if a.tokens_file else None, tls=tls, backend=a.backend,
        demo=a.demo, workers=a.workers, blas_threads=a.blas_threads, grace_s=a.grace, drain_s=a.drain,
        limits=Limits(max_message_bytes=a.max_message_mb << 20, max_tokens=a.max_tokens,
                      max_modules=a.max_modules, max_top_k=a.max_top_k,
                      max_concurrent_rpcs=a.max_concurrent_rpcs, max_upload_bytes=a.max_upload_mb << 20))


def store_config(a) -> StoreConfig:
    dsn = a.store_dsn or (env("STORE_DSN") if a.store_dsn_file is None else None)
    if a.store_dsn_file is not None:
        try:
            dsn = a.store_dsn_file.read_text().strip()
        except OSError as e:
            raise SystemExit(f"seqr serve: cannot read --store-dsn-file {a.store_dsn_file}: {e.strerror}")
    budget = None if str(a.max_staleness).lower() in ("off", "none") else float(a.max_staleness)
    return StoreConfig(dsn=dsn or None, anchor_dir=a.anchor_dir, poll_s=a.poll_interval, max_staleness_s=budget)


def cmd_serve(a) -> int:
    from . import logs
    json_logs = a.log_format == "json"
    logs.setup(a.log_level, json_format=json_logs)
    if a.processes > 1:
        from .processes import serve_group
        return serve_group(config_from_args(a), processes=a.processes, log_level=a.log_level, json_logs=json_logs)
    from .app import serve
    return serve(config_from_args(a))


def cmd_keys_init(a) -> int:
    from .store import init_key_file
    key_id = init_key_file(a.path)
    print(f"created {a.path} (mode 0600), key id {key_id}. Keep it away from the data directory "
          f"and back it up: without it the store cannot be read.")
    return 0


def cmd_tokens_new(a) -> int:
    from .auth import append_token, new_token_entry
    token, entry = new_token_entry(name=a.name, roles=a.role, libraries=a.libraries or ["*"],
                                   adapters=a.adapters or ["*"])
    append_token(a.file, entry)
    print(token)
    print(f"added {a.name!r} ({', '.join(a.role)}) to {a.file}; the token above is shown only once. "
          "Restart the server to pick it up.", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="seqr", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="seqr-router: route LLM requests to LoRA adapters from their own "
                                             "activations (SEQR). Privacy-first, on-prem gRPC service.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)

    keys = sub.add_parser("keys", help="key-encryption keys for the store").add_subparsers(dest="sub", required=True)
    ki = keys.add_parser("init", help="create a new key file (mode 0600); refuses to overwrite",
                         description="Create a key file holding one new 256-bit key-encryption key (KEK), "
                                     "mode 0600. Every stored object is encrypted with its own data key, "
                                     "wrapped by this KEK. Keep it off the data volume and back it up: "
                                     "without it the store cannot be read. Use it with "
                                     "`seqr serve --key-file PATH` (or SEQR_KEY_FILE).")
    ki.add_argument("path", type=Path, help="where to write the key file (must not exist)")
    ki.set_defaults(func=cmd_keys_init)

    tokens = sub.add_parser("tokens", help="bearer tokens for callers").add_subparsers(dest="sub", required=True)
    tn = tokens.add_parser("new", help="mint a token, append its digest to the tokens file, print the token once",
                           description="Mint a random bearer token for one caller and append its SHA-256 "
                                       "digest, roles and ACL globs to the tokens file (created 0600; it "
                                       "never holds the token itself). Roles: route (Route, RouteStream, "
                                       "DescribeLibrary), observer (Describe/List), admin (everything). "
                                       "The caller sends 'authorization: Bearer <token>' (seqr_client: "
                                       "RouterClient(..., token=...); CLI: --token / SEQR_TOKEN).")
    tn.add_argument("--file", type=Path, required=True, help="tokens file (created 0600)")
    tn.add_argument("--name", required=True)
    tn.add_argument("--role", action="append", choices=("route", "observer", "admin"), required=True,
                    help="repeat for several roles")
    tn.add_argument("--libraries", action="append", help="glob of library names (repeatable; default *)")
    tn.add_argument("--adapters", action="append", help="glob of adapter names it may use (repeatable; default *)")
    tn.set_defaults(func=cmd_tokens_new)

    cli_client.add_commands(sub)

    exp = add_export_parser(sub, load_library=load_library_offline)
    exp.add_argument("--data-dir", type=Path, default=Path(env("DATA_DIR", "data")),
                     help="the store to read (the server must be stopped: the store is locked) [SEQR_DATA_DIR]")
    exp.add_argument("--key-file", type=Path, default=env("KEY_FILE"), help="[SEQR_KEY_FILE]")
    exp.add_argument("--key-env", default=env("KEY_ENV"), help="[SEQR_KEY_ENV]")
    exp.add_argument("--key-command", default=env("KEY_COMMAND"), help="[SEQR_KEY_COMMAND]")

    tr = sub.add_parser("train", help="train an adapter for a library (seqr_client.training)", add_help=False)
    tr.add_argument("rest", nargs=argparse.REMAINDER)
    tr.set_defaults(func=cmd_train)
    _add_model_demo(sub)
    return ap


def load_library_offline(a):
    """A library's index straight from the store (for `seqr export`, with the server stopped)."""
    from .app import key_provider
    from .auth import OPEN
    from .manager import LibraryManager
    from .store import LibraryStore
    keys = KeySource(key_file=Path(a.key_file) if a.key_file else None, key_env=a.key_env,
                     key_command=a.key_command)
    store = LibraryStore.open(a.data_dir, key_provider(keys, a.data_dir), create=False)
    try:
        manager = LibraryManager(store)
        manager.load()
        return manager.get(a.library, OPEN).index
    finally:
        store.close()


def cmd_train(a) -> int:
    try:
        from seqr_client import training
    except ImportError as e:
        print(f"seqr train needs the training extras (torch, transformers, peft): {e}", file=sys.stderr)
        return 2
    return int(training.main(a.rest) or 0)


# --- `seqr demo` (issue 6, helper "eval"): the real-model demo lives in model_demo.py -------------
def _add_model_demo(sub) -> None:
    from . import model_demo
    p = sub.add_parser("demo", help="real-model demo: SmolLM2-135M + trained adapters, routed by the service",
                       description=model_demo.__doc__.split("\n\n")[0])
    model_demo.add_arguments(p)
    p.set_defaults(func=model_demo.run)
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SeqrError as e:
        print(json.dumps({"error": e.code, "field": e.field, "message": str(e)}), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
