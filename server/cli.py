"""Server-side commands of `seqr`: serve, keys, tokens, export, backup, restore.

Every flag has a SEQR_* environment variable (shown in --help); flags win over variables.
``seqr_cli`` mounts these with :func:`add_commands`; client commands live in seqr_client.cli.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from seqr_core.config_values import ConfigError, env_default, flag, port_or_off, positive, seconds, seconds_or_off
from seqr_core.errors import InvalidArgumentError, SeqrError

from . import ops_cli
from .config import KeySource, Limits, ServerConfig, StoreConfig, TLSConfig
from .export_cli import add_export_parser


def env(name: str, default=None):
    """The SEQR_<name> environment variable (every flag's default); a value that does not parse
    is reported under the variable's name (seqr_core.config_values)."""
    return env_default(os.environ, f"SEQR_{name}", default)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC service",
                       description="Run the router. With no flags: ./data, a development key created next to "
                                   "it (loud warning), the demo library on an empty store, open access "
                                   "(loud warning), 127.0.0.1:50051, metrics on 127.0.0.1:9464.")
    p.add_argument("--listen", default=env("LISTEN", "127.0.0.1:50051"),
                   help="HOST:PORT to bind; 0.0.0.0:50051 for all interfaces [SEQR_LISTEN]")
    p.add_argument("--data-dir", type=Path, default=Path(env("DATA_DIR", "data")),
                   help="encrypted store directory (created if missing) [SEQR_DATA_DIR]")
    p.add_argument("--anchor-dir", type=Path, default=env("ANCHOR_DIR"),
                   help="rollback anchor directory, outside the data directory (default: <key file>.anchors, "
                        "or <data-dir>.anchor for env/command keys); needed when the key file is read-only "
                        "[SEQR_ANCHOR_DIR]")
    p.add_argument("--metrics-port", type=port_or_off, default=env("METRICS_PORT", 9464),
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
                        "the server is OPEN, which is refused off loopback [SEQR_TOKENS_FILE]")
    p.add_argument("--insecure-open", action="store_true", default=env("INSECURE_OPEN", False),
                   help="allow an OPEN server (no --tokens-file) on a non-loopback --listen: any "
                        "caller that reaches the port may route, export and delete [SEQR_INSECURE_OPEN=1]")
    p.add_argument("--audit-log", default=env("AUDIT_LOG"),
                   help="hash-chained audit log of admin changes, exports and refused calls; 'off' disables "
                        "(loud warning). Default: <data-dir>.audit.log [SEQR_AUDIT_LOG]")
    p.add_argument("--tls-cert", type=Path, default=env("TLS_CERT"), help="server certificate (PEM) [SEQR_TLS_CERT]")
    p.add_argument("--tls-key", type=Path, default=env("TLS_KEY"), help="server private key (PEM) [SEQR_TLS_KEY]")
    p.add_argument("--tls-client-ca", type=Path, default=env("TLS_CLIENT_CA"),
                   help="require client certificates signed by this CA (mTLS; needs --tls-cert and "
                        "--tls-key) [SEQR_TLS_CLIENT_CA]")
    p.add_argument("--backend", choices=("numpy", "onnx"), default=env("BACKEND", "numpy"),
                   help="scorer backend [SEQR_BACKEND]")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--demo", dest="demo", action="store_true", default=env("DEMO"),
                   help="create the synthetic demo library if the store is empty (default: only with "
                        "the dev key) [SEQR_DEMO=1]")
    d.add_argument("--no-demo", dest="demo", action="store_false", help="never create the demo library")
    p.add_argument("--workers", type=positive, default=env("WORKERS", "16"),
                   help="threads that run requests' CPU work (scoring, parsing, store writes); waiting for "
                        "the network costs none [SEQR_WORKERS]")
    p.add_argument("--blas-threads", type=positive, default=env("BLAS_THREADS", "1"),
                   help="BLAS threads per request; 1 is fastest under concurrent load because requests "
                        "already run in parallel (multi-threaded small GEMMs stall when a core is busy) "
                        "[SEQR_BLAS_THREADS]")
    p.add_argument("--grace", type=seconds, default=env("GRACE_S", "10"),
                   help="seconds in-flight RPCs get at shutdown [SEQR_GRACE_S]")
    p.add_argument("--drain", type=seconds, default=env("DRAIN_S", "0"),
                   help="seconds NOT_SERVING before refusing new RPCs (load balancers) [SEQR_DRAIN_S]")
    lim = Limits()
    p.add_argument("--max-message-mb", type=positive, default=env("MAX_MESSAGE_MB", lim.max_message_bytes >> 20),
                   help="largest gRPC message [SEQR_MAX_MESSAGE_MB]")
    p.add_argument("--max-tokens", type=positive, default=env("MAX_TOKENS", lim.max_tokens), help="[SEQR_MAX_TOKENS]")
    p.add_argument("--max-modules", type=positive, default=env("MAX_MODULES", lim.max_modules), help="[SEQR_MAX_MODULES]")
    p.add_argument("--max-top-k", type=positive, default=env("MAX_TOP_K", lim.max_top_k), help="[SEQR_MAX_TOP_K]")
    p.add_argument("--max-concurrent-rpcs", type=positive,
                   default=env("MAX_CONCURRENT_RPCS", lim.max_concurrent_rpcs),
                   help="calls open at once, whole server [SEQR_MAX_CONCURRENT_RPCS]")
    p.add_argument("--max-calls-per-principal", type=positive,
                   default=env("MAX_CALLS_PER_PRINCIPAL", lim.max_calls_per_principal),
                   help="calls one caller may hold open at once (waiting ones included); more are "
                        "RESOURCE_EXHAUSTED [SEQR_MAX_CALLS_PER_PRINCIPAL]")
    p.add_argument("--max-streams-per-connection", type=positive,
                   default=env("MAX_STREAMS_PER_CONNECTION", lim.max_streams_per_connection),
                   help="HTTP/2 streams one connection may open at once [SEQR_MAX_STREAMS_PER_CONNECTION]")
    p.add_argument("--read-timeout", type=seconds, default=env("READ_TIMEOUT_S", lim.read_timeout_s),
                   help="seconds a unary request's message may take to arrive [SEQR_READ_TIMEOUT_S]")
    p.add_argument("--stream-idle", type=seconds, default=env("STREAM_IDLE_S", lim.stream_idle_s),
                   help="seconds a stream may wait for its next message [SEQR_STREAM_IDLE_S]")
    p.add_argument("--max-upload-mb", type=positive, default=env("MAX_UPLOAD_MB", lim.max_upload_bytes >> 20),
                   help="largest adapter upload [SEQR_MAX_UPLOAD_MB]")
    p.add_argument("--max-name-length", type=positive, default=env("MAX_NAME_LENGTH", lim.max_name_length),
                   help="longest name in a request (library, adapter, module, tensor, file); names use "
                        "[A-Za-z0-9._:/@+=-] [SEQR_MAX_NAME_LENGTH]")
    p.add_argument("--max-meta-value-length", type=positive,
                   default=env("MAX_META_VALUE_LENGTH", lim.max_meta_value_length),
                   help="longest free-text meta value [SEQR_MAX_META_VALUE_LENGTH]")
    p.add_argument("--max-library-modules", type=positive,
                   default=env("MAX_LIBRARY_MODULES", lim.max_library_modules),
                   help="modules in one library's signature [SEQR_MAX_LIBRARY_MODULES]")
    p.add_argument("--max-d-in", type=positive, default=env("MAX_D_IN", lim.max_d_in),
                   help="largest module input size [SEQR_MAX_D_IN]")
    p.add_argument("--max-d-out", type=positive, default=env("MAX_D_OUT", lim.max_d_out),
                   help="largest module output size [SEQR_MAX_D_OUT]")
    p.add_argument("--max-rank", type=positive, default=env("MAX_RANK", lim.max_rank),
                   help="largest shared-A rank [SEQR_MAX_RANK]")
    p.add_argument("--max-shared-a-mb", type=positive,
                   default=env("MAX_SHARED_A_MB", lim.max_shared_a_bytes >> 20),
                   help="largest shared A of one library (fp32, held in memory and on disk); the "
                        "default fits Llama-3-70B's 7 modules x 80 layers at rank 64 [SEQR_MAX_SHARED_A_MB]")
    p.add_argument("--decision-log", metavar="FILE|-", default=env("DECISION_LOG"),
                   help="append one JSON line per routing decision (time, library, version, caller, top-k "
                        "ids and scores, margin; never activations) to FILE (mode 0600), '-' for stdout "
                        "[SEQR_DECISION_LOG]")
    p.add_argument("--learn-from-traffic", action="store_true", default=env("LEARN_FROM_TRAFFIC", False),
                   help="learn aggregates (never a sequence) from routed traffic, in the worker pool after each "
                        "answer: a decayed moment pool that reports calibration drift (seqr_calibration_drift), "
                        "and statistics for adapters that have none (e.g. general ones uploaded after the "
                        "last Calibrate). Off by default: route callers then shape those statistics "
                        "[SEQR_LEARN_FROM_TRAFFIC=1]")
    p.add_argument("--learn-half-life", type=seconds, default=env("LEARN_HALF_LIFE", 5000.0),
                   help="half-life of the traffic moments, in sequences [SEQR_LEARN_HALF_LIFE]")
    p.add_argument("--learn-min-sequences", type=positive, default=env("LEARN_MIN_SEQUENCES", 256),
                   help="routed sequences before learned statistics are stored [SEQR_LEARN_MIN_SEQUENCES]")
    r = StoreConfig()
    p.add_argument("--processes", type=positive, default=env("PROCESSES", 1),
                   help="server processes on the one port (SO_REUSEPORT), each a replica of the store: use a "
                        "host's cores (Python serves one core per process) [SEQR_PROCESSES]")
    add_dsn_flags(p)
    p.add_argument("--poll-interval", type=seconds, default=env("POLL_INTERVAL", r.poll_s),
                   help="replicas check the store for newer commits this often, seconds (PostgreSQL also "
                        "notifies at once) [SEQR_POLL_INTERVAL]")
    p.add_argument("--max-staleness", type=seconds_or_off, default=env("MAX_STALENESS", r.max_staleness_s),
                   help="seconds a replica may go without reaching its store before it reports NOT_SERVING "
                        "and refuses reads; 'off' never [SEQR_MAX_STALENESS]")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "info"), help="[SEQR_LOG_LEVEL]")
    p.add_argument("--log-format", choices=("json", "text"), default=env("LOG_FORMAT", "json"), help="[SEQR_LOG_FORMAT]")
    p.set_defaults(func=cmd_serve)


