"""`seqr host`: a reference OpenAI-compatible HTTP server on transformers + PEFT, routed by seqr.

    POST /v1/chat/completions   POST /v1/completions   (``stream: true``: server-sent events)
    GET  /v1/models             GET  /v1/models/{id}   GET /health

Per request: the prompt's inputs on the library's targeted modules are captured (base model),
routed through the service (:mod:`seqr_client.host_routing`), the decision applied — one
adapter, a weighted top-k mix, or the base model when the margin is below ``min_margin`` — and
the text generated (:mod:`seqr_client.host_engine`). ``model`` picks the behaviour: the routed
name (default ``seqr``), ``base``, or an adapter's name to pin it (no routing). Every answer
says what served it: a ``seqr`` object in the body (adapter, id, margin, library version,
reason) and ``x-seqr-*`` headers. When routing fails (router down or slow: each call has a
deadline) the base model answers and says why, or 503 with ``router_required``. Errors are
OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``.

Starlette + uvicorn (well-kept ASGI stack); the model work runs in threads, one generation at
a time, with at most ``max_queue`` requests admitted (429 beyond).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from . import openai_schema as S
from .host_engine import Engine
from .host_routing import HostRouter, RoutingFailed, Served

log = logging.getLogger("seqr.host")


@dataclass(frozen=True)
class HostConfig:
    served_name: str = "seqr"             # the model id that routes
    router_required: bool = False         # 503 instead of the base model when routing fails
    max_new_tokens: int = 512             # the most a request may ask for
    max_prompt_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    max_queue: int = 16                   # requests admitted at once (one generates, the rest wait)
    owned_by: str = "seqr"


@dataclass
class _Admission:
    cap: int
    n: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self) -> None:
        with self.lock:
            if self.n >= self.cap:
                raise S.ApiError(429, f"the host is busy ({self.cap} requests in progress); retry shortly",
                                 type="rate_limit_error", code="rate_limit_exceeded")
            self.n += 1

    def leave(self) -> None:
        with self.lock:
            self.n -= 1


class OpenAIHost:
    """The request handlers around one Engine and one HostRouter (None: never route)."""

    def __init__(self, engine: Engine, router: HostRouter | None, config: HostConfig = HostConfig()):
        self.engine, self.router, self.config = engine, router, config
        self._admission = _Admission(config.max_queue)
        self.created = int(time.time())

    # ------------------------------------------------------------------ app
    def app(self) -> Starlette:
        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        return Starlette(routes=routes, exception_handlers={
            S.ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error})

    def model_ids(self) -> list[str]:
        return [self.config.served_name, "base", *self.engine.adapters]

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card(m) for m in self.model_ids()]})

    async def model(self, request: Request) -> JSONResponse:
        mid = request.path_params["model_id"]
        if mid not in self.model_ids():
            raise _no_model(mid)
        return JSONResponse(self._model_card(mid))

    def _model_card(self, mid: str) -> dict:
        return {"id": mid, "object": "model", "created": self.created, "owned_by": self.config.owned_by}

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "routing": self.router is not None,
                             "library": self.router.library if self.router else None})

    # ------------------------------------------------------------------ completions
    async def chat(self, request: Request):
        req = S.parse(S.ChatRequest, await _json(request, self.config.max_body_bytes))
        return await self._serve(req, lambda: self.engine.chat_ids(req.chat()), chat=True)

    async def completions(self, request: Request):
        req = S.parse(S.CompletionRequest, await _json(request, self.config.max_body_bytes))
        return await self._serve(req, lambda: self.engine.prompt_ids(req.text()), chat=False)

    async def _serve(self, req, encode, *, chat: bool):
        if req.model not in self.model_ids():
            raise _no_model(req.model)
        asked = req.limit()
        if asked is not None and asked > self.config.max_new_tokens:
            raise S.ApiError(400, f"max_tokens: at most {self.config.max_new_tokens} on this host",
                             param="max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens",
                             code="invalid_value")
        ids = await run_in_threadpool(encode)
        limit = self._limit(ids, asked, chat=chat)
        self._admission.enter()
        try:
            served = await run_in_threadpool(self._decide, req.model, ids)
            gen = self.engine.generate(ids, served=served, max_new_tokens=limit, temperature=req.temperature,
                                       top_p=req.top_p, seed=req.seed, stops=req.stops())
        except BaseException:
            self._admission.leave()
            raise
        rid = S.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            body = self._events(gen, rid=rid, model=req.model, chat=chat, prompt_tokens=len(ids),
                                usage=req.include_usage())
            return StreamingResponse(body, media_type="text/event-stream", headers={
                **served.headers(), "cache-control": "no-cache"})
        try:
            text = await run_in_threadpool(gen.text)
        finally:
            gen.cancel()
            self._admission.leave()
        build = S.chat_response if chat else S.completion_response
        return JSONResponse(build(rid=rid, model=req.model, text=text, finish=gen.finish_reason,
                                  prompt_tokens=len(ids), completion_tokens=gen.completion_tokens,
                                  seqr=served.as_json()), headers=served.headers())

    def _limit(self, ids: list[int], asked: int | None, *, chat: bool) -> int:
        """max_new_tokens for this request; 400 when the prompt (or prompt + asked) does not fit.
        Unasked, chat gets what the context leaves (up to the host's cap), completions 16 (as
        OpenAI's API)."""
        where = "messages" if chat else "prompt"
        if not ids:
            raise S.ApiError(400, "the prompt is empty", param=where, code="invalid_value")
        ctx = self.engine.context or (len(ids) + self.config.max_new_tokens)
        room = min(ctx - len(ids), self.config.max_new_tokens)
        if len(ids) > self.config.max_prompt_tokens or room < 1:
            raise S.ApiError(400, f"the prompt has {len(ids)} tokens; this host takes at most "
                                  f"{min(self.config.max_prompt_tokens, ctx - 1)}", param=where,
                             code="context_length_exceeded")
        limit = asked if asked is not None else (room if chat else min(16, room))
        if len(ids) + limit > ctx:
            raise S.ApiError(400, f"{len(ids)} prompt tokens + max_tokens={limit} exceed the model's {ctx}-token "
                                  "context", param="max_tokens", code="context_length_exceeded")
        return limit

    def _decide(self, model: str, ids: list[int]) -> Served:
        if model == "base":
            return Served(False, (), "base model requested")
        if model != self.config.served_name:
            return Served(False, ((model, self.router.known_id(model) if self.router else None, 1.0),),
                          "adapter requested by name")
        if self.router is None:
            return Served(False, (), "routing is off on this host")
        try:
            return self.router.decide(self.engine.model, torch.tensor([ids], dtype=torch.long), lock=self.engine.lock)
        except RoutingFailed as e:
            reason = str(e)
        log.warning("routing failed; answering with the base model", extra={"reason": reason})
        if self.config.router_required:
            raise S.ApiError(503, f"{reason} (this host requires routing)", type="server_error",
                             code="router_unavailable")
        return Served(False, (), reason, library=self.router.library)

    async def _events(self, gen, *, rid: str, model: str, chat: bool, prompt_tokens: int, usage: bool):
        """Server-sent events: a first chunk with the role and the ``seqr`` object, text deltas,
        a last chunk with finish_reason, optionally usage, then ``[DONE]``. Leaving early (the
        client went away) cancels the generation."""
        created, seqr = int(time.time()), gen.served.as_json()

        def event(finish: str | None = None, *, text: str | None = None, role: bool = False, **kw) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                doc = S.chat_chunk(rid=rid, model=model, created=created, delta=delta, finish=finish, **kw)
            else:
                doc = S.completion_chunk(rid=rid, model=model, created=created, text=text or "", finish=finish, **kw)
            return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"

        try:
            yield event(role=True, seqr=seqr)
            it = iter(gen)
            while (text := await run_in_threadpool(next, it, None)) is not None:
                yield event(text=text)
            yield event(gen.finish_reason)
            if usage:
                yield event(usage_=S.usage(prompt_tokens, gen.completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel()
            self._admission.leave()


# ---------------------------------------------------------------------------- errors
def _no_model(mid: str) -> S.ApiError:
    return S.ApiError(404, f"the model {mid[:100]!r} does not exist on this host; see GET /v1/models",
                      param="model", code="model_not_found")


async def _json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise S.ApiError(413, f"request body over {limit} bytes", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise S.ApiError(413, f"request body over {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise S.ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None


async def _api_error(request: Request, e: S.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    kind = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else "http_error"
    return JSONResponse(S.ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                   code=kind).body(), status_code=e.status_code)


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    incident = uuid.uuid4().hex[:12]
    log.error("request failed", exc_info=e, extra={"incident": incident, "path": request.url.path})
    return JSONResponse(S.ApiError(500, f"internal error (incident {incident})", type="server_error",
                                   code="internal_error").body(), status_code=500)


# ---------------------------------------------------------------------------- running it
class HostServer:
    """uvicorn in a thread: ``start()`` returns once listening (``port`` is the bound one)."""

    def __init__(self, host: OpenAIHost, *, listen: str = "127.0.0.1:8000", log_level: str = "warning"):
        import uvicorn
        addr, _, port = listen.rpartition(":")
        self.config = uvicorn.Config(host.app(), host=addr.strip("[]") or "127.0.0.1", port=int(port),
                                     log_level=log_level, timeout_keep_alive=5, lifespan="off",
                                     timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self, timeout: float = 30.0) -> "HostServer":
        self._thread = threading.Thread(target=self.server.run, name="seqr-host-http", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the host did not start listening on {self.config.host}:{self.config.port}")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM, then stop (in-flight generations get a few seconds)."""
        import signal
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        print(f"seqr host: listening on {self.url}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if self._thread is not None and not self._thread.is_alive():
                break
        self.stop()


def build_host(*, model: str, adapters: dict[str, Path], client=None, library: str | None = None,
               config: HostConfig = HostConfig(), top_k: int = 1, min_margin: float = 0.0, form: str = "auto",
               route_tokens: int = 512, router_timeout: float = 2.0) -> OpenAIHost:
    """Load the model and adapters and wire the router (``client`` None: no routing)."""
    from .host_engine import load_model
    from .host_routing import weights_sha256
    base, tok = load_model(model)
    engine = Engine(base, tok, adapters)
    router = None
    if client is not None:
        router = HostRouter(client, library=library, local={n: weights_sha256(p) for n, p in adapters.items()},
                            top_k=top_k, min_margin=min_margin, form=form, route_tokens=route_tokens,
                            timeout=router_timeout)
    return OpenAIHost(engine, router, config)
