"""The store's public behaviour: records, versions, ids, errors, locking and consistent reads."""

from __future__ import annotations

import re
import shutil
import threading
from datetime import datetime

import pytest

from seqr_core.errors import (AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, LimitExceededError,
                              NotFoundError, UnavailableError)
from seqr_server.store import AdapterRecord, KeyFileProvider, LibraryRecord, LibraryStore, init_key_file

FILES = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"\x00\x01" * 500}


@pytest.fixture
def key_path(tmp_path):
    path = tmp_path / "keys" / "kek.json"
    init_key_file(path)
    return path


@pytest.fixture
def store(tmp_path, key_path):
    s = LibraryStore.open(tmp_path / "data", KeyFileProvider(key_path))
    s.create_library("lib", meta={"base_model": "tiny", "rank": 8})
    yield s
    s.close()


def test_put_adapter_returns_a_complete_record(store):
    record = store.put_adapter("lib", "a", files=FILES, meta={"task": "math"})
    assert isinstance(record, AdapterRecord)
    assert record.name == "a" and record.adapter_id == 0 and record.meta == {"task": "math"}
    assert record.size_bytes == sum(len(v) for v in FILES.values())
    assert set(record.sha256) == set(FILES) and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in record.sha256.values())
    assert datetime.fromisoformat(record.created_at).utcoffset().total_seconds() == 0
    assert store.read_adapter_files("lib", "a") == FILES
    assert store.adapter("lib", "a") == record


def test_create_library_with_objects(store):
    record = store.create_library("two", meta={}, objects={"shared_a": b"A", "calibration": b"C"})
    assert isinstance(record, LibraryRecord)
    assert record.version == 1 and record.objects == ("calibration", "shared_a") and record.next_adapter_id == 0
    assert store.read_library_object("two", "shared_a") == b"A"
    assert store.read_library_object("two", "index_snapshot") is None
    assert store.list_libraries() == ["lib", "two"]


def test_every_mutation_bumps_the_library_version(store):
    versions = [store.library("lib").version]
    store.put_adapter("lib", "a", files=FILES, meta={})
    versions.append(store.library("lib").version)
    versions.append(store.put_library_object("lib", "calibration", b"c").version)
    versions.append(store.delete_adapter("lib", "a").version)
    versions.append(store.delete_library_object("lib", "calibration").version)
    assert versions == [1, 2, 3, 4, 5]


def test_adapter_ids_are_never_reused(store):
    ids = [store.put_adapter("lib", n, files=FILES, meta={}).adapter_id for n in ("a", "b")]
    store.delete_adapter("lib", "b")
    ids.append(store.put_adapter("lib", "b", files=FILES, meta={}).adapter_id)
    store.delete_adapter("lib", "a")
    ids.append(store.put_adapter("lib", "c", files=FILES, meta={}).adapter_id)
    assert ids == [0, 1, 2, 3]
    assert store.library("lib").next_adapter_id == 4
    assert [a.adapter_id for a in store.library("lib").adapters] == [2, 3]


def test_state_survives_reopen(tmp_path, key_path, store):
    store.put_adapter("lib", "a", files=FILES, meta={"x": [1, 2]})
    store.put_library_object("lib", "onnx_scorer", b"onnx")
    before = store.library("lib")
    store.close()
    with LibraryStore.open(tmp_path / "data", KeyFileProvider(key_path), create=False) as reopened:
        assert reopened.library("lib") == before
        assert reopened.read_adapter_files("lib", "a") == FILES
        assert reopened.read_library_object("lib", "onnx_scorer") == b"onnx"


def test_records_are_private_copies(store):
    store.put_adapter("lib", "a", files=FILES, meta={"tags": ["x"]})
    record = store.adapter("lib", "a")
    record.meta["tags"].append("mutated")
    record.sha256.clear()
    store.library("lib").meta["rank"] = 99
    assert store.adapter("lib", "a").meta == {"tags": ["x"]}
    assert store.library("lib").meta["rank"] == 8
    assert store.read_adapter_files("lib", "a") == FILES


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.create_library("lib", meta={}),
        lambda s: (s.put_adapter("lib", "a", files=FILES, meta={}), s.put_adapter("lib", "a", files=FILES, meta={})),
    ],
    ids=["library", "adapter"],
)
def test_duplicate_names_already_exist(store, call):
    with pytest.raises(AlreadyExistsError):
        call(store)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.library("nope"), "library"),
        (lambda s: s.delete_library("nope"), "library"),
        (lambda s: s.put_adapter("nope", "a", files=FILES, meta={}), "library"),
        (lambda s: s.read_adapter_files("lib", "nope"), "adapter"),
        (lambda s: s.delete_adapter("lib", "nope"), "adapter"),
        (lambda s: s.read_library_object("nope", "calibration"), "library"),
        (lambda s: s.put_library_object("nope", "calibration", b""), "library"),
        (lambda s: s.delete_library_object("lib", "calibration"), "role"),
    ],
)
def test_absent_names_are_not_found(store, call, field):
    with pytest.raises(NotFoundError) as caught:
        call(store)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.create_library("", meta={}), "library"),
        (lambda s: s.create_library(" padded", meta={}), "library"),
        (lambda s: s.create_library("x" * 201, meta={}), "library"),
        (lambda s: s.create_library("ctl\n", meta={}), "library"),
        (lambda s: s.create_library("x", meta=[]), "meta"),
        (lambda s: s.create_library("x", meta={"nan": float("nan")}), "meta"),
        (lambda s: s.create_library("x", meta={"obj": object()}), "meta"),
        (lambda s: s.create_library("x", meta={}, objects={"Bad-Role": b""}), "role"),
        (lambda s: s.create_library("x", meta={}, objects={"shared_a": "text"}), "objects['shared_a']"),
        (lambda s: s.put_adapter("lib", "a", files={}, meta={}), "files"),
        (lambda s: s.put_adapter("lib", "a", files={"../x": b""}, meta={}), "files"),
        (lambda s: s.put_adapter("lib", "a", files={"f": "text"}, meta={}), "files['f']"),
        (lambda s: s.put_adapter("lib", None, files=FILES, meta={}), "adapter"),
        (lambda s: s.put_library_object("lib", "", b""), "role"),
        (lambda s: s.put_library_object("lib", "calibration", None), "calibration"),
    ],
)
def test_invalid_arguments_are_rejected_before_any_write(store, call, field):
    seq = store.manifest_seq
    with pytest.raises(InvalidArgumentError) as caught:
        call(store)
    assert caught.value.field == field
    assert store.manifest_seq == seq


