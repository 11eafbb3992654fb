"""The one exception root of seqr-router.

Every error carries the offending ``field``, the ``limit`` it broke and the ``actual`` value,
so the server can turn it into a google.rpc.Status with a field violation and the client can
turn it back into the same type. The server maps each class to one gRPC status code.

Errors echo caller-supplied values (names, shapes, file names) into status messages and log
lines, so every part is bounded when the error is made: a 60 MB module name must not become
a 60 MB status and a 60 MB log line. Long values keep a short prefix and say how long they were.
"""

from __future__ import annotations

import reprlib
from typing import Any

MAX_ECHO = 200          # characters of one caller-supplied value kept in limit/actual
MAX_MESSAGE = 400       # characters of the message (it may interpolate caller values)
MAX_FIELD = 300         # field paths embed map keys and names the caller chose

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = MAX_ECHO
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 16
_REPR.maxlevel = 3


def cut(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` itself when short, else its first ``limit`` characters and '…(N chars)'."""
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"


def bounded(value: Any, limit: int = MAX_ECHO) -> Any:
    """``value`` unchanged when its text is short; otherwise a short text standing for it.

    Cheap on huge values: strings and bytes are sliced, containers go through a bounded
    ``reprlib`` (which never renders more than a few elements), so nothing is rendered in full.
    """
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        # Python refuses to print ints above ~4300 digits; nothing we compare is that large.
        return value if value.bit_length() <= 256 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, str):
        return cut(value, limit)
    if isinstance(value, (bytes, bytearray, memoryview)):
        # repr can take 4 characters per byte
        return bytes(value) if len(value) <= limit // 4 else f"{repr(bytes(value[:limit]))[:limit]}…({len(value)} bytes)"
    if isinstance(value, (tuple, list)) and len(value) <= 16 and all(
            v is None or isinstance(v, (bool, float)) or (isinstance(v, int) and v.bit_length() <= 256)
            or (isinstance(v, str) and len(v) <= limit) for v in value):
        return value    # shapes, small name lists: keep the object (callers compare them)
    return cut(_REPR.repr(value), limit)


class SeqrError(Exception):
    """Root of all seqr errors. ``code`` names the gRPC status the server answers with."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field: str = "", limit: Any = None, actual: Any = None):
        self.message = cut(str(message), MAX_MESSAGE)
        self.field = cut(str(field), MAX_FIELD)
        self.limit = bounded(limit)
        self.actual = bounded(actual)
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [f"{self.field}: {self.message}" if self.field else self.message]
        if self.limit is not None:
            parts.append(f"limit={self.limit}")
        if self.actual is not None:
            parts.append(f"actual={self.actual}")
        return "; ".join(parts)


class InvalidArgumentError(SeqrError):
    """The caller sent something malformed: wrong dtype, shape, non-finite values, bad option."""

    code = "INVALID_ARGUMENT"


class NotFoundError(SeqrError):
    """A named library, adapter or module does not exist (or is hidden from the caller)."""

    code = "NOT_FOUND"


class AlreadyExistsError(SeqrError):
    code = "ALREADY_EXISTS"


class LimitExceededError(SeqrError):
    """A request is larger than a configured limit (tokens, modules, bytes, top_k)."""

    code = "RESOURCE_EXHAUSTED"


class FailedPreconditionError(SeqrError):
    """The request is well formed but the state does not allow it (e.g. no calibration)."""

    code = "FAILED_PRECONDITION"


class IntegrityError(SeqrError):
    """Stored data failed authentication: tampered, truncated, swapped or rolled back."""

    code = "DATA_LOSS"


class UnavailableError(SeqrError):
    """The service cannot serve right now (store failed-stop, shutting down)."""

    code = "UNAVAILABLE"


class PermissionDeniedError(SeqrError):
    code = "PERMISSION_DENIED"


class UnauthenticatedError(SeqrError):
    code = "UNAUTHENTICATED"
