"""Table-driven bad input over the real socket: right status code, the field named, no trace left."""

from __future__ import annotations

import hashlib
import io
import json
import pickle

import grpc
import numpy as np
import pytest
import torch

from seqr_client.errors import from_rpc_error
from seqr_core import read_safetensors, write_safetensors
from seqr_router.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc, tensor_pb2

from ..peft_factory import read_dir
from .conftest import LIB, RANK, T

Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
DT = tensor_pb2.DType
SAFE = "adapter_model.safetensors"


def _tensor(a: np.ndarray, dtype=DT.F32) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=list(a.shape), data=np.ascontiguousarray(a, "<f4").tobytes())


def base_request(world) -> router_pb2.RouteRequest:
    req = router_pb2.RouteRequest(library=LIB)
    req.tensors["h0"].CopyFrom(_tensor(world.hidden[0]))
    req.inputs.add(module=Q0, form=router_pb2.ACTIVATIONS, tensor="h0")
    req.inputs.add(module=V0, form=router_pb2.ACTIVATIONS, tensor="h0")
    return req


def _set(path: str, value):
    def mutate(req):
        *parents, leaf = path.split(".")
        obj = req
        for p in parents:
            obj = obj[int(p)] if p.isdigit() else (obj[p] if p == "h0" else getattr(obj, p))
        setattr(obj, leaf, value)
    return mutate


def _data(fn):
    def mutate(req):
        t = req.tensors["h0"]
        out = fn(np.frombuffer(t.data, "<f4").reshape(tuple(t.shape)).copy())
        t.data = out.tobytes() if isinstance(out, np.ndarray) else out
    return mutate


def _nan(a):
    a[3, 5] = np.nan
    return a


def _inf(a):
    a[0, 0] = -np.inf
    return a


def _shape(shape, n=None):
    def mutate(req):
        t = req.tensors["h0"]
        t.shape[:] = shape
        t.data = np.zeros(n or int(np.prod(shape)), "<f4").tobytes()
    return mutate


def _projected_for_general(req):
    req.tensors["h0"].CopyFrom(_tensor(np.ones((T, RANK), np.float32)))
    for mi in req.inputs:
        mi.form = router_pb2.PROJECTED


def _moments_per_token(req):
    req.tensors["h0"].CopyFrom(_tensor(np.eye(RANK, dtype=np.float32)))
    for mi in req.inputs:
        mi.form = router_pb2.MOMENTS
    req.options.candidates[:] = ["shared-a0"]
    req.options.granularity = router_pb2.TOKEN


ROUTE_CASES = [
    ("dtype unspecified", _set("tensors.h0.dtype", DT.DTYPE_UNSPECIFIED), "INVALID_ARGUMENT", "tensors[h0].dtype"),
    ("dtype response-only F64", _set("tensors.h0.dtype", DT.F64), "INVALID_ARGUMENT", "tensors[h0].dtype"),
    ("3-D shape", _shape([1, T, 32]), "INVALID_ARGUMENT", "tensors[h0].shape"),
    ("wrong d_in", _shape([T * 2, 16]), "INVALID_ARGUMENT", f"inputs.{Q0}.activations.shape"),
    ("bytes length", _data(lambda a: a.tobytes()[:-4]), "INVALID_ARGUMENT", "tensors[h0].data"),
    ("NaN", _data(_nan), "INVALID_ARGUMENT", f"inputs.{Q0}.activations"),
    ("Inf", _data(_inf), "INVALID_ARGUMENT", f"inputs.{Q0}.activations"),
    ("too many tokens", _shape([300, 32]), "RESOURCE_EXHAUSTED", "tensors[h0].shape[0]"),
    ("unknown module", _set("inputs.0.module", "model.layers.9.self_attn.q_proj"), "INVALID_ARGUMENT",
     "inputs.model.layers.9.self_attn.q_proj"),
    ("unknown library", _set("library", "no-such-lib"), "NOT_FOUND", "library"),
    ("empty request", lambda r: (r.ClearField("inputs"), r.ClearField("tensors")), "INVALID_ARGUMENT", "inputs"),
    ("top_k 0", _set("options.top_k", 0), "INVALID_ARGUMENT", "options.top_k"),
    ("top_k above limit", _set("options.top_k", 65), "RESOURCE_EXHAUSTED", "options.top_k"),
    ("temperature 0", _set("options.temperature", 0.0), "INVALID_ARGUMENT", "options.temperature"),
    ("unknown method", _set("options.method", 99), "INVALID_ARGUMENT", "options.method"),
    ("form unspecified", _set("inputs.0.form", 0), "INVALID_ARGUMENT", "inputs[0].form"),
    ("dangling tensor name", _set("inputs.0.tensor", "nope"), "INVALID_ARGUMENT", "inputs[0].tensor"),
    ("unreferenced tensor", lambda r: r.tensors["spare"].CopyFrom(r.tensors["h0"]), "INVALID_ARGUMENT", "tensors"),
    ("module twice", _set("inputs.1.module", Q0), "INVALID_ARGUMENT", "inputs[1].module"),
    ("unknown candidate", lambda r: r.options.candidates.append("nobody"), "NOT_FOUND", "candidates"),
    ("projected for own-A adapters", _projected_for_general, "INVALID_ARGUMENT", f"inputs.{Q0}.projected"),
    ("moments with token granularity", _moments_per_token, "INVALID_ARGUMENT", "moments"),
    ("oversize message", _shape([200, 32], n=3_000_000), "RESOURCE_EXHAUSTED", ""),
]


