"""What `seqr host` asks the router, and what it makes of the answer.

Per request: capture the prompt's inputs on the modules the library's adapters target (base
model, adapters off), send as little as the method needs — ``moments`` (r×r per module, a few
KB whatever the prompt length) when every candidate adapter shares the library's A, raw
``activations`` otherwise — and turn the decision into a :class:`Served`: one adapter, a
weighted top-k mix, or the base model (margin below ``min_margin``, router unreachable).

Only adapters the host actually holds are candidates, and only if its copy is the one the
library indexed (same sha256 of ``adapter_model.safetensors``): a host never applies weights
that the routing decision was not computed on.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import NotFoundError, SeqrError
from .hf_host import capture_inputs, group_shared_inputs, moments, project
from .router_client import WEIGHTS, RouterClient

log = logging.getLogger("seqr.host")

FORMS = ("auto", "moments", "projected", "activations")


@dataclass(frozen=True)
class Served:
    """Which weights served a request, and why. ``adapters`` empty: the base model."""

    routed: bool                                   # the router was asked and answered
    adapters: tuple[tuple[str, int | None, float], ...]   # (name, library id, weight)
    reason: str                                    # why not routed / why the base model
    library: str = ""
    library_version: int | None = None
    margin: float | None = None
    capture_ms: float | None = None                # the prompt's forward pass up to the last targeted module
    route_ms: float | None = None                  # the router call (wire + server)

    @property
    def label(self) -> str:
        """``base``, the adapter's name, or ``a+b`` for a mix (the response header)."""
        return "+".join(n for n, _, _ in self.adapters) or "base"

    def as_json(self) -> dict:
        first = self.adapters[0] if self.adapters else (None, None, None)
        return {"adapter": first[0], "adapter_id": first[1], "routed": self.routed,
                "adapters": [{"name": n, "id": i, "weight": w} for n, i, w in self.adapters],
                "margin": None if self.margin is None or not math.isfinite(self.margin) else self.margin,
                "library": self.library or None, "library_version": self.library_version,
                "reason": self.reason, "capture_ms": self.capture_ms, "route_ms": self.route_ms}

    def headers(self) -> dict[str, str]:
        h = {"x-seqr-adapter": self.label, "x-seqr-routed": "true" if self.routed else "false"}
        if self.library_version is not None:
            h["x-seqr-library-version"] = str(self.library_version)
        if self.reason:
            h["x-seqr-reason"] = self.reason.encode("ascii", "replace").decode()[:200]
        return h


class RoutingFailed(Exception):
    """The router could not be asked or refused (down, deadline, auth…): the reason, for the response."""


@dataclass(frozen=True)
class LibraryView:
    """What the host needs from DescribeLibrary, refreshed when the library version moves."""

    version: int
    candidates: tuple[str, ...]                   # library adapters this host holds (same sha256)
    everything: bool                              # candidates are all of the caller's adapters
    modules: tuple[str, ...]                      # modules the candidates target
    shared_a: Mapping[str, np.ndarray] = field(default_factory=dict)
    all_shared: bool = False                      # every candidate is a shared-A adapter
    ids: Mapping[str, int] = field(default_factory=dict)


def weights_sha256(folder: str | Path) -> str:
    return hashlib.sha256((Path(folder) / WEIGHTS).read_bytes()).hexdigest()