def config_from_args(a) -> ServerConfig:
    """The config the flags describe; InvalidArgumentError for unsafe or incomplete ones."""
    tls = None
    if a.tls_cert or a.tls_key or a.tls_client_ca:     # TLSConfig refuses any of them alone
        tls = TLSConfig(cert_file=a.tls_cert, key_file=a.tls_key, client_ca_file=a.tls_client_ca)
    return ServerConfig(store=store_config(a),
        listen=a.listen, data_dir=a.data_dir, anchor_dir=Path(a.anchor_dir) if a.anchor_dir else None,
        metrics_port=a.metrics_port, metrics_host=a.metrics_host,
        keys=KeySource(key_file=Path(a.key_file) if a.key_file else None, key_env=a.key_env,
                       key_command=a.key_command),
        tokens_file=Path(a.tokens_file) if a.tokens_file else None, insecure_open=flag(a.insecure_open),
        tls=tls, backend=a.backend,
        audit=str(a.audit_log).lower() != "off",
        audit_log=Path(a.audit_log) if a.audit_log and str(a.audit_log).lower() != "off" else None,
        demo=None if a.demo is None else flag(a.demo), workers=a.workers, blas_threads=a.blas_threads,
        grace_s=a.grace, drain_s=a.drain, decision_log=a.decision_log or None,
        learn_from_traffic=flag(a.learn_from_traffic), learn_half_life=a.learn_half_life,
        learn_min_sequences=a.learn_min_sequences,
        limits=Limits(max_message_bytes=a.max_message_mb << 20, max_tokens=a.max_tokens,
                      max_modules=a.max_modules, max_top_k=a.max_top_k,
                      max_concurrent_rpcs=a.max_concurrent_rpcs, max_upload_bytes=a.max_upload_mb << 20,
                      max_calls_per_principal=a.max_calls_per_principal,
                      max_streams_per_connection=a.max_streams_per_connection,
                      read_timeout_s=a.read_timeout, stream_idle_s=a.stream_idle,
                      max_name_length=a.max_name_length, max_meta_value_length=a.max_meta_value_length,
                      max_library_modules=a.max_library_modules, max_d_in=a.max_d_in, max_d_out=a.max_d_out,
                      max_rank=a.max_rank, max_shared_a_bytes=a.max_shared_a_mb << 20))


