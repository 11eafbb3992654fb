"""A real server on 127.0.0.1:0, the real client, and adapters made by real `peft` at test time.

``world`` (session): a tiny random Llama, its signature, PEFT adapter folders (shared-A in
fp32 and fp16, and general ones), and hidden states captured from the model's forward pass.
``start_server(data_dir, **config)`` starts servers that are stopped at teardown.
``populated`` builds a server with library LIB holding every adapter, plus the index the
core builds from the same files, so tests compare the wire answer with seqr_core.route.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from seqr_client import RouterClient
from seqr_core import (BaseModelSignature, LibraryIndex, SharedARecipe, generate_shared_a,
                       parse_peft_adapter)
from seqr_server.app import ServerHandles, create_server
from seqr_server.config import Limits, ServerConfig

from ..peft_factory import make_peft_adapter, read_dir, signature, tiny_llama

LIB = "tiny"
SEED = 4242
RANK = 4
T = 12


@dataclass(frozen=True)
class World:
    model: object
    sig: BaseModelSignature
    recipe: SharedARecipe
    qv: tuple[str, ...]                 # q_proj/v_proj module names
    shared_a: dict                      # module -> A (RANK, d_in)
    adapters: dict                      # name -> folder, in upload order (ids 0, 1, ...)
    shared_names: tuple[str, ...]
    hidden: dict                        # layer -> (T, hidden) input of q_proj and v_proj
    other_model_dir: Path               # an adapter for a different base model


def _capture(model, n_tokens: int, seed: int) -> dict[int, np.ndarray]:
    """Inputs of each layer's q_proj (the post-norm hidden state v_proj reads too)."""
    out, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.q_proj.register_forward_hook(
            lambda mod, args, res, i=i: out.__setitem__(i, args[0][0].detach().float().numpy().copy())))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(torch.randint(0, 128, (1, n_tokens), generator=g))
    for h in hooks:
        h.remove()
    return out


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    model = tiny_llama()
    sig = signature(model)
    recipe = SharedARecipe(seed=SEED)
    qv = tuple(m.name for m in sig.modules if m.name.endswith(("q_proj", "v_proj")))
    shared_a = {m: generate_shared_a(recipe, module=m, rank=RANK, d_in=sig.spec(m).d_in) for m in qv}
    root = tmp_path_factory.mktemp("adapters")
    specs = [("shared-a0", dict(shared_a=recipe)), ("shared-a1", dict(shared_a=recipe, alpha=16)),
             ("shared-f16", dict(shared_a=recipe, dtype=torch.float16)), ("general-g0", {}),
             ("general-g1", dict(alpha=4))]
    adapters = {name: make_peft_adapter(model, root / name, seed=10 + i, rank=RANK, **kw)
                for i, (name, kw) in enumerate(specs)}
    other = make_peft_adapter(tiny_llama(hidden=48), root / "other-base", seed=99, rank=RANK)
    return World(model=model, sig=sig, recipe=recipe, qv=qv, shared_a=shared_a, adapters=adapters,
                 shared_names=tuple(n for n in adapters if n.startswith("shared")),
                 hidden=_capture(model, T, seed=1), other_model_dir=other)


def activations(world: World, hidden: dict | None = None) -> dict[str, np.ndarray]:
    """module -> x; q_proj and v_proj of a layer get the same array object (sent once)."""
    hidden = hidden or world.hidden
    return {m: hidden[int(m.split(".")[2])] for m in world.qv}


def projected(world: World, hidden: dict | None = None) -> dict[str, np.ndarray]:
    return {m: (x.astype(np.float64) @ world.shared_a[m].T.astype(np.float64)).astype(np.float32)
            for m, x in activations(world, hidden).items()}


def moments(world: World, hidden: dict | None = None) -> dict[str, np.ndarray]:
    out = {}
    for m, z in projected(world, hidden).items():
        z64 = z.astype(np.float64)
        out[m] = (z64.T @ z64 / z64.shape[0]).astype(np.float32)
    return out


def core_index(world: World, names=None, *, version: int | None = None) -> LibraryIndex:
    """The index seqr_core builds from the same files, ids in upload order."""
    names = list(names or world.adapters)
    idx = LibraryIndex.create(name=LIB, signature=world.sig, shared_a=world.shared_a, version=1)
    for i, n in enumerate(names):
        parsed = parse_peft_adapter(read_dir(world.adapters[n]), name=n, signature=world.sig)
        idx, _ = idx.add_adapter(parsed.adapter, adapter_id=i, upload_dtype=parsed.upload_dtype)
    return idx if version is None else idx.with_version(version)


def launch(data_dir: Path, *, load: bool = True, wait: bool = True, **overrides) -> ServerHandles:
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=Path(data_dir), metrics_port=None, demo=False,
                       workers=8, grace_s=5.0, limits=Limits(max_message_bytes=8 << 20, max_tokens=256))
    _, handles = create_server(replace(cfg, **overrides))
    handles.start(load=load)
    if load and wait:
        assert handles.wait_ready(60), handles.load_error
    return handles


@pytest.fixture
def start_server():
    started: list[ServerHandles] = []

    def start(data_dir: Path, **kw) -> ServerHandles:
        started.append(launch(data_dir, **kw))
        return started[-1]

    yield start
    for h in started:
        h.stop(grace=1.0)


def create_library(client: RouterClient, world: World, name: str = LIB):
    return client.create_library(name, signature=world.sig, shared_a_seed=SEED, shared_a_rank=RANK,
                                 shared_a_modules=world.qv)


def populate(handles: ServerHandles, world: World, *, token: str | None = None) -> RouterClient:
    c = RouterClient(handles.target, timeout=30, token=token)
    create_library(c, world)
    for name, path in world.adapters.items():
        c.put_adapter(path, name=name, library=LIB, allow_general=name.startswith("general"))
    return c


@pytest.fixture
def populated(world, start_server, tmp_path):
    """(handles, client) with LIB holding every test adapter, ids 0.. in upload order."""
    h = start_server(tmp_path / "data")
    c = populate(h, world)
    yield h, c
    c.close()


@pytest.fixture(scope="module")
def shared_server(world, tmp_path_factory):
    """Like ``populated`` but one per test module: for tests that must leave no trace."""
    h = launch(tmp_path_factory.mktemp("shared") / "data")
    c = populate(h, world)
    yield h, c
    c.close()
    h.stop(grace=1.0)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    # The servers log every refusal at INFO; keep test output readable.
    caplog.set_level(logging.WARNING)
