"""`seqr host` when things go wrong: the router refuses or hangs, routing is required, requests
are bad, the host is full, the command is misconfigured. Errors are OpenAI-shaped."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest

from .openai_host_world import CHAT, host, hosted, prompt_ids, reference_text  # noqa: F401


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
                time.sleep(0.05)
        else:
            pytest.fail("the place of a client that left was never freed")
    assert resp.choices[0].message.content is not None


@pytest.mark.parametrize("args, want", [
    (["--model", "/no/such/model"], "not a Hugging Face model folder"),
    (["--model", "tiny", "--adapter", "just-a-name"], "--adapter takes NAME=PATH"),
    (["--model", "tiny", "--adapters", "/no/such/dir"], "no such folder of adapter folders"),
    (["--model", "tiny", "--adapter", "x=/no/such/adapter"], "no such adapter folder"),
])
def test_seqr_host_configuration_errors_are_one_line(args, want, capsys):
    from seqr_cli.main import main
    assert main(["host", *args, "--no-routing", "--library", "lib", "--listen", "127.0.0.1:0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: INVALID_ARGUMENT: ") and want in err[0], err