def state(h, client):
    store = h.manager._store
    rec = store.library(LIB)
    return (client.describe(LIB).version, tuple(a.name for a in client.list_adapters(LIB)),
            rec.version, tuple(a.name for a in rec.adapters), rec.objects, tuple(store.list_libraries()))


def rpc_error(fn):
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return from_rpc_error(ei.value)


@pytest.mark.parametrize("case,mutate,code,field", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_bad_route_request_is_refused_naming_the_field(world, shared_server, case, mutate, code, field):
    h, client = shared_server
    before = state(h, client)
    req = base_request(world)
    mutate(req)
    with grpc.insecure_channel(h.target) as ch:
        err = rpc_error(lambda: router_pb2_grpc.RouterStub(ch).Route(req, timeout=30))
    assert err.code == code, str(err)
    if case == "oversize message":      # refused by the transport before any handler runs
        assert "larger than max" in str(err)
    else:
        assert field in err.field, (err.field, str(err))
        assert field.split(".")[-1] in str(err) or field in str(err)
    assert state(h, client) == before


# ------------------------------------------------------------------------------ uploads
def _header(files: dict[str, bytes], *, name="new-x", library=LIB, sizes=None, shas=None):
    h = admin_pb2.PutAdapterHeader(library=library, name=name)
    for f, data in files.items():
        h.files.add(name=f, size=(sizes or {}).get(f, len(data)),
                    sha256=(shas or {}).get(f, hashlib.sha256(data).hexdigest()))
    return h


def _upload(files, *, header=None, body=None, first_chunk=False):
    header = header or _header(files)
    body = body if body is not None else b"".join(files.values())

    def msgs():
        if not first_chunk:
            yield admin_pb2.PutAdapterRequest(header=header)
        for off in range(0, len(body), 1000):
            yield admin_pb2.PutAdapterRequest(chunk=admin_pb2.FileChunk(data=body[off:off + 1000]))
    return msgs


def _torch_zip() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


def _nan_weights(files):
    tensors, _ = read_safetensors(files[SAFE])
    key = sorted(tensors)[1]
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan
    return {**files, SAFE: write_safetensors(tensors)}


def _bad_config(files):
    cfg = json.loads(files["adapter_config.json"])
    cfg["r"] = 8
    return {**files, "adapter_config.json": json.dumps(cfg).encode()}


def upload_cases(world):
    good = read_dir(world.adapters["shared-a0"])
    good = {k: good[k] for k in ("adapter_config.json", SAFE)}
    other = read_dir(world.other_model_dir)
    other = {k: other[k] for k in ("adapter_config.json", SAFE)}
    return [
        ("truncated upload", _upload(good, body=b"".join(good.values())[:-100]), "INVALID_ARGUMENT",
         f"files[{SAFE}].size"),
        ("more bytes than announced", _upload(good, body=b"".join(good.values()) + b"xx"), "INVALID_ARGUMENT",
         "files"),
        ("sha256 mismatch", _upload(good, header=_header(good, shas={SAFE: "0" * 64})), "INVALID_ARGUMENT",
         f"files[{SAFE}].sha256"),
        ("not safetensors", _upload({**good, SAFE: (16).to_bytes(8, "little") + b"this is not JSON"}),
         "INVALID_ARGUMENT", SAFE),
        ("a small text file", _upload({**good, SAFE: b'{"hello": "world"} not safetensors'}),
         "INVALID_ARGUMENT", SAFE),
        ("pickle", _upload({**good, SAFE: pickle.dumps({"w": [1.0, 2.0]})}), "INVALID_ARGUMENT", SAFE),
        ("torch zip", _upload({**good, SAFE: _torch_zip()}), "INVALID_ARGUMENT", SAFE),
        ("extra .bin file", _upload({**good, "adapter_model.bin": pickle.dumps(1)}), "INVALID_ARGUMENT", "files"),
        ("missing config", _upload({SAFE: good[SAFE]}), "INVALID_ARGUMENT", "adapter_config.json"),
        ("rank mismatch in config", _upload(_bad_config(good)), "INVALID_ARGUMENT", SAFE),
        ("NaN weights", _upload(_nan_weights(good)), "INVALID_ARGUMENT", SAFE),
        ("other base model", _upload(other), "INVALID_ARGUMENT", "adapter.model.layers.0.self_attn"),
        ("no header", _upload(good, first_chunk=True), "INVALID_ARGUMENT", "header"),
        ("bad adapter name", _upload(good, header=_header(good, name="bad name!")), "INVALID_ARGUMENT",
         "header.name"),
        ("duplicate name", _upload(good, header=_header(good, name="shared-a0")), "ALREADY_EXISTS", "adapter.name"),
        ("unknown library", _upload(good, header=_header(good, library="nope")), "NOT_FOUND", "header.library"),
        ("announced size above limit", _upload(good, header=_header(good, sizes={SAFE: 1 << 40}), body=b""),
         "RESOURCE_EXHAUSTED", "header.files"),
        ("no files", _upload({}), "INVALID_ARGUMENT", "header.files"),
    ]


def test_bad_uploads_are_refused_naming_the_field_and_store_nothing(world, shared_server):
    h, client = shared_server
    cases = upload_cases(world)
    with grpc.insecure_channel(h.target) as ch:
        stub = admin_pb2_grpc.LibraryAdminStub(ch)
        for case, msgs, code, field in cases:
            before = state(h, client)
            err = rpc_error(lambda: stub.PutAdapter(msgs(), timeout=30))
            assert err.code == code, (case, str(err))
            assert field in err.field, (case, err.field, str(err))
            assert state(h, client) == before, case
    # after all that, a good upload of the same files still works and gets the next id
    info = client.put_adapter(world.adapters["shared-a0"], name="new-x", library=LIB)
    assert info.adapter_id == len(world.adapters)
    client.delete_adapter("new-x", library=LIB)


def test_bad_admin_requests_are_refused_naming_the_field(world, shared_server):
    h, client = shared_server
    before = state(h, client)
    cases = [
        (lambda: client.delete_adapter("nobody", library=LIB), "NOT_FOUND", "name"),
        (lambda: client.list_adapters("nope"), "NOT_FOUND", "library"),
        (lambda: client.create_library(LIB, signature=world.sig, shared_a_seed=1, shared_a_rank=RANK),
         "ALREADY_EXISTS", "name"),
        (lambda: client.create_library("bad-sig", signature=[("m", 0, 4)]), "INVALID_ARGUMENT", "signature"),
        (lambda: client.create_library("bad-rank", signature=world.sig, shared_a_seed=1, shared_a_rank=0),
         "INVALID_ARGUMENT", "shared_a_rank"),
        (lambda: client.create_library("bad-mod", signature=world.sig, shared_a_seed=1, shared_a_modules=["x"]),
         "NOT_FOUND", "shared_a_modules"),
        (lambda: client.calibrate([], library=LIB), "INVALID_ARGUMENT", "sequences"),
        (lambda: client.calibrate([{Q0: np.full((T, 32), np.nan, np.float32)}], library=LIB),
         "INVALID_ARGUMENT", f"inputs.{Q0}"),
    ]
    from seqr_client import SeqrError
    for fn, code, field in cases:
        with pytest.raises(SeqrError) as ei:
            fn()
        assert ei.value.code == code, str(ei.value)
        assert field in ei.value.field, (ei.value.field, str(ei.value))
    assert state(h, client) == before