class HostRouter:
    def __init__(self, client: RouterClient, *, library: str, local: Mapping[str, str], top_k: int = 1,
                 min_margin: float = 0.0, form: str = "auto", route_tokens: int = 512, timeout: float = 2.0):
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.client, self.library, self.top_k, self.min_margin = client, library, top_k, min_margin
        self.form, self.route_tokens, self.timeout = form, route_tokens, timeout
        self._local = dict(local)                    # adapter name -> sha256 of the host's copy
        self._view: LibraryView | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ library view
    def view(self, *, refresh: bool = False) -> LibraryView:
        with self._lock:
            if self._view is None or refresh:
                self._view = self._describe()
            return self._view

    def _describe(self) -> LibraryView:
        info = self.client.describe(self.library, include_shared_a=True, timeout=self.timeout)
        held, skipped = [], []
        for a in info.adapters:
            if a.name not in self._local:
                continue
            (held if info_sha(a) == self._local[a.name] else skipped).append(a)
        if skipped:
            log.warning("host copies differ from the library's; not routed to", extra={
                "adapters": [a.name for a in skipped], "library": self.library})
        mods = sorted({m for a in held for m in a.modules})
        return LibraryView(version=info.version, candidates=tuple(a.name for a in held),
                           everything=len(held) == len(info.adapters), modules=tuple(mods),
                           shared_a={m: info.shared_a[m] for m in mods if m in info.shared_a},
                           all_shared=bool(held) and all(a.kind == "shared_a" for a in held)
                           and all(m in info.shared_a for m in mods),
                           ids={a.name: a.adapter_id for a in held})

    def known_id(self, name: str) -> int | None:
        """The library id of ``name`` if the current view knows it (never calls the router)."""
        view = self._view
        return None if view is None else view.ids.get(name)

    # ------------------------------------------------------------------ one request
    def decide(self, model, input_ids, *, lock=contextlib.nullcontext()) -> Served:
        """Capture, route and decide for one prompt ``input_ids`` (1, T). Raises RoutingFailed.

        ``lock`` is held while the model runs (the capture), not while the router answers."""
        try:
            view = self.view()
            if not view.candidates:
                return Served(False, (), "no adapter of the library is held by this host",
                              library=self.library, library_version=view.version)
            t0 = time.perf_counter()
            with lock:
                captured = capture_inputs(model, input_ids, modules=view.modules)
            kwargs = self._inputs(view, captured)
            t1 = time.perf_counter()
            try:
                result = self._route(view, kwargs)
            except NotFoundError:           # an adapter was deleted since the view: look again once
                view = self.view(refresh=True)
                result = self._route(view, kwargs)
            t2 = time.perf_counter()
        except SeqrError as e:
            raise RoutingFailed(f"routing failed: {e.code}: {e.message}"[:300]) from None
        if result.library_version != view.version:
            self.view(refresh=True)         # for the next request: new or changed adapters
        common = dict(library=self.library, library_version=result.library_version, margin=result.margin,
                      capture_ms=round((t1 - t0) * 1e3, 3), route_ms=round((t2 - t1) * 1e3, 3))
        if result.margin < self.min_margin:
            return Served(True, (), f"margin {result.margin:.4g} below min-margin {self.min_margin:g}", **common)
        chosen = tuple((c.name, c.adapter_id, float(c.weight)) for c in result.choices
                       if c.name in view.ids)
        if len(chosen) != len(result.choices):
            return Served(True, (), "the router chose an adapter this host does not hold", **common)
        return Served(True, chosen, "", **common)

    def _inputs(self, view: LibraryView, captured: dict[str, np.ndarray]) -> dict:
        captured = {m: x[-self.route_tokens:] for m, x in captured.items()}
        form = self.form if self.form != "auto" else ("moments" if view.all_shared else "activations")
        if form in ("moments", "projected"):
            z = project(captured, view.shared_a)
            return {"moments": moments(z), "tokens": next(iter(z.values())).shape[0]} if form == "moments" \
                else {"projected": z}
        groups = group_shared_inputs(captured)      # q/k/v of a layer read one hidden state: send it once
        return {"inputs": dict(groups), "shared": {k: captured[k] for k in set(groups.values())}}

    def _route(self, view: LibraryView, kwargs: dict):
        return self.client.route(self.library, **kwargs, top_k=self.top_k, timeout=self.timeout,
                                 candidates=None if view.everything else view.candidates)


def info_sha(adapter) -> str | None:
    return dict(adapter.sha256).get(WEIGHTS)
