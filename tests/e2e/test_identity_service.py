"""Identity without restarts, through the real server: client certificates under mTLS name the
caller, the tokens file is reloaded on change and on SIGHUP (`seqr serve` as a process), and a
revoked caller is refused on its next call."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from seqr_client import (NotFoundError, PermissionDeniedError, RouterClient, UnauthenticatedError,
                         tls_credentials)
from seqr_server.audit_chain import verify
from seqr_server.auth import new_token_entry
from seqr_cli.main import main
from seqr_server.config import TLSConfig

from .certs import TestCA
from .conftest import LIB, activations, create_library

SEQR = str(Path(sys.executable).with_name("seqr"))


def _write_tokens(path: Path, entries: list[dict]) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(json.dumps({"tokens": entries}))
    os.replace(tmp, path)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_client_certificates_name_the_caller_under_mtls(world, start_server, tmp_path):
    ca = TestCA(tmp_path / "pki")
    pems = {"host-a": ca.issue("host-a"), "b-pod": ca.issue("b-pod", sans=("spiffe://corp/ns/b/sa/vllm",)),
            "ops": ca.issue("ops", dns=("ops.corp",)), "stranger": ca.issue("stranger")}
    observer_token, observer = new_token_entry(name="observer", roles=["observer"])
    _write_tokens(tmp_path / "tokens.json", [
        {"name": "host-a", "mtls": {"cn": "host-a"}, "roles": ["route"], "adapters": ["shared-*"]},
        {"name": "mesh-b", "mtls": {"san": "spiffe://corp/ns/b/sa/vllm"}, "roles": ["route"],
         "adapters": ["general-*"]},
        {"name": "ops", "mtls": {"cn": "ops", "san": "ops.corp"}, "roles": ["admin"]},
        observer])
    audit_log = tmp_path / "audit.log"
    h = start_server(tmp_path / "d", tokens_file=tmp_path / "tokens.json", audit_log=audit_log,
                     tls=TLSConfig(cert_file=ca.server.cert, key_file=ca.server.key, client_ca_file=ca.ca))

    def client(who: str, token: str | None = None) -> RouterClient:
        creds = tls_credentials(ca_file=str(ca.ca), cert_file=str(pems[who].cert), key_file=str(pems[who].key))
        return RouterClient(h.target, creds, token=token, timeout=30)

    with client("ops") as ops:
        create_library(ops, world)
        for name, path in world.adapters.items():
            ops.put_adapter(path, name=name, library=LIB, allow_general=name.startswith("general"))
    x = activations(world)
    with client("host-a") as a:
        assert set(a.route(LIB, x, top_k=10, include_scores=True).scores) == set(world.shared_names)
        with pytest.raises(NotFoundError):                     # hidden = absent, as with tokens
            a.route(LIB, x, candidates=["general-g0"])
        with pytest.raises(PermissionDeniedError):
            a.delete_adapter("shared-a0", library=LIB)
        with pytest.raises(PermissionDeniedError):
            a.list_adapters(LIB)
    with client("b-pod") as b:
        assert set(b.route(LIB, x, top_k=10, include_scores=True).scores) == {"general-g0", "general-g1"}
    with client("host-a", token=observer_token) as a_with_token:              # a token decides who calls
        assert len(a_with_token.list_adapters(LIB)) == len(world.adapters)
    with client("stranger") as s, pytest.raises(UnauthenticatedError):
        s.describe(LIB)

    recs = _records(audit_log)
    assert {r["principal"] for r in recs if r.get("phase") == "result"} == {"ops"}
    fails = [(r["code"], r.get("principal")) for r in recs if r["event"] == "auth.failure"]
    assert fails == [("PERMISSION_DENIED", "host-a"), ("PERMISSION_DENIED", "host-a"), ("UNAUTHENTICATED", None)]


def test_a_changed_tokens_file_takes_effect_without_a_restart(world, start_server, tmp_path):
    keep_token, keep = new_token_entry(name="keep", roles=["admin"])
    gone_token, gone = new_token_entry(name="gone", roles=["observer"])
    new_token, new = new_token_entry(name="new", roles=["observer"])
    tokens = tmp_path / "tokens.json"
    _write_tokens(tokens, [keep, gone])
    h = start_server(tmp_path / "d", tokens_file=tokens, audit_log=tmp_path / "audit.log")
    with RouterClient(h.target, token=keep_token) as admin:
        create_library(admin, world)
    with RouterClient(h.target, token=gone_token) as g, RouterClient(h.target, token=new_token) as n:
        assert [lib.name for lib in g.list_libraries()] == [LIB]
        _write_tokens(tokens, [keep, new])
        stop = threading.Event()
        for _ in range(1000):                  # checked at most once a second, on the request path
            try:
                g.list_libraries()
            except UnauthenticatedError:
                break
            stop.wait(0.02)
        with pytest.raises(UnauthenticatedError):
            g.list_libraries()
        assert [lib.name for lib in n.list_libraries()] == [LIB]
    h.stop(grace=1.0)
    reload = [r for r in _records(tmp_path / "audit.log") if r["event"] == "identity.reload"]
    assert [(r["trigger"], r["added"], r["removed"]) for r in reload] == [("change", ["new"], ["gone"])]


class _Lines:
    """stderr of a process, line by line, read on a thread."""

    def __init__(self, stream):
        self.q: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.q.put(line) for line in stream], daemon=True).start()

    def until(self, predicate, timeout: float = 60) -> dict:
        while True:
            line = self.q.get(timeout=timeout)
            self.seen.append(line)
            doc = json.loads(line) if line.startswith("{") else {}
            if predicate(doc):
                return doc


def test_sighup_reloads_the_tokens_file_of_seqr_serve(world, tmp_path):
    keep_token, keep = new_token_entry(name="keep", roles=["admin"])
    gone_token, gone = new_token_entry(name="gone", roles=["observer"])
    tokens = tmp_path / "tokens.json"
    _write_tokens(tokens, [keep, gone])
    env = {**os.environ, "SEQR_LISTEN": "127.0.0.1:0", "SEQR_METRICS_PORT": "off"}
    proc = subprocess.Popen([SEQR, "serve", "--no-demo", "--tokens-file", str(tokens)], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        err = _Lines(proc.stderr)
        port = err.until(lambda d: d.get("msg") == "listening")["port"]
        err.until(lambda d: d.get("msg") == "serving")
        with RouterClient(f"127.0.0.1:{port}", token=gone_token) as g, \
                RouterClient(f"127.0.0.1:{port}", token=keep_token) as k:
            assert g.list_libraries() == []
            _write_tokens(tokens, [keep])
            proc.send_signal(signal.SIGHUP)
            done = err.until(lambda d: d.get("msg", "").startswith("tokens file reload"))
            assert (done["msg"], done["trigger"], done["removed"]) == ("tokens file reloaded", "SIGHUP", ["gone"])
            with pytest.raises(UnauthenticatedError):
                g.list_libraries()
            tokens.write_text("{ not json")
            proc.send_signal(signal.SIGHUP)
            failed = err.until(lambda d: d.get("msg", "").startswith("tokens file reload"))
            assert (failed["msg"], failed["level"]) == ("tokens file reload failed; keeping the previous callers",
                                                        "error")
            assert k.list_libraries() == []                        # the previous callers still hold
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    audit_log = tmp_path / "data.audit.log"
    reloads = [(r["trigger"], r["code"]) for r in _records(audit_log) if r["event"] == "identity.reload"]
    assert reloads == [("SIGHUP", "OK"), ("SIGHUP", "INVALID_ARGUMENT")]
    assert [r["code"] for r in _records(audit_log) if r["event"] == "auth.failure"] == ["UNAUTHENTICATED"]
    assert verify(audit_log).ok
    assert main(["audit", "verify", str(audit_log)]) == 0
