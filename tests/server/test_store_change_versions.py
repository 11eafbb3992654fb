"""The store records which library version last changed what (the basis of per-caller view versions):
each adapter's upload, deletions as bounded tombstones, library-wide changes; legacy stores too."""

from __future__ import annotations

import pytest

from seqr_server.store import KeyFileProvider, LibraryStore, init_key_file
from seqr_server.store import manifest as mf
from seqr_server.views import ChangeLog

FILES = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"\x00\x01" * 50}


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys" / "kek.json"
    init_key_file(path)
    return KeyFileProvider(path)


@pytest.fixture
def store(tmp_path, keys):
    s = LibraryStore.open(tmp_path / "data", keys)
    s.create_library("lib", meta={})
    yield s
    s.close()


def _view(store, glob_prefix: str) -> int:
    return ChangeLog.of(store.library("lib")).view_version(lambda n: n.startswith(glob_prefix))


def test_each_version_records_what_it_changed(store):
    assert (store.library("lib").changed, store.library("lib").deleted) == (1, {})
    store.put_adapter("lib", "a-1", files=FILES, meta={})                 # v2
    store.put_adapter("lib", "b-1", files=FILES, meta={})                 # v3
    store.delete_adapter("lib", "a-1")                                    # v4
    rec = store.library("lib")
    assert [(a.name, a.changed) for a in rec.adapters] == [("b-1", 3)]
    assert (rec.version, rec.changed, dict(rec.deleted)) == (4, 1, {"a-1": 4})
    assert (_view(store, "a-"), _view(store, "b-"), _view(store, "c-")) == (4, 3, 1)
    store.put_library_object("lib", "calibration", b"{}")                 # v5: every caller's view
    assert (store.library("lib").changed, _view(store, "c-")) == (5, 5)
    store.put_adapter("lib", "a-1", files=FILES, meta={})                 # v6: the name is live again
    rec = store.library("lib")
    assert dict(rec.deleted) == {} and [a.changed for a in rec.adapters if a.name == "a-1"] == [6]


def test_tombstones_are_bounded_and_fold_into_one_library_wide_change(tmp_path, keys, store, monkeypatch):
    monkeypatch.setattr(mf, "MAX_TOMBSTONES", 4)
    views = []
    for i in range(7):
        store.put_adapter("lib", f"x-{i}", files=FILES, meta={})
        store.delete_adapter("lib", f"x-{i}")
        views.append(_view(store, "x-0"))
    rec = store.library("lib")
    assert len(rec.deleted) <= 4 and "x-0" not in rec.deleted
    assert rec.changed >= 3                       # x-0's deletion (v3) folded into the library-wide change
    assert views == sorted(views)                 # monotonic for a caller who sees only x-0
    store.close()
    again = LibraryStore.open(tmp_path / "data", keys)
    assert again.library("lib") == rec
    again.close()


def test_a_library_stored_before_change_versions_counts_as_changed_at_its_version(tmp_path, keys, store):
    store.put_adapter("lib", "a-1", files=FILES, meta={})
    store.put_adapter("lib", "b-1", files=FILES, meta={})

    def as_before(manifest, txn):                 # what a store written by the previous version holds
        lib = manifest["libraries"]["lib"]
        del lib["changed"], lib["deleted"]
        for entry in lib["adapters"].values():
            del entry["changed"]

    store._mutate(as_before, deep=True)
    store.close()
    store = LibraryStore.open(tmp_path / "data", keys)
    rec = store.library("lib")
    assert (rec.version, rec.changed, [a.changed for a in rec.adapters]) == (3, 3, [0, 0])
    assert _view(store, "a-") == 3
    store.delete_adapter("lib", "b-1")                                     # v4, hidden from "a-"
    assert (store.library("lib").changed, _view(store, "a-"), _view(store, "b-")) == (3, 3, 4)
    store.close()
