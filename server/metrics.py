"""Prometheus metrics, served on their own port (never on the gRPC port).

Each server gets its own registry, so several servers in one process (tests) do not collide.
Labels are bounded: libraries and adapters are operator-created, methods and codes are fixed.
No request content ever becomes a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.route_latency = Histogram("seqr_route_latency_seconds", "Route handler latency",
                                       ["library", "form"], buckets=_LATENCY_BUCKETS, registry=r)
        self.route_choices = Counter("seqr_route_choices_total",
                                     "Top-1 choices per adapter (an adapter that never wins is "
                                     "redundant with a neighbour)", ["library", "adapter"], registry=r)
        self.rechecked = Counter("seqr_route_rechecked_total",
                                 "Candidates re-scored in float64 to keep the ranking exact",
                                 ["library"], registry=r)
        self.library_version = Gauge("seqr_library_version", "Current library version", ["library"],
                                     registry=r)
        self.adapters = Gauge("seqr_library_adapters", "Adapters in the library", ["library"], registry=r)
        self.rpcs = Counter("seqr_rpcs_total", "RPCs by method and final status code",
                            ["method", "code"], registry=r)
        self.errors = Counter("seqr_rpc_errors_total", "Failed RPCs by method and status code",
                              ["method", "code"], registry=r)
        self.in_flight = Gauge("seqr_rpcs_in_flight", "RPCs being handled", registry=r)
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (port 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def library_changed(self, library: str, *, version: int, adapters: int) -> None:
        self.library_version.labels(library).set(version)
        self.adapters.labels(library).set(adapters)

    def library_removed(self, library: str) -> None:
        for gauge in (self.library_version, self.adapters):
            try:
                gauge.remove(library)
            except KeyError:
                pass

    def adapter_deleted(self, library: str, adapter: str) -> None:
        # A deleted adapter's series would otherwise be exported forever.
        try:
            self.route_choices.remove(library, adapter)
        except KeyError:
            pass
