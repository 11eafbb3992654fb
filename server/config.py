"""Server configuration: frozen dataclasses, built by the CLI from flags and SEQR_* variables.

Limits are explicit so every refusal can name the limit it applied. Defaults fit one
SmolLM2-sized library: a 128-token prompt with q/v activations on 30 layers is 8.8 MB fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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


@dataclass(frozen=True)
class TLSConfig:
    """Server TLS. With ``client_ca_file`` clients must present a certificate it signed (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


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
    anchor_dir: Path | None = None          # rollback anchor; default beside the key file
    poll_s: float = 1.0                     # followers check the store's head this often
    max_staleness_s: float | None = 300.0   # past this without the store: NOT_SERVING; None: never

    @property
    def follows(self) -> bool:
        return self.dsn is not None or self.shared


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("data")
    metrics_port: int | None = 9464         # None: no metrics endpoint; 0: any free port
    metrics_host: str = "127.0.0.1"
    keys: KeySource = field(default_factory=KeySource)
    store: StoreConfig = field(default_factory=StoreConfig)
    reuse_port: bool = False                # share the port with sibling processes (--processes)
    tokens_file: Path | None = None         # None: open server (a loud warning is logged)
    tls: TLSConfig | None = None
    backend: str = "numpy"                  # "numpy" | "onnx"
    demo: bool | None = None                # None: create the demo library only with the dev key
    workers: int = 16                       # threads that run requests' CPU work (scoring, writes)
    blas_threads: int = 1                   # BLAS threads per request: parallelism comes from
                                            # concurrent RPCs; threaded small GEMMs thrash
    grace_s: float = 10.0                   # in-flight RPCs get this long at shutdown
    drain_s: float = 0.0                    # NOT_SERVING this long before refusing new RPCs
    warm: bool = True                       # route a synthetic request per library before SERVING
    limits: Limits = field(default_factory=Limits)
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
