"""RouterClient: the typed face of the seqr-router gRPC API. numpy in, dataclasses out.

    from seqr_client import RouterClient
    with RouterClient("localhost:50051", token=os.environ.get("SEQR_TOKEN")) as c:
        r = c.route("demo", {"model.layers.0.self_attn.q_proj": x, "model.layers.0.self_attn.v_proj": x})
        r.best.name, r.best.adapter_id

Every call has a deadline (``timeout``, default 10 s; uploads and calibration 300 s). Failed
calls raise seqr_client.errors exceptions carrying the offending ``field``.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqr_router.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

from . import results as R
from . import wire
from .channel import make_channel
from .errors import AdapterFolderError, from_rpc_error

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_FILES = (CONFIG, WEIGHTS)
OPTIONAL_FILES = ("seqr.json", "README.md")
# torch.save / pickle files: loading one runs arbitrary code, so the service never takes them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
RESAVE = "re-save with `save_pretrained(..., safe_serialization=True)`"
CHUNK = 1 << 20
Array = np.ndarray


def _wrap(fn):
    """Failed calls raise seqr_client.errors exceptions instead of grpc.RpcError."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
    return call


def _refuse(p: Path, why: str) -> AdapterFolderError:
    msg = f"{p}: {why}"
    return AdapterFolderError(msg, field="path", actual=str(p), details=msg)


