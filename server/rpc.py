"""The boundary every RPC crosses: authenticate, admit, read, run, count, map errors to statuses.

The service runs on grpc.aio, and every method is registered here as a *request-streaming*
handler, also the unary ones. That is what lets a call be judged before its message is read:

1. authenticate from metadata (and the mTLS peer), before a byte of the body is requested,
   so an unauthenticated caller's message is never read or buffered beyond HTTP/2's window;
2. admit it under its principal's concurrency cap (RESOURCE_EXHAUSTED beyond it), so no caller
   can hold more than its share, and nobody holds a thread while it waits for the network;
3. read the message(s) with a deadline (a request that never arrives is dropped, not waited
   for) and bound every string in them before anything else looks at them;
4. run the CPU work (scoring, parsing, store writes) in a bounded thread pool, so the event
   loop stays free for health checks and for other callers' I/O.

Servicers stay thin and never see grpc: a unary-request method is a plain function
``fn(request, call)`` (run in the pool); a request-streaming one is ``async fn(requests, call)``
(an async generator when it also streams responses). ``call.run(fn, *args)`` runs work in the
pool. They raise SeqrError; this module is the only place that catches broad exceptions: an
unexpected one is logged with an incident id and answered INTERNAL without internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import threading
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from seqr_core.errors import InvalidArgumentError, LimitExceededError, SeqrError

from .auth import Authenticator, Principal
from .metrics import Metrics
from .status import internal_status, to_status

log = logging.getLogger("seqr.rpc")


class DeadlineError(SeqrError):
    """A request (or the next message of a stream) did not arrive in time."""

    code = "DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class Admission:
    """How long and how much one caller may hold; see Limits for the defaults."""

    calls_per_principal: int = 128         # concurrent calls of one principal (any state)
    read_timeout_s: float = 30.0           # a unary request's message must arrive within this
    stream_idle_s: float = 300.0           # longest wait for the next message of a stream


@dataclass(frozen=True)
class Call:
    """What a servicer method gets besides the request: who calls, and the pool to run work in."""

    method: str                            # "Router/Route"
    principal: Principal
    pool: Executor

    async def run(self, fn: Callable, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(fn, *args, **kwargs))


class _Slots:
    """Per-principal in-flight counts; acquire refuses past the cap instead of queueing."""

    def __init__(self, cap: int):
        self.cap = cap
        self._n: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, who: str) -> None:
        with self._lock:
            n = self._n.get(who, 0)
            if n >= self.cap:
                raise LimitExceededError("too many concurrent calls for this caller", field="authorization",
                                         limit=self.cap, actual=n + 1)
            self._n[who] = n + 1

    def release(self, who: str) -> None:
        with self._lock:
            n = self._n.get(who, 1) - 1
            if n:
                self._n[who] = n
            else:
                self._n.pop(who, None)


def _peer_identity(context) -> dict[str, list[bytes]]:
    ctx = context.auth_context() or {}
    return {k: list(v) for k, v in ctx.items() if k.startswith("x509_")}


class Dispatcher:
    """Builds the generic handlers of a service from its descriptor and a servicer object."""

    def __init__(self, *, auth: Authenticator, metrics: Metrics, pool: Executor,
                 admission: Admission = Admission(), tls: bool = False,
                 check_request: Callable[[Any], None] | None = None,
                 on_auth_failure: Callable[[str, SeqrError, str], None] | None = None):
        self.auth = auth
        self.metrics = metrics
        self.pool = pool
        self.admission = admission
        self._slots = _Slots(admission.calls_per_principal)
        self._tls = tls                  # only TLS peers have an identity worth reading
        self._check = check_request
        self._on_auth_failure = on_auth_failure

    # ------------------------------------------------------------------ registration
    def service(self, descriptor, messages, servicer) -> grpc.GenericRpcHandler:
        """Handlers for every method of ``descriptor`` (a ServiceDescriptor); ``messages`` is the
        pb2 module holding its request/response classes (requests may live in imported modules)."""
        handlers = {}
        for m in descriptor.methods:
            req_cls = _message_class(m.input_type, messages)
            resp_cls = _message_class(m.output_type, messages)
            fn = getattr(servicer, m.name)
            method = f"{descriptor.name}/{m.name}"
            des = _deserializer(req_cls)
            ser = resp_cls.SerializeToString
            if m.server_streaming:
                handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                    self._streaming(method, fn, m.client_streaming), request_deserializer=des,
                    response_serializer=ser)
            else:
                handlers[m.name] = grpc.stream_unary_rpc_method_handler(
                    self._unary(method, fn, m.client_streaming), request_deserializer=des,
                    response_serializer=ser)
        return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)

    def _unary(self, method: str, fn: Callable, client_streaming: bool):
        if client_streaming != inspect.iscoroutinefunction(fn):
            raise TypeError(f"{method}: request-streaming methods are async, unary-request ones are not")

        # A servicer may mark requests cheap enough to answer on the loop (``<Method>_inline``):
        # the thread handoff and GIL ping-pong cost more than the work itself for them.
        inline = getattr(fn.__self__, f"{fn.__name__}_inline", None) if hasattr(fn, "__self__") else None

        async def handler(requests, context):
            async with self._guard(method, context) as call:
                if client_streaming:
                    return await fn(self._stream(requests), call)
                req = await self._read_one(requests)
                if inline is not None and inline(req):
                    return fn(req, call)
                return await call.run(fn, req, call)
        return handler

    def _streaming(self, method: str, fn: Callable, client_streaming: bool):
        if client_streaming != inspect.isasyncgenfunction(fn):
            raise TypeError(f"{method}: request-streaming methods are async generators here")

        async def handler(requests, context):
            async with self._guard(method, context) as call:
                if client_streaming:
                    async for resp in fn(self._stream(requests), call):
                        yield resp
                else:
                    for resp in await call.run(fn, await self._read_one(requests), call):
                        yield resp
        return handler

    # ------------------------------------------------------------------ reading
    async def _next(self, requests: AsyncIterator, timeout_s: float, late: str):
        """The next message, bounded-checked; StopAsyncIteration at the end of the stream."""
        try:
            async with asyncio.timeout(timeout_s):
                req = await anext(requests)
        except TimeoutError:
            raise DeadlineError(late, field="request", limit=f"{timeout_s}s") from None
        if self._check is not None:
            self._check(req)
        return req

    async def _read_one(self, requests: AsyncIterator):
        try:
            return await self._next(requests, self.admission.read_timeout_s,
                                    "the request message did not arrive in time")
        except StopAsyncIteration:
            raise InvalidArgumentError("the request message is missing", field="request") from None

    async def _stream(self, requests: AsyncIterator) -> AsyncIterator:
        while True:
            try:
                req = await self._next(requests, self.admission.stream_idle_s, "the stream was idle too long")
            except StopAsyncIteration:
                return
            yield req

    # ------------------------------------------------------------------ the guard
    def _count(self, method: str, code: str) -> bool:
        """Account one finished call; a caller that saw its status can already scrape it."""
        self.metrics.in_flight.dec()
        self.metrics.rpcs.labels(method, code).inc()
        if code != "OK":
            self.metrics.errors.labels(method, code).inc()
        return True

    @contextlib.asynccontextmanager
    async def _guard(self, method: str, context):
        t0, principal, code, admitted, counted = time.perf_counter(), None, "OK", False, False
        self.metrics.in_flight.inc()
        try:
            try:
                principal = self.auth.authenticate(context.invocation_metadata(), method,
                                                   peer_identity=_peer_identity(context) if self._tls else None)
            except SeqrError as e:
                if self._on_auth_failure is not None:   # it may fsync: in the pool, awaited for order
                    await asyncio.get_running_loop().run_in_executor(
                        self.pool, self._on_auth_failure, method, e, context.peer())
                raise
            self._slots.acquire(principal.name)
            admitted = True
            yield Call(method=method, principal=principal, pool=self.pool)
        except SeqrError as e:
            code = e.code
            level = logging.WARNING if e.code in ("DATA_LOSS", "UNAVAILABLE") else logging.INFO
            log.log(level, "rpc refused", extra={"method": method, "code": e.code, "field": e.field,
                                                 "error": str(e)})
            st = to_status(e)
            counted = self._count(method, code)   # before abort: it sends the status to the caller
            await context.abort(st.code, st.details, st.trailing_metadata)
        except (asyncio.CancelledError, GeneratorExit):   # the client went away
            code = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - the one boundary; see module doc
            code = "INTERNAL"
            incident = uuid.uuid4().hex[:12]
            log.error("rpc failed", exc_info=e, extra={"method": method, "incident": incident})
            st = internal_status(incident)
            counted = self._count(method, code)
            await context.abort(st.code, st.details, st.trailing_metadata)
        finally:
            if admitted:
                self._slots.release(principal.name)
            if not counted:
                self._count(method, code)
            log.debug("rpc", extra={"method": method, "code": code, "principal": getattr(principal, "name", None),
                                    "ms": round((time.perf_counter() - t0) * 1e3, 3)})


def _message_class(desc, module):
    cls = getattr(module, desc.name, None)
    if cls is None or cls.DESCRIPTOR is not desc:
        from google.protobuf import message_factory
        cls = message_factory.GetMessageClass(desc)
    return cls


def _deserializer(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError:
            raise InvalidArgumentError(f"undecodable {cls.DESCRIPTOR.name} message", field="request",
                                       actual=f"{len(data)} bytes") from None
    return parse
