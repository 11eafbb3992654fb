"""Bearer tokens, roles and adapter ACLs: callers are routed only among adapters they may use,
and hidden adapters and libraries look exactly like absent ones."""

from __future__ import annotations

import json
import threading

import pytest

from seqr_client import (NotFoundError, PermissionDeniedError, RouterClient, SeqrError,
                         UnauthenticatedError)
from seqr_server.auth import new_token_entry

from .conftest import LIB, activations, create_library, populate

PRINCIPALS = {
    "admin": dict(roles=["admin"]),
    "router-shared": dict(roles=["route"], adapters=["shared-*"]),
    "router-none": dict(roles=["route"], adapters=["nothing-*"]),
    "admin-shared": dict(roles=["admin"], adapters=["shared-*"], libraries=[LIB, "empty"]),
    "observer": dict(roles=["observer"]),
}


@pytest.fixture
def secured(world, start_server, tmp_path, request):
    backend = getattr(request, "param", "numpy")
    tokens, entries = {}, []
    for name, kw in PRINCIPALS.items():
        tokens[name], entry = new_token_entry(name=name, **kw)
        entries.append(entry)
    (tmp_path / "tokens.json").write_text(json.dumps({"tokens": entries}))
    h = start_server(tmp_path / "d", tokens_file=tmp_path / "tokens.json", backend=backend)
    admin = populate(h, world, token=tokens["admin"])
    create_library(admin, world, name="secret")
    create_library(admin, world, name="empty")
    clients = {n: RouterClient(h.target, token=t, timeout=30) for n, t in tokens.items()}
    yield h, clients
    for c in clients.values():
        c.close()
    admin.close()


def _err(fn) -> SeqrError:
    with pytest.raises(SeqrError) as ei:
        fn()
    return ei.value


def _same_error(a: SeqrError, b: SeqrError, a_name: str, b_name: str) -> None:
    assert type(a) is type(b)
    assert (a.code, a.field, a.reason) == (b.code, b.field, b.reason)
    assert str(a).replace(a_name, "<x>") == str(b).replace(b_name, "<x>")


def test_calls_without_a_known_token_are_unauthenticated(world, secured):
    h, _ = secured
    with RouterClient(h.target) as anon:
        assert isinstance(_err(lambda: anon.describe(LIB)), UnauthenticatedError)
    with RouterClient(h.target, token="seqr_guess") as wrong:
        assert isinstance(_err(lambda: wrong.route(LIB, activations(world))), UnauthenticatedError)
    with RouterClient(h.target) as anon:
        assert anon.health() == "SERVING"        # health stays open for load balancers


def test_roles_limit_the_methods_a_caller_may_use(world, secured):
    _, c = secured
    assert isinstance(_err(lambda: c["router-shared"].list_adapters(LIB)), PermissionDeniedError)
    assert isinstance(_err(lambda: c["router-shared"].delete_adapter("shared-a0", library=LIB)),
                      PermissionDeniedError)
    assert isinstance(_err(lambda: c["observer"].route(LIB, activations(world))), PermissionDeniedError)
    assert len(c["observer"].list_adapters(LIB)) == len(world.adapters)


def test_a_caller_is_routed_only_among_adapters_it_may_use(world, secured):
    _, c = secured
    r = c["router-shared"].route(LIB, activations(world), top_k=10, include_scores=True)
    assert set(r.scores) == set(world.shared_names)
    assert {ch.name for ch in r.choices} <= set(world.shared_names)
    assert [a.name for a in c["router-shared"].describe(LIB).adapters] == list(world.shared_names)
    full = c["admin"].route(LIB, activations(world), top_k=10, include_scores=True)
    assert set(full.scores) == set(world.adapters)


def test_hidden_adapters_look_exactly_like_absent_ones(world, secured):
    _, c = secured
    x = activations(world)
    hidden = _err(lambda: c["router-shared"].route(LIB, x, candidates=["general-g0"]))
    absent = _err(lambda: c["router-shared"].route(LIB, x, candidates=["general-zz"]))
    assert isinstance(hidden, NotFoundError)
    _same_error(hidden, absent, "general-g0", "general-zz")
    hidden = _err(lambda: c["admin-shared"].delete_adapter("general-g0", library=LIB))
    absent = _err(lambda: c["admin-shared"].delete_adapter("general-zz", library=LIB))
    _same_error(hidden, absent, "general-g0", "general-zz")
    assert "general-g0" in [a.name for a in c["admin"].list_adapters(LIB)]   # still there for others


def test_hidden_libraries_look_exactly_like_absent_ones(world, secured):
    _, c = secured
    hidden = _err(lambda: c["admin-shared"].describe("secret"))
    absent = _err(lambda: c["admin-shared"].describe("sekret"))
    _same_error(hidden, absent, "secret", "sekret")
    assert [lib.name for lib in c["admin-shared"].list_libraries()] == ["empty", LIB]


def test_a_caller_that_sees_no_adapter_gets_the_empty_library_answer(world, secured):
    _, c = secured
    x = activations(world)
    none_visible = _err(lambda: c["router-none"].route(LIB, x))
    empty_lib = _err(lambda: c["admin"].route("empty", x))
    _same_error(none_visible, empty_lib, LIB, "empty")


def test_a_restricted_admin_cannot_upload_outside_its_acl(world, secured):
    _, c = secured
    err = _err(lambda: c["admin-shared"].put_adapter(world.adapters["general-g0"], name="general-new", library=LIB, allow_general=True))
    assert isinstance(err, PermissionDeniedError) and err.field == "header.name"
    ok = c["admin-shared"].put_adapter(world.adapters["shared-a0"], name="shared-new", library=LIB)
    assert ok.adapter_id == len(world.adapters)
    # the exported scorer would carry every adapter's routing index, hidden ones included
    assert isinstance(_err(lambda: c["admin-shared"].export_scorer(LIB)), PermissionDeniedError)


@pytest.mark.parametrize("secured", ["onnx"], indirect=True)
def test_acls_hold_on_the_onnx_backend_once_its_scorer_is_warm(world, secured):
    pytest.importorskip("onnxruntime")
    h, c = secured
    onnx_backend = h.backend.route.__self__
    version = c["admin"].describe(LIB).version
    c["admin"].route(LIB, activations(world))             # asks for this profile's scorer
    ev = threading.Event()
    for _ in range(3000):
        if onnx_backend.warm_version(LIB) == version and onnx_backend.stats().get("onnx: CPUExecutionProvider"):
            break
        c["admin"].route(LIB, activations(world))
        ev.wait(0.01)
    else:
        pytest.fail(f"onnx scorer never warmed: {onnx_backend.stats()}")
    r = c["router-shared"].route(LIB, activations(world), top_k=10, include_scores=True)
    assert set(r.scores) == set(world.shared_names)
    none_visible = _err(lambda: c["router-none"].route(LIB, activations(world)))
    empty_lib = _err(lambda: c["admin"].route("empty", activations(world)))
    _same_error(none_visible, empty_lib, LIB, "empty")