def read_peft_dir(path: str | Path) -> dict[str, bytes]:
    """The files of a PEFT adapter folder that the service accepts.

    Raises AdapterFolderError (an InvalidArgumentError, field "path") for what the service
    would refuse anyway, before anything is sent: not a folder, a pickled ``adapter_model.bin``
    (or .pt/.pth/.pkl/.ckpt) instead of safetensors, no weights, no adapter_config.json.
    """
    p = Path(path)
    if not p.is_dir():
        raise _refuse(p, "no such adapter folder" if not p.exists() else
                      "not a folder; pass the PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    if not (p / WEIGHTS).is_file():
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
        if pickles:
            raise _refuse(p, f"pickles are refused ({', '.join(pickles)}); {RESAVE}")
        raise _refuse(p, f"missing {WEIGHTS}: not a PEFT LoRA folder ({RESAVE})")
    if not (p / CONFIG).is_file():
        raise _refuse(p, f"missing {CONFIG}: not a PEFT LoRA folder")
    return {f: (p / f).read_bytes() for f in PEFT_FILES + OPTIONAL_FILES if (p / f).is_file()}


class RouterClient:
    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None, *,
                 token: str | None = None, timeout: float = 10.0, library: str | None = None,
                 upload_timeout: float = 300.0, options: list | None = None):
        self.target, self.timeout, self.upload_timeout, self.library = target, timeout, upload_timeout, library
        self._channel = make_channel(target, credentials, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._router = router_pb2_grpc.RouterStub(self._channel)
        self._admin = admin_pb2_grpc.LibraryAdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RouterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lib(self, library: str | None) -> str:
        lib = library or self.library
        if not lib:
            raise ValueError("no library given and no default library set on the client")
        return lib

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    # ------------------------------------------------------------------ routing
    @_wrap
    def route(self, library: str | None = None, inputs: Mapping[str, Array | str] | None = None, *,
              projected: Mapping[str, Array | str] | None = None,
              moments: Mapping[str, Array | str] | None = None,
              shared: Mapping[str, Array] | None = None, tokens: int | None = None,
              top_k: int = 1, method: str = "seqr", normalisation="activation",
              granularity: str = "sequence", aggregation: str = "mean", temperature: float = 1.0,
              candidates: Iterable[str] | None = None, include_scores: bool = False,
              lag_k: int | None = None, timeout: float | None = None) -> R.RouteResult:
        """Rank the adapters for one request.

        ``inputs``: module -> activations (T, d_in); ``projected``: module -> A·x (T, r);
        ``moments``: module -> ZᵀZ/T (r, r) over ``tokens`` tokens. A value may be the name of
        an array in ``shared`` (or simply the same array object) so modules reading one hidden
        state send it once.
        """
        req = router_pb2.RouteRequest(library=self._lib(library), options=wire.route_options(
            top_k=top_k, method=method, normalisation=normalisation, granularity=granularity,
            aggregation=aggregation, temperature=temperature, candidates=candidates,
            include_scores=include_scores, lag_k=lag_k))
        wire.add_inputs(req, inputs=inputs, projected=projected, moments=moments, shared=shared, tokens=tokens)
        resp = self._router.Route(req, timeout=self._t(timeout), metadata=self._metadata)
        return wire.route_result(resp)

    def route_stream(self, steps: Iterable[Mapping[str, Array]], *, library: str | None = None,
                     form: str = "activations", timeout: float | None = None, **options) -> Iterator[R.RouteResult]:
        """Decode-time routing: one result per step (module -> array in ``form``), in order.

        Library and options are sent with the first step only. No deadline unless ``timeout``.
        """
        opts = wire.route_options(**{**dict(top_k=1, method="seqr", normalisation="activation",
                                            granularity="token", aggregation="mean", temperature=1.0,
                                            candidates=None, include_scores=False, lag_k=None), **options})
        lib = self._lib(library)

        def requests():
            for n, step in enumerate(steps):
                req = router_pb2.RouteRequest(library=lib if n == 0 else "")
                if n == 0:
                    req.options.CopyFrom(opts)
                wire.add_inputs(req, **{"inputs" if form == "activations" else form: step})
                yield req

        try:
            for resp in self._router.RouteStream(requests(), timeout=timeout, metadata=self._metadata):
                yield wire.route_result(resp)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    @_wrap
    def describe(self, library: str | None = None, *, include_shared_a: bool = False,
                 include_background: bool = False, timeout: float | None = None) -> R.LibraryInfo:
        req = router_pb2.DescribeLibraryRequest(library=self._lib(library), include_shared_a=include_shared_a,
                                                include_background=include_background)
        return wire.library_info(self._router.DescribeLibrary(req, timeout=self._t(timeout), metadata=self._metadata))

    def training_inputs(self, library: str | None = None, *, timeout: float | None = None) -> R.LibraryInfo:
        """What an adapter owner trains against: the library's shared A and its background
        (pooled E[z zᵀ] per shared-A module) in one LibraryInfo (``shared_a``, ``background``).
        FailedPreconditionError (field include_background) until the library has been
        calibrated on enough sequences."""
        return self.describe(library, include_shared_a=True, include_background=True, timeout=timeout)

    # ------------------------------------------------------------------ admin
    @_wrap
    def create_library(self, name: str, *, signature, base_model: str = "", shared_a_seed: int | None = None,
                       shared_a_rank: int = 8, shared_a_modules: Iterable[str] | None = None,
                       shared_a: Mapping[str, Array] | None = None, meta: Mapping[str, str] | None = None,
                       shared_a_only: bool = False, timeout: float | None = None) -> R.LibraryInfo:
        """Create a library. ``signature``: {"base_model", "modules": [[name, d_in, d_out]]},
        a list of (name, d_in, d_out), or seqr_core.BaseModelSignature. Shared A: from
        ``shared_a_seed`` (+ rank, modules; default all) or uploaded as ``shared_a``.
        ``shared_a_only``: the library refuses every adapter whose A is not its shared A."""
        req = wire.create_library_request(name, signature_=signature, base_model=base_model,
                                          shared_a_seed=shared_a_seed, shared_a_rank=shared_a_rank,
                                          shared_a_modules=shared_a_modules, shared_a=shared_a, meta=meta)
        req.shared_a_only = shared_a_only
        return wire.library_info(self._admin.CreateLibrary(req, timeout=self._t(timeout), metadata=self._metadata))

    @_wrap
    def list_libraries(self, *, timeout: float | None = None) -> list[R.LibrarySummary]:
        resp = self._admin.ListLibraries(admin_pb2.ListLibrariesRequest(), timeout=self._t(timeout),
                                         metadata=self._metadata)
        return [R.LibrarySummary(l.name, l.version, l.base_model, l.adapters, l.degraded, l.damaged_adapters)
                for l in resp.libraries]

    def put_adapter(self, path: str | Path, *, name: str | None = None, library: str | None = None,
                    meta: Mapping[str, str] | None = None, progress: Callable[[int], None] | None = None,
                    allow_general: bool = False, replace: bool = False,
                    timeout: float | None = None) -> R.AdapterInfo:
        """Upload a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

        ``name`` defaults to the folder name; ``progress(n)`` is called with each chunk's size.
        An adapter whose lora_A is not the library's shared A is refused (FailedPreconditionError,
        field header.allow_general) unless ``allow_general``: it would take the general path.
        ``replace``: update the existing adapter ``name`` in place (same id, version + 1).
        """
        p = Path(path)
        return self.put_adapter_files(read_peft_dir(p), name=name or p.name, library=library, meta=meta,
                                      progress=progress, allow_general=allow_general, replace=replace,
                                      timeout=timeout)

    @_wrap
    def put_adapter_files(self, files: Mapping[str, bytes], *, name: str, library: str | None = None,
                          meta: Mapping[str, str] | None = None, progress: Callable[[int], None] | None = None,
                          allow_general: bool = False, replace: bool = False,
                          timeout: float | None = None) -> R.AdapterInfo:
        header = admin_pb2.PutAdapterHeader(library=self._lib(library), name=name, allow_general=allow_general,
                                            replace=replace,
                                            meta={str(k): str(v) for k, v in (meta or {}).items()})
        for fname, data in files.items():
            header.files.add(name=fname, size=len(data), sha256=hashlib.sha256(data).hexdigest())

        def messages():
            yield admin_pb2.PutAdapterRequest(header=header)
            for data in files.values():
                for off in range(0, len(data), CHUNK):
                    piece = data[off: off + CHUNK]
                    yield admin_pb2.PutAdapterRequest(chunk=admin_pb2.FileChunk(data=piece))
                    if progress is not None:
                        progress(len(piece))

        resp = self._admin.PutAdapter(messages(), timeout=timeout or self.upload_timeout, metadata=self._metadata)
        return wire.adapter_info(resp.adapter)

    @_wrap
    def delete_adapter(self, name: str, *, library: str | None = None,
                       timeout: float | None = None) -> R.DeleteResult:
        resp = self._admin.DeleteAdapter(admin_pb2.DeleteAdapterRequest(library=self._lib(library), name=name),
                                         timeout=self._t(timeout), metadata=self._metadata)
        return R.DeleteResult(resp.name, resp.adapter_id, resp.library_version)

    @_wrap
    def list_adapters(self, library: str | None = None, *, timeout: float | None = None) -> list[R.AdapterInfo]:
        resp = self._admin.ListAdapters(admin_pb2.ListAdaptersRequest(library=self._lib(library)),
                                        timeout=self._t(timeout), metadata=self._metadata)
        return [wire.adapter_info(a) for a in resp.adapters]

    @_wrap
    def calibrate(self, sequences: Iterable[Mapping[str, Array]], *, library: str | None = None,
                  form: str | Mapping[str, str] = "activations", timeout: float | None = None) -> R.CalibrationResult:
        """Stream unlabeled sequences (module -> (T, d_in) activations or (T, r) projected).

        ``form``: one form for every module, or a mapping module -> form (absent: activations).
        """
        forms = dict(form) if isinstance(form, Mapping) else None
        if not set(forms.values() if forms is not None else [form]) <= {"activations", "projected"}:
            raise ValueError("calibration takes activations or projected inputs")
        lib = self._lib(library)

        def messages():
            for n, seq in enumerate(sequences):
                req = admin_pb2.CalibrateRequest(library=lib if n == 0 else "")
                parts: dict[str, dict] = {"activations": {}, "projected": {}}
                for m, x in seq.items():
                    parts[forms.get(m, "activations") if forms is not None else form][m] = x
                wire.add_inputs(req, inputs=parts["activations"], projected=parts["projected"])
                yield req

        resp = self._admin.Calibrate(messages(), timeout=timeout or self.upload_timeout, metadata=self._metadata)
        return R.CalibrationResult(resp.sequences, tuple(resp.adapters), resp.library_version,
                                   resp.pooled_moments_updated)

    @_wrap
    def export_scorer(self, library: str | None = None, *, form: str = "activations", tokens: int = 0,
                      timeout: float | None = None) -> bytes:
        req = admin_pb2.ExportScorerRequest(library=self._lib(library), form=wire.FORMS[form], tokens=tokens)
        chunks = self._admin.ExportScorer(req, timeout=timeout or self.upload_timeout, metadata=self._metadata)
        return b"".join(c.data for c in chunks)

    @_wrap
    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """"SERVING" | "NOT_SERVING" | ... for the whole server ('') or one service."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._t(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def moments(z: np.ndarray) -> np.ndarray:
    """G = ZᵀZ / T from projected activations z (T, r): the `moments` input for one module."""
    z = np.asarray(z, dtype=np.float64)
    return (z.T @ z / z.shape[0]).astype(np.float32)


__all__ = ["RouterClient", "moments", "read_peft_dir"]
