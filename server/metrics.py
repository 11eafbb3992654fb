"""Prometheus metrics, served on their own port (never on the gRPC port).

Each server gets its own registry, so several servers in one process (tests) do not collide.
Labels are bounded: libraries and adapters are operator-created, methods and codes are fixed.
No request content ever becomes a label. ``observe_route`` is the one place a routing decision
is reported: its metrics and, when configured, its decision-log line (server/decision_log.py).
Every metric is documented in the README's table (a test checks it against /metrics).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 10.0)


class Metrics:
    def __init__(self, *, decision_log=None, clock: Callable[[], float] = time.time) -> None:
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
        self.adapters = Gauge("seqr_library_adapters", "Routable adapters in the library", ["library"], registry=r)
        self.damaged = Gauge("seqr_library_damaged_adapters",
                             "Adapters quarantined because their stored data is damaged (never routed; "
                             "delete and re-upload them)", ["library"], registry=r)
        self.degraded = Gauge("seqr_library_degraded",
                              "1 while the library serves with damaged parts quarantined, or cannot load at all",
                              ["library"], registry=r)
        self.failed = Gauge("seqr_library_failed",
                            "1 when the library cannot be loaded at all (damaged meta or shared A)",
                            ["library"], registry=r)
        self.rpcs = Counter("seqr_rpcs_total", "RPCs by method and final status code",
                            ["method", "code"], registry=r)
        self.errors = Counter("seqr_rpc_errors_total", "Failed RPCs by method and status code",
                              ["method", "code"], registry=r)
        self.in_flight = Gauge("seqr_rpcs_in_flight", "RPCs being handled", registry=r)
        # --learn-from-traffic (server/traffic.py)
        self.calibration_drift = Gauge(
            "seqr_calibration_drift", "Spread over calibrated shared-A adapters of their mean activation score "
            "on recent routed traffic (0 when the calibration matches the traffic; re-Calibrate when it grows)",
            ["library"], registry=r)
        self.traffic_sequences = Gauge("seqr_traffic_sequences", "Routed sequences in the decayed traffic moments",
                                       ["library"], registry=r)
        self.traffic_skipped = Counter("seqr_traffic_skipped_total",
                                       "Routed sequences not learned from because a learning task was running",
                                       ["library"], registry=r)
        self._http = None
        self._init_routing(decision_log, clock)

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
        if self.decision_log is not None:
            self.decision_log.close()

    def library_changed(self, library: str, *, version: int, adapters: int, damaged: int = 0,
                        degraded: bool = False, calibration=None) -> None:
        self.library_version.labels(library).set(version)
        self.adapters.labels(library).set(adapters)
        self.damaged.labels(library).set(damaged)
        self.degraded.labels(library).set(int(degraded))
        self.failed.labels(library).set(0)
        self._calibration_changed(library, calibration)

    def library_failed(self, library: str) -> None:
        self.failed.labels(library).set(1)
        self.degraded.labels(library).set(1)

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

    # ------------------------------------------------------------------ routing you can watch
    # Margin and score gap, fallbacks, calibration age, and the optional decision log.
    def _init_routing(self, decision_log, clock) -> None:
        r = self.registry
        self.decision_log = decision_log          # server.decision_log.DecisionLog | None
        self.margin = Histogram("seqr_route_margin", "Score of the first candidate minus the second "
                                "(routes with at least two candidates, whatever top_k)", ["library"], buckets=_MARGIN_BUCKETS,
                                registry=r)
        self.score_gap = Histogram("seqr_route_score_gap_ratio", "Margin divided by |score of the first "
                                   "choice|: scale-free confidence", ["library"], buckets=_GAP_BUCKETS,
                                   registry=r)
        self.fallbacks = Counter("seqr_route_fallback_total", "Routes whose requested normalisation could "
                                 "not be used (uncalibrated adapters: frobenius instead)", ["library"],
                                 registry=r)
        self.calibrated_at = Gauge("seqr_library_calibrated_timestamp_seconds",
                                   "Unix time of the library's last Calibrate", ["library"], registry=r)
        self.calibration_sequences = Gauge("seqr_library_calibration_sequences",
                                           "Sequences in the library's last Calibrate", ["library"], registry=r)
        self.decision_log_errors = Counter("seqr_decision_log_errors_total",
                                           "Decision-log lines that could not be written", registry=r)
        self._calibration_stamps: dict[str, float] = {}
        r.register(_CalibrationAge(self._calibration_stamps, clock))

    def _calibration_changed(self, library: str, calibration) -> None:
        at = getattr(calibration, "calibrated_at", None)
        if at is None:        # never calibrated, or stats stored before times were recorded
            return
        self._calibration_stamps[library] = float(at)
        self.calibrated_at.labels(library).set(at)
        self.calibration_sequences.labels(library).set(calibration.sequences)

    def observe_route(self, library: str, decision, *, form: str, caller: str, seconds: float) -> None:
        """Everything one routing decision tells the outside: metrics, and the decision-log line."""
        self.route_latency.labels(library, form).observe(seconds)
        if decision.choices:
            self.route_choices.labels(library, decision.choices[0].name).inc()
        if decision.rechecked:
            self.rechecked.labels(library).inc(decision.rechecked)
        if decision.fallback:
            self.fallbacks.labels(library).inc()
        if math.isfinite(decision.margin):     # inf: a single candidate, nothing to compare
            self.margin.labels(library).observe(decision.margin)
            top = abs(decision.choices[0].score)
            if top > 0 and math.isfinite(top):
                self.score_gap.labels(library).observe(decision.margin / top)
        if self.decision_log is not None and not self.decision_log.write(
                library=library, decision=decision, caller=caller, form=form, seconds=seconds):
            self.decision_log_errors.inc()


# ---------------------------------------------------------------------------- routing you can watch
# Margins are score differences, so their scale follows the normalisation (activation: scores
# near 1); the gap ratio margin / |top score| is scale-free and comparable across libraries.
_MARGIN_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
_GAP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class _CalibrationAge:
    """seqr_library_calibration_age_seconds, computed when scraped (a set gauge would go stale)."""

    NAME, HELP = "seqr_library_calibration_age_seconds", "Seconds since the library's last Calibrate"

    def __init__(self, stamps: Mapping[str, float], clock: Callable[[], float]):
        self._stamps, self._clock = stamps, clock

    def describe(self):
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["library"])]

    def collect(self):
        g = GaugeMetricFamily(self.NAME, self.HELP, labels=["library"])
        now = self._clock()
        for library, at in sorted(dict(self._stamps).items()):
            g.add_metric([library], max(0.0, now - at))
        yield g
