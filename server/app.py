"""Assemble and run the gRPC service.

``create_server(config)`` builds everything (store, manager, servicers, health, reflection,
metrics) and binds the port, but neither starts nor loads: tests and embedders drive the
returned ``ServerHandles``. ``serve(config)`` is the process: start, load and warm in the
background (health NOT_SERVING until done), then on SIGTERM/SIGINT drain and stop with grace.

Concurrency model: grpc.aio on one event loop thread, with every request's CPU work (scoring,
parsing, store writes) in a bounded thread pool of ``workers`` threads (see rpc.py). Waiting for
the network costs a coroutine, not a thread, so callers that open calls and never send (or
hold idle RouteStreams) cannot starve anyone: health, other callers and admin stay responsive,
and a principal's open calls are capped. numpy's BLAS releases the GIL, so large requests
overlap in the pool. ``ServerHandles`` keeps a synchronous face (start/load/stop) for the CLI,
tests and embedders: the loop runs in its own thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import shlex
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from threadpoolctl import threadpool_limits

from seqr_core.errors import FailedPreconditionError, SeqrError, UnavailableError
from seqr_router.v1 import admin_pb2, router_pb2

from . import demo
from .admin_service import AdminService
from .audit import NO_AUDIT, AuditLog, NullAudit, open_audit
from .auth import Authenticator
from .config import KeySource, ServerConfig
from .decision_log import open_decision_log
from .export import Backend, load_backend
from .manager import LibraryManager
from .metrics import Metrics
from .replica import Follower, follower_for, open_store
from .router_service import RouterService
from .traffic import TrafficLearner
from .request_bounds import check_request
from .rpc import Admission, Dispatcher
from .store import CommandKeyProvider, EnvKeyProvider, KeyFileProvider, dev_key_file

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


def _auth(config: ServerConfig, audit: AuditLog | NullAudit) -> Authenticator:
    if config.tokens_file is not None:
        return Authenticator.from_file(config.tokens_file, audit=audit)
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
            # One connection cannot open unbounded streams (each costs memory, not a thread).
            ("grpc.max_concurrent_streams", lim.max_streams_per_connection),
            # Two servers must never silently share a port - unless they are one `--processes` group.
            ("grpc.so_reuseport", 1 if config.reuse_port else 0)]


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


class _LoopThread:
    """An asyncio event loop on a daemon thread; ``call`` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="seqr-aio", daemon=True)
        self._thread.start()

    def call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class ServerHandles:
    """What a caller of create_server drives: start, load, wait, stop (all synchronous)."""

    server: grpc.aio.Server
    port: int
    config: ServerConfig
    manager: LibraryManager
    health: health.aio.HealthServicer
    metrics: Metrics
    backend: Backend
    pool: ThreadPoolExecutor
    loop: _LoopThread
    metrics_port: int | None = None
    audit: AuditLog | NullAudit = NO_AUDIT
    auth: Authenticator | None = None
    learner: TrafficLearner | None = None
    follower: Follower | None = None          # replicas: follows other processes' commits
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
        self.loop.call(self.server.start())
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
            self.set_health(health_pb2.HealthCheckResponse.SERVING)
            if self.follower is not None:
                self.follower.start(self.set_health)
            self.ready.set()
            log.info("serving", extra={"load_s": round(time.perf_counter() - t0, 3)})

    def set_health(self, status, services=("", *SERVICES)) -> None:
        async def put():
            for name in services:
                await self.health.set(name, status)
        self.loop.call(put())

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, drain, refuse new RPCs, give in-flight ones ``grace`` s, close the store.

        Bounded: whatever callers do, this returns within drain + grace + a few seconds."""
        if self._stopped:
            return
        self._stopped = True
        if self.follower is not None:
            self.follower.stop()
        grace = self.config.grace_s if grace is None else grace
        log.info("shutting down", extra={"drain_s": self.config.drain_s, "grace_s": grace})
        self.loop.call(self.health.enter_graceful_shutdown(), timeout=5)
        if self.config.drain_s > 0:
            time.sleep(self.config.drain_s)   # let load balancers see NOT_SERVING first
        try:
            self.loop.call(self.server.stop(grace), timeout=grace + 5)
        except (TimeoutError, concurrent.futures.TimeoutError):
            log.error("gRPC server did not stop within its grace; closing anyway", extra={"grace_s": grace})
        # Handlers still running in the pool finish their write (the manager lock); none start.
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.manager.close()                  # waits for a write still inside the store
        self.audit.close()
        if self.backend.close is not None:
            self.backend.close()
        self.metrics.stop()
        self.loop.close()
        log.info("stopped")


def admission(config: ServerConfig) -> Admission:
    lim = config.limits
    return Admission(calls_per_principal=lim.max_calls_per_principal, read_timeout_s=lim.read_timeout_s,
                     stream_idle_s=lim.stream_idle_s)


async def _build(config: ServerConfig, dispatcher: Dispatcher, router: RouterService, admin: AdminService,
                 creds) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Made on the loop thread: an aio server belongs to the loop it was created on."""
    server = grpc.aio.server(options=server_options(config),
                             maximum_concurrent_rpcs=config.limits.max_concurrent_rpcs)
    server.add_generic_rpc_handlers((
        dispatcher.service(router_pb2.DESCRIPTOR.services_by_name["Router"], router_pb2, router),
        dispatcher.service(admin_pb2.DESCRIPTOR.services_by_name["LibraryAdmin"], admin_pb2, admin)))
    hs = health.aio.HealthServicer()
    for name in ("", *SERVICES):
        await hs.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = (server.add_secure_port(config.listen, creds) if creds is not None
            else server.add_insecure_port(config.listen))
    return server, hs, port


