"""A damaged stored adapter is quarantined: the library serves the rest, restricted callers learn
nothing about a hidden one, admins see it as damaged, metrics say degraded, and it can be deleted.

Damage is real: one bit flipped in the adapter's sealed index object on disk (what startup
reads; the PEFT files are read only by a scrub or a re-parse), then a restart."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from seqr_client import AlreadyExistsError, IntegrityError, NotFoundError, SeqrError
from seqr_cli.main import main

from .conftest import LIB, activations
from .tenants import (HIDDEN, PRINCIPALS, TEAM_A, UPLOADS, Tenants, adapter_blob, flip_bit, index_blob, metric,
                      object_blob)

RPCS = ("route", "describe", "list_adapters", "list_libraries")
RESTRICTED = ("team-a", "observer-a")
UNRESTRICTED = ("admin", "observer")
ALLOWED = {"route": ("route", "describe"), "observer": ("describe", "list_adapters", "list_libraries")}


def seen(client, world, rpc: str):
    """What one caller gets from one RPC on LIB (timings left out), or the error it gets."""
    calls = {
        "route": lambda: (lambda r: (r.choices, r.margin, r.library_version, r.normalisation, r.fallback,
                                     dict(r.scores)))(client.route(LIB, activations(world), top_k=10,
                                                                   include_scores=True)),
        "describe": lambda: client.describe(LIB),
        "list_adapters": lambda: tuple(client.list_adapters(LIB)),
        "list_libraries": lambda: tuple(client.list_libraries()),
    }
    try:
        return calls[rpc]()
    except SeqrError as e:
        return Refused(type(e).__name__, e.field, str(e))


@dataclass(frozen=True)
class Refused:
    error: str
    field: str
    message: str


def everything_seen(t: Tenants) -> dict:
    return {(who, rpc): seen(t.c[who], t.world, rpc) for who in PRINCIPALS for rpc in RPCS}


@pytest.fixture
def tenants(world, tmp_path):
    t = Tenants(world, tmp_path, principals={**PRINCIPALS, "admin-a": dict(roles=["admin"], adapters=["team-a-*"])})
    yield t
    t.close()


@pytest.fixture(scope="module")
def damaged(world, tmp_path_factory):
    """Tenants before and after one bit flip in team-b-secret's index object and a restart."""
    t = Tenants(world, tmp_path_factory.mktemp("quarantine"))
    before = everything_seen(t)
    blob = index_blob(t.h, HIDDEN)
    t.restart()
    assert everything_seen(t) == before          # a clean restart changes nothing anyone sees
    t.h.stop(grace=1.0)
    flip_bit(blob)
    t.restart(metrics_port=0)
    yield SimpleNamespace(t=t, before=before, after=everything_seen(t))
    t.close()


@pytest.mark.parametrize("who,rpc", [(who, rpc) for who in RESTRICTED for rpc in RPCS
                                     if rpc in ALLOWED[PRINCIPALS[who]["roles"][0]]])
def test_restricted_callers_see_exactly_what_they_saw_before_the_damage(damaged, who, rpc):
    assert not isinstance(damaged.after[who, rpc], Refused)
    assert damaged.after[who, rpc] == damaged.before[who, rpc]


def _expect_quarantined(before: tuple, after: tuple) -> None:
    """``after`` lists what ``before`` did, team-b-secret now damaged and the rest unchanged."""
    assert [a.name for a in after] == [a.name for a in before] == list(UPLOADS)
    for b, a in zip(before, after):
        if a.name != HIDDEN:
            assert a == b and a.status == "ready"
            continue
        assert a.status == "damaged" and "DATA_LOSS" in a.damaged_reason
        assert (a.adapter_id, a.kind, a.upload_dtype, a.created_at, a.sha256, a.size_bytes) == \
               (b.adapter_id, b.kind, b.upload_dtype, b.created_at, b.sha256, b.size_bytes)
        assert (a.rank, a.modules, a.calibrated) == (0, (), False)    # its files cannot be read


@pytest.mark.parametrize("who", UNRESTRICTED)
def test_unrestricted_callers_see_the_damaged_adapter_quarantined(damaged, who):
    before, after = damaged.before, damaged.after
    _expect_quarantined(before[who, "list_adapters"], after[who, "list_adapters"])
    desc = after[who, "describe"]
    _expect_quarantined(before[who, "describe"].adapters, desc.adapters)
    assert desc.degraded and desc.damaged_objects == () and desc.version == before[who, "describe"].version
    [summary] = [s for s in after[who, "list_libraries"] if s.name == LIB]
    assert (summary.degraded, summary.damaged_adapters, summary.adapters) == (True, 1, len(UPLOADS))
    if who == "admin":      # the library keeps routing, among the adapters that are intact
        assert set(after[who, "route"][-1]) == set(TEAM_A)
    else:
        assert after[who, "route"] == before[who, "route"] == \
               Refused("PermissionDeniedError", "authorization", before[who, "route"].message)


