"""Injected I/O errors at every step of a commit: the operation is never acknowledged, the last
committed state stays readable, and fsync errors (or anything after the commit point) fail-stop."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

import pytest

from seqr_core.errors import UnavailableError
from seqr_server.store import FailPoints, FailStopError, KeyFileProvider, LibraryStore, init_key_file
from seqr_server.store.durable_io import is_temp_name
from seqr_server.store.testing import iter_files

OLD = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"old weights" * 100}
NEW = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"new weights" * 100}


@dataclass(frozen=True)
class Env:
    data_dir: Path
    key_path: Path

    @property
    def anchor_dir(self) -> Path:
        return self.key_path.with_name(self.key_path.name + ".anchors")

    def open(self, failpoints: FailPoints | None = None) -> LibraryStore:
        return LibraryStore.open(self.data_dir, KeyFileProvider(self.key_path), failpoints=failpoints)


@pytest.fixture
def env(tmp_path) -> Env:
    key_path = tmp_path / "keys" / "kek.json"
    init_key_file(key_path)
    e = Env(tmp_path / "data", key_path)
    with e.open() as store:
        store.create_library("lib", meta={})
        store.put_adapter("lib", "old", files=OLD, meta={})
    return e


def _is_blob(p: Path) -> bool:
    return p.suffix == ".blob"


def _is_manifest(p: Path) -> bool:
    return p.name == "MANIFEST"


def _is_anchor(p: Path) -> bool:
    return p.suffix == ".anchor"


def _is_dir(name: str):
    return lambda p: p.name == name


# (point, target predicate, operation, fatal, outcome after reopen)
# "old": the operation left no trace; "new": the manifest rename happened, so restart shows it.
CASES = [
    ("write", _is_blob, "put", False, "old"),
    ("fsync", _is_blob, "put", True, "old"),
    ("rename", _is_blob, "put", False, "old"),
    ("dir_fsync", _is_dir("blobs"), "put", True, "old"),
    ("write", _is_manifest, "put", False, "old"),
    ("fsync", _is_manifest, "put", True, "old"),
    ("rename", _is_manifest, "put", False, "old"),
    ("dir_fsync", _is_dir("data"), "put", True, "new"),
    ("write", _is_anchor, "put", True, "new"),
    ("fsync", _is_anchor, "put", True, "new"),
    ("rename", _is_anchor, "put", True, "new"),
    ("dir_fsync", _is_dir("kek.json.anchors"), "put", True, "new"),
    ("write", _is_manifest, "delete", False, "old"),
    ("rename", _is_manifest, "delete", False, "old"),
    ("unlink", _is_blob, "delete", True, "new"),
    ("dir_fsync", _is_dir("blobs"), "delete", True, "new"),
]


def _case_id(case) -> str:
    point, where, op, _, _ = case
    target = {"_is_blob": "blob", "_is_manifest": "manifest", "_is_anchor": "anchor"}.get(where.__name__, "dir")
    return f"{op}-{point}-{target}"


def _run(store: LibraryStore, op: str) -> None:
    if op == "put":
        store.put_adapter("lib", "new", files=NEW, meta={})
    else:
        store.delete_adapter("lib", "old")


def _expected_adapters(op: str, outcome: str) -> dict[str, dict[str, bytes]]:
    if outcome == "old":
        return {"old": OLD}
    return {"old": OLD, "new": NEW} if op == "put" else {}


def _contents(store: LibraryStore) -> dict[str, dict[str, bytes]]:
    return {a.name: store.read_adapter_files("lib", a.name) for a in store.library("lib").adapters}


def _temp_files(*roots: Path) -> list[Path]:
    return [p for p in iter_files(*roots) if is_temp_name(p.name)]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_injected_io_error_leaves_operation_unacknowledged(env, case):
    point, where, op, fatal, outcome = case
    failpoints = FailPoints()
    store = env.open(failpoints)
    version = store.library("lib").version
    failpoints.arm(point, where=where, error=OSError(errno.EIO, "injected"))
    with pytest.raises(UnavailableError):
        _run(store, op)
    if fatal:
        with pytest.raises(FailStopError, match="restart"):
            store.library("lib")
        with pytest.raises(FailStopError):
            store.read_adapter_files("lib", "old")
    else:
        # Not fatal: nothing changed, nothing left behind, and the store keeps working.
        assert store.library("lib").version == version
        assert _contents(store) == {"old": OLD}
        assert _temp_files(env.data_dir, env.anchor_dir) == []
        assert len(list((env.data_dir / "blobs").iterdir())) == len(OLD)
    store.close()
    with env.open() as reopened:
        assert _contents(reopened) == _expected_adapters(op, outcome)
        assert _temp_files(env.data_dir, env.anchor_dir) == []
        expected_blobs = sum(len(files) for files in _expected_adapters(op, outcome).values())
        assert len(list((env.data_dir / "blobs").iterdir())) == expected_blobs
        reopened.put_adapter("lib", "after", files=NEW, meta={})  # healthy again after restart


def test_non_fatal_error_can_be_retried_by_the_caller(env):
    failpoints = FailPoints()
    with env.open(failpoints) as store:
        failpoints.arm("write", where=_is_manifest, error=OSError(errno.ENOSPC, "disk full"))
        with pytest.raises(UnavailableError, match="No space|disk full"):
            store.put_adapter("lib", "new", files=NEW, meta={})
        store.put_adapter("lib", "new", files=NEW, meta={})
        assert _contents(store) == {"old": OLD, "new": NEW}


def test_fsync_error_is_never_retried(env):
    failpoints = FailPoints()
    store = env.open(failpoints)
    failpoints.arm("fsync", where=_is_blob, error=OSError(errno.EIO, "injected"))
    with pytest.raises(FailStopError):
        store.put_adapter("lib", "new", files=NEW, meta={})
    for call in (lambda: store.put_adapter("lib", "x", files=NEW, meta={}), store.list_libraries,
                 lambda: store.read_library_object("lib", "calibration"), store.rotate_kek):
        with pytest.raises(FailStopError):
            call()
    store.close()


def test_failed_rotation_leaves_old_keys_in_use(env):
    keys = KeyFileProvider(env.key_path)
    old_key = keys.primary_key_id
    failpoints = FailPoints()
    with LibraryStore.open(env.data_dir, keys, failpoints=failpoints) as store:
        new_key = keys.add_key()
        failpoints.arm("rename", where=_is_blob, error=OSError(errno.EIO, "injected"), times=1)
        with pytest.raises(UnavailableError):
            store.rotate_kek(new_key)
        assert store.key_ids_in_use() == {old_key}
        assert _contents(store) == {"old": OLD}
        assert len(list((env.data_dir / "blobs").iterdir())) == len(OLD)
        store.rotate_kek(new_key)  # a second attempt completes
        assert store.key_ids_in_use() == {new_key}
