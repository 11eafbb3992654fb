"""Tokens file reloads (on demand and on change), and client certificates mapped to callers."""

from __future__ import annotations

import json
import os

import pytest

from seqr_core.errors import InvalidArgumentError, PermissionDeniedError, UnauthenticatedError
from seqr_server.audit import AuditLog
from seqr_server.auth import Authenticator, token_digest


def _write(path, *entries) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(json.dumps({"tokens": list(entries)}))
    os.replace(tmp, path)              # how operators (and `seqr tokens new`) rewrite it


def _tok(name, token, roles=("route",), **kw):
    return {"name": name, "sha256": token_digest(token), "roles": list(roles), **kw}


def _md(token):
    return [("authorization", f"Bearer {token}")]


def _cert(cn=None, sans=()):
    ident = {"transport_security_type": [b"ssl"]}
    if cn:
        ident["x509_common_name"] = [cn.encode()]
    if sans:
        ident["x509_subject_alternative_name"] = [s.encode() for s in sans]
    return ident


def test_a_changed_file_is_read_at_most_once_per_poll_interval(tmp_path):
    now = [100.0]
    path = tmp_path / "tokens.json"
    _write(path, _tok("a", "ta"), _tok("b", "tb"))
    auth = Authenticator.from_file(path, poll_s=1.0, clock=lambda: now[0])
    assert auth.authenticate(_md("ta"), "Router/Route").name == "a"
    _write(path, _tok("b", "tb"))                       # revoke a
    now[0] += 0.5
    assert auth.authenticate(_md("ta"), "Router/Route").name == "a"     # not checked yet
    now[0] += 0.5
    with pytest.raises(UnauthenticatedError):
        auth.authenticate(_md("ta"), "Router/Route")
    assert auth.authenticate(_md("tb"), "Router/Route").name == "b"


def test_reload_revokes_at_once_and_audits_who_changed(tmp_path):
    path = tmp_path / "tokens.json"
    _write(path, _tok("a", "ta"), _tok("b", "tb"))
    audit = AuditLog(tmp_path / "audit.log")
    auth = Authenticator.from_file(path, audit=audit, poll_s=3600)
    _write(path, _tok("b", "tb"), _tok("c", "tc"))
    assert auth.reload(trigger="SIGHUP")
    with pytest.raises(UnauthenticatedError):
        auth.authenticate(_md("ta"), "Router/Route")
    assert auth.authenticate(_md("tc"), "Router/Route").name == "c"
    audit.close()
    rec = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()
           if "identity.reload" in line][0]
    assert (rec["trigger"], rec["code"], rec["added"], rec["removed"]) == ("SIGHUP", "OK", ["c"], ["a"])


@pytest.mark.parametrize("bad", [b"{not json", b"\xff\xfe", b'{"tokens": [1]}', b"[" * 100_000,
                                 b'{"tokens": [{"sha256": "00", "roles": ["route"]}]}'],
                         ids=["bad json", "not utf-8", "entry not an object", "deeply nested", "bad digest"])
def test_a_failed_reload_keeps_the_previous_callers_and_is_audited(tmp_path, bad, caplog):
    path = tmp_path / "tokens.json"
    _write(path, _tok("a", "ta"))
    audit = AuditLog(tmp_path / "audit.log")
    auth = Authenticator.from_file(path, audit=audit, poll_s=3600)
    path.write_bytes(bad)
    assert auth.reload() is False
    assert auth.authenticate(_md("ta"), "Router/Route").name == "a"
    assert "tokens file reload failed" in caplog.text
    audit.close()
    rec = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()
           if "identity.reload" in line][0]
    assert rec["code"] in ("INVALID_ARGUMENT", "FAILED_PRECONDITION") and len(rec["error"]) <= 256


def test_a_deleted_tokens_file_keeps_the_previous_callers(tmp_path):
    now = [0.0]
    path = tmp_path / "tokens.json"
    _write(path, _tok("a", "ta"))
    auth = Authenticator.from_file(path, clock=lambda: now[0])
    path.unlink()
    now[0] += 5
    assert auth.authenticate(_md("ta"), "Router/Route").name == "a"


