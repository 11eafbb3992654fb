"""The optional decision log (`seqr serve --decision-log FILE|-`): one JSON line per routing
decision, for audits and offline tuning of margins and calibration.

A line holds what was decided and for whom — time, library and version, the caller principal's
name, the top-k adapters (id, name, score, weight), margin, method, normalisation, fallback,
float64 re-checks, input form and handler time — and never a request's activations, projections
or moments. A file is opened for appending with mode 0600; ``-`` is standard output (the
server's own logs go to standard error). Lines are written whole under a lock and flushed, so
concurrent routes never interleave and a crash loses at most the line being written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from seqr_core.errors import FailedPreconditionError

log = logging.getLogger("seqr.decisions")

STDOUT = "-"


def decision_record(*, library: str, decision, caller: str, form: str, seconds: float,
                    now: datetime | None = None) -> dict:
    """The log line of one decision (a plain dict; JSON-safe: an infinite margin becomes null)."""
    margin = float(decision.margin)
    return {
        "time": (now or datetime.now(timezone.utc)).isoformat(timespec="milliseconds"),
        "library": library,
        "version": int(decision.version),
        "caller": caller,
        "top_k": [{"id": int(c.adapter_id), "name": c.name, "score": float(c.score),
                   "weight": float(c.weight)} for c in decision.choices],
        "margin": margin if math.isfinite(margin) else None,
        "method": decision.method,
        "normalisation": decision.normalisation,
        "fallback": decision.fallback,
        "rechecked": int(decision.rechecked),
        "form": form,
        "ms": round(seconds * 1e3, 3),
    }


class DecisionLog:
    def __init__(self, *, fd: int | None = None, stream: TextIO | None = None, name: str):
        self._fd, self._stream, self.name = fd, stream, name
        self._lock = threading.Lock()
        self._failed = False

    @classmethod
    def open(cls, target: str) -> "DecisionLog":
        """``-`` for standard output, else a file path (created 0600, appended to)."""
        if target == STDOUT:
            return cls(stream=sys.stdout, name="stdout")
        path = Path(target)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            raise FailedPreconditionError(f"cannot open the decision log {path}: {e.strerror}",
                                          field="decision_log", actual=str(path)) from None
        return cls(fd=fd, name=str(path))

    def write(self, *, library: str, decision, caller: str, form: str, seconds: float) -> bool:
        """Append one line; False (and one error log per failure streak) when it cannot be written.

        Routing goes on when the log cannot be written: it is an operator's aid, not the audit
        trail. Files get one unbuffered O_APPEND write per line, so nothing piles up in memory
        while a disk is full."""
        line = json.dumps(decision_record(library=library, decision=decision, caller=caller, form=form,
                                          seconds=seconds), separators=(",", ":")) + "\n"
        with self._lock:
            try:
                if self._fd is not None:
                    _write_all(self._fd, line.encode())
                elif self._stream is not None:
                    self._stream.write(line)
                    self._stream.flush()
                else:
                    raise ValueError("the decision log is closed")
            except (OSError, ValueError) as e:     # ValueError: a closed log or stream
                if not self._failed:
                    log.error("decision log write failed", extra={"log": self.name, "error": str(e)})
                self._failed = True
                return False
            self._failed = False
            return True

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = self._stream = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def open_decision_log(target: str | None) -> DecisionLog | None:
    return None if not target else DecisionLog.open(target)
