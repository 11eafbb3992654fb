"""Tenants sharing one library: tokens, uploads, store surgery and metric reads for e2e tests."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from seqr_client import RouterClient
from seqr_server.app import ServerHandles
from seqr_server.auth import new_token_entry

from .conftest import LIB, World, create_library, launch

HIDDEN = "team-b-secret"
TEAM_A = ("team-a-0", "team-a-1")
# Stored names -> the world's adapter folders they are uploaded from (ids 0, 1, 2 in this order).
UPLOADS = {"team-a-0": "shared-a0", HIDDEN: "shared-f16", "team-a-1": "shared-a1"}
PRINCIPALS = {
    "admin": dict(roles=["admin"]),
    "team-a": dict(roles=["route"], adapters=["team-a-*"]),
    "observer": dict(roles=["observer"]),
    "observer-a": dict(roles=["observer"], adapters=["team-a-*"]),
}


def write_tokens(path: Path, principals: dict[str, dict]) -> dict[str, str]:
    """A tokens file for ``principals`` (name -> new_token_entry options); returns name -> token."""
    from seqr_server.quotas import Quota

    tokens, entries = {}, []
    for name, kw in principals.items():
        kw = dict(kw)
        quota = kw.pop("quota", None)
        if quota:
            kw["quota"] = Quota(**quota)
        tokens[name], entry = new_token_entry(name=name, **kw)
        entries.append(entry)
    path.write_text(json.dumps({"tokens": entries}))
    return tokens


def connect(h: ServerHandles, tokens: dict[str, str]) -> dict[str, RouterClient]:
    return {n: RouterClient(h.target, token=t, timeout=30) for n, t in tokens.items()}


def close(clients: dict[str, RouterClient]) -> None:
    for c in clients.values():
        c.close()


def populate_tenants(admin: RouterClient, world: World) -> None:
    create_library(admin, world)
    for name, source in UPLOADS.items():
        admin.put_adapter(world.adapters[source], name=name, library=LIB)


def adapter_blob(h: ServerHandles, adapter: str, library: str = LIB) -> Path:
    return h.manager._store.blob_path(library, adapter=adapter, file="adapter_model.safetensors")


def index_blob(h: ServerHandles, adapter: str, library: str = LIB) -> Path:
    """The adapter's sealed routing index: what startup reads (never the PEFT files)."""
    return h.manager._store.blob_path(library, adapter=adapter, role="index")


def object_blob(h: ServerHandles, role: str, library: str = LIB) -> Path:
    return h.manager._store.blob_path(library, role=role)


def flip_bit(path: Path) -> None:
    """One flipped bit in the middle of a sealed blob (inside its ciphertext)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def metric(h: ServerHandles, name: str, library: str = LIB) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{h.metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(rf'^{name}{{library="{re.escape(library)}"}} (\S+)$', text, re.M)
    return None if m is None else float(m.group(1))


class Tenants:
    """A tokens-file server whose LIB holds team-a-0, team-b-secret, team-a-1 (ids 0, 1, 2)."""

    def __init__(self, world: World, root: Path, *, principals: dict[str, dict] = PRINCIPALS, populate: bool = True):
        self.world, self.root = world, root
        self.tokens = write_tokens(root / "tokens.json", principals)
        self.h = launch(root / "data", tokens_file=root / "tokens.json")
        self.c = connect(self.h, self.tokens)
        if populate:
            populate_tenants(self.c["admin"], world)

    def restart(self, **kw) -> None:
        close(self.c)
        self.h.stop(grace=1.0)
        self.h = launch(self.root / "data", tokens_file=self.root / "tokens.json", **kw)
        self.c = connect(self.h, self.tokens)

    def close(self) -> None:
        close(self.c)
        self.h.stop(grace=1.0)
