"""Assemble and run the gRPC service.

``create_server(config)`` builds everything (store, manager, servicers, health, reflection,
metrics) and binds the port, but neither starts nor loads: tests and embedders drive the
returned ``ServerHandles``. ``serve(config)`` is the process: start, load and warm in the
background (health NOT_SERVING until done), then on SIGTERM/SIGINT drain and stop with grace.

Concurrency model: grpc's synchronous server on a thread pool, chosen from measurements
(bench/load.py --server sync|aio-executor|aio-inline): routing time is the core's, so all three
reach the same throughput; aio-executor adds a thread hop, and aio-inline runs scoring on the
event loop, where one slow request (large activations, a float64 re-check) stalls every other
call and the health checks. Threads keep health and admin calls responsive, and numpy's BLAS
calls release the GIL so large requests overlap. A RouteStream holds one worker thread while
open: size ``workers`` above the expected number of concurrent decode streams.
"""

from __future__ import annotations

import logging
import shlex
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from threadpoolctl import threadpool_limits
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from seqr_core.errors import FailedPreconditionError, SeqrError, UnavailableError
from seqr_router.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

from . import demo
from .admin_service import AdminService
from .auth import Authenticator
from .config import KeySource, ServerConfig
from .export import Backend, load_backend
from .manager import LibraryManager
from .metrics import Metrics
from .router_service import RouterService
from .rpc import Guard
from .store import CommandKeyProvider, EnvKeyProvider, KeyFileProvider, LibraryStore, dev_key_file

log = logging.getLogger("seqr.server")

SERVICES = (router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["LibraryAdmin"].full_name)


def key_provider(k: KeySource, data_dir: Path):
    """The store's KEK provider; with no source configured, the dev key beside ``data_dir``."""
    if k.key_file is not None:
        return KeyFileProvider(k.key_file)
    if k.key_env is not None:
        return EnvKeyProvider(k.key_env)
    if k.key_command is not None:
        return CommandKeyProvider(shlex.split(k.key_command))
    return dev_key_file(data_dir)            # logs its own loud warning


