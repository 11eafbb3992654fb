"""The manifest encoder writes exactly what json.dumps writes, across real commits."""

from __future__ import annotations

import json

from seqr_server.store import KeyFileProvider, LibraryStore, init_key_file
from seqr_server.store.manifest import ManifestEncoder, open_manifest

FILES = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x" * 64}


def _plain(manifest) -> str:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"))


def test_every_commit_writes_what_json_dumps_writes(tmp_path):
    key = tmp_path / "kek.json"
    init_key_file(key)
    enc, keys = ManifestEncoder(), KeyFileProvider(key)
    with LibraryStore.open(tmp_path / "data", keys) as store:
        store.create_library("lib", meta={"owner": "ü"})
        store.create_library("other", meta={})
        steps = [
            lambda: store.put_adapters("lib", [(f"a{i}", FILES, {"i": i, "tags": ["x", "é"]}, {"index": b"i" * i})
                                              for i in range(5)]),
            lambda: store.put_adapter("lib", "a2", files={**FILES, "extra": b"y"}, meta={"v": 2}, replace=True,
                                      library_objects={"calibration": b"c"}),
            lambda: store.put_adapter_objects("lib", {"a3": {"index": b"new"}}),
            lambda: store.delete_adapter("lib", "a1"),
            lambda: store.put_adapter("other", "b", files=FILES, meta={}),
            lambda: store.rotate_kek(keys.add_key()),
        ]
        for step in steps:
            step()
            manifest = store._manifest
            # the same encoder across commits, as the committer keeps it
            assert enc.encode(manifest) == _plain(manifest)
        raw = (tmp_path / "data" / "MANIFEST").read_bytes()
    reopened = open_manifest(raw, keys, anchor=None)
    assert _plain(reopened) == _plain(manifest)


def test_an_entry_edited_into_a_new_dict_is_encoded_again():
    enc = ManifestEncoder()
    entry = {"adapter_id": 0, "meta": {"a": 1}}
    m = {"format": 1, "seq": 1, "store_id": "s", "libraries": {"l": {"adapters": {"x": entry}, "version": 1}}}
    assert enc.encode(m) == _plain(m)
    m2 = {**m, "seq": 2, "libraries": {"l": {"adapters": {"x": {**entry, "meta": {"a": 2}}}, "version": 2}}}
    assert enc.encode(m2) == _plain(m2) != _plain(m)