def test_the_damaged_adapter_as_a_candidate_is_data_loss_only_for_who_may_see_it(damaged, world):
    c, x = damaged.t.c, activations(damaged.t.world)
    with pytest.raises(IntegrityError) as ei:
        c["admin"].route(LIB, x, candidates=[HIDDEN, "team-a-0"])
    assert ei.value.field == "candidates" and HIDDEN in str(ei.value)
    with pytest.raises(NotFoundError) as hidden:
        c["team-a"].route(LIB, x, candidates=[HIDDEN])
    with pytest.raises(NotFoundError) as absent:
        c["team-a"].route(LIB, x, candidates=["team-b-absent"])
    assert (hidden.value.field, hidden.value.reason) == (absent.value.field, absent.value.reason)
    assert str(hidden.value).replace(HIDDEN, "<x>") == str(absent.value).replace("team-b-absent", "<x>")


def test_metrics_say_the_library_is_degraded_and_health_stays_serving(damaged):
    h = damaged.t.h
    assert metric(h, "seqr_library_damaged_adapters") == 1.0
    assert metric(h, "seqr_library_degraded") == 1.0
    assert metric(h, "seqr_library_failed") == 0.0
    assert metric(h, "seqr_library_adapters") == float(len(TEAM_A))
    assert damaged.t.c["team-a"].health() == "SERVING"


def test_deleting_a_damaged_adapter_crypto_shreds_it(tenants):
    blob = index_blob(tenants.h, HIDDEN)
    tenants.h.stop(grace=1.0)
    flip_bit(blob)
    tenants.restart(metrics_port=0)
    admin, world = tenants.c["admin"], tenants.world
    version = admin.describe(LIB).version
    with pytest.raises(AlreadyExistsError):           # the store still holds the name
        admin.put_adapter(world.adapters["shared-a0"], name=HIDDEN, library=LIB)
    with pytest.raises(NotFoundError) as hidden:      # to an admin it is hidden from, it is absent
        tenants.c["admin-a"].delete_adapter(HIDDEN, library=LIB)
    with pytest.raises(NotFoundError) as absent:
        tenants.c["admin-a"].delete_adapter("team-b-absent", library=LIB)
    assert str(hidden.value).replace(HIDDEN, "<x>") == str(absent.value).replace("team-b-absent", "<x>")
    assert blob.exists() and admin.describe(LIB).version == version
    gone = admin.delete_adapter(HIDDEN, library=LIB)
    assert (gone.name, gone.adapter_id, gone.library_version) == (HIDDEN, 1, version + 1)
    assert not blob.exists()                          # its wrapped data key was only in that file
    assert HIDDEN not in [a.name for a in admin.list_adapters(LIB)]
    assert not admin.describe(LIB).degraded
    assert metric(tenants.h, "seqr_library_damaged_adapters") == 0.0
    assert metric(tenants.h, "seqr_library_degraded") == 0.0
    again = admin.put_adapter(world.adapters["shared-f16"], name=HIDDEN, library=LIB)
    assert again.adapter_id == len(UPLOADS) and again.status == "ready"
    tenants.restart()
    assert [(a.name, a.status) for a in tenants.c["admin"].list_adapters(LIB)] == \
           [("team-a-0", "ready"), ("team-a-1", "ready"), (HIDDEN, "ready")]


def test_an_adapter_damaged_while_serving_is_quarantined_by_a_scrub(tenants):
    before = seen(tenants.c["team-a"], tenants.world, "route")
    flip_bit(adapter_blob(tenants.h, HIDDEN))
    assert tenants.h.manager.scrub() == {LIB: [HIDDEN]}
    assert tenants.h.manager.scrub() == {}            # already set aside
    assert [a.status for a in tenants.c["admin"].list_adapters(LIB) if a.name == HIDDEN] == ["damaged"]
    assert seen(tenants.c["team-a"], tenants.world, "route") == before
    assert set(seen(tenants.c["admin"], tenants.world, "route")[-1]) == set(TEAM_A)


