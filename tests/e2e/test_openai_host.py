"""`seqr host` driven by the official `openai` client against a real server: chat, completion,
streaming, stop strings, top-k mixes, the margin gate, pinned adapters, and the command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from seqr_client import RouterClient
from seqr_client.hf_host import capture_inputs
from seqr_client.hf_models import tiny_llama
from seqr_client.host_engine import Engine, load_model
from seqr_client.host_routing import HostRouter, weights_sha256
from seqr_client.openai_host import HostServer, OpenAIHost
from seqr_core import SharedARecipe

from ..peft_factory import make_peft_adapter
from .openai_host_world import (CHAT, LIB, MIXED, PROMPT, QV, RANK, SEED, host, hosted, prompt_ids,  # noqa: F401
                                reference_route, reference_text)


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
