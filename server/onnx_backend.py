"""The onnxruntime scorer backend (``--backend onnx``): the numpy path's contract, on ORT.

``OnnxBackend().route(index, inputs, options)`` returns the ``seqr_core.routing.Decision`` that
``seqr_core.routing.route`` returns — same validation and errors, same exact ranking — but
scores with an exported ONNX graph (seqr_core.onnx_export) on the CUDA provider when a GPU is
usable, else on CPU. Exactness: the graph returns fp32 scores with rigorous error bounds; the
candidates those bounds leave in doubt are re-scored in float64 with seqr_core (brute force +
combine), exactly as the numpy path does, so top-k and order equal the numpy path's.

Sessions are built from bytes in memory, never from a file (the graph holds plaintext
weights). Each (library snapshot, profile) gets one session; a *profile* is what a graph is
specialised to: the supplied modules and their input forms, the effective normalisation and
whether per-token outputs are needed. Sessions are built only off the request path, by one
background thread: ``prepare(index)`` (called by the server after every library change, and
by ``route`` itself when it sees a snapshot it has no sessions for) exports the profiles in
recent use, warms them, then swaps the library's slot in one assignment. A request is scored
by ONNX only on the very snapshot it names — the manager's current one — so an answer never
comes from an older library; until that snapshot's sessions are warm, numpy serves it,
exactly. Numpy also serves, with a logged reason: methods other than seqr; requests numpy
rejects (it raises the same error it always does); a candidate the graph excludes; an export
or session build that failed (logged with the error). Either way the decision comes from
seqr_core.routing's one pipeline: this backend only supplies scores and bounds.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from seqr_core import energies as E
from seqr_core.errors import InvalidArgumentError, UnavailableError
from seqr_core.normalise import Normalisation
from seqr_core.qr_index import LibraryIndex
from seqr_core.routing import Decision, Plan, RouteOptions, decide, numpy_scores, plan

from . import onnx_scoring as S
from .onnx_scoring import Profile, default_profile

log = logging.getLogger(__name__)
PROVIDER_ENV = "SEQR_ONNX_PROVIDER"      # auto | cuda | cpu
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


# --- providers and sessions --------------------------------------------------------------

def gpu_present() -> bool:
    """A usable NVIDIA device, asked of the driver itself (onnxruntime-gpu lists the CUDA
    provider as available even on machines without a GPU)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        n = ctypes.c_int(0)
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(n)) == 0 and n.value > 0
    except (OSError, AttributeError):
        return False


def select_providers(prefer: str | None = None) -> list:
    """[CUDA (TF32 off: fp32 parity), CPU] when CUDA is usable, else [CPU]. ``prefer`` (or
    $SEQR_ONNX_PROVIDER): auto | cuda (fail if unusable) | cpu."""
    import onnxruntime as ort
    prefer = (prefer or os.environ.get(PROVIDER_ENV) or "auto").lower()
    if prefer not in ("auto", "cuda", "cpu"):
        raise InvalidArgumentError("provider must be auto, cuda or cpu", field="onnx.provider",
                                   actual=prefer)
    usable = prefer != "cpu" and CUDA in ort.get_available_providers() and gpu_present()
    if prefer == "cuda" and not usable:
        raise UnavailableError("CUDA provider forced but no GPU / onnxruntime-gpu CUDA provider is usable",
                               field="onnx.provider", actual=ort.get_available_providers())
    if not usable:
        return [CPU]
    if hasattr(ort, "preload_dlls"):          # CUDA/cuDNN from pip's nvidia-* wheels, if present
        try:
            ort.preload_dlls()
        except Exception as e:                # noqa: BLE001 - the session build reports what is missing
            log.debug("onnxruntime.preload_dlls: %s", e)
    return [(CUDA, {"use_tf32": "0"}), CPU]


