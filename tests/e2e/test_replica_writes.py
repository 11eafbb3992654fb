"""Writes through replicas of one shared store meet main's write rules: quotas, quarantine, audit.

Two in-process servers share one data directory (a `--processes` group's medium) with a poll
interval far longer than the tests, so neither follows the other between writes by itself:
whatever a write gets right about the other replica's commits, it got by bringing its own
snapshot to the store's head before checking anything.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from seqr_client import LimitExceededError, RouterClient
from seqr_server.config import KeySource, StoreConfig
from seqr_server.store import init_key_file

from .conftest import LIB, activations, create_library
from .tenants import flip_bit, write_tokens

SLOW_POLL = StoreConfig(shared=True, poll_s=600.0)
PRINCIPALS = {
    "admin": dict(roles=["admin"]),
    "team-a": dict(roles=["admin"], adapters=["team-a-*"], quota=dict(adapters=2, libraries=1)),
}


@pytest.fixture
def pair(tmp_path, start_server):
    """Two servers on one shared directory (each with its own audit log), and tokens for both."""
    key = tmp_path / "kek.json"
    init_key_file(key)
    tokens = write_tokens(tmp_path / "tokens.json", PRINCIPALS)
    servers = [start_server(tmp_path / "data", keys=KeySource(key_file=key), store=SLOW_POLL,
                            tokens_file=tmp_path / "tokens.json", audit_log=tmp_path / f"audit{i}.log")
               for i in range(2)]
    clients = [{n: RouterClient(s.target, token=t, timeout=30) for n, t in tokens.items()} for s in servers]
    yield servers, clients
    for cs in clients:
        for c in cs.values():
            c.close()


def test_a_quota_counts_what_the_principal_stored_through_another_replica(world, pair):
    _, (on_a, on_b) = pair
    create_library(on_b["admin"], world)              # b serves the library before team-a's uploads
    on_a["team-a"].put_adapter(world.adapters["shared-a0"], name="team-a-0", library=LIB)
    on_a["team-a"].put_adapter(world.adapters["shared-a1"], name="team-a-1", library=LIB)
    with pytest.raises(LimitExceededError) as ei:
        on_b["team-a"].put_adapter(world.adapters["shared-f16"], name="team-a-2", library=LIB)
    assert (ei.value.field, ei.value.limit, ei.value.actual) == ("quota.adapters", "2", "3")
    assert [a.name for a in on_b["admin"].list_adapters(LIB)] == ["team-a-0", "team-a-1"]


def test_a_replica_catching_up_quarantines_a_damaged_adapter_and_keeps_serving(world, pair):
    (a, b), (on_a, on_b) = pair
    create_library(on_a["admin"], world)
    on_b["admin"].put_adapter(world.adapters["shared-a0"], name="kept", library=LIB)   # b now serves the library
    on_a["admin"].put_adapter(world.adapters["shared-a1"], name="damaged", library=LIB)
    flip_bit(a.manager._store.blob_path(LIB, adapter="damaged", role="index"))
    # b has not read "damaged" yet: its next write catches up on it (from its index object, what
    # a replica reads of an added adapter), and finds the damage.
    on_b["admin"].put_adapter(world.adapters["shared-f16"], name="later", library=LIB)
    status = {x.name: x.status for x in on_b["admin"].list_adapters(LIB)}
    assert status == {"kept": "ready", "damaged": "damaged", "later": "ready"}
    routed = on_b["admin"].route(LIB, activations(world), top_k=3)
    assert {c.name for c in routed.choices} == {"kept", "later"}
    assert routed.library_version == on_b["admin"].describe(LIB).version


def test_a_replica_catches_up_from_index_objects_not_peft_files(world, pair):
    (a, b), (on_a, on_b) = pair
    create_library(on_a["admin"], world)
    on_b["admin"].put_adapter(world.adapters["shared-a0"], name="kept", library=LIB)   # b now serves the library
    on_a["admin"].put_adapter(world.adapters["shared-a1"], name="added", library=LIB)
    on_a["admin"].put_adapter(world.adapters["shared-f16"], name="kept", library=LIB, replace=True)
    for n in ("added", "kept"):      # unreadable PEFT files: only the index objects can serve them
        flip_bit(a.manager._store.blob_path(LIB, adapter=n, file="adapter_model.safetensors"))
    on_b["admin"].put_adapter(world.adapters["shared-a0"], name="later", library=LIB)   # b catches up
    status = {x.name: (x.status, x.version) for x in on_b["admin"].list_adapters(LIB)}
    assert status == {"kept": ("ready", 2), "added": ("ready", 1), "later": ("ready", 1)}
    a.manager.refresh()
    x = activations(world)
    got, want = on_b["admin"].route(LIB, x, top_k=4), on_a["admin"].route(LIB, x, top_k=4)
    assert [(c.name, c.adapter_id) for c in got.choices] == [(c.name, c.adapter_id) for c in want.choices]
    # float64 rounding apart: the two replicas' slot layouts differ (the order each applied the changes)
    np.testing.assert_allclose([c.score for c in got.choices], [c.score for c in want.choices], rtol=1e-12)


def test_each_replica_audits_the_writes_it_accepted(world, pair, tmp_path):
    _, (on_a, on_b) = pair
    create_library(on_a["admin"], world)
    on_b["admin"].put_adapter(world.adapters["shared-a0"], name="via-b", library=LIB)
    on_a["admin"].delete_adapter("via-b", library=LIB)

    def mutations(i: int) -> list[tuple]:
        lines = [json.loads(x) for x in (tmp_path / f"audit{i}.log").read_text().splitlines()]
        return [(r["action"], r.get("adapter"), r["code"]) for r in lines
                if r.get("event") == "mutation" and r.get("phase") == "result"]

    assert mutations(0) == [("CreateLibrary", None, "OK"), ("DeleteAdapter", "via-b", "OK")]
    assert mutations(1) == [("PutAdapter", "via-b", "OK")]
