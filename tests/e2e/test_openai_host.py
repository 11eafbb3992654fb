"""`seqr host` driven by the official `openai` client: a tiny Llama saved as a real Hugging Face
folder, real PEFT adapters, a real seqr server and library, and a reference computed here with
the plain helpers (capture -> route -> apply -> generate) that the host's answers must equal."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
            c.put_adapter(path, name=name, library=lib)
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


# ---------------------------------------------------------------------------- chat, completion, stream
def test_chat_is_routed_and_generated_with_the_routed_adapter(hosted):
    ids = prompt_ids(hosted, chat=True)
    want = reference_route(hosted, ids)
    text, n = reference_text(hosted, ids, [want.best.name])
    with host(hosted) as (_, client):
        raw = client.chat.completions.with_raw_response.create(model="seqr", messages=CHAT, max_tokens=8,
                                                               temperature=0)
    resp = raw.parse()
    seqr = resp.model_extra["seqr"]
    assert seqr["routed"] and seqr["adapter"] == want.best.name and seqr["adapter_id"] == want.best.adapter_id
    assert seqr["margin"] == pytest.approx(want.margin, rel=1e-6)
    assert seqr["library"] == LIB and seqr["library_version"] == want.library_version and seqr["reason"] == ""
    assert raw.headers["x-seqr-adapter"] == want.best.name and raw.headers["x-seqr-routed"] == "true"
    assert raw.headers["x-seqr-library-version"] == str(want.library_version)
    assert resp.choices[0].message.content == text and resp.choices[0].message.role == "assistant"
    others = {reference_text(hosted, ids, [n])[0] for n in hosted.shared if n != want.best.name}
    assert text != reference_text(hosted, ids, [])[0] and text not in others     # the adapter shows
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == n
    assert resp.object == "chat.completion" and resp.model == "seqr"
    assert hosted.server.metrics.registry.get_sample_value(
        "seqr_route_latency_seconds_count", {"library": LIB, "form": "moments"}) >= 1   # shared A: moments


def test_completion_and_streaming_say_which_adapter_served(hosted):
    ids = prompt_ids(hosted, chat=False)
    want = reference_route(hosted, ids)
    text, _ = reference_text(hosted, ids, [want.best.name], max_new_tokens=10)
    with host(hosted) as (_, client):
        done = client.completions.create(model="seqr", prompt=PROMPT, max_tokens=10, temperature=0)
        chunks = list(client.completions.create(model="seqr", prompt=PROMPT, max_tokens=10, temperature=0,
                                                stream=True))
        chat_chunks = list(client.chat.completions.create(model="seqr", messages=CHAT, max_tokens=6, temperature=0,
                                                          stream=True, stream_options={"include_usage": True}))
    assert done.choices[0].text == text and done.model_extra["seqr"]["adapter"] == want.best.name
    assert chunks[0].model_extra["seqr"]["adapter"] == want.best.name
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    chat_want, _ = reference_text(hosted, prompt_ids(hosted, chat=True),
                                  [reference_route(hosted, prompt_ids(hosted, chat=True)).best.name], max_new_tokens=6)
    assert chat_chunks[0].choices[0].delta.role == "assistant" and "seqr" in chat_chunks[0].model_extra
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices) == chat_want
    assert chat_chunks[-1].usage.completion_tokens <= 6 and not chat_chunks[-1].choices


def test_stop_strings_cut_the_text_in_both_modes(hosted):
    ids = prompt_ids(hosted, chat=False)
    full, _ = reference_text(hosted, ids, [reference_route(hosted, ids).best.name], max_new_tokens=12)
    stop = full[3:5] if len(full) >= 5 else full[-1:]
    want = full[:full.find(stop)]
    with host(hosted) as (_, client):
        done = client.completions.create(model="seqr", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
        streamed = list(client.completions.create(model="seqr", prompt=PROMPT, max_tokens=12, temperature=0,
                                                  stop=stop, stream=True))
    assert done.choices[0].text == want and done.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_top_k_mix_and_low_margin_base(hosted):
    ids = prompt_ids(hosted, chat=True)
    want = reference_route(hosted, ids, top_k=2)
    names, weights = [c.name for c in want.choices], [c.weight for c in want.choices]
    mixed_text, _ = reference_text(hosted, ids, names, weights)
    base_text, _ = reference_text(hosted, ids, [])
    with host(hosted, top_k=2) as (_, client):
        raw = client.chat.completions.with_raw_response.create(model="seqr", messages=CHAT, max_tokens=8,
                                                               temperature=0)
    seqr = raw.parse().model_extra["seqr"]
    assert [(a["name"], a["id"]) for a in seqr["adapters"]] == [(c.name, c.adapter_id) for c in want.choices]
    assert [a["weight"] for a in seqr["adapters"]] == pytest.approx(weights)
    assert raw.headers["x-seqr-adapter"] == "+".join(names)
    assert raw.parse().choices[0].message.content == mixed_text
    with host(hosted, min_margin=1e9) as (_, client):
        resp = client.chat.completions.create(model="seqr", messages=CHAT, max_tokens=8, temperature=0)
    seqr = resp.model_extra["seqr"]
    assert seqr["routed"] and seqr["adapter"] is None and seqr["reason"].startswith("margin ")
    assert "below min-margin 1e+09" in seqr["reason"] and resp.choices[0].message.content == base_text


def test_models_list_and_pinned_adapter(hosted):
    ids = prompt_ids(hosted, chat=True)
    pinned, _ = reference_text(hosted, ids, ["shared-1"])
    with host(hosted) as (_, client):
        listed = [m.id for m in client.models.list()]
        resp = client.chat.completions.create(model="shared-1", messages=CHAT, max_tokens=8, temperature=0)
        assert client.models.retrieve("base").id == "base"
    assert listed == ["seqr", "base", "shared-0", "shared-1", "shared-2", "general-0"]
    seqr = resp.model_extra["seqr"]
    assert seqr["adapter"] == "shared-1" and not seqr["routed"] and seqr["reason"] == "adapter requested by name"
    assert resp.choices[0].message.content == pinned


def test_a_library_with_general_adapters_is_routed_on_activations(hosted):
    ids = prompt_ids(hosted, chat=True)
    with host(hosted, library=MIXED) as (_, client):
        resp = client.chat.completions.create(model="seqr", messages=CHAT, max_tokens=4, temperature=0)
    mods = sorted({m for a in hosted.client.describe(MIXED).adapters for m in a.modules})
    x = capture_inputs(hosted.reference, ids, modules=mods)
    want = hosted.client.route(MIXED, x)
    assert resp.model_extra["seqr"]["adapter"] == want.best.name
    assert hosted.server.metrics.registry.get_sample_value(
        "seqr_route_latency_seconds_count", {"library": MIXED, "form": "activations"}) >= 1


def test_an_adapter_whose_host_copy_differs_is_never_routed_to(hosted, tmp_path):
    # Same name as a library adapter, other weights: routing on the library's factors and
    # applying these would serve something the decision was not computed on.
    other = make_peft_adapter(tiny_llama(seed=1)[0], tmp_path / "shared-0", seed=99, rank=RANK,
                              shared_a=SharedARecipe(seed=SEED), targets=QV)
    engine = Engine(*load_model(str(hosted.base_dir)), {"shared-0": other})
    r = HostRouter(RouterClient(hosted.server.target, timeout=5), library=LIB,
                   local={"shared-0": weights_sha256(other)})
    srv = HostServer(OpenAIHost(engine, r), listen="127.0.0.1:0").start()
    try:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", timeout=60, max_retries=0)
        resp = client.chat.completions.create(model="seqr", messages=CHAT, max_tokens=2, temperature=0)
    finally:
        srv.stop()
        r.client.close()
    assert resp.model_extra["seqr"]["adapter"] is None
    assert resp.model_extra["seqr"]["reason"] == "no adapter of the library is held by this host"


# ---------------------------------------------------------------------------- router down
def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def blackhole():
    """A port that accepts TCP connections and never says a word: a hung router."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.mark.parametrize("down", ["refused", "silent"])