def create_server(config: ServerConfig) -> tuple[grpc.aio.Server, ServerHandles]:
    metrics = Metrics(decision_log=open_decision_log(config.decision_log))
    backend = load_backend(config.backend)
    audit = open_audit(config)             # a server that cannot audit does not start
    auth = _auth(config, audit)
    creds = _credentials(config)           # fail on bad TLS files before the store is locked
    store = open_store(config, key_provider(config.keys, config.data_dir))
    demo_wanted = config.demo if config.demo is not None else config.keys.is_dev
    config = replace(config, demo=demo_wanted)
    manager = LibraryManager(store, metrics=metrics, on_change=backend.prepare, audit=audit)
    pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="seqr-rpc")
    dispatcher = Dispatcher(auth=auth, metrics=metrics, pool=pool, admission=admission(config),
                            tls=creds is not None,
                            check_request=functools.partial(check_request, limits=config.limits),
                            on_auth_failure=lambda method, err, peer: auth.refused(method, err, peer=peer, principal=None))
    learner = TrafficLearner(manager=manager, metrics=metrics, submit=pool.submit, half_life=config.learn_half_life,
                             min_sequences=config.learn_min_sequences) if config.learn_from_traffic else None
    router = RouterService(manager=manager, limits=config.limits, metrics=metrics, route_fn=backend.route,
                           learner=learner)
    admin = AdminService(manager=manager, limits=config.limits)
    loop = _LoopThread()
    try:
        server, hs, port = loop.call(_build(config, dispatcher, router, admin, creds))
    except RuntimeError as e:    # grpc raises RuntimeError when it cannot bind
        loop.close()
        pool.shutdown(wait=False)
        store.close()
        audit.close()
        raise UnavailableError(f"cannot listen on {config.listen}: {e}", field="listen",
                               actual=config.listen) from None
    return server, ServerHandles(server=server, port=port, config=config, manager=manager, health=hs,
                                 metrics=metrics, backend=backend, pool=pool, loop=loop, audit=audit, auth=auth,
                                 learner=learner, follower=follower_for(config, store, manager, metrics))


def serve(config: ServerConfig, *, on_ready: Callable[[ServerHandles], object] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code. ``on_ready`` is called once serving."""
    # Process-wide, so only here (not in create_server, which tests embed in their process).
    threadpool_limits(limits=config.blas_threads, user_api="blas")
    _, handles = create_server(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: handles.auth.reload(trigger="SIGHUP"))
    handles.start()
    if on_ready is not None:     # e.g. a `--processes` child telling its parent
        threading.Thread(target=lambda: handles.wait_ready() and on_ready(handles), daemon=True).start()
    stop.wait()
    # Shutdown always finishes: if something still holds on past drain + grace, exit anyway.
    watchdog = threading.Timer(config.drain_s + config.grace_s + 15, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()
    handles.stop()
    return 0 if handles.load_error is None else 1
