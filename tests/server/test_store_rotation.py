"""Online KEK rotation: routing threads keep reading throughout, and afterwards no object (on
disk or in the manifest) references the old key id, which can then be retired."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from seqr_core.errors import FailedPreconditionError
from seqr_server.store import (EnvKeyProvider, FailPoints, KeyFileProvider, LibraryStore, WrongKeyError,
                               init_key_file)
from seqr_server.store.envelope import parse_header

ADAPTERS = 24
READERS = 4
SYNC_TIMEOUT_S = 60  # only guards against a hang; never asserted as a duration


def _files(i: int) -> dict[str, bytes]:
    rng = random.Random(i)
    return {"adapter_config.json": f'{{"r": {i}}}'.encode(), "adapter_model.safetensors": rng.randbytes(4000)}


def _digest(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


@pytest.fixture
def key_path(tmp_path) -> Path:
    path = tmp_path / "keys" / "kek.json"
    init_key_file(path)
    return path


def _fill(store: LibraryStore) -> None:
    store.create_library("lib", meta={}, objects={"calibration": b"c" * 300, "shared_a": b"s" * 300})
    for i in range(ADAPTERS):
        store.put_adapter("lib", f"a{i}", files=_files(i), meta={})


def _header_key_ids(data_dir: Path) -> set[str]:
    paths = [data_dir / "MANIFEST", *sorted((data_dir / "blobs").iterdir())]
    return {parse_header(p.read_bytes(), what=str(p))[0].key_id for p in paths}


@dataclass
class Readers:
    """Routing stand-ins: read random adapters and check every byte, until told to stop."""

    store: LibraryStore
    reads: int = 0
    failures: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    progressed: threading.Condition = field(default_factory=threading.Condition)

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            i = rng.randrange(ADAPTERS)
            try:
                got = self.store.read_adapter_files("lib", f"a{i}")
                assert _digest(got) == _digest(_files(i))
                assert self.store.read_library_object("lib", "calibration") == b"c" * 300
            except BaseException as exc:  # noqa: BLE001 - collected and asserted on by the test
                self.failures.append(exc)
            with self.progressed:
                self.reads += 1
                self.progressed.notify_all()

    def wait_for_more(self, n: int) -> None:
        """Block until readers completed ``n`` more reads (proves they ran during this phase)."""
        with self.progressed:
            target = self.reads + n
            assert self.progressed.wait_for(lambda: self.reads >= target or self.failures, SYNC_TIMEOUT_S)


def test_rotation_keeps_readers_working_and_retires_old_key(tmp_path, key_path):
    keys = KeyFileProvider(key_path)
    old_key = keys.primary_key_id
    failpoints = FailPoints()
    store = LibraryStore.open(tmp_path / "data", keys, failpoints=failpoints)
    _fill(store)
    readers = Readers(store)
    threads = [threading.Thread(target=readers.run, args=(s,), daemon=True) for s in range(READERS)]
    for t in threads:
        t.start()
    # Pause rotation half-way (after some objects are re-sealed, before the commit) until the
    # readers have done real work against the half-rotated directory.
    failpoints.arm("rename", where=lambda p: p.suffix == ".blob", times=ADAPTERS,
                   action=lambda hit: readers.wait_for_more(2))
    readers.wait_for_more(20)
    new_key = keys.add_key()
    result = store.rotate_kek(new_key)
    readers.wait_for_more(20)
    keys.retire_key(old_key)
    readers.wait_for_more(20)
    readers.stop.set()
    for t in threads:
        t.join(SYNC_TIMEOUT_S)

    assert readers.failures == []
    assert result["resealed"] == ADAPTERS * 2 + 2 and result["already_current"] == 0
    assert store.key_ids_in_use() == {new_key}
    assert _header_key_ids(tmp_path / "data") == {new_key}
    store.close()
    reloaded = KeyFileProvider(key_path)
    assert reloaded.key_ids() == [new_key]
    with LibraryStore.open(tmp_path / "data", reloaded) as reopened:
        for i in range(ADAPTERS):
            assert _digest(reopened.read_adapter_files("lib", f"a{i}")) == _digest(_files(i))


def test_second_rotation_to_same_key_reseals_nothing(tmp_path, key_path):
    keys = KeyFileProvider(key_path)
    with LibraryStore.open(tmp_path / "data", keys) as store:
        _fill(store)
        before = sorted(p.name for p in (tmp_path / "data" / "blobs").iterdir())
        result = store.rotate_kek()
        assert result["resealed"] == 0 and result["already_current"] == ADAPTERS * 2 + 2
        assert sorted(p.name for p in (tmp_path / "data" / "blobs").iterdir()) == before


def test_rotation_to_unknown_key_is_refused(tmp_path, key_path):
    with LibraryStore.open(tmp_path / "data", KeyFileProvider(key_path)) as store:
        with pytest.raises(FailedPreconditionError, match="does not hold key"):
            store.rotate_kek("kf-0000000000000000")


def test_env_provider_rotates_by_prepending_a_key(tmp_path):
    old, new = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    anchors = tmp_path / "anchors"
    with LibraryStore.open(tmp_path / "data", EnvKeyProvider(environ={"K": old}, var="K"), anchor_dir=anchors) as s:
        _fill(s)
    both = EnvKeyProvider(environ={"K": f"{new},{old}"}, var="K")
    with LibraryStore.open(tmp_path / "data", both, anchor_dir=anchors) as store:
        store.rotate_kek()
        assert store.key_ids_in_use() == {both.primary_key_id}
    only_new = EnvKeyProvider(environ={"K": new}, var="K")
    with LibraryStore.open(tmp_path / "data", only_new, anchor_dir=anchors) as store:
        assert _digest(store.read_adapter_files("lib", "a3")) == _digest(_files(3))
    with pytest.raises(WrongKeyError):
        LibraryStore.open(tmp_path / "data", EnvKeyProvider(environ={"K": old}, var="K"), anchor_dir=anchors)


def test_env_provider_cannot_switch_primary_itself(tmp_path):
    a, b = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    keys = EnvKeyProvider(environ={"K": f"{a},{b}"}, var="K")
    other = next(k for k in keys.key_ids() if k != keys.primary_key_id)
    with LibraryStore.open(tmp_path / "data", keys, anchor_dir=tmp_path / "anchors") as store:
        with pytest.raises(FailedPreconditionError, match="cannot change its primary"):
            store.rotate_kek(other)


