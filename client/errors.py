"""The client's exceptions: one per gRPC status the service uses, mirroring seqr_core.errors.

Every exception carries ``code`` (the gRPC status name), ``field`` (the offending request
field, from the status' BadRequest detail), ``limit`` and ``actual`` (strings, from its
ErrorInfo), ``reason`` (the server-side error class, e.g. "TAMPERED_BLOB_ERROR") and
``message``. ``str(exc)`` is the server's full message.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class SeqrError(Exception):
    code = "UNKNOWN"

    def __init__(self, message: str, *, field: str = "", limit: str | None = None,
                 actual: str | None = None, reason: str = "", details: str = ""):
        self.message = message
        self.field = field
        self.limit = limit
        self.actual = actual
        self.reason = reason
        super().__init__(details or (f"{field}: {message}" if field else message))


class InvalidArgumentError(SeqrError):
    code = "INVALID_ARGUMENT"


class NotFoundError(SeqrError):
    code = "NOT_FOUND"


class AlreadyExistsError(SeqrError):
    code = "ALREADY_EXISTS"


class LimitExceededError(SeqrError):
    code = "RESOURCE_EXHAUSTED"


class FailedPreconditionError(SeqrError):
    code = "FAILED_PRECONDITION"


class IntegrityError(SeqrError):
    code = "DATA_LOSS"


class UnavailableError(SeqrError):
    code = "UNAVAILABLE"


class PermissionDeniedError(SeqrError):
    code = "PERMISSION_DENIED"


class UnauthenticatedError(SeqrError):
    code = "UNAUTHENTICATED"


class DeadlineExceededError(SeqrError):
    code = "DEADLINE_EXCEEDED"


class UnimplementedError(SeqrError):
    code = "UNIMPLEMENTED"


class CancelledError(SeqrError):
    code = "CANCELLED"


class InternalError(SeqrError):
    code = "INTERNAL"


class AdapterFolderError(InvalidArgumentError):
    """A local adapter folder the service would refuse (pickles, missing files), caught before
    any byte is sent. ``field`` is "path"; the message names the folder and what to do."""


_BY_CODE = {c.code: c for c in (InvalidArgumentError, NotFoundError, AlreadyExistsError, LimitExceededError,
                                FailedPreconditionError, IntegrityError, UnavailableError,
                                PermissionDeniedError, UnauthenticatedError, DeadlineExceededError,
                                UnimplementedError, CancelledError, InternalError)}


def from_rpc_error(e: grpc.RpcError) -> SeqrError:
    """The client exception for a failed call (falls back to the bare code and details)."""
    code = e.code().name if callable(getattr(e, "code", None)) else "UNKNOWN"
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    field, message, meta, reason = "", details or code, {}, ""
    status = rpc_status.from_call(e) if hasattr(e, "trailing_metadata") else None
    for any_ in (status.details if status is not None else ()):
        if any_.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            any_.Unpack(br)
            if br.field_violations:
                field, message = br.field_violations[0].field, br.field_violations[0].description
        elif any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
            meta, reason = dict(info.metadata), info.reason
    cls = _BY_CODE.get(code, SeqrError)
    return cls(message, field=field or meta.get("field", ""), limit=meta.get("limit"),
               actual=meta.get("actual"), reason=reason, details=details or code)
