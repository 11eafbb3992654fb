"""View versions: the library version a restricted caller is told moves only with what it can see,
so hidden adapters' uploads and deletions leave no trace in it (issue 9, item 11)."""

from __future__ import annotations

import pytest

from seqr_core import ModuleInput, RouteOptions
from seqr_core import route as core_route
from seqr_server.auth import Principal
from seqr_router.v1 import admin_pb2
from seqr_server.views import route_in_view

from .conftest import LIB, activations, create_library
from .tenants import HIDDEN, PRINCIPALS, Tenants

VIEWERS = ("team-a", "observer-a")


@pytest.fixture
def tenants(world, tmp_path):
    t = Tenants(world, tmp_path, principals={**PRINCIPALS, "admin-a": dict(roles=["admin"], adapters=["team-a-*"])})
    yield t
    t.close()


def versions(t: Tenants, library: str = LIB) -> dict[str, int]:
    """Every version each caller is told about ``library``, by caller and RPC."""
    x = activations(t.world)
    out = {"admin": t.c["admin"].describe(library).version}
    out["team-a/describe"] = t.c["team-a"].describe(library).version
    if library == LIB:
        out["team-a/route"] = t.c["team-a"].route(LIB, x).library_version
        out["team-a/route_stream"] = next(iter(t.c["team-a"].route_stream([x], library=LIB))).library_version
    out["observer-a/describe"] = t.c["observer-a"].describe(library).version
    out["observer-a/list_libraries"] = {s.name: s.version for s in t.c["observer-a"].list_libraries()}[library]
    c = t.c["observer-a"]     # the typed client returns only the adapters; ask its stub for the version
    out["observer-a/list_adapters"] = c._admin.ListAdapters(admin_pb2.ListAdaptersRequest(library=library),
                                                            metadata=c._metadata, timeout=30).library_version
    return out


def restricted(v: dict[str, int]) -> set[int]:
    return {n for k, n in v.items() if k != "admin"}


def test_hidden_uploads_and_deletes_leave_a_restricted_callers_version_alone(tenants):
    before = versions(tenants)
    assert len(restricted(before)) == 1 and before["admin"] == 4        # created + 3 uploads
    admin = tenants.c["admin"]
    admin.put_adapter(tenants.world.adapters["general-g0"], name="team-b-new", library=LIB, allow_general=True)
    admin.delete_adapter(HIDDEN, library=LIB)
    after = versions(tenants)
    assert after["admin"] == before["admin"] + 2
    assert restricted(after) == restricted(before)


def test_an_empty_library_and_one_with_only_hidden_adapters_look_the_same(tenants):
    admin = tenants.c["admin"]
    create_library(admin, tenants.world, name="empty")
    create_library(admin, tenants.world, name="hidden-only")
    admin.put_adapter(tenants.world.adapters["shared-a0"], name="team-b-only", library="hidden-only")
    for who in VIEWERS:
        empty, hidden = tenants.c[who].describe("empty"), tenants.c[who].describe("hidden-only")
        assert (empty.version, empty.adapters) == (hidden.version, hidden.adapters) == (1, ())
    assert admin.describe("hidden-only").version == 2


def test_visible_changes_and_calibration_move_every_view_to_the_library_version(tenants):
    admin, world = tenants.c["admin"], tenants.world
    start = versions(tenants)
    admin.put_adapter(world.adapters["general-g0"], name="team-a-new", library=LIB, allow_general=True)
    v = versions(tenants)
    assert restricted(v) == {v["admin"]} and v["admin"] > max(restricted(start))
    admin.put_adapter(world.adapters["general-g1"], name="team-b-later", library=LIB, allow_general=True)
    hidden = versions(tenants)
    assert restricted(hidden) == {v["admin"]} and hidden["admin"] == v["admin"] + 1
    admin.calibrate([activations(world)], library=LIB)          # concerns the whole library
    cal = versions(tenants)
    assert restricted(cal) == {cal["admin"]} == {hidden["admin"] + 1}
    admin.delete_adapter("team-a-new", library=LIB)             # a visible delete moves views forward
    gone = versions(tenants)
    assert restricted(gone) == {gone["admin"]} == {cal["admin"] + 1}


def test_a_restricted_admin_is_told_its_own_writes_versions(tenants):
    admin_a, world = tenants.c["admin-a"], tenants.world
    tenants.c["admin"].put_adapter(world.adapters["general-g0"], name="team-b-x", library=LIB, allow_general=True)
    seen = admin_a.describe(LIB).version
    assert seen < tenants.c["admin"].describe(LIB).version         # the hidden upload is not in its view
    put = admin_a.put_adapter(world.adapters["general-g1"], name="team-a-mine", library=LIB, allow_general=True)
    assert admin_a.describe(LIB).version == tenants.c["admin"].describe(LIB).version > seen
    gone = admin_a.delete_adapter("team-a-mine", library=LIB)
    assert gone.library_version == admin_a.describe(LIB).version == tenants.c["admin"].describe(LIB).version
    assert put.adapter_id == 4 and gone.adapter_id == 4      # ids stay library-wide (vLLM lora_int_id)


def test_view_versions_survive_a_restart(tenants):
    tenants.c["admin"].put_adapter(tenants.world.adapters["general-g0"], name="team-b-x", library=LIB, allow_general=True)
    tenants.c["admin"].delete_adapter(HIDDEN, library=LIB)
    before = versions(tenants)
    assert max(restricted(before)) < before["admin"]     # the store, not memory, must keep this apart
    tenants.restart()
    assert versions(tenants) == before


def test_a_stale_backend_answer_is_recomputed_only_when_the_caller_could_see_the_change(tenants):
    """The onnx backend may answer from an older snapshot while a new scorer warms."""
    h, admin, world = tenants.h, tenants.c["admin"], tenants.world
    x = {m: ModuleInput("activations", a, a.shape[0]) for m, a in activations(world).items()}
    team_a = Principal("team-a", frozenset({"route"}), adapters=("team-a-*",))
    everyone = Principal("ops", frozenset({"admin"}))
    old = h.manager._libs[LIB]
    stale = lambda index, inputs, options: core_route(old.index, inputs, options)   # noqa: E731
    admin.put_adapter(world.adapters["general-g0"], name="team-b-x", library=LIB, allow_general=True)   # hidden from team-a
    cur = h.manager._libs[LIB]
    decision, view = route_in_view(stale, cur, team_a, cur.index, x, RouteOptions(candidates=("team-a-0", "team-a-1")))
    assert (decision.version, view) == (old.version, old.view_version(team_a))      # same view: served stale
    decision, view = route_in_view(stale, cur, everyone, cur.index, x, RouteOptions())
    assert (decision.version, view) == (old.version, old.version)                   # says which snapshot
    admin.put_adapter(world.adapters["general-g1"], name="team-a-x", library=LIB, allow_general=True)   # visible to team-a
    cur = h.manager._libs[LIB]
    decision, view = route_in_view(stale, cur, team_a, cur.index, x, RouteOptions(candidates=("team-a-0", "team-a-1")))
    assert decision.version == cur.version and view == cur.version                  # recomputed on the new one