def test_oversized_metadata_is_refused(store):
    with pytest.raises(LimitExceededError):
        store.put_adapter("lib", "a", files=FILES, meta={"blob": "x" * (1 << 20)})


def test_second_open_of_same_directory_is_refused(tmp_path, key_path, store):
    with pytest.raises(FailedPreconditionError, match="already open"):
        LibraryStore.open(tmp_path / "data", KeyFileProvider(key_path))


def test_closed_store_refuses_calls(store):
    store.close()
    store.close()  # idempotent
    with pytest.raises(UnavailableError, match="closed"):
        store.list_libraries()


def test_open_without_create_needs_an_existing_store(tmp_path, key_path):
    with pytest.raises(FailedPreconditionError, match="does not exist"):
        LibraryStore.open(tmp_path / "nothing", KeyFileProvider(key_path), create=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FailedPreconditionError, match="create=False"):
        LibraryStore.open(tmp_path / "empty", KeyFileProvider(key_path), create=False)


def test_moved_store_needs_explicit_adoption(tmp_path, key_path, store):
    store.put_adapter("lib", "a", files=FILES, meta={})
    store.close()
    shutil.move(tmp_path / "data", tmp_path / "moved")
    with pytest.raises(FailedPreconditionError, match="accept_unanchored=True"):
        LibraryStore.open(tmp_path / "moved", KeyFileProvider(key_path))
    with LibraryStore.open(tmp_path / "moved", KeyFileProvider(key_path), accept_unanchored=True) as adopted:
        assert adopted.read_adapter_files("lib", "a") == FILES
    with LibraryStore.open(tmp_path / "moved", KeyFileProvider(key_path)) as again:  # anchored now
        assert again.list_libraries() == ["lib"]


def test_stray_blobs_without_manifest_are_not_overwritten(tmp_path, key_path):
    blobs = tmp_path / "data" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / ("ab" * 16 + ".blob")).write_bytes(b"something")
    with pytest.raises(FailedPreconditionError, match="refusing to initialise"):
        LibraryStore.open(tmp_path / "data", KeyFileProvider(key_path))
    assert (blobs / ("ab" * 16 + ".blob")).exists()


def test_recovery_removes_orphan_temp_files_and_blobs(tmp_path, key_path, store):
    store.put_adapter("lib", "a", files=FILES, meta={})
    store.close()
    (tmp_path / "data" / ".MANIFEST.123.tmp").write_bytes(b"partial")
    (tmp_path / "data" / "blobs" / ".x.blob.9.tmp").write_bytes(b"partial")
    (tmp_path / "data" / "blobs" / ("cd" * 16 + ".blob")).write_bytes(b"unreferenced")
    with LibraryStore.open(tmp_path / "data", KeyFileProvider(key_path)) as reopened:
        assert reopened.recovery == {"temp_files": 2, "orphan_blobs": 1}
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["LOCK", "MANIFEST", "blobs"]
        assert len(list((tmp_path / "data" / "blobs").iterdir())) == len(FILES)


def test_readers_never_see_a_half_applied_change(store):
    """Invariant of this workload: version == 1 + adapters and every listed adapter is readable."""
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                lib = store.library("lib")
                if lib.version != 1 + len(lib.adapters) or lib.next_adapter_id != len(lib.adapters):
                    problems.append(f"inconsistent record {lib}")
                if lib.adapters and store.read_adapter_files("lib", lib.adapters[-1].name) != FILES:
                    problems.append("wrong bytes")
            except Exception as exc:  # noqa: BLE001 - a thread's exception would otherwise be lost
                problems.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(15):
        store.put_adapter("lib", f"a{i}", files=FILES, meta={})
    stop.set()
    for t in threads:
        t.join()
    assert problems == []


def test_mutations_never_change_a_published_manifest(store):
    """White-box guard for the structural sharing between manifest versions (readers rely on it)."""
    import copy

    store.put_adapter("lib", "a", files=FILES, meta={"m": [1]})
    store.put_library_object("lib", "calibration", b"c")
    mutations = [
        lambda: store.put_adapter("lib", "b", files=FILES, meta={}),
        lambda: store.put_library_object("lib", "calibration", b"d"),
        lambda: store.delete_library_object("lib", "calibration"),
        lambda: store.delete_adapter("lib", "a"),
        lambda: store.create_library("other", meta={}),
        lambda: store.rotate_kek(),
        lambda: store.delete_library("other"),
    ]
    for mutate in mutations:
        published = store._manifest  # noqa: SLF001
        frozen = copy.deepcopy(published)
        mutate()
        assert published == frozen