def test_a_damaged_index_object_while_serving_is_quarantined_by_a_scrub(tenants):
    before = seen(tenants.c["team-a"], tenants.world, "route")
    flip_bit(index_blob(tenants.h, HIDDEN))
    assert tenants.h.manager.scrub() == {LIB: [HIDDEN]}
    assert [a.status for a in tenants.c["admin"].list_adapters(LIB) if a.name == HIDDEN] == ["damaged"]
    assert seen(tenants.c["team-a"], tenants.world, "route") == before


def test_a_damaged_calibration_is_quarantined_and_pooled_moments_recalibrate_shared_a_adapters(tenants):
    admin, x = tenants.c["admin"], activations(tenants.world)
    admin.calibrate([x], library=LIB)
    assert admin.route(LIB, x, normalisation="activation").fallback == ""
    blob = object_blob(tenants.h, "calibration")
    tenants.h.stop(grace=1.0)
    flip_bit(blob)
    tenants.restart()
    admin, team_a = tenants.c["admin"], tenants.c["team-a"]
    # Every adapter here is shared-A: the intact pooled moments calibrate them again, exactly
    # for the mean and per-token variance of e; log z-scores need the stream and fall back.
    r = team_a.route(LIB, x, normalisation="activation")
    assert r.normalisation == "activation" and r.fallback == ""
    r = team_a.route(LIB, x, normalisation="zscore/adapter_module/log")
    assert r.normalisation == "frobenius" and "uncalibrated" in r.fallback
    for c in (admin, team_a):       # library-wide damage names no adapter: every caller may know
        info = c.describe(LIB)
        assert info.degraded and info.damaged_objects == ("calibration",)
        assert all(a.status == "ready" for a in info.adapters)
        assert set(info.derived_adapters) == {a.name for a in info.adapters}
    admin.calibrate([x], library=LIB)
    assert not team_a.describe(LIB).degraded and team_a.describe(LIB).derived_adapters == ()
    assert team_a.route(LIB, x, normalisation="zscore/adapter_module/log").fallback == ""


def test_damaged_calibration_and_moments_fall_back_until_the_next_calibrate(tenants):
    admin, x = tenants.c["admin"], activations(tenants.world)
    admin.calibrate([x], library=LIB)
    blobs = [object_blob(tenants.h, "calibration"), object_blob(tenants.h, "moments")]
    tenants.h.stop(grace=1.0)
    for b in blobs:
        flip_bit(b)
    tenants.restart()
    admin, team_a = tenants.c["admin"], tenants.c["team-a"]
    r = team_a.route(LIB, x, normalisation="activation")
    assert r.normalisation == "frobenius" and "uncalibrated" in r.fallback
    info = team_a.describe(LIB)
    assert info.degraded and info.damaged_objects == ("calibration", "moments") and info.pooled_sequences == 0
    admin.calibrate([x], library=LIB)
    assert not team_a.describe(LIB).degraded
    assert team_a.route(LIB, x, normalisation="activation").fallback == ""


def test_a_damaged_shared_a_fails_the_library_without_detail_for_restricted_callers(tenants):
    blob = object_blob(tenants.h, "shared_a")
    tenants.c["admin"].create_library("other", signature=tenants.world.sig)
    tenants.h.stop(grace=1.0)
    flip_bit(blob)
    tenants.restart(metrics_port=0)
    with pytest.raises(IntegrityError) as admin_err:
        tenants.c["admin"].describe(LIB)
    assert "shared_a" in str(admin_err.value)         # the unrestricted admin gets the detail
    for who in ("team-a", "observer-a"):
        with pytest.raises(IntegrityError) as ei:
            tenants.c[who].describe(LIB)
        assert ei.value.field == "library" and "shared_a" not in str(ei.value)
        assert not any(n in str(ei.value) for n in UPLOADS)
    assert metric(tenants.h, "seqr_library_failed") == 1.0
    assert metric(tenants.h, "seqr_library_degraded") == 1.0
    assert tenants.c["admin"].describe("other").name == "other"   # the other library is unaffected


def test_the_cli_shows_admins_the_damage(damaged, capsys):
    t = damaged.t
    common = ["--target", t.h.target, "--token", t.tokens["admin"], "--library", LIB]
    assert main(["adapters", "ls", *common]) == 0
    out = capsys.readouterr().out
    assert f"1\t{HIDDEN}\tDAMAGED" in out and "DATA_LOSS" in out
    assert main(["libraries", "ls", "--target", t.h.target, "--token", t.tokens["admin"]]) == 0
    assert "DEGRADED (1 damaged adapters)" in capsys.readouterr().out
    assert main(["describe", *common]) == 0
    assert f"DEGRADED: damaged objects [], damaged adapters ['{HIDDEN}']" in capsys.readouterr().out