CERT_ENTRIES = [
    {"name": "host-a", "mtls": {"cn": "host-a"}, "roles": ["route"], "adapters": ["team-a-*"]},
    {"name": "mesh-b", "mtls": {"san": "spiffe://corp/ns/b/sa/vllm"}, "roles": ["route"]},
    {"name": "ops", "mtls": {"cn": "ops", "san": "ops.corp"}, "roles": ["admin"]},
    {"name": "token-user", "sha256": token_digest("tt"), "roles": ["observer"]},
]

CERT_CASES = [
    # (certificate, bearer token, method, principal or error)
    (_cert("host-a"), None, "Router/Route", "host-a"),
    (_cert("other", ["spiffe://corp/ns/b/sa/vllm"]), None, "Router/Route", "mesh-b"),
    (_cert("ops", ["ops.corp"]), None, "LibraryAdmin/DeleteAdapter", "ops"),
    (_cert("ops", ["elsewhere"]), None, "Router/Route", UnauthenticatedError),   # both fields must match
    (_cert("host-a", ["spiffe://corp/ns/b/sa/vllm"]), None, "Router/Route", UnauthenticatedError),  # two callers
    (_cert("stranger"), None, "Router/Route", UnauthenticatedError),
    (_cert("HOST-A"), None, "Router/Route", UnauthenticatedError),               # exact match only
    (_cert("host-a"), None, "LibraryAdmin/DeleteAdapter", PermissionDeniedError),
    (_cert("host-a"), "tt", "LibraryAdmin/ListAdapters", "token-user"),          # a token decides
    (_cert("host-a"), "wrong", "Router/Route", UnauthenticatedError),            # ... even a bad one
    ({"transport_security_type": [b"insecure"]}, None, "Router/Route", UnauthenticatedError),
    (None, None, "Router/Route", UnauthenticatedError),
]


@pytest.mark.parametrize("ident,token,method,expect", CERT_CASES)
def test_client_certificates_map_to_callers(tmp_path, ident, token, method, expect):
    path = tmp_path / "tokens.json"
    _write(path, *CERT_ENTRIES)
    auth = Authenticator.from_file(path)
    md = _md(token) if token else []
    if isinstance(expect, str):
        assert auth.authenticate(md, method, peer_identity=ident).name == expect
    else:
        with pytest.raises(expect):
            auth.authenticate(md, method, peer_identity=ident)


@pytest.mark.parametrize("entry,field", [
    ({"mtls": {"cn": ""}, "roles": ["route"]}, "tokens[0].mtls"),
    ({"mtls": {"subject": "x"}, "roles": ["route"]}, "tokens[0].mtls"),
    ({"mtls": "host-a", "roles": ["route"]}, "tokens[0].mtls"),
    ({"mtls": {"cn": "x" * 300}, "roles": ["route"]}, "tokens[0].mtls"),
    ({"mtls": {"cn": "a"}, "sha256": "0" * 64, "roles": ["route"]}, "tokens[0]"),
    ({"roles": ["route"]}, "tokens[0]"),
    ("not an object", "tokens[0]"),
    ({"mtls": {"cn": "a"}, "roles": [{"x": 1}]}, "tokens[0].roles"),
])
def test_malformed_certificate_entries_are_refused_naming_the_entry(tmp_path, entry, field):
    path = tmp_path / "tokens.json"
    _write(path, entry)
    with pytest.raises(InvalidArgumentError) as ei:
        Authenticator.from_file(path)
    assert ei.value.field == field


def test_two_entries_for_the_same_certificate_are_refused(tmp_path):
    path = tmp_path / "tokens.json"
    _write(path, {"mtls": {"cn": "a"}, "roles": ["route"]}, {"mtls": {"cn": "a"}, "roles": ["admin"]})
    with pytest.raises(InvalidArgumentError) as ei:
        Authenticator.from_file(path)
    assert ei.value.field == "tokens[1].mtls"
