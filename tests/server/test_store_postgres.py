"""The store on a real PostgreSQL: same behaviour as the directory store, writers on two
"hosts" serialised, ciphertext only in the database, and tampered rows fail with DATA_LOSS."""

from __future__ import annotations

import hashlib
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from seqr_core.errors import AlreadyExistsError, IntegrityError, UnavailableError
from seqr_server.store import (KeyFileProvider, LibraryStore, MissingBlobError, RollbackError, TamperedBlobError,
                               init_key_file)

from ..postgres import Cluster, Proxy, cluster

FILES = {"adapter_config.json": b'{"r": 8, "secret_marker": "cfg-7f3a"}',
         "adapter_model.safetensors": b"weights-marker-91c2" * 200}


@dataclass
class Db:
    cluster: Cluster
    name: str
    keys: KeyFileProvider
    root: Path

    @property
    def dsn(self) -> str:
        return self.cluster.dsn(self.name)

    def connect(self, host: str = "host-a", *, dsn: str | None = None, **kw) -> LibraryStore:
        """A store as one host sees it: its own anchor directory."""
        return LibraryStore.connect(dsn or self.dsn, self.keys, anchor_dir=self.root / host / "anchors", **kw)

    def sql(self, statement: str, *args):
        return self.cluster.sql(statement, *args, schema=self.name)


@pytest.fixture
def db(tmp_path):
    c = cluster()
    name = c.new_schema()
    key_path = tmp_path / "keys" / "kek.json"
    init_key_file(key_path)
    yield Db(c, name, KeyFileProvider(key_path), tmp_path)
    c.drop_schema(name)


@pytest.fixture
def lib(db):
    with db.connect() as s:
        s.create_library("lib", meta={"base_model": "tiny-meta-marker"}, objects={"shared_a": b"shared-a-marker"})
        s.put_adapter("lib", "alpha-adapter", files=FILES, meta={"owner": "team-owner-marker"})
        s.put_adapter("lib", "beta-adapter", files=FILES, meta={})
    return db


def _blob_names(db: Db) -> list[str]:
    return [r[0] for r in db.sql("SELECT name FROM seqr_blobs ORDER BY name")]


def test_round_trip_and_ids_never_reused(lib):
    with lib.connect() as s:
        assert s.medium == "postgres" and s.shared
        assert s.read_adapter_files("lib", "alpha-adapter") == FILES
        assert s.read_library_object("lib", "shared_a") == b"shared-a-marker"
        s.delete_adapter("lib", "beta-adapter")
        rec = s.put_adapter("lib", "gamma", files=FILES, meta={})
        assert rec.adapter_id == 2
        assert s.library("lib").version == 5
        assert s.verify() == {"checked": 5, "failed": []}


def test_state_survives_reconnect_and_replaced_blobs_are_deleted(lib):
    with lib.connect() as s:
        before = set(_blob_names(lib))
        s.delete_adapter("lib", "beta-adapter")
        seq = s.manifest_seq
    assert len(before) - len(_blob_names(lib)) == 2           # both files crypto-shredded
    with lib.connect() as s:
        assert s.manifest_seq == seq and [a.name for a in s.library("lib").adapters] == ["alpha-adapter"]


def test_a_second_host_follows_commits_and_is_woken_by_notify(lib):
    with lib.connect("host-a") as a, lib.connect("host-b") as b:
        assert not b.refresh()
        a.put_adapter("lib", "gamma", files=FILES, meta={})
        assert b.wait_for_commit(30)                          # the NOTIFY, not the timeout
        assert b.refresh()
        assert b.manifest_seq == a.manifest_seq
        assert b.read_adapter_files("lib", "gamma") == FILES


