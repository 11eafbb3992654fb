"""Replicas: a server whose store other processes also write follows it.

Every replica serves immutable snapshots (the manager's libraries, swapped whole). The
:class:`Follower` keeps them at the store's latest commit: it waits for a commit signal
(PostgreSQL NOTIFY; for a shared directory, the poll interval), then refreshes - the store
adopts the newer manifest after verifying it, the manager rebuilds the libraries whose stored
state changed and swaps them in. It also polls every ``poll_s`` so a lost notification costs
at most one interval, and each successful poll confirms the replica is current.

Staleness is the time since the replica last confirmed it is at the store's head. While it is
cut off (database down, network partition, tampered rows refused) it keeps serving its last
verified snapshot, every response still naming the version it was scored on, and reports:

* metrics ``seqr_store_staleness_seconds``, ``seqr_store_reachable`` (0/1), ``seqr_store_commit``
  (the commit its snapshot is at) and ``seqr_store_sync_errors_total{code}``;
* health service ``seqr.replica``: SERVING only while in sync with the store;
* past ``max_staleness_s``: the overall health ("" and the Router/LibraryAdmin services) turns
  NOT_SERVING and reads answer UNAVAILABLE naming the budget, so clients retry on a fresher
  replica. Both recover by themselves when the link returns and the replica has caught up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from grpc_health.v1 import health_pb2
from prometheus_client import Counter, Gauge

from seqr_core.errors import IntegrityError, UnavailableError

from .config import ServerConfig
from .manager import LibraryManager
from .metrics import Metrics
from .store import KeyProvider, LibraryStore
from .store.anchor import resolve_anchor_dir

log = logging.getLogger("seqr.replica")

REPLICA_HEALTH = "seqr.replica"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SetHealth = Callable[..., None]          # ServerHandles.set_health(status, services=...)


def open_store(config: ServerConfig, keys: KeyProvider) -> LibraryStore:
    """The configured store: PostgreSQL, a shared directory, or the exclusive directory."""
    s = config.store
    if s.dsn is not None:
        anchors = config.anchor_dir or resolve_anchor_dir(config.data_dir.absolute(), keys.anchor_dir, None)
        return LibraryStore.connect(s.dsn, keys, anchor_dir=anchors)
    return LibraryStore.open(config.data_dir, keys, create=True, shared=s.shared, anchor_dir=config.anchor_dir)


def follower_for(config: ServerConfig, store: LibraryStore, manager: LibraryManager,
                 metrics: Metrics) -> Follower | None:
    if not store.shared:
        return None
    return Follower(manager, store, poll_s=config.store.poll_s, max_staleness_s=config.store.max_staleness_s,
                    metrics=metrics)


class Follower:
    def __init__(self, manager: LibraryManager, store: LibraryStore, *, poll_s: float,
                 max_staleness_s: float | None, metrics: Metrics):
        self._manager, self._store = manager, store
        self.poll_s, self.max_staleness_s = poll_s, max_staleness_s
        # In sync: the last sync succeeded and is recent. A sync stuck in I/O (a partition the
        # TCP stack has not given up on yet) shows as age, not as an error.
        self.sync_window_s = 3 * poll_s + 1.0
        self._stop = threading.Event()
        self._confirmed = time.monotonic()     # last time the replica knew it was at the head
        self._error: str | None = None         # the last sync's error, None after a success
        self._in_sync = True
        self._stale = False
        self._since_lost = 0.0
        self._threads: list[threading.Thread] = []
        r = metrics.registry
        self._g_staleness = Gauge("seqr_store_staleness_seconds",
                                  "Seconds since this replica last confirmed it is at the store's latest commit",
                                  registry=r)
        self._g_reachable = Gauge("seqr_store_reachable", "1 while this replica is in sync with the store",
                                  registry=r)
        self._g_commit = Gauge("seqr_store_commit", "Store commit number this replica's snapshot is at", registry=r)
        self._c_errors = Counter("seqr_store_sync_errors_total", "Failed syncs with the store, by status code",
                                 ["code"], registry=r)
        self._g_reachable.set(1)
        self._g_commit.set(store.manifest_seq)

    @property
    def staleness_s(self) -> float:
        return time.monotonic() - self._confirmed

    def start(self, set_health: SetHealth) -> Follower:
        self._set_health = set_health
        set_health(SERVING, services=(REPLICA_HEALTH,))
        for target, name in ((self._follow, "seqr-follow"), (self._watch, "seqr-staleness")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)      # the follow thread may sit in a database call; it is a daemon

    # ------------------------------------------------------------------ threads
    def _follow(self) -> None:
        while not self._stop.is_set():
            self.sync_once()
            if self._stop.is_set():
                return
            self._store.wait_for_commit(self.poll_s)

    def sync_once(self) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            changed = self._manager.refresh()
        except (UnavailableError, IntegrityError) as e:
            self._c_errors.labels(e.code).inc()
            if self._error is None:
                log.log(logging.ERROR if e.code == "DATA_LOSS" else logging.WARNING,
                        "cannot sync with the library store; serving the last snapshot",
                        extra={"error": str(e), "code": e.code, "commit": self._store.manifest_seq})
            self._error = str(e)
            return
        self._confirmed = time.monotonic()
        self._error = None
        self._g_commit.set(self._store.manifest_seq)
        if changed:
            log.info("followed the store", extra={"commit": self._store.manifest_seq, "libraries": changed,
                                                  "ms": round((time.perf_counter() - t0) * 1e3, 1),
                                                  "cpu_ms": round((time.thread_time() - c0) * 1e3, 1)})

    def _watch(self) -> None:
        """Turns staleness into health, apart from the follow thread (which may be stuck in I/O)."""
        while not self._stop.wait(min(0.25, self.poll_s)):
            self.check()

    def check(self) -> None:
        age = self.staleness_s
        self._g_staleness.set(age)
        in_sync = self._error is None and age <= self.sync_window_s
        if in_sync != self._in_sync:
            self._in_sync = in_sync
            self._g_reachable.set(int(in_sync))
            self._set_health(SERVING if in_sync else NOT_SERVING, services=(REPLICA_HEALTH,))
            if in_sync:
                log.info("caught up with the library store", extra={
                    "commit": self._store.manifest_seq, "cut_off_s": round(time.monotonic() - self._since_lost, 3)})
            else:
                self._since_lost = time.monotonic() - age
                log.warning("out of sync with the library store; serving the last snapshot",
                            extra={"staleness_s": round(age, 3), "error": self._error,
                                   "commit": self._store.manifest_seq})
        stale = self.max_staleness_s is not None and age > self.max_staleness_s
        if stale != self._stale:
            self._stale = stale
            self._manager.set_stale(
                f"this replica has not reached its library store for {age:.1f} s (budget "
                f"{self.max_staleness_s:g} s); retry on another replica" if stale else None)
            self._set_health(NOT_SERVING if stale else SERVING)
            (log.error if stale else log.info)(
                "past the staleness budget: NOT_SERVING" if stale else "within the staleness budget again: SERVING",
                extra={"staleness_s": round(age, 3), "budget_s": self.max_staleness_s})