def new_session(model: bytes, *, providers: list, threads: int | None = None):
    """An InferenceSession from bytes in memory (no optimized-model or profile file is written)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Idle intra-op threads must not spin: the same process runs numpy re-checks and gRPC.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
    sess = ort.InferenceSession(model, sess_options=so, providers=providers)
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if sess.get_providers()[0] != wanted:
        if os.environ.get(PROVIDER_ENV, "").lower() == "cuda":
            raise UnavailableError("CUDA provider forced but the session fell back to CPU",
                                   field="onnx.provider", actual=sess.get_providers())
        log.warning("onnx scorer: %s requested but %s is active (CUDA libraries missing?)",
                    wanted, sess.get_providers()[0])
    return sess


@dataclass(frozen=True)
class _Scorer:
    session: object
    provider: str
    excluded: frozenset          # adapter ids the graph leaves NaN


@dataclass(frozen=True)
class _Slot:
    index: LibraryIndex
    scorers: Mapping[Profile, _Scorer]


class OnnxBackend:
    """Scores with onnxruntime; see the module docstring for the contract and fallbacks."""

    name = "onnx"

    def __init__(self, *, prefer: str | None = None, intra_op_threads: int | None = None,
                 max_profiles: int = 8, default_normalisation: Normalisation | None = None):
        self.providers = select_providers(prefer)
        self.threads, self.max_profiles = intra_op_threads, max_profiles
        self.default_normalisation = default_normalisation
        self._slots: dict[str, _Slot] = {}
        self._recent: dict[str, OrderedDict] = {}
        self._pending: set = set()
        self._failed: dict = {}
        self._lock = threading.Lock()
        self._stats: Counter = Counter()
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seqr-onnx-build")
        names = [p if isinstance(p, str) else p[0] for p in self.providers]
        log.info("onnx backend: providers %s", names)

    # --- building (never on the request path) ---------------------------------------------
    def prepare(self, index: LibraryIndex, *, profiles=None, wait: bool = False) -> Future:
        """Export + warm sessions for ``index`` in the background, then swap them in.
        ``profiles``: default = those in recent use for this library, or the default profile."""
        if not index.adapters:                        # nothing to score: numpy answers (errors)
            with self._lock:
                cur = self._slots.get(index.name)
                if cur is None or cur.index.version < index.version:
                    self._slots[index.name] = _Slot(index, MappingProxyType({}))
            done: Future = Future()
            done.set_result(None)
            return done
        with self._lock:
            profs = list(profiles or self._recent.get(index.name, ()) or
                         [default_profile(index, self.default_normalisation)])
            self._pending.update((index.name, index.version, p) for p in profs)
        fut = self._builder.submit(self._build_and_swap, index, profs)
        if wait:
            fut.result()
        return fut

    def close(self) -> None:
        self._builder.shutdown(wait=True, cancel_futures=True)

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until every build queued so far has finished (one builder thread: FIFO)."""
        self._builder.submit(lambda: None).result(timeout)

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def warm_version(self, library: str) -> int | None:
        slot = self._slots.get(library)
        return None if slot is None else slot.index.version

    def _build_and_swap(self, index: LibraryIndex, profiles) -> None:
        built = {}
        for prof in profiles:
            try:
                built[prof] = self._compile(index, prof)
            except Exception as e:                # noqa: BLE001 - served by numpy, reason logged
                log.warning("onnx scorer %s v%d [%s] failed: %s", index.name, index.version, prof.key, e)
                with self._lock:
                    self._failed[(index.name, index.version, prof)] = f"export failed: {e}"
        with self._lock:
            self._pending.difference_update((index.name, index.version, p) for p in profiles)
            cur = self._slots.get(index.name)
            if cur is not None and cur.index.version > index.version:
                return                                # a newer snapshot is already warm
            self._failed = {k: v for k, v in self._failed.items()
                            if k[0] != index.name or k[1] >= index.version}
            if cur is not None and cur.index.version == index.version:
                built = {**cur.scorers, **built}
            recent = self._recent.get(index.name)
            if recent:
                built = {p: s for p, s in built.items() if p in recent or p in profiles}
            self._slots[index.name] = _Slot(index, MappingProxyType(built))   # the atomic swap

    def _compile(self, index: LibraryIndex, prof: Profile) -> _Scorer:
        from seqr_core.onnx_export import export_scorer, scorer_metadata
        sess = new_session(export_scorer(index, **prof.export_options()), providers=self.providers,
                           threads=self.threads)
        md = scorer_metadata(sess.get_modelmeta().custom_metadata_map)
        _warm_up(sess)
        excluded = frozenset(a["id"] for a in md["seqr.adapters"] if a["excluded"])
        provider = sess.get_providers()[0]
        log.info("onnx scorer %s v%d [%s] warm on %s", index.name, index.version, prof.key, provider)
        return _Scorer(sess, provider, excluded)

    def _want(self, index: LibraryIndex, prof: Profile | None) -> None:
        """Note a profile as in use and get it (or this snapshot) built in the background."""
        with self._lock:
            if prof is not None:
                recent = self._recent.setdefault(index.name, OrderedDict())
                recent[prof] = None
                recent.move_to_end(prof)
                while len(recent) > self.max_profiles:
                    recent.popitem(last=False)
            slot = self._slots.get(index.name)
            newer = slot is None or slot.index.version < index.version
            profs = list(self._recent.get(index.name, ())) if newer else [prof]
            busy = self._pending | set(self._failed)
            profs = [p for p in profs if p is not None and (index.name, index.version, p) not in busy
                     and (slot is None or slot.index.version != index.version or p not in slot.scorers)]
            if not profs:
                return
            self._pending.update((index.name, index.version, p) for p in profs)
        self._builder.submit(self._build_and_swap, index, profs)

    # --- serving -----------------------------------------------------------------------------
    def _numpy(self, p: Plan, reason: str) -> Decision:
        with self._lock:
            first = self._stats[f"numpy: {reason}"] == 0
            self._stats[f"numpy: {reason}"] += 1
        (log.info if first else log.debug)("onnx backend: served by numpy (%s)", reason)
        return decide(p, numpy_scores(p))

    def route(self, index: LibraryIndex, inputs: Mapping[str, E.ModuleInput],
              options: RouteOptions = RouteOptions()) -> Decision:
        p = plan(index, inputs, options)                 # raises exactly what numpy raises
        prof = S.profile(p)
        if isinstance(prof, str):
            return self._numpy(p, prof)
        slot = self._slots.get(index.name)               # one read: a swap cannot change it under us
        scorer = slot.scorers.get(prof) if slot is not None and slot.index.version == index.version else None
        if scorer is None:
            self._want(index, prof)
            key = (index.name, index.version, prof)
            return self._numpy(p, self._failed.get(key, "scorer warming"))
        if scorer.excluded and np.isin(p.ids, list(scorer.excluded)).any():
            return self._numpy(p, "candidate not scorable by this graph")
        with self._lock:
            self._stats[f"onnx: {scorer.provider}"] += 1
        return decide(p, S.scores(p, scorer.session))


def _warm_up(sess) -> None:
    """One run on zeros so the first request pays no lazy initialisation (CUDA kernels)."""
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        dtype = {"tensor(bool)": bool, "tensor(float16)": np.float16}.get(i.type, np.float32)
        feeds[i.name] = np.ones(shape, dtype) if dtype is bool else np.zeros(shape, dtype)
    if all(i.type != "tensor(bfloat16)" for i in sess.get_inputs()):
        sess.run(None, feeds)

