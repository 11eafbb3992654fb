"""Replicas on one library store: real servers (in this process, each with its own store
connection and rollback anchor, as on separate hosts) against a real PostgreSQL, and a process
group's shared data directory.

Waits poll with generous limits (the machine may be busy); speed is reported by
bench/replicas.py, never asserted here.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import numpy as np
import pytest

from seqr_client import IntegrityError, RouterClient, SeqrError, UnavailableError
from seqr_core.errors import FailedPreconditionError
from seqr_server.config import KeySource, StoreConfig
from seqr_server.store import init_key_file

from ..peft_factory import read_dir
from ..postgres import Proxy, cluster
from .conftest import LIB, activations, create_library, moments


def until(predicate, timeout: float = 60.0, step: float = 0.05) -> bool:
    ev = threading.Event()
    for _ in range(int(timeout / step)):
        if predicate():
            return True
        ev.wait(step)
    return predicate()


def put(client: RouterClient, world, adapter: str, *, name: str | None = None, **kw) -> int:
    """Upload through ``client``; the library version that write committed."""
    client.put_adapter(world.adapters[adapter], name=name or adapter, library=LIB, **kw)
    return client.describe(LIB).version


def _files(world, name: str) -> dict[str, bytes]:
    f = read_dir(world.adapters[name])
    return {k: f[k] for k in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture
def replicas(tmp_path, start_server):
    """start(n, dsn=None, **store) -> n servers on one fresh PostgreSQL store (one schema)."""
    c = cluster()
    schema = c.new_schema()
    key = tmp_path / "kek.json"
    init_key_file(key)
    made: list = []

    def start(n: int = 3, *, dsns: list[str] | None = None, **store):
        out = []
        for i in range(n):
            host = tmp_path / f"host{len(made)}"
            dsn = dsns[i] if dsns else c.dsn(schema)
            cfg = StoreConfig(dsn=dsn, poll_s=store.pop("poll_s", 0.5), **store)
            h = start_server(host / "data", keys=KeySource(key_file=key), store=cfg, anchor_dir=host / "anchors")
            made.append(h)
            out.append(h)
        return out

    start.schema = schema
    start.cluster = c
    yield start
    for h in made:
        h.stop(grace=1.0)
    c.drop_schema(schema)


def _version(client: RouterClient) -> int:
    try:
        return client.describe(LIB).version
    except SeqrError:
        return -1


def test_a_write_on_one_replica_is_served_by_the_others(world, replicas):
    r1, r2, r3 = replicas(3)
    clients = [RouterClient(h.target, timeout=30) for h in (r1, r2, r3)]
    create_library(clients[0], world)
    v = put(clients[0], world, "shared-a0")
    for c in clients[1:]:
        assert until(lambda: _version(c) == v)
        routed = c.route(LIB, activations(world))
        assert routed.library_version == v and routed.best.name == "shared-a0"
    deleted = clients[2].delete_adapter("shared-a0", library=LIB)         # any replica accepts writes
    assert until(lambda: _version(clients[0]) == deleted.library_version)
    assert clients[0].describe(LIB).adapters == ()
    for c in clients:
        c.close()


def test_a_follower_serves_exactly_what_the_writer_serves(world, replicas):
    r1, r2 = replicas(2)
    writer, follower = RouterClient(r1.target, timeout=60), RouterClient(r2.target, timeout=60)
    create_library(writer, world)
    for name in world.adapters:
        writer.put_adapter(world.adapters[name], name=name, library=LIB, allow_general=name.startswith("general"))
    writer.delete_adapter("shared-a1", library=LIB)
    writer.put_adapter(world.adapters["shared-a1"], name="shared-a1-again", library=LIB)
    rng = np.random.default_rng(5)
    writer.calibrate([activations(world, {k: rng.standard_normal(h.shape).astype(np.float32)
                                          for k, h in world.hidden.items()}) for _ in range(6)], library=LIB)
    # After the Calibrate: a shared-A adapter calibrated from the pooled moments alone, and an
    # in-place replace (same id, new factors: its old statistics must not survive on the follower).
    writer.put_adapter(world.adapters["shared-a0"], name="late", library=LIB)
    writer.put_adapter(world.adapters["shared-a1"], name="shared-f16", library=LIB, replace=True)
    v = writer.describe(LIB).version
    assert until(lambda: _version(follower) == v)
    assert follower.describe(LIB) == writer.describe(LIB)
    assert follower.list_adapters(LIB) == writer.list_adapters(LIB)
    shared = ["shared-a0", "shared-f16", "shared-a1-again", "late"]
    for form in ({"inputs": activations(world)}, {"moments": moments(world), "tokens": 12, "candidates": shared}):
        a = writer.route(LIB, **form, top_k=3, include_scores=True, normalisation="activation")
        b = follower.route(LIB, **form, top_k=3, include_scores=True, normalisation="activation")
        assert replace(a, timings=None) == replace(b, timings=None) and a.library_version == v
        assert a.normalisation == "activation" and a.fallback == ""
    writer.close()
    follower.close()


def test_a_write_through_a_replica_behind_the_store_serves_what_was_committed(world, replicas):
    r1, r2 = replicas(2)
    c1, c2 = RouterClient(r1.target, timeout=30), RouterClient(r2.target, timeout=30)
    create_library(c1, world)
    put(c1, world, "shared-a0")
    assert until(lambda: _version(c2) == 2)
    r1.follower.stop()                       # r1 no longer follows: it only learns through its writes
    put(c2, world, "shared-a1")
    added = c1.put_adapter(world.adapters["shared-f16"], name="shared-f16", library=LIB)
    assert added.adapter_id == 2             # the store's next id, not the one r1's old view predicted
    info = c1.describe(LIB)
    assert [(a.name, a.adapter_id) for a in info.adapters] == [("shared-a0", 0), ("shared-a1", 1), ("shared-f16", 2)]
    assert info.version == 4 and c1.route(LIB, activations(world)).library_version == 4
    c1.close()
    c2.close()


def test_concurrent_writes_through_two_replicas_are_serialised_and_ids_never_reused(world, replicas):
    r1, r2, r3 = replicas(3)
    with RouterClient(r1.target, timeout=60) as c1:
        create_library(c1, world)
    files = _files(world, "shared-a0")
    acked: dict[str, int] = {}
    errors: list[Exception] = []

    def writer(h, prefix: str) -> None:
        with RouterClient(h.target, timeout=60) as c:
            for i in range(6):
                try:
                    acked[f"{prefix}{i}"] = c.put_adapter_files(files, name=f"{prefix}{i}", library=LIB).adapter_id
                except SeqrError as e:
                    errors.append(e)

    threads = [threading.Thread(target=writer, args=(h, p)) for h, p in ((r1, "one-"), (r2, "two-"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(acked) == 12
    assert sorted(acked.values()) == list(range(12))                      # serialised: no id twice
    with RouterClient(r3.target, timeout=30) as c3:
        assert until(lambda: _version(c3) == 13)
        assert {a.name: a.adapter_id for a in c3.describe(LIB).adapters} == acked


def test_a_replica_cut_off_serves_stale_then_not_serving_then_catches_up(world, replicas):
    c = replicas.cluster
    proxy = Proxy(c.port)
    try:
        (r1,) = replicas(1)
        (cut,) = replicas(1, dsns=[c.dsn(replicas.schema, port=proxy.port, tcp_user_timeout="1500",
                                         keepalives_idle="1", keepalives_interval="1", keepalives_count="2")],
                          max_staleness_s=4.0, poll_s=0.3)
        writer, reader = RouterClient(r1.target, timeout=30), RouterClient(cut.target, timeout=30)
        create_library(writer, world)
        v1 = put(writer, world, "shared-a0")
        assert until(lambda: _version(reader) == v1)

        proxy.cut()
        v2 = put(writer, world, "shared-a1")
        assert until(lambda: reader.health("seqr.replica") == "NOT_SERVING")
        stale = reader.route(LIB, activations(world))        # still serving, and says on what
        assert stale.library_version == v1 < v2 and reader.health() == "SERVING"

        assert until(lambda: reader.health() == "NOT_SERVING")            # past the 4 s budget
        with pytest.raises(UnavailableError, match=r"has not reached its library store .*\(budget 4 s\)"):
            reader.route(LIB, activations(world))
        with pytest.raises(UnavailableError, match="has not reached its library store"):
            reader.put_adapter(world.adapters["shared-f16"], name="while-cut", library=LIB)

        proxy.heal()
        assert until(lambda: reader.health() == "SERVING" and reader.health("seqr.replica") == "SERVING")
        assert until(lambda: _version(reader) == v2)
        assert reader.route(LIB, activations(world)).library_version == v2
        assert "while-cut" not in {a.name for a in reader.describe(LIB).adapters}
        writer.close()
        reader.close()
    finally:
        proxy.close()


def test_postgres_restart_under_load_routes_on_and_writes_recover(world, replicas):
    r1, r2 = replicas(2, poll_s=0.3)
    clients = [RouterClient(h.target, timeout=30) for h in (r1, r2)]
    create_library(clients[0], world)
    v = put(clients[0], world, "shared-a0")
    assert until(lambda: _version(clients[1]) == v)
    x = activations(world)
    stop, routed, failed = threading.Event(), [0], []

    def load(c: RouterClient) -> None:
        while not stop.is_set():
            try:
                c.route(LIB, x)
                routed[0] += 1
            except SeqrError as e:
                failed.append(e)

    threads = [threading.Thread(target=load, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    try:
        replicas.cluster.stop("fast")
        with pytest.raises(UnavailableError, match="database .* unavailable .* not applied"):
            clients[1].put_adapter(world.adapters["shared-a1"], name="during", library=LIB)
        during = routed[0]
        replicas.cluster.start()

        def write() -> bool:
            try:
                clients[1].put_adapter(world.adapters["shared-a1"], name="after", library=LIB)
                return True
            except UnavailableError:
                return False
        assert until(write)
        assert until(lambda: {a.name for a in clients[0].describe(LIB).adapters} == {"shared-a0", "after"})
        assert until(lambda: routed[0] > during + 10)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failed == [] and routed[0] > 0
    for c in clients:
        c.close()


def test_an_old_manifest_row_is_data_loss_and_the_replica_keeps_its_last_good_snapshot(world, replicas):
    r1, r2 = replicas(2)
    c1, c2 = RouterClient(r1.target, timeout=30), RouterClient(r2.target, timeout=30)
    create_library(c1, world)
    ((old,),) = replicas.cluster.sql("SELECT sealed FROM seqr_manifest", schema=replicas.schema)
    v = put(c1, world, "shared-a0")
    assert until(lambda: _version(c2) == v)
    replicas.cluster.sql("UPDATE seqr_manifest SET sealed = %s, seq = seq - 1", bytes(old), schema=replicas.schema)
    with pytest.raises(IntegrityError, match="older"):
        c2.put_adapter(world.adapters["shared-a1"], name="x", library=LIB)
    assert until(lambda: c1.health("seqr.replica") == "NOT_SERVING")
    assert c1.route(LIB, activations(world)).library_version == v          # never the replayed state
    c1.close()
    c2.close()


def test_a_process_groups_shared_directory_follows_every_member(world, tmp_path, start_server):
    key = tmp_path / "kek.json"
    init_key_file(key)
    shared = StoreConfig(shared=True, poll_s=0.2)
    a, b = (start_server(tmp_path / "data", keys=KeySource(key_file=key), store=shared,
                         audit_log=tmp_path / f"audit{i}.log") for i in range(2))     # one writer per log
    with RouterClient(a.target, timeout=30) as ca, RouterClient(b.target, timeout=30) as cb:
        create_library(ca, world)
        v = put(cb, world, "shared-a0")
        assert until(lambda: _version(ca) == v)
        assert ca.put_adapter(world.adapters["shared-a1"], name="shared-a1", library=LIB).adapter_id == 1
        assert until(lambda: [x.adapter_id for x in cb.describe(LIB).adapters] == [0, 1])
        assert cb.route(LIB, activations(world)).library_version == v + 1


def test_an_exclusive_directory_still_refuses_a_second_server(tmp_path, start_server):
    start_server(tmp_path / "data")
    with pytest.raises(FailedPreconditionError, match="already open"):
        start_server(tmp_path / "data", store=StoreConfig(shared=True), audit_log=tmp_path / "other.audit.log")


def test_keys_rotate_runs_beside_the_replicas_and_backup_names_the_database(world, replicas, tmp_path, capsys):
    from seqr_cli.main import main
    from seqr_server.store import KeyFileProvider

    new_key = KeyFileProvider(tmp_path / "kek.json").add_key()     # step 1: every replica holds the new KEK
    r1, r2 = replicas(2)
    c1, c2 = RouterClient(r1.target, timeout=30), RouterClient(r2.target, timeout=30)
    create_library(c1, world)
    put(c1, world, "shared-a0")
    dsn = replicas.cluster.dsn(replicas.schema)
    ops = ["--store-dsn", dsn, "--key-file", str(tmp_path / "kek.json"), "--anchor-dir", str(tmp_path / "ops")]
    assert main(["keys", "rotate", "--to", new_key, *ops]) == 0          # step 2: while they serve
    assert json.loads(capsys.readouterr().out)["key_ids_in_use"] == [new_key]
    v = put(c2, world, "shared-a1")                                      # both follow and write on
    assert until(lambda: _version(c1) == v)
    assert {c.name for c in c1.route(LIB, activations(world), top_k=2).choices} == {"shared-a0", "shared-a1"}
    for command in (["backup", str(tmp_path / "b.tar")], ["restore", str(tmp_path / "b.tar")]):
        assert main([*command, *ops]) == 1
        err = json.loads(capsys.readouterr().err)
        assert err["error"] == "FAILED_PRECONDITION" and err["field"] == "store_dsn"
        assert "--store-dsn" in err["message"] and "pg_dump" in err["message"]
    assert not (tmp_path / "b.tar").exists()
    c1.close()
    c2.close()