def store_config(a) -> StoreConfig:
    """Where the libraries live (see add_dsn_flags)."""
    return StoreConfig(dsn=ops_cli.dsn_from_args(a), poll_s=a.poll_interval, max_staleness_s=a.max_staleness)


def cmd_serve(a) -> int:
    try:
        config = config_from_args(a)
    except ConfigError:                  # a variable or flag that does not parse: seqr_cli says which
        raise
    except InvalidArgumentError as e:    # one line an operator can act on, before anything starts
        print(f"seqr serve: refusing to start: {e.message}", file=sys.stderr)
        return 2
    from . import logs
    json_logs = a.log_format == "json"
    logs.setup(a.log_level, json_format=json_logs)
    if a.processes > 1:
        from .processes import serve_group
        return serve_group(config, processes=a.processes, log_level=a.log_level, json_logs=json_logs)
    from .app import serve
    return serve(config)


def cmd_keys_init(a) -> int:
    from .audit import NO_AUDIT, AuditLog
    from .store import init_key_file
    audit = AuditLog(a.audit_log) if a.audit_log else NO_AUDIT
    try:
        with audit.mutation(principal=f"local:{_local_user()}", action="keys.init", path=str(a.path)) as out:
            key_id = init_key_file(a.path)
            out["key_id"] = key_id
    finally:
        audit.close()
    print(f"created {a.path} (mode 0600), key id {key_id}. Keep it away from the data directory "
          f"and back it up: without it the store cannot be read.")
    return 0


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError("must be a non-negative integer")
    return n


