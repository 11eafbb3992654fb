"""The boundary every RPC crosses: authenticate, run, count, and turn errors into statuses.

Servicer methods are decorated with ``@unary("Router/Route")`` or ``@streaming(...)`` and take
``(request_or_iterator, context, principal)``; they raise SeqrError and never touch status codes.
The servicer carries the ``Guard`` (auth + metrics) as ``self.guard``.
This is the only place that catches broad exceptions: an unexpected one is logged with an
incident id and answered INTERNAL without internals (gRPC would otherwise send its text).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid

import grpc

from seqr_core.errors import SeqrError

from .auth import Authenticator
from .metrics import Metrics
from .status import internal_status, to_status

log = logging.getLogger("seqr.rpc")


class Guard:
    def __init__(self, auth: Authenticator, metrics: Metrics):
        self.auth = auth
        self.metrics = metrics

    @contextlib.contextmanager
    def call(self, method: str, context):
        """Around one RPC: yields the caller's Principal; maps whatever escapes to a status."""
        t0, principal, code = time.perf_counter(), None, "OK"
        self.metrics.in_flight.inc()
        try:
            principal = self.auth.authenticate(context.invocation_metadata(), method,
                                               peer_identity=context.auth_context())
            yield principal
        except SeqrError as e:
            code = e.code
            self.auth.refused(method, e, peer=context.peer(), principal=principal)
            level = logging.WARNING if e.code in ("DATA_LOSS", "UNAVAILABLE") else logging.INFO
            log.log(level, "rpc refused", extra={"method": method, "code": e.code, "field": e.field,
                                                 "error": str(e)})
            context.abort_with_status(to_status(e))
        except grpc.RpcError:           # the client went away while we read its stream
            code = "CANCELLED"
        except GeneratorExit:           # the client went away while we streamed to it
            code = "CANCELLED"
            raise
        except Exception as e:  # noqa: BLE001 - the one boundary; see module doc
            code = "INTERNAL"
            incident = uuid.uuid4().hex[:12]
            log.error("rpc failed", exc_info=e, extra={"method": method, "incident": incident})
            context.abort_with_status(internal_status(incident))
        finally:
            self.metrics.in_flight.dec()
            self.metrics.rpcs.labels(method, code).inc()
            if code != "OK":
                self.metrics.errors.labels(method, code).inc()
            log.debug("rpc", extra={"method": method, "code": code, "principal": getattr(principal, "name", None),
                                    "ms": round((time.perf_counter() - t0) * 1e3, 3)})


def unary(method: str):
    """For unary-response RPCs (unary-unary and stream-unary)."""
    def wrap(fn):
        @functools.wraps(fn)
        def handler(servicer, request, context):
            with servicer.guard.call(method, context) as principal:
                return fn(servicer, request, context, principal)
        return handler
    return wrap


def streaming(method: str):
    """For streaming-response RPCs (unary-stream and stream-stream): ``fn`` is a generator."""
    def wrap(fn):
        @functools.wraps(fn)
        def handler(servicer, request, context):
            with servicer.guard.call(method, context) as principal:
                yield from fn(servicer, request, context, principal)
        return handler
    return wrap
