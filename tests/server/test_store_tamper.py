"""Tampering with any stored object makes its read (or the store's open) fail with an IntegrityError.

For every object kind (manifest, adapter files, each library object role) a table of bit flips,
truncations, appends and header edits is applied to the file on disk; swapped blobs, blobs from
older versions or other stores and replayed manifests are tested separately.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from seqr_core.errors import FailedPreconditionError, IntegrityError, NotFoundError
from seqr_server.store import (KeyFileProvider, LibraryStore, MissingBlobError, RollbackError,
                               SwappedBlobError, TamperedBlobError, init_key_file)
from seqr_server.store.testing import HeaderLayout, header_layout

ROLES = ("shared_a", "calibration", "onnx_scorer", "index_snapshot")
KINDS = ("manifest", "adapter_config", "adapter_weights", *ROLES)


@dataclass(frozen=True)
class Populated:
    data_dir: Path
    key_path: Path
    other_key_id: str
    paths: dict[str, Path]  # object kind -> the file holding it

    def open(self) -> LibraryStore:
        return LibraryStore.open(self.data_dir, KeyFileProvider(self.key_path))

    def path_of(self, kind: str) -> Path:
        return self.paths[kind]

    def read(self, kind: str) -> None:
        with self.open() as store:
            if kind.startswith("adapter_"):
                store.read_adapter_files("lib", "a1")
            elif kind != "manifest":
                store.read_library_object("lib", kind)


def _adapter_files(rng: random.Random) -> dict[str, bytes]:
    return {"adapter_config.json": b'{"r": 8, "lora_alpha": 16}', "adapter_model.safetensors": rng.randbytes(3000)}


def _populate(root: Path, *, key_path: Path | None = None) -> Populated:
    if key_path is None:
        key_path = root / "keys" / "kek.json"
        init_key_file(key_path)
    keys = KeyFileProvider(key_path)
    other = next(k for k in keys.key_ids() if k != keys.primary_key_id) if len(keys.key_ids()) > 1 else keys.add_key()
    # ^ a second key id of the same length lets a test swap key ids in a header
    rng = random.Random(1)
    with LibraryStore.open(root / "data", keys) as store:
        store.create_library("lib", meta={"base": "tiny"}, objects={r: rng.randbytes(500) for r in ROLES})
        store.put_adapter("lib", "a1", files=_adapter_files(rng), meta={"task": "one"})
        store.put_adapter("lib", "a2", files=_adapter_files(rng), meta={"task": "two"})
        paths = {
            "manifest": root / "data" / "MANIFEST",
            "adapter_config": store.blob_path("lib", adapter="a1", file="adapter_config.json"),
            "adapter_weights": store.blob_path("lib", adapter="a1", file="adapter_model.safetensors"),
            **{role: store.blob_path("lib", role=role) for role in ROLES},
        }
    return Populated(root / "data", key_path, other, paths)


@pytest.fixture(scope="module")
def populated(tmp_path_factory) -> Populated:
    return _populate(tmp_path_factory.mktemp("tamper"))


@pytest.fixture
def fresh(tmp_path) -> Populated:
    return _populate(tmp_path)


Mutation = Callable[[bytes, HeaderLayout, Populated], bytes]


def _flip(offset_of: Callable[[bytes, HeaderLayout], int], bit: int = 0) -> Mutation:
    def mutate(blob: bytes, lay: HeaderLayout, _: Populated) -> bytes:
        i = offset_of(blob, lay)
        return blob[:i] + bytes([blob[i] ^ (1 << bit)]) + blob[i + 1:]
    return mutate


def _replace(region: str, value: Callable[[bytes, HeaderLayout, Populated], bytes]) -> Mutation:
    def mutate(blob: bytes, lay: HeaderLayout, pop: Populated) -> bytes:
        r = getattr(lay, region)
        return blob[: r.start] + value(blob, lay, pop) + blob[r.stop:]
    return mutate


def _version_delta(delta: int) -> Mutation:
    return _replace("version", lambda b, lay, _: struct.pack(">Q", struct.unpack(">Q", b[lay.version])[0] + delta))


def _nonce_of_length(n: int) -> Mutation:
    def mutate(blob: bytes, lay: HeaderLayout, _: Populated) -> bytes:
        return blob[: lay.nonce_len.start] + bytes([n]) + os.urandom(n) + blob[lay.body]
    return mutate


def _random_flip(seed: int) -> Mutation:
    def mutate(blob: bytes, lay: HeaderLayout, pop: Populated) -> bytes:
        rng = random.Random(seed)
        return _flip(lambda b, _: rng.randrange(len(b)), rng.randrange(8))(blob, lay, pop)
    return mutate


MUTATIONS: dict[str, Mutation] = {
    "flip_magic": _flip(lambda b, lay: 0),
    "format_version_2": _replace("format_version", lambda *_: b"\x02"),
    "flags_set": _replace("flags", lambda *_: b"\x01"),
    "version_plus_one": _version_delta(+1),
    "version_minus_one": _version_delta(-1),
    "flip_key_id": _flip(lambda b, lay: lay.key_id.start + 3),
    "other_key_id": _replace("key_id", lambda b, lay, pop: pop.other_key_id.encode()),
    "flip_wrapped_key": _flip(lambda b, lay: lay.wrapped.start + 20, 5),
    "wrapped_len_shorter": _replace("wrapped_len", lambda b, lay, _: struct.pack(">H", len(b[lay.wrapped]) - 1)),
    "nonce_len_16": _nonce_of_length(16),
    "nonce_len_8": _nonce_of_length(8),
    "flip_nonce": _flip(lambda b, lay: lay.nonce.start + 5),
    "flip_first_body_byte": _flip(lambda b, lay: lay.body.start),
    "flip_middle_body_byte": _flip(lambda b, lay: (lay.body.start + len(b)) // 2, 7),
    "flip_tag": _flip(lambda b, lay: len(b) - 1),
    **{f"random_flip_{seed}": _random_flip(seed) for seed in range(10)},
    "truncate_to_0": lambda b, lay, _: b"",
    "truncate_to_3": lambda b, lay, _: b[:3],
    "truncate_fixed_header": lambda b, lay, _: b[:14],
    "truncate_in_wrapped_key": lambda b, lay, _: b[: lay.wrapped.start + 5],
    "truncate_after_header": lambda b, lay, _: b[: lay.body.start],
    "truncate_shorter_than_tag": lambda b, lay, _: b[: lay.body.start + 15],
    "truncate_half": lambda b, lay, _: b[: len(b) // 2],
    "truncate_last_byte": lambda b, lay, _: b[:-1],
    "append_one_byte": lambda b, lay, _: b + b"\x00",
    "append_block": lambda b, lay, _: b + os.urandom(64),
    "random_same_length": lambda b, lay, _: os.urandom(len(b)),
    "fresh_nonce": _replace("nonce", lambda b, lay, _: os.urandom(12)),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("kind", KINDS)
def test_tampered_object_fails_to_open(populated, kind, mutation):
    path = populated.path_of(kind)
    original = path.read_bytes()
    path.write_bytes(MUTATIONS[mutation](original, header_layout(original), populated))
    try:
        with pytest.raises(IntegrityError) as caught:
            populated.read(kind)
    finally:
        path.write_bytes(original)
    assert not isinstance(caught.value, FailedPreconditionError)
    populated.read(kind)  # the restored object opens again: the failure was the tampering


def test_read_error_names_the_object(populated):
    path = populated.path_of("adapter_weights")
    original = path.read_bytes()
    path.write_bytes(original[:-1])
    try:
        with pytest.raises(TamperedBlobError, match="adapter 'a1' file 'adapter_model.safetensors'"):
            populated.read("adapter_weights")
    finally:
        path.write_bytes(original)


def _swap(a: Path, b: Path) -> None:
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)


def test_swapped_blob_between_adapters_fails_to_open(fresh):
    with fresh.open() as store:
        a1 = store.blob_path("lib", adapter="a1", file="adapter_model.safetensors")
        a2 = store.blob_path("lib", adapter="a2", file="adapter_model.safetensors")
        _swap(a1, a2)
        with pytest.raises(SwappedBlobError, match="'a1'"):  # a1 now holds a2's newer blob
            store.read_adapter_files("lib", "a1")
        with pytest.raises(RollbackError, match="'a2'"):  # a2 now holds a1's older blob
            store.read_adapter_files("lib", "a2")


def test_files_swapped_within_one_adapter_fail_to_open(fresh):
    # Same version and key id: only the role in the associated data tells them apart.
    with fresh.open() as store:
        _swap(store.blob_path("lib", adapter="a1", file="adapter_config.json"),
              store.blob_path("lib", adapter="a1", file="adapter_model.safetensors"))
        with pytest.raises(TamperedBlobError):
            store.read_adapter_files("lib", "a1")


def test_library_objects_swapped_between_roles_fail_to_open(fresh):
    with fresh.open() as store:
        _swap(store.blob_path("lib", role="calibration"), store.blob_path("lib", role="shared_a"))
        for role in ("calibration", "shared_a"):
            with pytest.raises(TamperedBlobError, match=role):
                store.read_library_object("lib", role)


def test_older_version_of_object_replayed_fails_to_open(fresh):
    with fresh.open() as store:
        old = store.blob_path("lib", role="calibration").read_bytes()
        store.put_library_object("lib", "calibration", b"new calibration")
        store.blob_path("lib", role="calibration").write_bytes(old)
        with pytest.raises(RollbackError):
            store.read_library_object("lib", "calibration")


def test_blob_from_another_store_fails_to_open(tmp_path):
    # Identical histories give identical versions: only the store id in the associated data differs.
    one = _populate(tmp_path / "one")
    two = _populate(tmp_path / "two", key_path=one.key_path)
    with one.open() as s1, two.open() as s2:
        s1.blob_path("lib", role="calibration").write_bytes(s2.blob_path("lib", role="calibration").read_bytes())
        with pytest.raises(TamperedBlobError):
            s1.read_library_object("lib", "calibration")


def test_missing_blob_fails_with_missing_blob_error(fresh):
    with fresh.open() as store:
        store.blob_path("lib", adapter="a2", file="adapter_config.json").unlink()
        with pytest.raises(MissingBlobError, match="'a2'"):
            store.read_adapter_files("lib", "a2")
        assert [what for what, _ in store.verify()["failed"]] == [
            "library 'lib' adapter 'a2' file 'adapter_config.json'"
        ]


def test_old_manifest_replayed_is_refused(fresh):
    old = (fresh.data_dir / "MANIFEST").read_bytes()
    with fresh.open() as store:
        store.delete_adapter("lib", "a2")
    (fresh.data_dir / "MANIFEST").write_bytes(old)
    with pytest.raises(RollbackError, match="older than the last committed"):
        fresh.open()


def test_old_copy_of_whole_data_dir_replayed_is_refused(fresh, tmp_path):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(fresh.data_dir, snapshot)
    with fresh.open() as store:
        store.put_library_object("lib", "calibration", b"newer")
    shutil.rmtree(fresh.data_dir)
    shutil.copytree(snapshot, fresh.data_dir)
    with pytest.raises(RollbackError):
        fresh.open()


def test_deleted_manifest_is_refused(fresh):
    (fresh.data_dir / "MANIFEST").unlink()
    with pytest.raises(RollbackError, match="MANIFEST is missing"):
        fresh.open()


def test_manifest_of_another_store_is_refused(tmp_path):
    one = _populate(tmp_path / "one")
    two = _populate(tmp_path / "two", key_path=one.key_path)
    shutil.copyfile(two.data_dir / "MANIFEST", one.data_dir / "MANIFEST")
    with pytest.raises(RollbackError, match="different store"):
        one.open()


def test_refused_manifest_leaves_blobs_untouched(fresh):
    blobs = sorted(p.name for p in (fresh.data_dir / "blobs").iterdir())
    manifest = fresh.data_dir / "MANIFEST"
    original = manifest.read_bytes()
    manifest.write_bytes(original[:-1])
    with pytest.raises(IntegrityError):
        fresh.open()
    assert sorted(p.name for p in (fresh.data_dir / "blobs").iterdir()) == blobs
    manifest.write_bytes(original)
    with fresh.open() as store:
        assert store.read_adapter_files("lib", "a2")


def test_absent_adapter_is_not_found_rather_than_integrity_error(fresh):
    with fresh.open() as store:
        with pytest.raises(NotFoundError):
            store.read_adapter_files("lib", "nope")