def cmd_tokens_new(a) -> int:
    from .auth import append_token, new_token_entry
    from .quotas import Quota
    quota = Quota(libraries=a.quota_libraries, adapters=a.quota_adapters, bytes=a.quota_bytes)
    token, entry = new_token_entry(name=a.name, roles=a.role, libraries=a.libraries or ["*"],
                                   adapters=a.adapters or ["*"], quota=quota)
    append_token(a.file, entry)
    print(token)
    print(f"added {a.name!r} ({', '.join(a.role)}) to {a.file}; the token above is shown only once. "
          "A running server picks it up within a second (at once on SIGHUP).", file=sys.stderr)
    return 0


def _local_user() -> str:
    import getpass
    try:
        return getpass.getuser()
    except (KeyError, OSError):       # no passwd entry (containers)
        return f"uid {os.getuid()}"


def cmd_audit_verify(a) -> int:
    from .audit_chain import verify
    try:
        v = verify(a.file)
    except OSError as e:
        print(f"seqr audit verify: cannot read {a.file}: {e.strerror}", file=sys.stderr)
        return 2
    if not v.ok:
        print(f"BROKEN: {a.file}: line {v.line}: {v.reason} ({v.records} records verified before it)")
        return 1
    pending = f"; {v.open_intents} change(s) logged as intent without a result" if v.open_intents else ""
    print(f"OK: {a.file}: {v.records} records, head {v.head}{pending}")
    return 0


