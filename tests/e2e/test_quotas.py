"""Per-principal quotas (tokens-file "quota"): libraries, adapters and bytes a principal may own.
Refusals are RESOURCE_EXHAUSTED naming the limit, and nothing is written."""

from __future__ import annotations

import json

import pytest

from seqr_client import LimitExceededError
from seqr_client.router_client import read_peft_dir
from seqr_server.auth import Authenticator
from seqr_cli.main import main

from .conftest import LIB, create_library
from .tenants import Tenants

QUOTAED = {
    "admin": dict(roles=["admin"]),
    "team-a": dict(roles=["admin"], adapters=["team-a-*"], quota=dict(adapters=2, libraries=1)),
}


@pytest.fixture
def tenants(world, tmp_path):
    t = Tenants(world, tmp_path, principals=QUOTAED, populate=False)
    create_library(t.c["admin"], world)
    yield t
    t.close()


def _stored(t: Tenants) -> tuple:
    """Everything a refused write must leave alone: manifest commit, blob files, libraries, adapters."""
    store = t.h.manager._store
    return (store.manifest_seq, sorted(p.name for p in (store.data_dir / "blobs").iterdir()),
            [(s.name, s.version) for s in t.c["admin"].list_libraries()],
            [a.name for a in t.c["admin"].list_adapters(LIB)])


def _refused(fn, field: str, limit: int, actual: int) -> None:
    with pytest.raises(LimitExceededError) as ei:
        fn()
    assert (ei.value.field, ei.value.limit, ei.value.actual) == (field, str(limit), str(actual))


def test_an_adapter_quota_refuses_the_upload_past_it_and_writes_nothing(tenants):
    a, admin, adapters = tenants.c["team-a"], tenants.c["admin"], tenants.world.adapters
    a.put_adapter(adapters["shared-a0"], name="team-a-0", library=LIB)
    a.put_adapter(adapters["shared-a1"], name="team-a-1", library=LIB)
    before = _stored(tenants)
    _refused(lambda: a.put_adapter(adapters["general-g0"], name="team-a-2", library=LIB, allow_general=True), "quota.adapters", 2, 3)
    assert _stored(tenants) == before
    # Usage is what the principal uploaded (recorded as the owner), not what its globs match.
    admin.put_adapter(adapters["general-g0"], name="team-a-by-ops", library=LIB, allow_general=True)
    _refused(lambda: a.put_adapter(adapters["general-g0"], name="team-a-2", library=LIB, allow_general=True), "quota.adapters", 2, 3)
    a.delete_adapter("team-a-0", library=LIB)                         # deleting frees its share
    a.put_adapter(adapters["general-g0"], name="team-a-2", library=LIB, allow_general=True)
    tenants.restart()                                                 # ownership is stored
    _refused(lambda: tenants.c["team-a"].put_adapter(adapters["general-g1"], name="team-a-3", library=LIB, allow_general=True),
             "quota.adapters", 2, 3)


def test_a_library_quota_refuses_the_next_library_and_writes_nothing(tenants):
    a, world = tenants.c["team-a"], tenants.world
    create_library(a, world, name="mine")
    before = _stored(tenants)
    _refused(lambda: create_library(a, world, name="mine-too"), "quota.libraries", 1, 2)
    assert _stored(tenants) == before
    assert "mine-too" not in [s.name for s in a.list_libraries()]


def test_a_bytes_quota_counts_uploaded_files_and_shared_a(world, tmp_path):
    size, size1 = (sum(len(d) for d in read_peft_dir(world.adapters[n]).values()) for n in ("shared-a0", "shared-a1"))
    t = Tenants(world, tmp_path, populate=False, principals={
        "admin": dict(roles=["admin"]), "small": dict(roles=["admin"], quota=dict(bytes=size + 100))})
    try:
        create_library(t.c["admin"], world)
        small = t.c["small"]
        small.put_adapter(world.adapters["shared-a0"], name="one", library=LIB)
        before = _stored(t)
        _refused(lambda: small.put_adapter(world.adapters["shared-a1"], name="two", library=LIB),
                 "quota.bytes", size + 100, size + size1)
        assert _stored(t) == before
        shared_a = 4 * sum(world.shared_a[m].size for m in world.qv)      # float32 A of every q/v module
        _refused(lambda: create_library(small, world, name="big"), "quota.bytes", size + 100,
                 size + shared_a + _safetensors_header(t))
        assert _stored(t) == before
    finally:
        t.close()


def _safetensors_header(t: Tenants) -> int:
    """Bytes the stored shared-A object holds beyond its float32 data (its safetensors header)."""
    rec = t.h.manager._libs[LIB].record
    data = 4 * sum(a.size for a in t.h.manager._libs[LIB].index.shared_a.values())
    return rec.object_sizes["shared_a"] - data


def test_tokens_new_writes_the_quota_the_server_enforces(tmp_path, capsys):
    path = tmp_path / "t.json"
    assert main(["tokens", "new", "--file", str(path), "--name", "h", "--role", "admin",
                 "--quota-adapters", "3", "--quota-bytes", "1000000"]) == 0
    token = capsys.readouterr().out.strip()
    assert json.loads(path.read_text())["tokens"][0]["quota"] == {"adapters": 3, "bytes": 1000000}
    p = Authenticator.from_file(path).authenticate([("authorization", f"Bearer {token}")], "LibraryAdmin/PutAdapter")
    assert (p.quota.adapters, p.quota.bytes, p.quota.libraries) == (3, 1000000, None)
    with pytest.raises(SystemExit):
        main(["tokens", "new", "--file", str(path), "--name", "h2", "--role", "admin", "--quota-adapters", "-1"])
