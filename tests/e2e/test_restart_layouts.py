"""Every library layout the tests create survives a restart, and an older store still opens.

Issue 9, item 1: the stored shared A is safetensors, and the old reader refused every file whose
header length is 128 mod 256 (its first byte is then 0x80, a pickle's first byte). A library of
modules m.q and m.v with d_in 64 at rank 8 was created, worked, and after a restart failed for
ever. Each layout here is created through the real server, routed, stopped, started again on
the same data directory and routed again: the answers must not change.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from seqr_client import RouterClient
from seqr_core import SharedARecipe, generate_shared_a, llama_signature
from seqr_server.demo import NAME as DEMO, demo_spec
from seqr_server.store import KeyFileProvider, LibraryStore

from .conftest import SEED, create_library

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store_v1"
MQV = (("m.q", 64, 64), ("m.v", 64, 48))


def peft_files(modules, *, rank: int, seed: int, recipe: SharedARecipe | None = None) -> dict[str, bytes]:
    """PEFT files written by the `safetensors` package: shared A from ``recipe``, or own A."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for m, d_in, d_out in modules:
        A = (generate_shared_a(recipe, module=m, rank=rank, d_in=d_in) if recipe is not None
             else (rng.standard_normal((rank, d_in)) / np.sqrt(d_in)).astype(np.float32))
        tensors[f"base_model.model.{m}.lora_A.weight"] = A
        tensors[f"base_model.model.{m}.lora_B.weight"] = rng.standard_normal((d_out, rank)).astype(np.float32)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": save(tensors)}


def _inputs(modules, *, tokens: int = 5, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((tokens, d_in)).astype(np.float32) for m, d_in, _ in modules}


def _world_modules(world):
    return [(m, world.sig.spec(m).d_in, world.sig.spec(m).d_out) for m in world.qv]


# Each builder creates one library through the client and returns (name, inputs or None).
def tiny_world(c, world):
    create_library(c, world, name="tiny")
    for name, path in world.adapters.items():
        c.put_adapter(path, name=name, library="tiny", allow_general=name.startswith("general"))
    return "tiny", _inputs(_world_modules(world))


def tiny_world_empty(c, world):
    create_library(c, world, name="empty")
    return "empty", None


def mqv_rank8(c, world):
    c.create_library("mqv", signature=[list(m) for m in MQV], shared_a_seed=7, shared_a_rank=8)
    c.put_adapter_files(peft_files(MQV, rank=8, seed=1, recipe=SharedARecipe(seed=7)), name="shared", library="mqv")
    c.put_adapter_files(peft_files(MQV, rank=8, seed=2), name="general", library="mqv", allow_general=True)
    return "mqv", _inputs(MQV)


def mqv_uploaded_a(c, world):
    shared = {m: generate_shared_a(SharedARecipe(seed=11), module=m, rank=8, d_in=d_in) for m, d_in, _ in MQV}
    c.create_library("mqv-up", signature=[list(m) for m in MQV], shared_a=shared)
    c.put_adapter_files(peft_files(MQV, rank=8, seed=3, recipe=SharedARecipe(seed=11)), name="shared",
                        library="mqv-up")
    return "mqv-up", _inputs(MQV)


def general_only(c, world):
    c.create_library("general", signature=world.sig)
    for name in ("general-g0", "general-g1"):
        c.put_adapter(world.adapters[name], name=name, library="general")
    return "general", _inputs(_world_modules(world))


def smollm2_shapes(c, world):
    sig = llama_signature(base_model="smollm2-shapes", hidden=576, intermediate=1536, layers=30, heads=9,
                          kv_heads=3)
    mods = [(m.name, m.d_in, m.d_out) for m in sig.modules if m.name.endswith(("q_proj", "v_proj"))]
    c.create_library("smol", signature=sig, shared_a_seed=SEED, shared_a_rank=8, shared_a_modules=[m for m, *_ in mods])
    for k in range(2):
        c.put_adapter_files(peft_files(mods, rank=8, seed=k, recipe=SharedARecipe(seed=SEED)), name=f"a{k}",
                            library="smol")
    return "smol", _inputs(mods, tokens=4)


def demo_library(c, world):
    spec = demo_spec()          # made by the server itself at its first start (demo=True)
    return DEMO, _inputs([(m, spec.signature.spec(m).d_in, 0) for m in spec.shared_a])


LAYOUTS = [("tiny llama, shared A on q/v at rank 4", tiny_world, {}),
           ("tiny llama, no adapters", tiny_world_empty, {}),
           ("m.q and m.v, d_in 64, shared A at rank 8", mqv_rank8, {}),
           ("m.q and m.v, d_in 64, uploaded shared A at rank 8", mqv_uploaded_a, {}),
           ("no shared A, general adapters", general_only, {}),
           ("SmolLM2 shapes, 30 layers, q/v at rank 8", smollm2_shapes, {}),
           ("demo library", demo_library, {"demo": True})]


def _answers(c: RouterClient, library: str, x):
    info = c.describe(library)
    if x is None:
        return info, None
    return info, [c.route(library, x, top_k=8, include_scores=True, normalisation=n)
                  for n in ("frobenius", "activation")]


@pytest.mark.parametrize("build, launch_kw", [l[1:] for l in LAYOUTS], ids=[l[0] for l in LAYOUTS])
def test_library_layout_routes_the_same_after_a_restart(world, start_server, tmp_path, build, launch_kw):
    h = start_server(tmp_path / "data", **launch_kw)
    with RouterClient(h.target, timeout=60) as c:
        library, x = build(c, world)
        before = _answers(c, library, x)
    h.stop(grace=1.0)
    h2 = start_server(tmp_path / "data")
    with RouterClient(h2.target, timeout=60) as c:
        after = _answers(c, library, x)
    assert after[0] == before[0]
    for b, a in zip(before[1] or (), after[1] or ()):
        assert (a.choices, a.scores, a.library_version, a.normalisation, a.fallback) == \
               (b.choices, b.scores, b.library_version, b.normalisation, b.fallback)


def test_store_written_before_the_reader_switch_opens_and_routes_the_same(start_server, tmp_path):
    # tests/fixtures/store_v1 was written by the hand-written reader/writer (see its generator).
    root = tmp_path / "store_v1"
    shutil.copytree(FIXTURE, root)
    (root / "dev.kek").chmod(0o600)           # git keeps 0644; the key provider insists on 0600
    # The copy has no rollback anchor for its new path: adopt it once, as after moving a store.
    LibraryStore.open(root / "data", KeyFileProvider(root / "dev.kek"), create=False,
                      accept_unanchored=True).close()
    h = start_server(root / "data")           # the dev key: data/../dev.kek
    expected = json.loads((root / "expected.json").read_text())
    assert sorted(expected) == ["mqv", "tiny"]
    with RouterClient(h.target, timeout=30) as c:
        for library, want in expected.items():
            x = {m: np.asarray(v, dtype=np.float32) for m, v in want["inputs"].items()}
            ans = want["answer"]
            got = c.route(library, x, top_k=8, include_scores=True, normalisation=ans["normalisation"])
            assert [[ch.name, ch.adapter_id] for ch in got.choices] == ans["choices"], library
            assert (got.library_version, got.normalisation) == (ans["library_version"], ans["normalisation"])
            assert got.scores == pytest.approx(ans["scores"], rel=1e-6), library
