"""Valid requests for every RPC, and the domain-aware strategies the generic ones miss.

Seeds come from the e2e ``world`` (a tiny Llama's signature, real PEFT adapters, hidden
states from its forward pass), so unmutated they succeed and mutated they fail deep inside
the server instead of at the first lookup. Domain strategies here: tensors whose bytes nearly
agree with dtype and shape, and fresh names so creates succeed (uploads: uploads.py).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import Message
from hypothesis import strategies as st

from seqr_router.v1 import admin_pb2, library_pb2, router_pb2, tensor_pb2

from .proto_strategies import INT64_EDGES, huge_strings

DT = tensor_pb2.DType
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class Rpc:
    service: str                     # "seqr_router.v1.Router"
    name: str                        # "Route"
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def method(self) -> str:         # as the server's metrics and auth name it
        return f"{self.service.rsplit('.', 1)[1]}/{self.name}"


def _rpcs() -> tuple[Rpc, ...]:
    from google.protobuf import message_factory
    out = []
    for module, svc in ((router_pb2, "Router"), (admin_pb2, "LibraryAdmin")):
        sd = module.DESCRIPTOR.services_by_name[svc]
        for m in sd.methods:
            out.append(Rpc(sd.full_name, m.name, message_factory.GetMessageClass(m.input_type),
                           message_factory.GetMessageClass(m.output_type), m.client_streaming,
                           m.server_streaming))
    return tuple(out)


RPCS = _rpcs()
BY_NAME = {r.name: r for r in RPCS}


@dataclass(frozen=True)
class FuzzWorld:
    """What the seeds are made of (taken from tests/e2e/conftest.World)."""

    lib: str
    rank: int
    tokens: int
    modules: tuple[tuple[str, int, int], ...]          # every signature module: (name, d_in, d_out)
    qv: tuple[str, ...]                                 # the modules the adapters target
    hidden: dict                                        # layer -> (T, d) float32
    shared_a: dict                                      # module -> (rank, d_in)
    adapter_files: dict                                 # name -> {file name: bytes}

    @classmethod
    def from_world(cls, world, *, lib: str, rank: int) -> "FuzzWorld":
        from ..peft_factory import read_dir
        return cls(lib=lib, rank=rank, tokens=next(iter(world.hidden.values())).shape[0],
                   modules=tuple((m.name, m.d_in, m.d_out) for m in world.sig.modules), qv=world.qv,
                   hidden=world.hidden, shared_a=world.shared_a,
                   adapter_files={n: read_dir(p) for n, p in world.adapters.items()})

    @property
    def vocab(self) -> tuple[str, ...]:
        return (self.lib, *self.qv, *(m for m, _, _ in self.modules), "h0", "h1", "x", *self.adapter_files,
                CONFIG, WEIGHTS, "README.md", "seqr.json", "shared-*", "fz-lib", "fz-adapter")

    def d_in(self, module: str) -> int:
        return next(d for m, d, _ in self.modules if m == module)


# ---------------------------------------------------------------------- tensors
def tensor(a: np.ndarray, dtype: int = DT.F32) -> tensor_pb2.Tensor:
    if dtype == DT.F16:
        data = np.ascontiguousarray(a, "<f2").tobytes()
    elif dtype == DT.BF16:
        data = (np.ascontiguousarray(a, "<f4").view("<u4") >> 16).astype("<u2").tobytes()
    else:
        data = np.ascontiguousarray(a, "<f4").tobytes()
    return tensor_pb2.Tensor(dtype=dtype, shape=list(a.shape), data=data)


_SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4e38, -3.4e38, 1e-45, 65504.0, 1e30],
                     dtype=np.float32)


def fill(kind: str, nbytes: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if kind == "bytes":
        return rng.bytes(nbytes)
    n = (nbytes + 3) // 4
    if kind == "zeros":
        a = np.zeros(n, np.float32)
    elif kind == "specials":
        a = rng.standard_normal(n).astype(np.float32)
        idx = rng.integers(0, max(n, 1), size=min(n, 3))
        a[idx] = rng.choice(_SPECIALS, size=len(idx))
    else:
        a = (rng.standard_normal(n) * (1e30 if kind == "huge" else 1.0)).astype(np.float32)
    return a.tobytes()[:nbytes]


def tensors(fw: FuzzWorld, *, max_elems: int = 1 << 16) -> st.SearchStrategy[tensor_pb2.Tensor]:
    """Tensors near the valid ones: plausible dims, byte lengths right or off by a little,
    any dtype value, NaN/Inf and extreme values in the data."""
    d = fw.modules[0][1]
    dims = (1, 2, fw.tokens, fw.rank, d, d + 1, fw.rank - 1, 0)

    @st.composite
    def build(draw) -> tensor_pb2.Tensor:
        dtype = draw(st.one_of(st.sampled_from((DT.F32, DT.F16, DT.BF16)), st.sampled_from((0, DT.F64, DT.I64)),
                               st.integers(-2**31, 2**31 - 1)))
        shape = draw(st.one_of(st.lists(st.sampled_from(dims), min_size=2, max_size=2),
                               st.lists(st.one_of(st.sampled_from(dims), st.sampled_from(INT64_EDGES)),
                                        max_size=5)))
        itemsize = 2 if dtype in (DT.F16, DT.BF16) else 4
        n = math.prod(shape) if shape and all(0 <= s <= max_elems for s in shape) else draw(st.integers(0, 64))
        n = n if n <= max_elems else draw(st.integers(0, 64))
        off = draw(st.one_of(st.just(0), st.just(0), st.sampled_from((-1, 1, -itemsize, itemsize)),
                             st.integers(-n * itemsize, 64)))
        data = fill(draw(st.sampled_from(("normal", "normal", "zeros", "specials", "huge", "bytes"))),
                     max(0, n * itemsize + off), draw(st.integers(0, 2**32 - 1)))
        return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)
    return build()


# ---------------------------------------------------------------------- router seeds
def _route(fw: FuzzWorld, form: str, dtype: int = DT.F32, **options) -> router_pb2.RouteRequest:
    req = router_pb2.RouteRequest(library=fw.lib, options=router_pb2.RouteOptions(**options))
    for m in fw.qv:
        layer = int(m.split(".")[2])
        x = fw.hidden[layer]
        if form == "activations":
            key, a, f = f"h{layer}", x, router_pb2.ACTIVATIONS
        else:
            z = x.astype(np.float64) @ fw.shared_a[m].T.astype(np.float64)
            a, f = (z, router_pb2.PROJECTED) if form == "projected" else (z.T @ z / len(z), router_pb2.MOMENTS)
            key = m
        if key not in req.tensors:
            req.tensors[key].CopyFrom(tensor(a.astype(np.float32), dtype))
        req.inputs.add(module=m, form=f, tensor=key, tokens=fw.tokens if form == "moments" else 0)
    return req


def route_seeds(fw: FuzzWorld) -> list[router_pb2.RouteRequest]:
    N = router_pb2.Normalisation
    names = sorted(fw.adapter_files)
    return [_route(fw, "activations"), _route(fw, "projected"), _route(fw, "moments"),
            _route(fw, "activations", DT.F16, top_k=3, include_scores=True),
            _route(fw, "projected", DT.BF16, granularity=router_pb2.TOKEN, top_k=2),
            _route(fw, "activations", method=router_pb2.EXACT, candidates=names[:2]),
            _route(fw, "activations", method=router_pb2.LAG, lag_k=2, normalisation=N(kind=N.NONE)),
            _route(fw, "activations", method=router_pb2.ARROW, normalisation=N(kind=N.NONE)),
            _route(fw, "activations", method=router_pb2.SPECTR, aggregation=router_pb2.VOTE,
                   granularity=router_pb2.TOKEN, temperature=0.25),
            _route(fw, "moments", normalisation=N(kind=N.ZSCORE, granularity=N.ADAPTER, transform=N.LOG))]


def stream_seeds(fw: FuzzWorld) -> list[list[router_pb2.RouteRequest]]:
    a, p, m = _route(fw, "activations"), _route(fw, "projected"), _route(fw, "moments")
    later = router_pb2.RouteRequest()
    later.CopyFrom(p)
    later.ClearField("library")
    later.ClearField("options")
    return [[a], [a, later, later], [m, p], [p, _route(fw, "projected", granularity=router_pb2.TOKEN)]]


# ---------------------------------------------------------------------- admin seeds
def create_library(fw: FuzzWorld, name: str, kind: str) -> admin_pb2.CreateLibraryRequest:
    sig = library_pb2.Signature(base_model="tiny-llama", modules=[
        library_pb2.ModuleSpec(name=m, d_in=d, d_out=o) for m, d, o in fw.modules])
    req = admin_pb2.CreateLibraryRequest(name=name, signature=sig, meta={"owner": "fuzz"})
    if kind == "recipe":
        req.recipe.CopyFrom(library_pb2.SharedARecipe(seed=7))
        req.shared_a_rank = fw.rank
        req.shared_a_modules.extend(fw.qv[:2])
    elif kind == "uploaded":
        for m in fw.qv[:2]:
            req.uploaded.modules[m].CopyFrom(tensor(fw.shared_a[m]))
    return req


def calibrate_seeds(fw: FuzzWorld) -> list[list[admin_pb2.CalibrateRequest]]:
    out = []
    for form in ("activations", "projected"):
        r = _route(fw, form)
        first = admin_pb2.CalibrateRequest(library=fw.lib, tensors=r.tensors, inputs=r.inputs)
        out.append([first, admin_pb2.CalibrateRequest(tensors=r.tensors, inputs=r.inputs)])
    return out


def put_stream(library: str, name: str, files: dict[str, bytes], *, chunk: int = 1 << 12,
               headers: dict | None = None) -> list[admin_pb2.PutAdapterRequest]:
    """The stream the client sends; ``headers`` overrides FileHeader fields per file name."""
    # Valid as sent: the world's general adapters need allow_general (the fuzz may clear it).
    h = admin_pb2.PutAdapterHeader(library=library, name=name, allow_general=True)
    for fname, data in files.items():
        fields = dict(name=fname, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        fields.update((headers or {}).get(fname, {}))
        h.files.add(**fields)
    body = b"".join(files.values())
    return [admin_pb2.PutAdapterRequest(header=h)] + [
        admin_pb2.PutAdapterRequest(chunk=admin_pb2.FileChunk(data=body[o: o + chunk]))
        for o in range(0, len(body), chunk)]


def seeds(fw: FuzzWorld) -> dict[str, list[list[Message]]]:
    """Valid requests per RPC name, each as the list of messages of one call."""
    real = sorted(fw.adapter_files)
    return {
        "Route": [[r] for r in route_seeds(fw)],
        "RouteStream": stream_seeds(fw),
        "DescribeLibrary": [[router_pb2.DescribeLibraryRequest(library=fw.lib)],
                            [router_pb2.DescribeLibraryRequest(library=fw.lib, include_shared_a=True)]],
        "CreateLibrary": [[create_library(fw, f"fz-seed-{k}", k)] for k in ("recipe", "uploaded", "none")],
        "ListLibraries": [[admin_pb2.ListLibrariesRequest()]],
        "PutAdapter": [put_stream(fw.lib, f"fz-seed-{n}", fw.adapter_files[n]) for n in real[:2]],
        "DeleteAdapter": [[admin_pb2.DeleteAdapterRequest(library=fw.lib, name=n)] for n in real[-1:]],
        "ListAdapters": [[admin_pb2.ListAdaptersRequest(library=fw.lib)]],
        "Calibrate": calibrate_seeds(fw),
        "ExportScorer": [[admin_pb2.ExportScorerRequest(library=fw.lib, form=f, tokens=t)]
                         for f, t in ((router_pb2.ACTIVATIONS, 0), (router_pb2.PROJECTED, fw.tokens),
                                      (router_pb2.MOMENTS, 0))],
    }


def fresh_library_names() -> st.SearchStrategy[str]:
    return st.one_of(st.integers(0, 10**9).map(lambda i: f"fz-lib-{i}"), huge_strings(300))
