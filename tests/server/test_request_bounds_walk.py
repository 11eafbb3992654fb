"""check_request reaches every string field of every request message of both services.

The cases are generated from the proto descriptors here, independently of the walker under
test: each string field (singular, repeated, map key, map value, nested in messages, maps and
repeated messages) gets an out-of-bounds value on its own, and must be refused naming its
proto field path. A field added to a proto later is covered without editing this file.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor

from seqr_core.errors import InvalidArgumentError
from seqr_router.v1 import admin_pb2, router_pb2, tensor_pb2
from seqr_server.config import Limits
from seqr_server.request_bounds import check_request

LIMITS = Limits()
STRING, MESSAGE = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE


def _string_paths(desc):
    """(path, set_value(msg, value)) for every string reachable from ``desc``."""
    out = []
    for fd in desc.fields:
        n = fd.name
        if fd.type == STRING:
            if fd.is_repeated:
                out.append((f"{n}[0]", lambda m, v, n=n: getattr(m, n).append(v)))
            else:
                out.append((n, lambda m, v, n=n: setattr(m, n, v)))
        elif fd.type == MESSAGE and fd.message_type.GetOptions().map_entry:
            key, val = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            if key.type == STRING and val.type == MESSAGE:
                out.append((n, lambda m, v, n=n: getattr(m, n)[v].SetInParent()))
            elif key.type == STRING:
                out.append((n, lambda m, v, n=n: getattr(m, n).__setitem__(v, "")))
            if val.type == STRING:
                out.append((f"{n}[k]", lambda m, v, n=n: getattr(m, n).__setitem__("k", v)))
            elif val.type == MESSAGE:
                out += [(f"{n}[k].{p}", lambda m, v, n=n, s=s: s(getattr(m, n)["k"], v))
                        for p, s in _string_paths(val.message_type)]
        elif fd.type == MESSAGE:
            for p, s in _string_paths(fd.message_type):
                if fd.is_repeated:
                    out.append((f"{n}[0].{p}", lambda m, v, n=n, s=s: s(getattr(m, n).add(), v)))
                else:
                    out.append((f"{n}.{p}", lambda m, v, n=n, s=s: s(getattr(m, n), v)))
    return out


REQUEST_TYPES = sorted({m.input_type for mod in (router_pb2, admin_pb2)
                        for svc in mod.DESCRIPTOR.services_by_name.values() for m in svc.methods},
                       key=lambda d: d.full_name)
CASES = [(d, path, setter) for d in REQUEST_TYPES for path, setter in _string_paths(d)]
IDS = [f"{d.name}.{path}" for d, path, _ in CASES]


def _msg(desc, setter, value):
    from google.protobuf import message_factory
    msg = message_factory.GetMessageClass(desc)()
    setter(msg, value)
    return msg


def test_the_cases_cover_what_the_services_take():
    paths = {f"{d.name}.{p}" for d, p, _ in CASES}
    for want in ("RouteRequest.inputs[0].module", "RouteRequest.tensors", "RouteRequest.options.candidates[0]",
                 "CreateLibraryRequest.uploaded.modules", "CreateLibraryRequest.meta[k]",
                 "CreateLibraryRequest.signature.modules[0].name", "PutAdapterRequest.header.files[0].sha256",
                 "CalibrateRequest.inputs[0].tensor", "ExportScorerRequest.library"):
        assert want in paths


@pytest.mark.parametrize("desc,path,setter", CASES, ids=IDS)
def test_an_overlong_string_anywhere_is_refused_naming_its_path(desc, path, setter):
    value = "a" * (max(LIMITS.max_name_length, LIMITS.max_meta_value_length) + 1)
    with pytest.raises(InvalidArgumentError) as ei:
        check_request(_msg(desc, setter, value), limits=LIMITS)
    assert ei.value.field == path
    assert ei.value.actual == len(value) and "longer than" in ei.value.message
    assert len(str(ei.value)) < 300


@pytest.mark.parametrize("desc,path,setter", CASES, ids=IDS)
def test_a_control_character_anywhere_is_refused_naming_its_path(desc, path, setter):
    with pytest.raises(InvalidArgumentError) as ei:
        check_request(_msg(desc, setter, "ok\x1b[2Jforged"), limits=LIMITS)
    assert ei.value.field == path
    assert ei.value.actual == "'\\x1b' at 2"


@pytest.mark.parametrize("desc,path,setter", CASES, ids=IDS)
def test_a_module_path_is_accepted_everywhere(desc, path, setter):
    check_request(_msg(desc, setter, "base_model.model.model.layers.31.self_attn.q_proj"), limits=LIMITS)


NAME_KIND = [(value, ok) for value, ok in [
    ("model.layers.0.self_attn.q_proj", True), ("adapter_model.safetensors", True), ("org/Model-7B@main", True),
    ("team-a:legal+v2=1", True), ("a" * 256, True), ("a" * 257, False), ("a b", False), ("a\tb", False),
    ("naïve", False), ("a'b", False), ('a"b', False), ("a\\b", False), ("a;b", False), ("a*b", False),
    ("a\u202eb", False), ("", True)]]


@pytest.mark.parametrize("value,ok", NAME_KIND, ids=[repr(v[:20]) for v, _ in NAME_KIND])
def test_names_allow_exactly_the_documented_charset(value, ok):
    req = router_pb2.RouteRequest(library=value)
    if ok:
        check_request(req, limits=LIMITS)
    else:
        with pytest.raises(InvalidArgumentError):
            check_request(req, limits=LIMITS)


def test_free_text_fields_allow_printable_unicode_and_their_own_limit():
    ok = admin_pb2.CreateLibraryRequest(name="lib")
    ok.signature.base_model = "Meta Llama 3 (70B, instruct)"
    ok.meta["description"] = "Équipe légale – Zürich 法律 " + "x" * 900
    check_request(ok, limits=LIMITS)
    ok.meta["description"] = "x" * (LIMITS.max_meta_value_length + 1)
    with pytest.raises(InvalidArgumentError) as ei:
        check_request(ok, limits=LIMITS)
    assert (ei.value.field, ei.value.limit) == ("meta[description]", LIMITS.max_meta_value_length)


def test_bytes_fields_are_not_strings():
    req = router_pb2.RouteRequest(library="lib")
    req.tensors["h0"].CopyFrom(tensor_pb2.Tensor(dtype=tensor_pb2.F32, shape=[1, 4], data=b"\x00 \xff\n" * 4))
    req.inputs.add(module="m.q", form=router_pb2.ACTIVATIONS, tensor="h0")
    check_request(req, limits=LIMITS)
    check_request(admin_pb2.PutAdapterRequest(chunk=admin_pb2.FileChunk(data=b"\xff" * 10_000)), limits=LIMITS)


def test_limits_come_from_the_config():
    req = router_pb2.RouteRequest(library="a" * 40)
    check_request(req, limits=LIMITS)
    with pytest.raises(InvalidArgumentError) as ei:
        check_request(req, limits=Limits(max_name_length=32))
    assert (ei.value.field, ei.value.limit, ei.value.actual) == ("library", 32, 40)
