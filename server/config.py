"""Server configuration: frozen dataclasses, built by the CLI from flags and SEQR_* variables.

Limits are explicit so every refusal can name the limit it applied. Defaults fit one
SmolLM2-sized library: a 128-token prompt with q/v activations on 30 layers is 8.8 MB fp32.
Library-shape limits fit Llama-3-70B (80 layers x 7 modules, d_in up to 28672).

Unsafe combinations are refused when the config is built (``__post_init__``), so the CLI,
create_server and every embedder get the same refusal before anything starts.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from seqr_core.errors import InvalidArgumentError


@dataclass(frozen=True)
class Limits:
    """Per-request and per-server limits. Exceeding one is RESOURCE_EXHAUSTED naming it."""

    max_message_bytes: int = 64 << 20       # gRPC receive/send limit per message
    max_tokens: int = 8192                  # T of one request (activations/projected)
    max_modules: int = 1024                 # module inputs per request
    max_tensors: int = 1024                 # named tensors per request
    max_top_k: int = 64
    max_candidates: int = 4096
    max_concurrent_rpcs: int = 4096         # whole server; beyond it gRPC answers RESOURCE_EXHAUSTED
    max_calls_per_principal: int = 128      # one caller's open calls, waiting ones included
    max_streams_per_connection: int = 128   # HTTP/2 streams one connection may open at once
    read_timeout_s: float = 30.0            # a unary request's message must arrive within this
    stream_idle_s: float = 300.0            # longest wait for the next message of a stream
    max_upload_bytes: int = 512 << 20       # all files of one adapter
    max_upload_files: int = 4
    max_calibration_sequences: int = 1_000_000
    # Pooled moments kept per library (seqr_core.moments): second-order ones (K×K float64 per
    # shared-A module, K = r(r+1)/2) only while they fit this budget; first moments always.
    # 60 modules at rank 8 take 0.6 MB, 560 modules at rank 16 83 MB.
    max_moment_bytes: int = 64 << 20
    # The background (pooled E[z zᵀ]) is published only when it pools at least this many sequences.
    min_background_sequences: int = 16
    # Every caller-supplied string is checked at the wire (server/request_bounds.py).
    max_name_length: int = 256              # names: library, adapter, module, tensor, file, base model
    max_meta_value_length: int = 1024       # free-text meta values
    # Library shape, checked before CreateLibrary allocates anything. The shared A is held in
    # memory and on disk (fp32): 2 GiB fits Llama-3-70B's 7 modules x 80 layers at rank 64,
    # or q/v at rank 256.
    max_library_modules: int = 1024
    max_d_in: int = 65536
    max_d_out: int = 65536
    max_rank: int = 256
    max_shared_a_bytes: int = 2 << 30


@dataclass(frozen=True)
class TLSConfig:
    """Server TLS. With ``client_ca_file`` clients must present a certificate it signed (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def __post_init__(self) -> None:
        missing = [f for f in ("cert_file", "key_file") if getattr(self, f) is None]
        if missing:
            # Otherwise the server would run plaintext and nobody would notice the missing mTLS.
            why = " (--tls-client-ca alone would run plaintext, without mTLS)" if len(missing) == 2 else ""
            raise InvalidArgumentError(f"TLS needs both --tls-cert and --tls-key{why}",
                                       field=f"tls.{missing[0]}")


@dataclass(frozen=True)
class KeepaliveConfig:
    """HTTP/2 keepalive. Clients ping every 30 s (see seqr_client.channel); we allow 10 s."""

    time_ms: int = 60_000                   # server pings idle connections this often
    timeout_ms: int = 20_000
    min_client_ping_interval_ms: int = 10_000
    # Rotating long-lived connections lets round_robin clients behind a headless Service
    # discover new pods; in-flight calls get max_connection_age_grace_ms to finish.
    max_connection_age_ms: int = 300_000
    max_connection_age_grace_ms: int = 30_000


@dataclass(frozen=True)
class KeySource:
    """Where the store's key-encryption key comes from; all None means the dev key file."""

    key_file: Path | None = None
    key_env: str | None = None              # name of an environment variable
    key_command: str | None = None          # external KMS/HSM plugin command line

    @property
    def is_dev(self) -> bool:
        return self.key_file is None and self.key_env is None and self.key_command is None


@dataclass(frozen=True)
class StoreConfig:
    """Where the libraries live, and how a replica follows other processes' commits.

    ``dsn`` None: the data directory (``ServerConfig.data_dir``), exclusive to this process
    unless ``shared`` (a ``--processes`` group). A PostgreSQL ``dsn``: any number of replicas."""

    dsn: str | None = None                  # libpq connection string / URI (may hold a password)
    shared: bool = False                    # directory shared by a process group
    poll_s: float = 1.0                     # followers check the store's head this often
    max_staleness_s: float | None = 300.0   # past this without the store: NOT_SERVING; None: never

    def __post_init__(self) -> None:
        if not self.poll_s > 0:
            raise InvalidArgumentError("--poll-interval must be more than 0 seconds", field="poll_interval",
                                       limit="> 0", actual=self.poll_s)
        if self.max_staleness_s is not None and not self.max_staleness_s > 0:
            raise InvalidArgumentError("--max-staleness must be more than 0 seconds, or 'off'",
                                       field="max_staleness", limit="> 0", actual=self.max_staleness_s)

    def __repr__(self) -> str:        # never print the DSN: it may hold a password
        return (f"StoreConfig(dsn={'<set>' if self.dsn else None}, shared={self.shared}, poll_s={self.poll_s}, "
                f"max_staleness_s={self.max_staleness_s})")

    @property
    def follows(self) -> bool:
        return self.dsn is not None or self.shared


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("data")
    anchor_dir: Path | None = None          # rollback anchor; None: beside the key file (or the data)
    metrics_port: int | None = 9464         # None: no metrics endpoint; 0: any free port
    metrics_host: str = "127.0.0.1"
    keys: KeySource = field(default_factory=KeySource)
    store: StoreConfig = field(default_factory=StoreConfig)
    reuse_port: bool = False                # share the port with sibling processes (--processes)
    tokens_file: Path | None = None         # None: open server (a loud warning is logged)
    audit: bool = True                      # False: no audit log (a loud warning is logged)
    audit_log: Path | None = None           # None: <data_dir>.audit.log (see server/audit.py)
    insecure_open: bool = False             # allow an open server on a non-loopback address
    tls: TLSConfig | None = None
    backend: str = "numpy"                  # "numpy" | "onnx"
    demo: bool | None = None                # None: create the demo library only with the dev key
    workers: int = 16                       # threads that run requests' CPU work (scoring, writes)
    blas_threads: int = 1                   # BLAS threads per request: parallelism comes from
                                            # concurrent RPCs; threaded small GEMMs thrash
    grace_s: float = 10.0                   # in-flight RPCs get this long at shutdown
    drain_s: float = 0.0                    # NOT_SERVING this long before refusing new RPCs
    warm: bool = True                       # route a synthetic request per library before SERVING
    decision_log: str | None = None         # JSON lines per routing decision: a path, or "-" for stdout
    # --learn-from-traffic (server/traffic.py): decayed moments of routed traffic (drift metric),
    # statistics for adapters that have none, both from aggregates only.
    learn_from_traffic: bool = False
    learn_half_life: float = 5000.0         # sequences
    learn_min_sequences: int = 256          # before learned statistics are stored
    limits: Limits = field(default_factory=Limits)
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)

    def __post_init__(self) -> None:
        if self.tokens_file is None and not self.insecure_open and not is_local_address(self.listen):
            raise InvalidArgumentError(
                f"--listen {self.listen} is reachable from other hosts and no --tokens-file is given: "
                "every caller could route, export and delete. Pass --tokens-file (see `seqr tokens "
                "new`), or --insecure-open (SEQR_INSECURE_OPEN=1) to accept an open server",
                field="listen", actual=self.listen)


def is_local_address(listen: str) -> bool:
    """True for loopback HOST:PORT and unix sockets; anything else (names included) is not."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
