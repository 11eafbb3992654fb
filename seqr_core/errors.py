"""The one exception root of seqr-router.

Every error carries the offending ``field``, the ``limit`` it broke and the ``actual`` value,
so the server can turn it into a google.rpc.Status with a field violation and the client can
turn it back into the same type. The server maps each class to one gRPC status code.
"""

from __future__ import annotations

from typing import Any


class SeqrError(Exception):
    """Root of all seqr errors. ``code`` names the gRPC status the server answers with."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field: str = "", limit: Any = None, actual: Any = None):
        self.message = message
        self.field = field
        self.limit = limit
        self.actual = actual
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
