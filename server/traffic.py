"""Learning from routed traffic (`seqr serve --learn-from-traffic`, off by default).

After a sequence-level Route has been answered, its inputs are handed to the worker pool (never
the event loop, never before the response): aggregates only, never a sequence, are kept.

* A decayed pool of the moments of z = A·x per shared-A module (seqr_core.moments, half-life in
  sequences). It measures **drift**: ``seqr_calibration_drift{library}`` is the spread, over the
  library's calibrated shared-A adapters, of the mean ``activation`` score each would get on the
  recent traffic (1.0 for every adapter on the calibration traffic itself). A spread of 0.1 means
  stale calibration alone now hands one adapter a 0.1 score advantage over another: re-Calibrate.
  A library without pooled moments adopts the traffic's once it has ``min_sequences``.
* Adapters with no statistics at all — general adapters uploaded after the last Calibrate, or
  any adapter of a library never calibrated — are calibrated from the first ``min_sequences``
  routed sequences that carry activations for all their modules (the Calibrator's statistics,
  every normalisation), then stored like a Calibrate (audited as ``seqr:traffic``). Statistics a
  Calibrate streamed are never replaced: the operator's calibration stays authoritative, and a
  route caller cannot steer it.

Cost is bounded: one learning task per library at a time; sequences arriving meanwhile are
skipped and counted (``seqr_traffic_skipped_total``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from seqr_core import Calibrator, CalibrationStats, LibraryIndex, ModuleInput
from seqr_core.errors import SeqrError
from seqr_core.moments import MomentAccumulator

from .auth import ROLES, Principal
from .metrics import Metrics

log = logging.getLogger("seqr.traffic")

LEARNER = Principal(name="seqr:traffic", roles=frozenset(ROLES))
DRIFT_EVERY = 16           # sequences between drift updates


@dataclass
class _Library:
    pool: MomentAccumulator
    busy: threading.Lock = field(default_factory=threading.Lock)
    gaps: tuple[str, ...] = ()             # adapters being calibrated from traffic
    basis: LibraryIndex | None = None      # the gap adapters alone (their ids kept)
    calibrator: Calibrator | None = None
    seen: int = 0


class TrafficLearner:
    def __init__(self, *, manager, metrics: Metrics, submit: Callable, half_life: float,
                 min_sequences: int):
        self.manager, self.metrics, self._submit = manager, metrics, submit
        self.decay = 0.5 ** (1.0 / max(half_life, 1.0))
        self.min_sequences = max(int(min_sequences), 1)
        self._libs: dict[str, _Library] = {}
        self._lock = threading.Lock()

    def observe(self, state, inputs: Mapping[str, ModuleInput], *, granularity: str) -> None:
        """Hand one routed sequence to the pool; never blocks, never raises into the caller."""
        if granularity != "sequence":
            return
        with self._lock:
            lib = self._libs.setdefault(state.name, _Library(pool=MomentAccumulator(decay=self.decay)))
        if not lib.busy.acquire(blocking=False):
            self.metrics.traffic_skipped.labels(state.name).inc()
            return
        try:
            self._submit(self._learn, state, dict(inputs), lib)
        except RuntimeError:              # the pool is shutting down
            lib.busy.release()

    def busy(self, library: str) -> bool:
        lib = self._libs.get(library)
        return lib is not None and lib.busy.locked()

    # ------------------------------------------------------------------ in the pool
    def _learn(self, state, inputs: dict[str, ModuleInput], lib: _Library) -> None:
        try:
            index = state.index
            lib.pool.begin_sequence()
            x64: dict[int, np.ndarray] = {}    # q/k/v of a layer share one input: convert it once
            for m, inp in inputs.items():
                if m not in index.shared_a:
                    continue
                if inp.form == "moments":
                    lib.pool.add_moments(m, inp.data, inp.tokens)
                    continue
                z = x64.setdefault(id(inp.data), inp.data.astype(np.float64))
                lib.pool.add_tokens(m, z if inp.form == "projected" else z @ index.shared_a[m].T.astype(np.float64))
            lib.seen += 1
            self.metrics.traffic_sequences.labels(state.name).set(lib.pool.sequences)
            self._calibrate_gaps(state, inputs, lib)
            if lib.seen % DRIFT_EVERY == 0:
                self.metrics.calibration_drift.labels(state.name).set(drift(index, lib.pool))
            self._maybe_store(state, lib)
        finally:
            lib.busy.release()

    def _calibrate_gaps(self, state, inputs, lib: _Library) -> None:
        index = state.index
        cal = index.calibration
        gaps = tuple(e.name for e in index.adapters if cal is None or cal.get(e.name) is None)
        if gaps != lib.gaps:              # adapters added or calibrated since: start again
            lib.gaps, lib.calibrator, lib.basis = gaps, None, None
            if gaps:
                lib.basis = index.restricted(gaps)
                lib.calibrator = Calibrator(lib.basis)
        if lib.calibrator is None:
            return
        needed = {m for e in lib.basis.adapters for m in e.modules}
        if any(m not in inputs or inputs[m].form != "activations" for m in needed):
            return                        # only sequences that cover every gap module per token
        lib.calibrator.update({m: inputs[m] for m in needed})

    def _maybe_store(self, state, lib: _Library) -> None:
        ready = lib.calibrator is not None and lib.calibrator.sequences >= self.min_sequences
        adopt = state.pool is None and lib.pool.sequences >= self.min_sequences and bool(state.index.shared_a)
        if not (ready or adopt):
            return
        cal = state.index.calibration
        fresh = lib.calibrator.finish() if ready else CalibrationStats(sequences=cal.sequences if cal else 0)
        basis = lib.basis if ready else state.index
        pool = lib.pool.finish() if adopt else None
        try:
            self.manager.store_calibration(state.name, basis, fresh, LEARNER, pool=pool)
        except SeqrError as e:            # e.g. the audit log refuses: keep learning, try again later
            log.warning("could not store statistics learned from traffic",
                        extra={"library": state.name, "error": str(e), "code": e.code})
            return
        log.info("calibrated from routed traffic", extra={"library": state.name, "adapters": sorted(fresh.adapters),
                                                          "pooled_moments_adopted": pool is not None})
        lib.gaps, lib.calibrator, lib.basis = (), None, None


def drift(index: LibraryIndex, pool: MomentAccumulator) -> float:
    """Spread (max − min) over calibrated shared-A adapters of their mean ``activation`` score
    on the pooled traffic; 0 when fewer than two adapters can be compared."""
    if index.cal_columns is None or not index.adapters:
        return 0.0
    slots, lay = index.slots, index.layout
    ratios = []
    for m, mm in pool.finish().modules.items():
        g = lay.group_of.get(m)
        if g is None or mm.mean.size != lay.groups[g[0]].K:
            continue
        k = lay.row[m]
        e = mm.mean @ index.table(f"W{g[0]}")[g[1]][:, slots]                 # (K,)·(K, N) -> (N,)
        mean = index.cal_table("mod_mean")[0][k, slots]
        ok = index.table("shared")[k, slots] & index.cal_table("has")[k, slots] & np.isfinite(mean)
        ratios.append(np.where(ok, e / np.maximum(mean, 1e-30), np.nan))
    if not ratios:
        return 0.0
    r = np.stack(ratios)                                                   # (rows, N)
    cnt = np.isfinite(r).sum(axis=0)
    b = np.nansum(r, axis=0)[cnt > 0] / cnt[cnt > 0]
    return float(b.max() - b.min()) if b.size > 1 else 0.0