def test_writers_on_two_hosts_are_serialised_and_never_reuse_ids(lib):
    a, b = lib.connect("host-a"), lib.connect("host-b")
    errors: list[BaseException] = []

    def put(store: LibraryStore, prefix: str) -> None:
        for i in range(8):
            try:
                store.put_adapter("lib", f"{prefix}-{i}", files={"adapter_config.json": prefix.encode()}, meta={})
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)

    threads = [threading.Thread(target=put, args=(s, p)) for s, p in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    a.refresh()
    b.refresh()
    ids = [r.adapter_id for r in a.library("lib").adapters]
    assert ids == sorted(set(ids)) and len(ids) == 18        # 2 + 16, every one kept, none reused
    assert a.library("lib") == b.library("lib")
    assert a.library("lib").version == 1 + 2 + 16
    a.close()
    b.close()


def test_a_writer_behind_the_head_edits_the_latest_state(lib):
    with lib.connect("host-a") as a, lib.connect("host-b") as b:
        a.put_adapter("lib", "from-a", files=FILES, meta={})
        with pytest.raises(AlreadyExistsError):                # b has not refreshed, yet sees a's adapter
            b.put_adapter("lib", "from-a", files=FILES, meta={})
        assert b.put_adapter("lib", "from-b", files=FILES, meta={}).adapter_id == 3


def test_the_database_holds_only_ciphertext(lib):
    needles = [b"alpha-adapter", b"beta-adapter", b"tiny-meta-marker", b"team-owner-marker", b"shared-a-marker",
               b"weights-marker-91c2", b"cfg-7f3a", b'"lib"', hashlib.sha256(FILES["adapter_config.json"]).hexdigest().encode()]
    rows = lib.sql("SELECT name::bytea, sealed FROM seqr_blobs UNION ALL SELECT seq::text::bytea, sealed FROM seqr_manifest")
    stored = b"\n".join(bytes(col) for row in rows for col in row)
    assert len(rows) == 6 and not [n for n in needles if n in stored]
    bindir = subprocess.run(["scripts/postgres.sh", "bindir"], capture_output=True, text=True, check=True).stdout.strip()
    dump = subprocess.run([f"{bindir}/pg_dump", "-h", "127.0.0.1", "-p", str(lib.cluster.port), "-U", "postgres",
                           "-n", lib.name, "seqr_tests"], capture_output=True, check=True).stdout
    assert b"seqr_blobs" in dump
    assert not [n for n in needles if n in dump or n.hex().encode() in dump]


# --------------------------------------------------------------------------- tampering
def _flip(data: bytes) -> bytes:
    return data[:-20] + bytes([data[-20] ^ 4]) + data[-19:]


def _tamper_blob(mutate: Callable[[bytes], bytes]) -> Callable[[Db], None]:
    def apply(db: Db) -> None:
        with db.connect() as s:
            name = s.blob_name("lib", adapter="alpha-adapter", file="adapter_model.safetensors")
        (sealed,), = db.sql("SELECT sealed FROM seqr_blobs WHERE name = %s", name)
        db.sql("UPDATE seqr_blobs SET sealed = %s WHERE name = %s", mutate(bytes(sealed)), name)
    return apply


def _swap_rows(db: Db) -> None:
    with db.connect() as s:
        x = s.blob_name("lib", adapter="alpha-adapter", file="adapter_model.safetensors")
        y = s.blob_name("lib", adapter="beta-adapter", file="adapter_model.safetensors")
    db.sql("UPDATE seqr_blobs b SET sealed = o.sealed FROM seqr_blobs o WHERE (b.name, o.name) IN ((%s, %s), (%s, %s))",
           x, y, y, x)


def _older_version_of_row(db: Db) -> None:
    with db.connect() as s:
        old = s.blob_name("lib", adapter="alpha-adapter", file="adapter_config.json")
        (sealed,), = db.sql("SELECT sealed FROM seqr_blobs WHERE name = %s", old)
        s.delete_adapter("lib", "alpha-adapter")
        s.put_adapter("lib", "alpha-adapter", files=FILES, meta={})    # same name, new id and version
        new = s.blob_name("lib", adapter="alpha-adapter", file="adapter_config.json")
    db.sql("UPDATE seqr_blobs SET sealed = %s WHERE name = %s", bytes(sealed), new)


def _drop_row(db: Db) -> None:
    with db.connect() as s:
        name = s.blob_name("lib", adapter="alpha-adapter", file="adapter_config.json")
    db.sql("DELETE FROM seqr_blobs WHERE name = %s", name)


BLOB_TAMPERING = {
    "bit_flip": (_tamper_blob(_flip), TamperedBlobError),
    "truncated": (_tamper_blob(lambda b: b[:-1]), TamperedBlobError),
    "appended": (_tamper_blob(lambda b: b + b"\0"), TamperedBlobError),
    "swapped_rows": (_swap_rows, IntegrityError),
    "older_version_of_object": (_older_version_of_row, IntegrityError),
    "deleted_row": (_drop_row, MissingBlobError),
}


@pytest.mark.parametrize("case", BLOB_TAMPERING, ids=list(BLOB_TAMPERING))
def test_a_tampered_blob_row_fails_with_data_loss(lib, case):
    tamper, error = BLOB_TAMPERING[case]
    tamper(lib)
    with lib.connect() as s, pytest.raises(error) as e:
        s.read_adapter_files("lib", "alpha-adapter")
    assert e.value.code == "DATA_LOSS"


def test_an_old_manifest_row_is_refused_by_every_host_that_saw_a_newer_one(lib):
    (old,), = lib.sql("SELECT sealed FROM seqr_manifest")
    with lib.connect("host-a") as a, lib.connect("host-b") as b:
        a.delete_adapter("lib", "beta-adapter")
        b.refresh()
        lib.sql("UPDATE seqr_manifest SET sealed = %s, seq = seq - 1", bytes(old))
        with pytest.raises(RollbackError, match="older"):
            b.refresh()
        with pytest.raises(RollbackError):
            a.put_adapter("lib", "new", files=FILES, meta={})
        assert [x.name for x in b.library("lib").adapters] == ["alpha-adapter"]   # still the last good state
    with pytest.raises(RollbackError, match="older than the last committed"):
        lib.connect("host-a")


@pytest.mark.parametrize("edit", [
    "UPDATE seqr_manifest SET seq = seq + 1",
    "UPDATE seqr_manifest SET sealed = set_byte(sealed, length(sealed) - 3, get_byte(sealed, length(sealed) - 3) # 1)",
])
def test_an_edited_manifest_row_fails_with_data_loss(lib, edit):
    lib.sql(edit)
    with pytest.raises(IntegrityError) as e:
        lib.connect("host-a")
    assert e.value.code == "DATA_LOSS"


def test_a_manifest_row_of_another_store_is_refused(lib, tmp_path):
    other = Db(lib.cluster, lib.cluster.new_schema(), lib.keys, tmp_path / "other")
    try:
        with other.connect():
            pass
        (foreign,), = other.sql("SELECT sealed FROM seqr_manifest")
        lib.sql("UPDATE seqr_manifest SET sealed = %s, seq = 1", bytes(foreign))
        with pytest.raises(RollbackError, match="different store"):
            lib.connect("host-a")
    finally:
        lib.cluster.drop_schema(other.name)


def test_writes_while_the_database_is_down_are_unavailable_and_reads_keep_working(lib):
    proxy = Proxy(lib.cluster.port)
    try:
        with lib.connect("host-a", dsn=lib.cluster.dsn(lib.name, port=proxy.port)) as s:
            proxy.down()
            with pytest.raises(UnavailableError, match="database .* is unavailable.*not applied"):
                s.put_adapter("lib", "while-down", files=FILES, meta={})
            with pytest.raises(UnavailableError):
                s.refresh()
            assert [a.name for a in s.library("lib").adapters] == ["alpha-adapter", "beta-adapter"]
            proxy.heal()
            assert s.put_adapter("lib", "after", files=FILES, meta={}).adapter_id == 2
    finally:
        proxy.close()
