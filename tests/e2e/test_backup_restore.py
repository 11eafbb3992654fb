"""`seqr backup` / `seqr restore` / `seqr keys rotate` against real stores and a real server.

A backup taken while the server runs, restored onto a new directory, serves the same library
version and routes to the same choices with the same scores; it carries key ids, never keys.
Tampered backups, missing keys, non-empty targets and rollbacks fail closed before anything
is written.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tarfile

import pytest

from seqr_cli.main import main
from seqr_client import RouterClient
from seqr_server.config import KeySource
from seqr_server.store import init_key_file

from .conftest import LIB, activations, populate


def _run(capsys, *argv) -> tuple[int, dict]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else json.loads(err.strip().splitlines()[-1]))


def _route(h, world):
    with RouterClient(h.target) as c:
        r = c.route(LIB, activations(world), top_k=3)
    return r.library_version, [(ch.name, ch.adapter_id, ch.score) for ch in r.choices]


@pytest.fixture
def backed_up(world, start_server, tmp_path, capsys):
    """(key file, data dir, backup file, routing answer): backup taken while the server serves."""
    kek = tmp_path / "keys" / "kek.json"
    init_key_file(kek)
    data = tmp_path / "data"
    h = start_server(data, keys=KeySource(key_file=kek))
    populate(h, world).close()
    answer = _route(h, world)
    rc, doc = _run(capsys, "backup", tmp_path / "b.tar", "--data-dir", data, "--key-file", kek)
    assert rc == 0, doc
    h.stop(grace=1.0)
    return kek, data, tmp_path / "b.tar", answer


def test_restored_store_routes_identically(world, start_server, backed_up, tmp_path, capsys):
    kek, _, backup, answer = backed_up
    rc, doc = _run(capsys, "restore", backup, "--data-dir", tmp_path / "restored", "--key-file", kek)
    assert rc == 0, doc
    assert doc["libraries"] == 1 and doc["blobs_verified"] > len(world.adapters)
    h = start_server(tmp_path / "restored", keys=KeySource(key_file=kek))
    assert _route(h, world) == answer
    # the routing index objects came back too: the restored store starts without PEFT files
    assert all(a.objects == ("index",) for a in h.manager._store.library(LIB).adapters)


def test_backup_holds_key_ids_but_no_key_material(backed_up):
    kek, _, backup, _ = backed_up
    keyfile = json.loads(kek.read_text())
    secrets = [base64.b64decode(k["key"]) for k in keyfile["keys"]] + [k["key"].encode() for k in keyfile["keys"]]
    with tarfile.open(backup) as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    index = json.loads(blobs["seqr-backup.json"])
    assert index["key_ids"] == [keyfile["primary"]]
    assert index["anchor"]["seq"] == index["manifest_seq"]
    assert not [n for n, b in blobs.items() for s in secrets if s in b]
    assert LIB.encode() not in blobs["seqr-backup.json"]      # names stay sealed


def _tamper(backup) -> None:
    """Flip the last bit of the first blob, rewriting the tar around it."""
    with tarfile.open(backup) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = next(m.name for m, _ in members if m.name.startswith("blobs/"))
    with tarfile.open(backup, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data[:-1] + bytes([data[-1] ^ 1]) if m.name == first else data))


def _other_key(tmp_path):
    init_key_file(tmp_path / "other.json")
    return tmp_path / "other.json"


@pytest.mark.parametrize("case,code,field", [
    ("tampered blob", "DATA_LOSS", "blobs/"),
    ("another key file", "FAILED_PRECONDITION", "key_id"),
    ("non-empty target", "FAILED_PRECONDITION", "data_dir"),
    ("rollback of the original path", "DATA_LOSS", "data_dir"),
])
def test_bad_restores_fail_closed_before_writing(case, code, field, backed_up, world, start_server, tmp_path, capsys):
    kek, data, backup, _ = backed_up
    target, key = tmp_path / "new", kek
    if case == "tampered blob":
        _tamper(backup)
    elif case == "another key file":
        key = _other_key(tmp_path)
    elif case == "non-empty target":
        target.mkdir()
        (target / "x").write_text("x")
    else:   # one more commit after the backup, then the directory is lost and the old backup restored
        h = start_server(data, keys=KeySource(key_file=kek))
        with RouterClient(h.target) as c:
            c.delete_adapter(world.shared_names[0], library=LIB)
        h.stop(grace=1.0)
        shutil.rmtree(data)
        target = data
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, err = _run(capsys, "restore", backup, "--data-dir", target, "--key-file", key)
    assert rc == 1 and err["error"] == code and err["field"].startswith(field), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "rollback of the original path":
        rc, doc = _run(capsys, "restore", backup, "--data-dir", target, "--key-file", key, "--accept-rollback")
        assert rc == 0 and doc["manifest_seq"] == json.loads(tarfile.open(backup).extractfile(
            "seqr-backup.json").read())["manifest_seq"]


def test_keys_rotate_reencrypts_retires_and_keeps_routing(backed_up, world, start_server, tmp_path, capsys):
    kek, data, backup, answer = backed_up
    old = json.loads(kek.read_text())["primary"]
    rc, doc = _run(capsys, "keys", "rotate", "--data-dir", data, "--key-file", kek, "--retire-old")
    assert rc == 0, doc
    new = doc["added_key_id"]
    assert doc["primary_key_id"] == new != old and doc["resealed"] > len(world.adapters)
    assert doc["retired_key_ids"] == [old] and doc["key_ids"] == [new] == doc["key_ids_in_use"]
    assert json.loads(kek.read_text())["primary"] == new
    h = start_server(data, keys=KeySource(key_file=kek))
    assert _route(h, world)[1] == answer[1]
    assert all(a.objects == ("index",) for a in h.manager._store.library(LIB).adapters)
    h.stop(grace=1.0)
    # A backup from before the rotation needs the retired key: restore says which one is missing.
    rc, err = _run(capsys, "restore", backup, "--data-dir", tmp_path / "r2", "--key-file", kek)
    assert rc == 1 and err["error"] == "FAILED_PRECONDITION" and old in err["message"]


def test_keys_rotate_needs_the_server_stopped(backed_up, start_server, capsys):
    kek, data, _, _ = backed_up
    start_server(data, keys=KeySource(key_file=kek))
    rc, err = _run(capsys, "keys", "rotate", "--data-dir", data, "--key-file", kek)
    assert rc == 1 and err["error"] == "FAILED_PRECONDITION" and "already open" in err["message"]
