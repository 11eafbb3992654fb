"""Router servicer: parse -> core route on the current snapshot -> response. Thin on purpose."""

from __future__ import annotations

import time
from typing import Callable

from seqr_core import Decision, LibraryIndex, RouteOptions
from seqr_core import route as core_route
from seqr_core.errors import LimitExceededError
from seqr_router.v1 import router_pb2

from . import wire
from .auth import Principal
from .config import Limits
from .info import library_info
from .manager import LibraryManager, LibraryState
from .metrics import Metrics
from .rpc import Call, inline

RouteFn = Callable[[LibraryIndex, dict, RouteOptions], Decision]


class RouterService:
    def __init__(self, *, manager: LibraryManager, limits: Limits, metrics: Metrics, route_fn: RouteFn):
        self.manager, self.limits, self.metrics = manager, limits, metrics
        self.route_fn = route_fn

    @inline
    def Route(self, request, call: Call):
        return self._route(request, call.principal)

    async def RouteStream(self, requests, call: Call):
        library, options = "", router_pb2.RouteOptions()
        async for req in requests:
            # Decode-time hosts send the library and options once; later steps only tensors.
            if not req.library:
                req.library = library
            if not req.HasField("options"):
                req.options.CopyFrom(options)
            library, options = req.library, req.options
            yield await call.run(self._route, req, call.principal)

    def DescribeLibrary(self, request, call: Call):
        state = self.manager.get(request.library, call.principal)
        return library_info(state, call.principal, include_shared_a=request.include_shared_a)

    def _route(self, req: router_pb2.RouteRequest, principal: Principal) -> router_pb2.RouteResponse:
        t0 = time.perf_counter()
        state = self.manager.get(req.library, principal)
        inputs = wire.decode_inputs(req.tensors, req.inputs, limits=self.limits)
        index, candidates = self._scope(state, list(req.options.candidates), principal)
        options = wire.route_options(req.options, limits=self.limits, candidates=candidates)
        # The no-visible-adapter view (see _scope) goes to the core, never to a backend that
        # caches per library name: it only ever raises the empty library's error.
        route_fn = self.route_fn if index is state.index else core_route
        t1 = time.perf_counter()
        decision = route_fn(index, inputs, options)
        t2 = time.perf_counter()
        resp = wire.route_response(decision, names_by_id=state.names_by_id,
                                   include_scores=req.options.include_scores,
                                   timings=router_pb2.Timings(decode_ms=(t1 - t0) * 1e3,
                                                              score_ms=(t2 - t1) * 1e3))
        t3 = time.perf_counter()
        resp.timings.total_ms = (t3 - t0) * 1e3
        forms = {i.form for i in inputs.values()}
        self.metrics.route_latency.labels(state.name, forms.pop() if len(forms) == 1 else "mixed").observe(t3 - t0)
        if decision.choices:
            self.metrics.route_choices.labels(state.name, decision.choices[0].name).inc()
        if decision.rechecked:
            self.metrics.rechecked.labels(state.name).inc(decision.rechecked)
        return resp

    def _scope(self, state: LibraryState, asked: list[str], principal: Principal):
        """(index, candidates) the caller may route among; hidden names fail like absent ones."""
        if len(asked) > self.limits.max_candidates:
            raise LimitExceededError("too many candidates", field="options.candidates",
                                     limit=self.limits.max_candidates, actual=len(asked))
        if asked:
            for n in asked:
                state.entry(n, principal, field="candidates")
            return state.index, tuple(asked)
        if principal.unrestricted:
            return state.index, None
        visible = tuple(e.name for e in state.visible_entries(principal))
        if not visible:      # answer exactly as the same library without adapters would
            return state.without_adapters(), None
        return state.index, visible