def _auth(config: ServerConfig) -> Authenticator:
    if config.tokens_file is not None:
        return Authenticator.from_file(config.tokens_file)
    log.warning("NO TOKENS FILE: the server is OPEN - every caller may route, read and modify every "
                "library. Pass --tokens-file (see `seqr tokens new`) before exposing this port.")
    return Authenticator.open_server()


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    ka, lim = config.keepalive, config.limits
    return [("grpc.max_receive_message_length", lim.max_message_bytes),
            ("grpc.max_send_message_length", lim.max_message_bytes),
            ("grpc.keepalive_time_ms", ka.time_ms),
            ("grpc.keepalive_timeout_ms", ka.timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", ka.min_client_ping_interval_ms),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_connection_age_ms", ka.max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", ka.max_connection_age_grace_ms),
            # Two servers must never silently share a port.
            ("grpc.so_reuseport", 0)]


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    t = config.tls
    if t is None:
        return None

    def read(path: Path, field: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise FailedPreconditionError(f"cannot read {path}: {e.strerror}", field=field) from None

    ca = read(t.client_ca_file, "tls_client_ca") if t.client_ca_file else None
    return grpc.ssl_server_credentials([(read(t.key_file, "tls_key"), read(t.cert_file, "tls_cert"))],
                                       root_certificates=ca, require_client_auth=ca is not None)


@dataclass
class ServerHandles:
    """What a caller of create_server drives: start, load, wait, stop."""

    server: grpc.Server
    port: int
    config: ServerConfig
    manager: LibraryManager
    health: health.HealthServicer
    metrics: Metrics
    backend: Backend
    metrics_port: int | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    load_error: BaseException | None = None
    _stopped: bool = False

    @property
    def target(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0].strip("[]")
        host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        return f"{host}:{self.port}" if ":" not in host else f"[{host}]:{self.port}"

    def start(self, *, load: bool = True) -> "ServerHandles":
        if self.config.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
            except OSError as e:
                raise UnavailableError(f"cannot serve metrics on {self.config.metrics_host}:"
                                       f"{self.config.metrics_port}: {e.strerror}", field="metrics_port") from None
        self.server.start()
        log.info("listening", extra={"listen": self.config.listen, "port": self.port,
                                     "metrics_port": self.metrics_port, "tls": self.config.tls is not None})
        if load:
            threading.Thread(target=self.load, name="seqr-load", daemon=True).start()
        return self

    def load(self) -> None:
        """Load (and warm) every library, create the demo if asked, then report SERVING."""
        t0 = time.perf_counter()
        try:
            self.manager.load()
            if self.config.demo and not self.manager.names():
                demo.create_demo(self.manager)
                log.info("created the demo library", extra={"library": demo.NAME})
            if self.config.warm:
                self.manager.warm()
        except SeqrError as e:
            self.load_error = e
            log.error("loading failed; health stays NOT_SERVING", extra={"error": str(e), "code": e.code})
            return
        if not self._stopped:
            for name in ("", *SERVICES):
                self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            self.ready.set()
            log.info("serving", extra={"load_s": round(time.perf_counter() - t0, 3)})

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, drain, refuse new RPCs, give in-flight ones ``grace`` s, close the store."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        self.health.enter_graceful_shutdown()
        log.info("shutting down", extra={"drain_s": self.config.drain_s, "grace_s": grace})
        if self.config.drain_s > 0:
            time.sleep(self.config.drain_s)   # let load balancers see NOT_SERVING first
        self.server.stop(grace).wait()
        self.manager.close()                  # waits for a write still inside the store
        if self.backend.close is not None:
            self.backend.close()
        self.metrics.stop()
        log.info("stopped")


def create_server(config: ServerConfig) -> tuple[grpc.Server, ServerHandles]:
    metrics = Metrics()
    backend = load_backend(config.backend)
    auth = _auth(config)
    creds = _credentials(config)           # fail on bad TLS files before the store is locked
    store = LibraryStore.open(config.data_dir, key_provider(config.keys, config.data_dir), create=True,
                              anchor_dir=config.anchor_dir)
    demo_wanted = config.demo if config.demo is not None else config.keys.is_dev
    config = replace(config, demo=demo_wanted)
    manager = LibraryManager(store, metrics=metrics, on_change=backend.prepare)
    guard = Guard(auth, metrics)
    server = grpc.server(ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="seqr-rpc"),
                         options=server_options(config),
                         maximum_concurrent_rpcs=config.limits.max_concurrent_rpcs)
    router_pb2_grpc.add_RouterServicer_to_server(
        RouterService(manager=manager, limits=config.limits, guard=guard, metrics=metrics, route_fn=backend.route),
        server)
    admin_pb2_grpc.add_LibraryAdminServicer_to_server(
        AdminService(manager=manager, limits=config.limits, guard=guard), server)
    hs = health.HealthServicer(experimental_non_blocking=True)
    for name in ("", *SERVICES):
        hs.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = (server.add_secure_port(config.listen, creds) if creds is not None
                else server.add_insecure_port(config.listen))
    except RuntimeError as e:    # grpc raises RuntimeError when it cannot bind
        store.close()
        raise UnavailableError(f"cannot listen on {config.listen}: {e}", field="listen",
                               actual=config.listen) from None
    return server, ServerHandles(server=server, port=port, config=config, manager=manager,
                                 health=hs, metrics=metrics, backend=backend)


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    # Process-wide, so only here (not in create_server, which tests embed in their process).
    threadpool_limits(limits=config.blas_threads, user_api="blas")
    _, handles = create_server(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    handles.start()
    stop.wait()
    handles.stop()
    return 0 if handles.load_error is None else 1
