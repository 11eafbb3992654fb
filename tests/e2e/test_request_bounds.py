"""Caller-supplied strings are bounded at the wire, over the real socket (issue 9, item 3).

A huge or odd name is refused INVALID_ARGUMENT naming its proto field path before anything
else reads it, and neither the status nor the server's log echoes it at length.
"""

from __future__ import annotations

import io
import logging

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from seqr_client import RouterClient
from seqr_client.errors import from_rpc_error
from seqr_core import BaseModelSignature, ModuleSpec
from seqr_router.v1 import admin_pb2, admin_pb2_grpc, library_pb2, router_pb2, router_pb2_grpc
from seqr_server.config import Limits
from seqr_server.logs import JsonFormatter

from .conftest import LIB, T, launch
from .test_bad_input import _header, _tensor, base_request

KB = 1024


@pytest.fixture
def server_log(caplog):
    """Every log line the server writes, formatted as `seqr serve` formats them (JSON)."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    caplog.set_level(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    yield buf
    logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def big_server(world, tmp_path_factory):
    """A populated server whose message limit lets a 60 MB name through to the handlers."""
    from .conftest import populate
    h = launch(tmp_path_factory.mktemp("big") / "data",
               limits=Limits(max_message_bytes=128 << 20, max_tokens=256))
    c = populate(h, world)
    yield h
    c.close()
    h.stop(grace=1.0)


def _call(h, fn):
    opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(h.target, options=opts) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            fn(router_pb2_grpc.RouterStub(ch), admin_pb2_grpc.LibraryAdminStub(ch))
    return ei.value


def _status_bytes(e: grpc.RpcError) -> int:
    return len(e.details() or "") + sum(len(k) + len(v) for k, v in e.trailing_metadata() or ())


def _field(e: grpc.RpcError) -> str:
    st = rpc_status.from_call(e)
    for d in st.details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            return br.field_violations[0].field
    return ""


def test_a_60mb_module_name_is_refused_without_amplifying_logs_or_status(world, big_server, server_log):
    req = base_request(world)
    req.inputs[1].module = "m" * (60 << 20)
    server_log.truncate(0)
    e = _call(big_server, lambda router, admin: router.Route(req, timeout=120))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()[:300]
    assert _field(e) == "inputs[1].module"
    assert "longer than 256 characters" in e.details()
    assert _status_bytes(e) < 2 * KB
    assert len(server_log.getvalue()) < 4 * KB, server_log.getvalue()[:500]


def test_an_8mb_library_name_is_refused_without_amplifying_logs_or_status(world, big_server, server_log):
    server_log.truncate(0)
    name = "L" * (8 << 20)
    for call in (lambda router, admin: router.DescribeLibrary(router_pb2.DescribeLibraryRequest(library=name)),
                 lambda router, admin: admin.ListAdapters(admin_pb2.ListAdaptersRequest(library=name)),
                 lambda router, admin: admin.DeleteAdapter(admin_pb2.DeleteAdapterRequest(library=name, name="x"))):
        e = _call(big_server, call)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and _field(e) == "library"
        assert _status_bytes(e) < 2 * KB
    assert len(server_log.getvalue()) < 8 * KB, server_log.getvalue()[:500]


def _route_with(**kw):
    def build(world):
        req = base_request(world)
        for path, value in kw.items():
            if path == "tensor_key":
                req.tensors[value].CopyFrom(req.tensors["h0"])
                req.inputs[1].tensor = value
            elif path == "candidate":
                req.options.candidates.append(value)
            elif path == "rename_tensor":
                req.tensors[value].CopyFrom(req.tensors.pop("h0"))
                for mi in req.inputs:
                    mi.tensor = value
            else:
                setattr(req, path, value)
        return req
    return build


ROUTE_NAME_CASES = [
    ("space in a tensor name", _route_with(rename_tensor="h 0"), "tensors"),
    ("newline in a candidate", _route_with(candidate="shared-a0\nforged log line"), "options.candidates[0]"),
    ("non-ASCII library", _route_with(library="tïny"), "library"),
    ("NUL in a library", _route_with(library="tiny\x00"), "library"),
    ("overlong tensor name (map key)", _route_with(tensor_key="t" * 257), "tensors"),
    ("quote in a tensor name (map key)", _route_with(tensor_key='h"1'), "tensors"),
]


@pytest.mark.parametrize("case,build,field", ROUTE_NAME_CASES, ids=[c[0] for c in ROUTE_NAME_CASES])
def test_route_names_outside_the_charset_or_length_are_refused_naming_the_path(world, shared_server, case,
                                                                               build, field):
    h, _ = shared_server
    req = build(world)
    e = _call(h, lambda router, admin: router.Route(req, timeout=30))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert _field(e) == field, e.details()


def _create(name="lib-x", *, module="m.q", base_model="org/Model-7B", meta=None):
    req = admin_pb2.CreateLibraryRequest(name=name, signature=library_pb2.Signature(
        base_model=base_model, modules=[library_pb2.ModuleSpec(name=module, d_in=8, d_out=8)]))
    req.meta.update(meta or {})
    return req


def _put(header):
    return iter([admin_pb2.PutAdapterRequest(header=header)])


def _stream_second(first, second):
    return iter([first, second])


ADMIN_NAME_CASES = [
    ("library name with a space", lambda a: a.CreateLibrary(_create("my lib")), "name"),
    ("module name with a slash-dot-dot and a space", lambda a: a.CreateLibrary(_create(module="../x y")),
     "signature.modules[0].name"),
    ("base model with a newline", lambda a: a.CreateLibrary(_create(base_model="org/m\nx")), "signature.base_model"),
    ("meta value with a bidi override", lambda a: a.CreateLibrary(_create(meta={"owner": "ab\u202ecd"})),
     "meta[owner]"),
    ("meta value above the limit", lambda a: a.CreateLibrary(_create(meta={"note": "x" * 1025})), "meta[note]"),
    ("meta key with a space", lambda a: a.CreateLibrary(_create(meta={"the owner": "x"})), "meta"),
    ("upload file name with a space",
     lambda a: a.PutAdapter(_put(_header({"adapter config.json": b"{}"}))), "header.files[0].name"),
    ("upload adapter name with a tab", lambda a: a.PutAdapter(_put(_header({"a.json": b"{}"}, name="x\ty"))),
     "header.name"),
    ("adapter name too long", lambda a: a.DeleteAdapter(admin_pb2.DeleteAdapterRequest(library=LIB, name="a" * 300)),
     "name"),
    ("export of a library with a semicolon",
     lambda a: next(a.ExportScorer(admin_pb2.ExportScorerRequest(library="x;rm"))), "library"),
]


@pytest.mark.parametrize("case,call,field", ADMIN_NAME_CASES, ids=[c[0] for c in ADMIN_NAME_CASES])
def test_admin_names_outside_the_charset_or_length_are_refused_naming_the_path(shared_server, case, call, field):
    h, _ = shared_server
    e = _call(h, lambda router, admin: call(admin))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert _field(e) == field, e.details()


def test_every_message_of_a_stream_is_checked(world, shared_server):
    h, _ = shared_server
    good = base_request(world)
    bad = router_pb2.RouteRequest()
    bad.CopyFrom(good)
    bad.inputs[0].module = "model.layers.0.self_attn.q_proj\r"
    e = _call(h, lambda router, admin: list(router.RouteStream(iter([good, bad]), timeout=30)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and _field(e) == "inputs[0].module"
    cal = admin_pb2.CalibrateRequest(library=LIB, tensors=good.tensors, inputs=good.inputs)
    cal_bad = admin_pb2.CalibrateRequest(tensors=good.tensors, inputs=bad.inputs)
    e = _call(h, lambda router, admin: admin.Calibrate(iter([cal, cal_bad]), timeout=30))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and _field(e) == "inputs[0].module"


REAL_MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.31.mlp.down_proj",
                "transformer.h.0.attn.c_attn", "model.decoder.layers.0.fc1",
                "model.layers.0.block_sparse_moe.experts.7.w1", "encoder.block.0.layer.0.SelfAttention.q"]


def test_real_model_names_and_free_text_pass(start_server, tmp_path):
    """Module paths of real HF models, an HF model id and Unicode meta text are all accepted."""
    h = start_server(tmp_path / "d")
    with RouterClient(h.target) as c:
        sig = BaseModelSignature(base_model="meta-llama/Meta-Llama-3-70B-Instruct@main",
                                 modules=tuple(ModuleSpec(m, 16, 16) for m in REAL_MODULES))
        info = c.create_library("team-a.lib_v2", signature=sig, shared_a_seed=7, shared_a_rank=2,
                                meta={"owner": "Équipe légale – Zürich", "ticket": "SEC-42"})
        assert [m.name for m in info.modules] == REAL_MODULES
        x = {m: np.ones((T, 16), np.float32) for m in REAL_MODULES}
        e = _call(h, lambda router, admin: router.Route(_route_for("team-a.lib_v2", x), timeout=30))
        # Past the wire bounds: the core checked every module, then found the library empty.
        assert _field(e) == "library" and "has no adapters" in e.details(), e.details()
        assert c.describe("team-a.lib_v2").meta["owner"] == "Équipe légale – Zürich"


def _route_for(library, x):
    req = router_pb2.RouteRequest(library=library)
    for i, (m, a) in enumerate(x.items()):
        name = f"{m}:input@{i}"          # tensor names may use the same charset
        req.tensors[name].CopyFrom(_tensor(a))
        req.inputs.add(module=m, form=router_pb2.ACTIVATIONS, tensor=name)
    return req


def test_client_side_error_of_a_long_name_reports_the_limit(world, shared_server):
    h, _ = shared_server
    req = base_request(world)
    req.inputs[0].module = "q" * 5000
    err = from_rpc_error(_call(h, lambda router, admin: router.Route(req, timeout=30)))
    assert (err.code, err.field, err.limit, err.actual) == ("INVALID_ARGUMENT", "inputs[0].module", "256", "5000")