def test_router_down_answers_with_the_base_model_and_says_so(hosted, down, blackhole):
    target = f"127.0.0.1:{_closed_port()}" if down == "refused" else blackhole
    ids = prompt_ids(hosted, chat=True)
    base_text, _ = reference_text(hosted, ids, [])
    with host(hosted, target=target, timeout=1.0) as (_, client):
        raw = client.chat.completions.with_raw_response.create(model="seqr", messages=CHAT, max_tokens=8,
                                                               temperature=0)
        streamed = list(client.chat.completions.create(model="seqr", messages=CHAT, max_tokens=8, temperature=0,
                                                       stream=True))
    seqr = raw.parse().model_extra["seqr"]
    assert not seqr["routed"] and seqr["adapter"] is None
    assert seqr["reason"].startswith("routing failed: " + ("UNAVAILABLE" if down == "refused" else "DEADLINE_EXCEEDED"))
    assert raw.headers["x-seqr-adapter"] == "base" and raw.headers["x-seqr-routed"] == "false"
    assert raw.parse().choices[0].message.content == base_text
    assert streamed[0].model_extra["seqr"]["reason"].startswith("routing failed")
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == base_text


def test_router_required_answers_503(hosted, blackhole):
    with host(hosted, target=blackhole, timeout=1.0, router_required=True) as (_, client):
        with pytest.raises(openai.InternalServerError) as ei:
            client.chat.completions.create(model="seqr", messages=CHAT, max_tokens=4)
        assert client.chat.completions.create(model="base", messages=CHAT, max_tokens=2).choices  # no routing needed
    assert ei.value.status_code == 503
    err = ei.value.body
    assert err["type"] == "server_error" and err["code"] == "router_unavailable"
    assert "DEADLINE_EXCEEDED" in err["message"] and err["param"] is None


