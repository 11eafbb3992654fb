"""Canary and crypto-shredding: random 32-byte sentinels and every data key are searched for in
every file the store ever writes (including temp files, caught at the moment of their rename),
through puts, rotation, deletes and key retirement. Nothing must ever be found; after a delete
nothing left on disk can bring the adapter back."""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import pytest

from seqr_core.errors import NotFoundError
from seqr_server.store import (FailPointHit, FailPoints, KeyFileProvider, KeyProvider, LibraryStore, WrongKeyError,
                               init_key_file)
from seqr_server.store.envelope import parse_header, wrap_aad
from seqr_server.store.manifest import adapter_context
from seqr_server.store.testing import find_needles


class SpyKeys(KeyProvider):
    """Records every data key that passes through, so the test can search the disk for them."""

    def __init__(self, inner: KeyFileProvider):
        self.inner = inner
        self.anchor_dir = inner.anchor_dir
        self.data_keys: set[bytes] = set()

    @property
    def primary_key_id(self) -> str:
        return self.inner.primary_key_id

    def key_ids(self) -> list[str]:
        return self.inner.key_ids()

    def wrap(self, data_key: bytes, *, aad: bytes) -> tuple[str, bytes]:
        self.data_keys.add(data_key)
        return self.inner.wrap(data_key, aad=aad)

    def unwrap(self, key_id: str, wrapped: bytes, *, aad: bytes) -> bytes:
        data_key = self.inner.unwrap(key_id, wrapped, aad=aad)
        self.data_keys.add(data_key)
        return data_key

    def set_primary(self, key_id: str) -> None:
        self.inner.set_primary(key_id)


def _with_sentinel(rng: random.Random, sentinel: bytes, size: int = 4000) -> bytes:
    body = bytearray(rng.randbytes(size))
    at = rng.randrange(size - len(sentinel))
    body[at:at + len(sentinel)] = sentinel
    return bytes(body)


def _encodings(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), base64.b64encode(secret)]


class Canary:
    def __init__(self, tmp_path: Path):
        self.key_path = tmp_path / "keys" / "kek.json"
        init_key_file(self.key_path)
        self.data_dir = tmp_path / "data"
        self.keys = SpyKeys(KeyFileProvider(self.key_path))
        self.failpoints = FailPoints()
        self.sentinels: list[bytes] = []
        self.temp_hits: list[tuple[Path, bytes]] = []
        self.temps_checked = 0
        # Every temp file is complete when it is renamed: search it right then.
        self.failpoints.arm("rename", times=10**9, action=self._search_temp)
        self.store = LibraryStore.open(self.data_dir, self.keys, failpoints=self.failpoints)

    def _search_temp(self, hit: FailPointHit) -> None:
        data = hit.temp.read_bytes()
        self.temps_checked += 1
        self.temp_hits += [(hit.temp, n) for n in self.needles() if n in data]

    def sentinel(self) -> bytes:
        s = os.urandom(32)
        self.sentinels.append(s)
        return s

    def needles(self) -> list[bytes]:
        return [e for s in self.sentinels for e in _encodings(s)] + list(self.keys.data_keys)

    def keks(self) -> list[bytes]:
        """Every KEK in the key file right now (raw and encoded)."""
        entries = json.loads(self.key_path.read_text())["keys"]
        return [e for entry in entries for e in _encodings(base64.b64decode(entry["key"]))]

    def assert_nothing_leaked(self) -> None:
        assert self.temp_hits == []
        assert find_needles(self.needles() + self.keks(), self.data_dir, self.keys.anchor_dir) == []
        assert find_needles(self.needles(), self.key_path.parent) == []


@pytest.fixture
def canary(tmp_path) -> Canary:
    c = Canary(tmp_path)
    yield c
    c.store.close()


def _put_canaries(c: Canary, rng: random.Random, n: int) -> list[str]:
    names = []
    for i in range(n):
        name = f"canary-{c.sentinel().hex()}"  # names and metadata are secret too
        files = {"adapter_config.json": _with_sentinel(rng, c.sentinel(), 300),
                 "adapter_model.safetensors": _with_sentinel(rng, c.sentinel())}
        c.store.put_adapter("lib", name, files=files, meta={"note": c.sentinel().hex()})
        names.append(name)
    return names


