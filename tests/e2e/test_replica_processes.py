"""Replicas as real processes: kill -9 under load, and `seqr serve --processes N` on one port."""

from __future__ import annotations

import json
import threading

import pytest

from seqr_cli.main import main
from seqr_client import RouterClient, SeqrError
from seqr_server.store import init_key_file

from ..netns import Hosts
from ..postgres import Proxy, cluster
from .conftest import LIB, activations, create_library
from .processes import serve
from .test_replicas import put, until


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "kek.json"
    init_key_file(path)
    return path


def _load(client: RouterClient, x, stop: threading.Event, done: list, failed: list) -> None:
    while not stop.is_set():
        try:
            client.route(LIB, x)
            done.append(1)
        except SeqrError as e:
            failed.append(e)


@pytest.fixture
def hosts():
    """Three separate test hosts (network namespaces) where this machine can make them, else None."""
    if not Hosts.available():
        yield None
        return
    h = Hosts()
    yield h
    h.close()


def test_kill_9_of_a_replica_under_load_fails_no_route(world, tmp_path, key, hosts):
    c = cluster()
    schema = c.new_schema()
    started, proxies = [], []
    try:
        for i in range(3):
            where: dict = {}
            open_: list[str] = []
            dsn = c.dsn(schema)
            if hosts is not None:          # its own network stack, reaching the database over a veth
                h = hosts.add()
                proxies.append(Proxy(c.port, bind=h.gateway))
                dsn = c.dsn(schema, host=h.gateway, port=proxies[-1].port)
                where = {"host": h.address, "wrap": h.command}
                open_ = ["--insecure-open"]    # off loopback, but on a private test network
            started.append(serve(["--store-dsn", dsn, "--key-file", str(key), "--no-demo",
                                  "--anchor-dir", str(tmp_path / f"host{i}" / "anchors"), "--poll-interval", "0.3",
                                  "--metrics-port", "0",
                                  "--data-dir", str(tmp_path / f"host{i}" / "data"), *open_], cwd=tmp_path, **where))
        with RouterClient(started[0].target, timeout=30) as admin:
            create_library(admin, world)
            v = put(admin, world, "shared-a0")
        # One channel over all three, round-robin, retrying Route on UNAVAILABLE (seqr_client's default).
        everyone = "ipv4:" + ",".join(s.target for s in started)
        x = activations(world)
        with RouterClient(everyone, timeout=30) as rr:
            assert until(lambda: all(RouterClient(s.target).describe(LIB).version == v for s in started))
            stop, done, failed = threading.Event(), [], []
            threads = [threading.Thread(target=_load, args=(rr, x, stop, done, failed)) for _ in range(4)]
            for t in threads:
                t.start()
            assert until(lambda: len(done) > 50)
            assert all(s.routes_served() > 0 for s in started)       # round-robin: each one serves
            started[1].kill9()
            killed_at = len(done)
            assert until(lambda: len(done) > killed_at + 200)
            stop.set()
            for t in threads:
                t.join()
        assert started[1].proc.wait(10) == -9
        assert failed == [] and len(done) > killed_at
    finally:
        for s in started:
            s.stop()
        for p in proxies:
            p.close()
        c.drop_schema(schema)


def test_a_process_group_serves_one_port_follows_its_writes_and_restarts_a_killed_member(world, tmp_path, key):
    group = serve(["--processes", "2", "--key-file", str(key), "--no-demo", "--poll-interval", "0.2",
                   "--data-dir", str(tmp_path / "data")], cwd=tmp_path)
    try:
        assert len(group.pids) == 2 and group.proc.pid not in group.pids
        with RouterClient(group.target, timeout=30) as admin:
            create_library(admin, world)
            v = put(admin, world, "shared-a0")

        def every_connection_serves(version: int) -> bool:
            # Fresh connections land on either member (the kernel spreads them).
            for _ in range(8):
                with RouterClient(group.target, timeout=30) as c:
                    try:
                        if c.route(LIB, activations(world)).library_version != version:
                            return False
                    except SeqrError:             # that member has not seen the library yet
                        return False
            return True
        assert until(lambda: every_connection_serves(v))

        group.kill9(group.pids[0])
        assert until(lambda: len(group.logged("process serving")) == 3)        # the parent restarted it
        with RouterClient(group.target, timeout=30) as admin:
            v2 = put(admin, world, "shared-a1")
        assert until(lambda: every_connection_serves(v2))
    finally:
        group.stop()
    assert group.proc.returncode == 0 and group.logged("stopped")
    # One hash chain per member (one writer per file); the writes are in the members' logs.
    logs = sorted(tmp_path.glob("data.audit.*"))
    assert [p.name for p in logs] == ["data.audit.p0.log", "data.audit.p1.log"]
    assert all(main(["audit", "verify", str(p)]) == 0 for p in logs)
    actions = [json.loads(line).get("action") for p in logs for line in p.read_text().splitlines()]
    assert actions.count("CreateLibrary") == 2 and actions.count("PutAdapter") == 4   # intent + result each