# ---------------------------------------------------------------------------- bad requests
BAD = [  # (path, body, status, param, code)
    ("/chat/completions", {"model": "seqr", "messages": []}, 400, "messages", "invalid_value"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model", "missing_required_parameter"),
    ("/chat/completions", {"model": "seqr", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", "invalid_value"),
    ("/chat/completions", {"model": "seqr", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content[0].type", "invalid_value"),
    ("/chat/completions", {"model": "seqr", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400,
     "max_tokens", "invalid_value"),
    ("/chat/completions", {"model": "seqr", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000},
     400, "max_tokens", "invalid_value"),
    ("/chat/completions", {"model": "seqr", "messages": [{"role": "user", "content": "x"}], "max_tokens": 512},
     400, "max_tokens", "context_length_exceeded"),
    ("/chat/completions", {"model": "seqr", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400,
     "temperature", "invalid_value"),
    ("/chat/completions", {"model": "seqr", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400,
     "stream", "invalid_value"),
    ("/chat/completions", {"model": "seqr", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n",
     "unsupported_parameter"),
    ("/chat/completions", {"model": "seqr", "messages": [{"role": "user", "content": "x"}],
                           "tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter"),
    ("/chat/completions", {"model": "seqr", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400,
     "stop", "invalid_value"),
    ("/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model",
     "model_not_found"),
    ("/chat/completions", {"model": "seqr", "messages": [{"role": "user", "content": "x" * 3000}]}, 400, "messages",
     "context_length_exceeded"),
    ("/completions", {"model": "seqr", "prompt": ["a", "b"]}, 400, "prompt", "invalid_value"),
    ("/completions", {"model": "seqr", "prompt": ""}, 400, "prompt", "invalid_value"),
    ("/completions", [1, 2], 400, None, "invalid_body"),
    ("/completions", b"{not json", 400, None, "invalid_json"),
    ("/completions", b"{" + b" " * 20_000 + b"}", 413, None, "request_too_large"),   # over max_body_bytes
    ("/embeddings", {"model": "seqr", "input": "x"}, 404, None, "not_found"),
]


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_error_bodies(hosted):
    with host(hosted, max_prompt_tokens=1024, max_body_bytes=16_384) as (srv, client):
        for path, body, status, param, code in BAD:
            got, doc = _post(srv.url + path, body)
            assert got == status, (path, body if not isinstance(body, bytes) else body[:20], doc)
            err = doc["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["param"] == param and err["code"] == code and err["message"], err
            assert err["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError) as ei:          # the official client sees the same body
            client.chat.completions.create(model="seqr", messages=[])
        assert ei.value.status_code == 400 and ei.value.body["param"] == "messages"
        with urllib.request.urlopen(srv.url + "/models", timeout=10) as r:     # still serving
            assert r.status == 200


# ---------------------------------------------------------------------------- admission
def test_a_full_host_says_429_and_a_client_that_leaves_frees_its_place(hosted):
    with host(hosted, max_queue=1) as (_, client):
        stream = client.chat.completions.create(model="base", messages=CHAT, max_tokens=440, temperature=0,
                                                stream=True)
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        with pytest.raises(openai.RateLimitError) as ei:
            client.chat.completions.create(model="base", messages=CHAT, max_tokens=2)
        assert ei.value.status_code == 429 and ei.value.body["code"] == "rate_limit_exceeded"
        stream.close()            # the client goes away mid-stream: its generation is cancelled
        for _ in range(100):
            try:
                resp = client.chat.completions.create(model="base", messages=CHAT, max_tokens=2)
                break
            except openai.RateLimitError:
                import time
                time.sleep(0.05)
        else:
            pytest.fail("the place of a client that left was never freed")
    assert resp.choices[0].message.content is not None


# ---------------------------------------------------------------------------- the command
def test_seqr_host_command_serves_routed_requests_and_stops_on_sigterm(hosted):
    seqr = str(Path(sys.executable).with_name("seqr"))
    proc = subprocess.Popen([seqr, "host", "--model", str(hosted.base_dir), "--adapters",
                             str(hosted.shared["shared-0"].parent), "--listen", "127.0.0.1:0",
                             "--target", hosted.server.target, "--library", LIB, "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "SEQR_TOKEN": ""})
    try:
        url, lines = None, []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("seqr host: listening on "):
                url = line.split()[-1]
                break
        assert url, "".join(lines)
        client = openai.OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)
        resp = client.chat.completions.create(model="seqr", messages=CHAT, max_tokens=4, temperature=0)
        want = reference_route(hosted, prompt_ids(hosted, chat=True))
        assert resp.model_extra["seqr"]["adapter"] == want.best.name
        assert [m.id for m in client.models.list()] == ["seqr", "base", "shared-0", "shared-1", "shared-2"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
