"""What one fuzzed call came back with, and the server-side exception behind an INTERNAL.

The server answers INTERNAL with only an incident id; the traceback goes to its log. The fuzz
runs the server in-process, so ``Incidents`` (a logging handler on ``seqr.rpc``) keeps each
incident's exception, which both the reproducer file and the known-issue matchers read.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from dataclasses import dataclass

_INCIDENT = re.compile(r"incident ([0-9a-f]{12})")
ROOT = "/".join(__file__.split("/")[:-3])       # the repository, to shorten frame paths


@dataclass(frozen=True)
class ServerError:
    type: str
    message: str
    frames: tuple[tuple[str, int, str], ...]     # (file, line, function), innermost last

    @classmethod
    def from_exc_info(cls, exc_info) -> "ServerError":
        _, exc, tb = exc_info
        frames = tuple((f.filename.removeprefix(ROOT + "/"), f.lineno or 0, f.name)
                       for f in traceback.extract_tb(tb))
        return cls(type=type(exc).__name__, message=str(exc)[:500], frames=frames)

    def render(self) -> str:
        return "\n".join([f"{self.type}: {self.message}", *(f"  {f}:{n} in {fn}" for f, n, fn in self.frames)])


@dataclass(frozen=True)
class Outcome:
    rpc: str                                      # "Route"
    server: str                                   # "open" | "tokens"
    principal: str
    code: str                                     # grpc.StatusCode name
    details: str
    responses: int = 0
    incident: str | None = None
    server_error: ServerError | None = None
    problem: str | None = None                    # set when the outcome breaks a fuzz oracle
    field: str = ""                               # the field a refusal names

    @property
    def label(self) -> str:
        return f"{self.rpc}:{self.code}"


class Incidents(logging.Handler):
    """Keeps the exception of every ``rpc failed`` log record, by incident id."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self._by_id: dict[str, ServerError] = {}
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        incident = getattr(record, "incident", None)
        if incident and record.exc_info:
            with self._lock:
                self._by_id[incident] = ServerError.from_exc_info(record.exc_info)

    def lookup(self, details: str) -> tuple[str | None, ServerError | None]:
        m = _INCIDENT.search(details or "")
        if not m:
            return None, None
        with self._lock:
            return m.group(1), self._by_id.get(m.group(1))

    def __enter__(self) -> "Incidents":
        logging.getLogger("seqr.rpc").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("seqr.rpc").removeHandler(self)
