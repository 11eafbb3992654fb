"""The routing index is stored, sealed, beside the PEFT files; startup reads it, never the files.

Real store on disk, real manager, real PEFT bytes; damage is done to the files on disk.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from seqr_core import (LibraryIndex, ModuleInput, Normalisation, RouteOptions, SharedARecipe,
                       parse_peft_adapter, route, write_safetensors)
from seqr_core.adapter_index import decode
from seqr_core.errors import IntegrityError
from seqr_core.signature import BaseModelSignature, ModuleSpec
from seqr_server import library_objects as lo
from seqr_server.auth import OPEN
from seqr_server.config import Limits
from seqr_server.manager import LibraryManager
from seqr_server.store import KeyFileProvider, LibraryStore, init_key_file

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store_v0"
SIG = BaseModelSignature("toy", (ModuleSpec("m.q", 8, 12), ModuleSpec("m.v", 8, 4)))
RECIPE = SharedARecipe(seed=3)


def peft_files(rng, A: dict, *, r: int = 2, alpha: int = 4, half: bool = False) -> dict[str, bytes]:
    tensors = {}
    for m, a in A.items():
        B = rng.standard_normal((SIG.spec(m).d_out, r)).astype(np.float32)
        tensors[f"base_model.model.{m}.lora_A.weight"] = a
        tensors[f"base_model.model.{m}.lora_B.weight"] = B.astype(np.float16).astype(np.float32) if half else B
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q", "v"]}
    return {"adapter_config.json": json.dumps(cfg).encode(), "adapter_model.safetensors": write_safetensors(tensors)}


def open_manager(data: Path, key: Path, **kw) -> LibraryManager:
    mgr = LibraryManager(LibraryStore.open(data, KeyFileProvider(key), **kw))
    mgr.load()
    return mgr


@pytest.fixture
def populated(tmp_path):
    """(data dir, key file, the library's shared A): library ``lib`` with four adapters."""
    key = tmp_path / "kek.json"
    init_key_file(key)
    mgr = open_manager(tmp_path / "data", key)
    shared = lo.recipe_shared_a(SIG, RECIPE, rank=2, modules=[], limits=Limits())
    mgr.create_library(lo.LibrarySpec(name="lib", signature=SIG, shared_a=shared, recipe=RECIPE, meta={}))
    rng = np.random.default_rng(1)
    own = {"m.q": rng.uniform(-1, 1, (2, 8)).astype(np.float32), "m.v": shared["m.v"]}
    for name, A in (("a", shared), ("b", shared), ("own", own), ("c", {"m.q": shared["m.q"]})):
        mgr.put_adapter("lib", name, peft_files(rng, A), {}, OPEN, allow_general=name == "own")
    mgr.close()
    return tmp_path / "data", key, shared


def inputs(rng, forms=("activations",)):
    x = rng.standard_normal((5, 8)).astype(np.float32)
    return {m: ModuleInput("activations", x, 5) for m in ("m.q", "m.v")}


def decisions(index: LibraryIndex, rng_seed: int = 9):
    rng = np.random.default_rng(rng_seed)
    x = inputs(rng)
    return [route(index, x, RouteOptions(top_k=3, normalisation=Normalisation(n), granularity=g))
            for n in ("none", "frobenius") for g in ("sequence", "token")]


def same(a, b):
    for da, db in zip(a, b):
        assert da.choices == db.choices and da.version == db.version
        if da.tokens is not None:
            np.testing.assert_array_equal(da.tokens.ids, db.tokens.ids)


def damage_peft_weights(data: Path, key: Path, library: str) -> list[str]:
    """Overwrite every adapter's weights blob on disk; returns the adapter names."""
    with LibraryStore.open(data, KeyFileProvider(key)) as store:
        names = [a.name for a in store.library(library).adapters]
        paths = [store.blob_path(library, adapter=n, file="adapter_model.safetensors") for n in names]
    for p in paths:
        raw = bytearray(p.read_bytes())
        raw[-10] ^= 0xFF
        p.write_bytes(bytes(raw))
    return names


def test_put_commits_the_index_object_with_the_files(populated):
    data, key, _ = populated
    with LibraryStore.open(data, KeyFileProvider(key)) as store:
        for rec in store.library("lib").adapters:
            assert rec.objects == ("index",)
            ai = decode(store.read_adapter_object("lib", rec.name, "index"))
            assert ai.name == rec.name and set(ai.modules) <= set(SIG.names)
        assert store.verify()["failed"] == []


def test_startup_reads_the_index_not_the_peft_files(populated):
    data, key, _ = populated
    mgr = open_manager(data, key)
    before = decisions(mgr.get("lib", OPEN).index)
    mgr.close()
    names = damage_peft_weights(data, key, "lib")
    mgr = open_manager(data, key)
    try:
        # every PEFT weights blob is now unreadable, yet the library loads and answers the same
        assert mgr.get("lib", OPEN).index.names == tuple(names)
        same(before, decisions(mgr.get("lib", OPEN).index))
        assert len(mgr._store.verify()["failed"]) == len(names)
    finally:
        mgr.close()


@pytest.mark.parametrize("damage", ["flip", "swap"])
def test_a_damaged_or_swapped_index_object_is_data_loss(populated, damage):
    data, key, _ = populated
    with LibraryStore.open(data, KeyFileProvider(key)) as store:
        pa, pb = (store.blob_path("lib", adapter=n, role="index") for n in ("a", "b"))
    if damage == "flip":
        raw = bytearray(pa.read_bytes())
        raw[-5] ^= 1
        pa.write_bytes(bytes(raw))
    else:                       # each blob is bound to its adapter: b's index cannot pose as a's
        shutil.copyfile(pb, pa)
    with LibraryStore.open(data, KeyFileProvider(key)) as store:
        with pytest.raises(IntegrityError) as e:
            store.read_adapter_object("lib", "a", "index")
        assert e.value.code == "DATA_LOSS"


def test_deleting_an_adapter_shreds_its_index_object(populated):
    data, key, _ = populated
    with LibraryStore.open(data, KeyFileProvider(key)) as store:
        path = store.blob_path("lib", adapter="b", role="index")
    mgr = open_manager(data, key)
    mgr.delete_adapter("lib", "b", OPEN)
    mgr.close()
    assert not path.exists()


def test_rotation_reseals_index_objects(populated):
    data, key, _ = populated
    keys = KeyFileProvider(key)
    new = keys.add_key()
    with LibraryStore.open(data, keys) as store:
        store.rotate_kek(new)
        assert store.key_ids_in_use() == {new}
        assert decode(store.read_adapter_object("lib", "a", "index")).name == "a"


def test_an_index_of_another_format_is_rederived_once_and_logged(populated, caplog):
    data, key, _ = populated
    mgr = open_manager(data, key)
    before = decisions(mgr.get("lib", OPEN).index)
    stale = safetensors.numpy.save({"meta": np.frombuffer(b'{"format": 0}', np.uint8)})
    version = mgr._store.library("lib").version
    mgr._store.put_adapter_objects("lib", {"a": {"index": stale}, "own": {"index": stale}})
    assert mgr._store.library("lib").version == version          # derived data: no new version
    mgr.close()
    caplog.set_level(logging.INFO, logger="seqr.manager")
    mgr = open_manager(data, key)
    same(before, decisions(mgr.get("lib", OPEN).index))
    mgr.close()
    logged = [r for r in caplog.records if r.getMessage() == "adapters re-parsed from their PEFT files"]
    assert len(logged) == 1 and logged[0].adapters == 2 and "index format 0 is not 1" in str(logged[0].reasons)
    # the re-derived objects were stored: the next start needs no PEFT file at all
    damage_peft_weights(data, key, "lib")
    caplog.clear()
    mgr = open_manager(data, key)
    same(before, decisions(mgr.get("lib", OPEN).index))
    mgr.close()
    assert not [r for r in caplog.records if "re-parsed" in r.getMessage()]


def _fixture_copy(tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(FIXTURE, tmp_path / "old")
    key = tmp_path / "old" / "kek.json"
    key.chmod(0o600)                              # git does not keep the key file's mode
    (tmp_path / "old" / "data").chmod(0o700)
    return tmp_path / "old" / "data", key


def test_a_store_written_before_index_objects_migrates_without_losing_an_adapter(tmp_path, caplog):
    data, key = _fixture_copy(tmp_path)
    with LibraryStore.open(data, KeyFileProvider(key), accept_unanchored=True) as store:
        rec = store.library("lib")
        assert all(a.objects == () for a in rec.adapters)           # written by the old code
        files = {a.name: store.read_adapter_files("lib", a.name) for a in rec.adapters}
        spec = lo.spec_from_store("lib", rec.meta, store.read_library_object("lib", lo.SHARED_A))
        raw_cal = store.read_library_object("lib", lo.CALIBRATION)
    # What the old service served: the index built from the PEFT files themselves.
    want = spec.empty_index(version=rec.version)
    for a in rec.adapters:
        p = parse_peft_adapter(files[a.name], name=a.name, signature=spec.signature)
        want, _ = want.add_adapter(p.adapter, adapter_id=a.adapter_id, upload_dtype=p.upload_dtype)
    want = want.with_calibration(lo.decode_calibration(raw_cal, {e.name: e.adapter_id for e in want.adapters}),
                                 version=rec.version)
    caplog.set_level(logging.INFO, logger="seqr.manager")
    mgr = open_manager(data, key)
    got = mgr.get("lib", OPEN).index
    assert [(e.name, e.adapter_id, e.kind, e.upload_dtype) for e in got.adapters] == \
        [(e.name, e.adapter_id, e.kind, e.upload_dtype) for e in want.adapters] == \
        [(a.name, a.adapter_id, a.meta["kind"], a.meta["upload_dtype"]) for a in rec.adapters]  # as the old code saw them
    assert [e.name for e in got.adapters] == ["law", "med", "own", "code"]
    assert got.version == rec.version and got.calibration is not None
    rng = np.random.default_rng(2)
    qv = [m for m in spec.signature.names if got.module_ids(m).size]
    x = rng.standard_normal((6, 32)).astype(np.float32)
    req = {m: ModuleInput("activations", x, 6) for m in qv}
    for opts in (RouteOptions(top_k=4), RouteOptions(top_k=2, granularity="token"),
                 RouteOptions(top_k=4, normalisation=Normalisation("zscore", "adapter", "log"))):
        a, b = route(want, req, opts), route(got, req, opts)
        assert a.choices == b.choices and not a.fallback
    mgr.close()
    with LibraryStore.open(data, KeyFileProvider(key)) as store:
        assert all(a.objects == ("index",) for a in store.library("lib").adapters)
    logged = [r for r in caplog.records if r.getMessage() == "adapters re-parsed from their PEFT files"]
    assert len(logged) == 1 and logged[0].adapters == 4
    # Migrated for good: the PEFT files are no longer needed to start.
    damage_peft_weights(data, key, "lib")
    mgr = open_manager(data, key)
    assert mgr.get("lib", OPEN).index.names == got.names
    assert route(mgr.get("lib", OPEN).index, req, RouteOptions(top_k=4)).choices == \
        route(want, req, RouteOptions(top_k=4)).choices
    mgr.close()


def test_mains_v1_fixture_store_migrates_to_index_objects_and_answers_as_before(tmp_path, caplog):
    """tests/fixtures/store_v1 (written before index objects, with calibration and general
    adapters): every adapter loads, its index is stored, and later starts need no PEFT file."""
    shutil.copytree(FIXTURE.parent / "store_v1", tmp_path / "v1")
    data, key = tmp_path / "v1" / "data", tmp_path / "v1" / "dev.kek"
    key.chmod(0o600)
    expected = json.loads((tmp_path / "v1" / "expected.json").read_text())
    with LibraryStore.open(data, KeyFileProvider(key), accept_unanchored=True) as store:
        stored = {lib: [a.name for a in store.library(lib).adapters] for lib in expected}
        assert all(a.objects == () for lib in expected for a in store.library(lib).adapters)

    def answers(mgr):
        out = {}
        for lib, want in expected.items():
            x = {m: np.asarray(v, dtype=np.float32) for m, v in want["inputs"].items()}
            d = route(mgr.get(lib, OPEN).index, {m: ModuleInput("activations", a, a.shape[0]) for m, a in x.items()},
                      RouteOptions(top_k=8, normalisation=Normalisation(want["answer"]["normalisation"])))
            out[lib] = ([[c.name, c.adapter_id] for c in d.choices], d.version, d.normalisation)
            assert out[lib] == (want["answer"]["choices"], want["answer"]["library_version"],
                                want["answer"]["normalisation"]), lib
        return out

    caplog.set_level(logging.INFO, logger="seqr.manager")
    mgr = open_manager(data, key)
    for lib in expected:
        state = mgr.get(lib, OPEN)
        assert list(state.index.names) == stored[lib] and not state.damage.adapters
    first = answers(mgr)
    mgr.close()
    logged = [r for r in caplog.records if r.getMessage() == "adapters re-parsed from their PEFT files"]
    assert sorted(r.library for r in logged) == sorted(expected)
    with LibraryStore.open(data, KeyFileProvider(key)) as store:
        assert all(a.objects == ("index",) for lib in expected for a in store.library(lib).adapters)
    for lib in expected:
        damage_peft_weights(data, key, lib)
    caplog.clear()
    mgr = open_manager(data, key)
    assert answers(mgr) == first
    assert all(list(mgr.get(lib, OPEN).index.names) == stored[lib] for lib in expected)
    mgr.close()
    assert not [r for r in caplog.records if "re-parsed" in r.getMessage()]


def test_the_served_record_is_the_stores_after_puts_replaces_and_deletes(populated):
    data, key, shared = populated
    mgr = open_manager(data, key)
    rng = np.random.default_rng(5)
    try:
        steps = [lambda: mgr.put_adapter("lib", "d", peft_files(rng, shared), {"k": "v"}, OPEN),
                 lambda: mgr.put_adapter("lib", "b", peft_files(rng, shared), {}, OPEN, replace=True),
                 lambda: mgr.delete_adapter("lib", "a", OPEN),
                 lambda: mgr.put_adapter("lib", "a", peft_files(rng, shared), {}, OPEN),
                 lambda: mgr.delete_adapter("lib", "c", OPEN)]
        for step in steps:
            step()
            assert mgr.get("lib", OPEN).record == mgr._store.library("lib")
        assert [a.name for a in mgr.get("lib", OPEN).record.adapters] == ["b", "own", "d", "a"]
    finally:
        mgr.close()
