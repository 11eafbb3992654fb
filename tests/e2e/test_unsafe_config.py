"""Unsafe configurations refuse to start (issue 9, item 8), through `seqr serve` and create_server.

* mTLS asked for (--tls-client-ca) without --tls-cert/--tls-key used to run plaintext;
* a non-loopback --listen without a tokens file used to let anyone export and delete,
  now it needs an explicit --insecure-open (SEQR_INSECURE_OPEN=1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from seqr_client import RouterClient
from seqr_core.errors import InvalidArgumentError
from seqr_server.auth import append_token, new_token_entry
from seqr_cli.main import build_parser
from seqr_server.cli import config_from_args
from seqr_server.config import TLSConfig

from .test_cli import SEQR

PEM = Path("/nonexistent/seqr-test.pem")    # never read: the refusal comes first

REFUSED = [
    ("all IPv4 interfaces, no tokens", dict(listen="0.0.0.0:0"), "listen"),
    ("all IPv6 interfaces, no tokens", dict(listen="[::]:0"), "listen"),
    ("a host name, no tokens", dict(listen="seqr.internal:0"), "listen"),
    ("a LAN address, no tokens", dict(listen="10.1.2.3:0"), "listen"),
    ("client CA without cert and key", dict(tls=lambda: TLSConfig(cert_file=None, key_file=None, client_ca_file=PEM)),
     "tls.cert_file"),
    ("cert without key", dict(tls=lambda: TLSConfig(cert_file=PEM, key_file=None)), "tls.key_file"),
]


@pytest.mark.parametrize("case,overrides,field", REFUSED, ids=[c[0] for c in REFUSED])
def test_create_server_refuses_unsafe_configs(start_server, tmp_path, case, overrides, field):
    with pytest.raises(InvalidArgumentError) as ei:
        start_server(tmp_path / "d", **{k: v() if callable(v) else v for k, v in overrides.items()})
    assert ei.value.field == field
    assert not (tmp_path / "d").exists()          # refused before the store was touched


def _tokens(tmp_path: Path) -> tuple[Path, str]:
    token, entry = new_token_entry(name="ops", roles=["admin"], libraries=["*"], adapters=["*"])
    append_token(tmp_path / "tokens.json", entry)
    return tmp_path / "tokens.json", token


ACCEPTED = ["explicitly insecure open", "tokens file", "loopback name"]


@pytest.mark.parametrize("case", ACCEPTED)
def test_create_server_accepts_safe_or_explicit_configs(start_server, tmp_path, case):
    token = None
    if case == "explicitly insecure open":
        kw = dict(listen="0.0.0.0:0", insecure_open=True)
    elif case == "tokens file":
        path, token = _tokens(tmp_path)
        kw = dict(listen="0.0.0.0:0", tokens_file=path)
    else:
        kw = dict(listen="localhost:0")
    h = start_server(tmp_path / "d", **kw)
    with RouterClient(f"127.0.0.1:{h.port}", token=token) as c:
        assert c.list_libraries() == []


def _serve(tmp_path: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SEQR_")}
    env = {**inherited, "SEQR_METRICS_PORT": "off", "SEQR_LISTEN": "127.0.0.1:0", **env}
    return subprocess.Popen([SEQR, "serve", *args], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)


SERVE_REFUSED = [
    ("--tls-client-ca alone", ["--tls-client-ca", str(PEM)], {}, "--tls-cert"),
    ("--tls-key alone", ["--tls-key", str(PEM)], {}, "--tls-cert"),
    ("SEQR_TLS_CLIENT_CA alone", [], {"SEQR_TLS_CLIENT_CA": str(PEM)}, "--tls-cert"),
    ("--listen 0.0.0.0 without tokens", ["--listen", "0.0.0.0:0"], {}, "--insecure-open"),
    ("SEQR_LISTEN=[::] without tokens", [], {"SEQR_LISTEN": "[::]:0"}, "--insecure-open"),
]


@pytest.mark.parametrize("case,args,env,hint", SERVE_REFUSED, ids=[c[0] for c in SERVE_REFUSED])
def test_seqr_serve_refuses_unsafe_configs_with_one_line(tmp_path, case, args, env, hint):
    proc = _serve(tmp_path, args, env)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqr serve: refusing to start: ") and hint in lines[0], err
    assert not (tmp_path / "data").exists()


SERVE_ACCEPTED = [
    ("--insecure-open", ["--listen", "0.0.0.0:0", "--insecure-open"], {}),
    ("SEQR_INSECURE_OPEN=1", [], {"SEQR_LISTEN": "0.0.0.0:0", "SEQR_INSECURE_OPEN": "1"}),
]


@pytest.mark.parametrize("case,args,env", SERVE_ACCEPTED, ids=[c[0] for c in SERVE_ACCEPTED])
def test_seqr_serve_starts_open_off_loopback_only_when_told(tmp_path, case, args, env):
    proc = _serve(tmp_path, ["--no-demo", *args], env)
    try:
        port, lines = None, []
        for line in proc.stderr:
            lines.append(line)
            doc = json.loads(line)
            port = doc.get("port", port)
            if doc["msg"] == "serving":
                break
        assert port, "".join(lines)
        assert "NO TOKENS FILE" in "".join(lines)     # still loud about it
        with RouterClient(f"127.0.0.1:{port}") as c:
            assert c.list_libraries() == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_limit_flags_and_variables_reach_the_config(monkeypatch):
    monkeypatch.setenv("SEQR_MAX_RANK", "64")
    a = build_parser().parse_args(["serve", "--max-name-length", "128", "--max-meta-value-length", "512",
                                   "--max-library-modules", "600", "--max-d-in", "32768", "--max-d-out", "30000",
                                   "--max-shared-a-mb", "100"])
    lim = config_from_args(a).limits
    assert (lim.max_name_length, lim.max_meta_value_length, lim.max_library_modules, lim.max_d_in, lim.max_d_out,
            lim.max_rank, lim.max_shared_a_bytes) == (128, 512, 600, 32768, 30000, 64, 100 << 20)