def add_commands(sub, *, remote_export=None) -> None:
    """serve, keys, tokens, export, backup, restore on a ``seqr`` sub-command set.
    ``remote_export(args) -> bytes``: `seqr export --target` (seqr_cli passes the client's)."""
    _add_serve(sub)

    keys = sub.add_parser("keys", help="key-encryption keys for the store").add_subparsers(dest="sub", required=True)
    ki = keys.add_parser("init", help="create a new key file (mode 0600); refuses to overwrite",
                         description="Create a key file holding one new 256-bit key-encryption key (KEK), "
                                     "mode 0600. Every stored object is encrypted with its own data key, "
                                     "wrapped by this KEK. Keep it off the data volume and back it up: "
                                     "without it the store cannot be read. Use it with "
                                     "`seqr serve --key-file PATH` (or SEQR_KEY_FILE).")
    ki.add_argument("path", type=Path, help="where to write the key file (must not exist)")
    ki.add_argument("--audit-log", type=Path, default=env("AUDIT_LOG"),
                    help="record the operation (who, when, key id) in this audit log; not while a server "
                         "holds it [SEQR_AUDIT_LOG]")
    ki.set_defaults(func=cmd_keys_init)
    ops_cli.add_keys_commands(keys, add_store_flags=add_store_flags)

    tokens = sub.add_parser("tokens", help="bearer tokens for callers").add_subparsers(dest="sub", required=True)
    tn = tokens.add_parser("new", help="mint a token, append its digest to the tokens file, print the token once",
                           description="Mint a random bearer token for one caller and append its SHA-256 "
                                       "digest, roles and ACL globs to the tokens file (created 0600; it "
                                       "never holds the token itself). Roles: route (Route, RouteStream, "
                                       "DescribeLibrary), observer (Describe/List), admin (everything). "
                                       "The caller sends 'authorization: Bearer <token>' (seqr_client: "
                                       "RouterClient(..., token=...); CLI: --token / SEQR_TOKEN).")
    tn.add_argument("--file", type=Path, required=True, help="tokens file (created 0600)")
    tn.add_argument("--name", required=True, help="the caller's name (audit log, quota account)")
    tn.add_argument("--role", action="append", choices=("route", "observer", "admin"), required=True,
                    help="repeat for several roles")
    tn.add_argument("--libraries", action="append", help="glob of library names (repeatable; default *)")
    tn.add_argument("--adapters", action="append", help="glob of adapter names it may use (repeatable; default *)")
    tn.add_argument("--quota-libraries", type=_count, metavar="N", help="most libraries it may create and own")
    tn.add_argument("--quota-adapters", type=_count, metavar="N", help="most adapters it may upload and own")
    tn.add_argument("--quota-bytes", type=_count, metavar="N",
                    help="most bytes it may own: uploaded adapter files plus its libraries' shared A")
    tn.set_defaults(func=cmd_tokens_new)

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(dest="sub", required=True)
    av = audit.add_parser("verify", help="check an audit log's hash chain",
                          description="Check every line of an audit log: canonical JSON, its own hash, sequence "
                                      "number and the sha256 of the line before. Prints the head (seq:sha256); "
                                      "compare it with a copy kept elsewhere to detect lines cut from the end. "
                                      "Exit 0: intact; 1: broken (the first broken line is printed); 2: unreadable.")
    av.add_argument("file", type=Path)
    av.set_defaults(func=cmd_audit_verify)

    add_export_parser(sub, load_library=load_library_offline, remote_export=remote_export,
                      store_flags=lambda p: add_store_flags(p, what="the store to read (offline: without --target)"))
    ops_cli.add_backup_commands(sub, add_store_flags=add_store_flags)


def add_store_flags(p: argparse.ArgumentParser, *, what: str) -> None:
    """--data-dir and the key source, for commands that open the store offline."""
    p.add_argument("--data-dir", type=Path, default=Path(env("DATA_DIR", "data")),
                   help=f"{what} (the server must be stopped: the store is locked) [SEQR_DATA_DIR]")
    p.add_argument("--anchor-dir", type=Path, default=env("ANCHOR_DIR"),
                   help="rollback anchor directory, as for serve [SEQR_ANCHOR_DIR]")
    p.add_argument("--key-file", type=Path, default=env("KEY_FILE"), help="[SEQR_KEY_FILE]")
    p.add_argument("--key-env", default=env("KEY_ENV"), help="[SEQR_KEY_ENV]")
    p.add_argument("--key-command", default=env("KEY_COMMAND"), help="[SEQR_KEY_COMMAND]")
    add_dsn_flags(p)


def add_dsn_flags(p: argparse.ArgumentParser) -> None:
    """--store-dsn / --store-dsn-file (PostgreSQL instead of --data-dir); the DSN is never a default
    (--help must not print a password): it is read from SEQR_STORE_DSN when the flag is absent."""
    dsn = p.add_mutually_exclusive_group()
    dsn.add_argument("--store-dsn", default=None,
                     help="the libraries are in PostgreSQL (libpq DSN or URI) instead of --data-dir; prefer "
                          "--store-dsn-file for passwords [SEQR_STORE_DSN]")
    dsn.add_argument("--store-dsn-file", type=Path, default=env("STORE_DSN_FILE"),
                     help="file holding the PostgreSQL DSN (e.g. a mounted Secret) [SEQR_STORE_DSN_FILE]")
    p.set_defaults(store_dsn_env=env("STORE_DSN"))


def key_source(a) -> KeySource:
    return KeySource(key_file=Path(a.key_file) if a.key_file else None, key_env=a.key_env,
                     key_command=a.key_command)


def load_library_offline(a):
    """A library's index straight from the store (for `seqr export`; a data directory's server must be
    stopped, a PostgreSQL store is read beside its replicas)."""
    from .app import key_provider
    from .auth import OPEN
    from .manager import LibraryManager
    store = ops_cli.open_offline(a, key_provider(key_source(a), a.data_dir))
    try:
        manager = LibraryManager(store)
        manager.load()
        return manager.get(a.library, OPEN).index
    finally:
        store.close()
