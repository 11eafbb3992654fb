"""The world `seqr host` tests run in: a tiny Llama saved as a real Hugging Face folder, real PEFT
adapters, a real seqr server with two libraries, the host's Engine, and a reference computed
with the plain helpers (capture -> route -> apply -> generate) that the host's answers must equal.

Import ``hosted`` into a test module to use it (a module-scoped fixture)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch

from seqr_client import RouterClient
from seqr_client.hf_host import apply_decision, capture_inputs, load_adapters, moments, project
from seqr_client.hf_models import tiny_llama
from seqr_client.host_engine import Engine, adapter_folders, load_model
from seqr_client.host_routing import HostRouter, weights_sha256
from seqr_client.openai_host import HostConfig, HostServer, OpenAIHost
from seqr_core import SharedARecipe, signature_from_hf_config

from ..peft_factory import make_peft_adapter
from .conftest import launch

LIB, MIXED, SEED, RANK = "hosted", "hosted-mixed", 777, 4
QV = ("q_proj", "v_proj")
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "def add(a, b): return"}]
PROMPT = "import numpy as np\nx ="


@dataclass
class Hosted:
    base_dir: Path
    shared: dict          # name -> folder (shared A)
    general: dict         # name -> folder (own A)
    server: object        # ServerHandles
    client: RouterClient
    engine: Engine
    reference: object     # an independent PeftModel with the same adapters
    tokenizer: object


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosted")
    model, tok = tiny_llama(seed=1)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    recipe = SharedARecipe(seed=SEED)
    shared = {f"shared-{i}": make_peft_adapter(model, root / "adapters" / f"shared-{i}", seed=20 + i, rank=RANK,
                                               shared_a=recipe, targets=QV) for i in range(3)}
    general = {"general-0": make_peft_adapter(model, root / "general" / "general-0", seed=30, rank=RANK, targets=QV)}
    h = launch(root / "data", metrics_port=None)
    c = RouterClient(h.target, timeout=30)
    sig = signature_from_hf_config(model.config.to_dict(), base_model="tiny-hosted")
    qv = [m.name for m in sig.modules if m.name.endswith(QV)]
    for lib, dirs in ((LIB, shared), (MIXED, {**shared, **general})):
        c.create_library(lib, signature=sig, shared_a_seed=SEED, shared_a_rank=RANK, shared_a_modules=qv)
        for name, path in dirs.items():
            c.put_adapter(path, name=name, library=lib, allow_general=name in general)
    engine = Engine(*load_model(str(root / "base")), adapter_folders(pairs=[f"{n}={p}" for n, p in
                                                                            {**shared, **general}.items()]))
    ref_base, _ = load_model(str(root / "base"))
    reference = load_adapters(ref_base, {**shared, **general})
    yield Hosted(root / "base", shared, general, h, c, engine, reference, tok)
    c.close()
    h.stop(grace=1.0)


@contextmanager
def host(hosted: Hosted, *, library: str = LIB, target: str | None = None, router: bool = True,
         top_k: int = 1, min_margin: float = 0.0, timeout: float = 5.0, **config):
    """A running `seqr host` over the shared engine, and an openai client for it."""
    local = {n: weights_sha256(p) for n, p in hosted.engine.adapters.items()}
    r = None
    if router:
        rc = RouterClient(target or hosted.server.target, timeout=timeout)
        r = HostRouter(rc, library=library, local=local, top_k=top_k, min_margin=min_margin, timeout=timeout)
    srv = HostServer(OpenAIHost(hosted.engine, r, HostConfig(**config)), listen="127.0.0.1:0").start()
    try:
        yield srv, openai.OpenAI(base_url=srv.url, api_key="unused", timeout=60, max_retries=0)
    finally:
        srv.stop()
        if r is not None:
            r.client.close()


# ---------------------------------------------------------------------------- the reference
def prompt_ids(hosted: Hosted, *, chat: bool) -> list[int]:
    text = "".join(f"{m['role']}: {m['content']}\n" for m in CHAT) + "assistant:" if chat else PROMPT
    return hosted.tokenizer(text)["input_ids"]          # the byte tokenizer has no chat template


def reference_route(hosted: Hosted, ids, *, library: str = LIB, top_k: int = 1):
    mods = sorted({m for a in hosted.client.describe(library).adapters for m in a.modules})
    x = capture_inputs(hosted.reference, ids, modules=mods)
    info = hosted.client.describe(library, include_shared_a=True)
    z = project(x, info.shared_a)
    return hosted.client.route(library, moments=moments(z), tokens=len(ids), top_k=top_k)


def reference_text(hosted: Hosted, ids, adapters, weights=None, *, max_new_tokens: int = 8) -> tuple[str, int]:
    m = hosted.reference
    x = torch.tensor([ids])
    with torch.no_grad():
        if adapters:
            apply_decision(m, adapters, weights)
            out = m.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=hosted.tokenizer.pad_token_id)
        else:
            with m.disable_adapter():
                out = m.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=hosted.tokenizer.pad_token_id)
    new = out[0, len(ids):]
    return hosted.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False), len(new)