def test_sentinels_and_keys_never_reach_disk(canary):
    rng = random.Random(5)
    objects = {role: _with_sentinel(rng, canary.sentinel()) for role in ("shared_a", "calibration")}
    canary.store.create_library("lib", meta={"owner": canary.sentinel().hex()}, objects=objects)
    names = _put_canaries(canary, rng, 6)
    canary.store.put_library_object("lib", "onnx_scorer", _with_sentinel(rng, canary.sentinel()))
    canary.assert_nothing_leaked()

    old_key = canary.keys.primary_key_id
    canary.store.rotate_kek(canary.keys.inner.add_key())
    canary.assert_nothing_leaked()

    for name in names[:3]:
        canary.store.delete_adapter("lib", name)
    canary.store.put_library_object("lib", "calibration", _with_sentinel(rng, canary.sentinel()))
    canary.assert_nothing_leaked()

    canary.keys.inner.retire_key(old_key)
    canary.assert_nothing_leaked()
    assert canary.temps_checked > 40 and len(canary.keys.data_keys) > 20  # the searches really ran


def test_deleted_adapter_leaves_nothing_recoverable(canary):
    rng = random.Random(6)
    canary.store.create_library("lib", meta={})
    keep, gone = _put_canaries(canary, rng, 2)
    paths = [canary.store.blob_path("lib", adapter=gone, file=f) for f in ("adapter_config.json",
                                                                          "adapter_model.safetensors")]
    wrapped_keys = [parse_header(p.read_bytes(), what="t")[0].wrapped_key for p in paths]
    version = canary.store.library("lib").version

    record = canary.store.delete_adapter("lib", gone)

    assert record.version == version + 1 and [a.name for a in record.adapters] == [keep]
    assert not any(p.exists() for p in paths)
    assert find_needles(wrapped_keys, canary.data_dir, canary.keys.anchor_dir) == []
    with pytest.raises(NotFoundError):
        canary.store.read_adapter_files("lib", gone)
    canary.store.close()
    with LibraryStore.open(canary.data_dir, KeyFileProvider(canary.key_path)) as reopened:
        assert [a.name for a in reopened.library("lib").adapters] == [keep]
        assert reopened.read_adapter_files("lib", keep)


def test_backup_copy_of_deleted_adapter_is_dead_once_its_kek_is_retired(canary):
    rng = random.Random(7)
    canary.store.create_library("lib", meta={})
    (name,) = _put_canaries(canary, rng, 1)
    adapter = canary.store.adapter("lib", name)
    path = canary.store.blob_path("lib", adapter=name, file="adapter_model.safetensors")
    backup = parse_header(path.read_bytes(), what="backup")[0]  # e.g. left in a nightly backup
    aad = wrap_aad(adapter_context(canary.store.store_id, "lib", name, adapter.adapter_id, "adapter_model.safetensors"),
                   backup.version)
    canary.store.delete_adapter("lib", name)
    # Honest limit: while the old KEK exists, a backup copy can still be unwrapped ...
    assert len(canary.keys.unwrap(backup.key_id, backup.wrapped_key, aad=aad)) == 32
    # ... rotating and retiring that KEK finishes the shred.
    canary.store.rotate_kek(canary.keys.inner.add_key())
    canary.keys.inner.retire_key(backup.key_id)
    with pytest.raises(WrongKeyError):
        canary.keys.unwrap(backup.key_id, backup.wrapped_key, aad=aad)


def test_deleted_library_shreds_all_its_blobs(canary):
    rng = random.Random(8)
    canary.store.create_library("lib", meta={}, objects={"shared_a": b"a" * 100})
    _put_canaries(canary, rng, 3)
    canary.store.create_library("other", meta={})
    canary.store.put_adapter("other", "x", files={"f": b"x" * 10}, meta={})
    canary.store.delete_library("lib")
    assert canary.store.list_libraries() == ["other"]
    assert len(list((canary.data_dir / "blobs").iterdir())) == 1
    canary.store.create_library("lib", meta={})  # the name is free again, starting from scratch
    assert canary.store.library("lib").adapters == () and canary.store.library("lib").objects == ()


def test_replaced_library_object_is_shredded(canary):
    canary.store.create_library("lib", meta={}, objects={"calibration": b"first"})
    first = canary.store.blob_path("lib", role="calibration")
    canary.store.put_library_object("lib", "calibration", b"second")
    assert not first.exists()
    assert canary.store.read_library_object("lib", "calibration") == b"second"
    canary.store.delete_library_object("lib", "calibration")
    assert canary.store.read_library_object("lib", "calibration") is None
    assert list((canary.data_dir / "blobs").iterdir()) == []
