"""The one place that turns a SeqrError into a gRPC status.

The status is a google.rpc.Status with two details: BadRequest.field_violations naming the
offending field (what a generic gRPC client shows), and ErrorInfo (domain "seqr-router",
reason = the error class in UPPER_SNAKE) whose metadata carries field, limit and actual so
seqr_client can rebuild the same exception type.
"""

from __future__ import annotations

import re

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from seqr_core.errors import SeqrError

DOMAIN = "seqr-router"
_MAX_META = 256  # actual values can be big tuples or arrays; a status is not a dump


def grpc_code(err: SeqrError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def _short(value: object) -> str:
    s = str(value)
    return s if len(s) <= _MAX_META else s[: _MAX_META - 3] + "..."


def to_status(err: SeqrError) -> grpc.Status:
    """A grpc.Status (code, message, rich details) for ``err``; hand it to abort_with_status."""
    code = grpc_code(err)
    details = []
    if err.field:
        br = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.message)])
        details.append(br)
    meta = {"field": err.field}
    if err.limit is not None:
        meta["limit"] = _short(err.limit)
    if err.actual is not None:
        meta["actual"] = _short(err.actual)
    details.append(error_details_pb2.ErrorInfo(reason=_snake(type(err).__name__), domain=DOMAIN,
                                               metadata=meta))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    st = status_pb2.Status(code=getattr(code_pb2, code.name), message=str(err), details=packed)
    return rpc_status.to_status(st)


def internal_status(incident: str) -> grpc.Status:
    """An INTERNAL status that reveals nothing but an incident id to look up in the log."""
    st = status_pb2.Status(code=code_pb2.INTERNAL,
                           message=f"internal error (incident {incident}; see the server log)")
    return rpc_status.to_status(st)
