"""Tokens file parsing, roles per method and ACL globs (no server needed)."""

from __future__ import annotations

import json

import pytest

from seqr_core.errors import InvalidArgumentError, PermissionDeniedError, UnauthenticatedError
from seqr_server.auth import OPEN, Authenticator, METHOD_ROLES, append_token, new_token_entry, token_digest


def _auth(tmp_path, *entries) -> Authenticator:
    p = tmp_path / "tokens.json"
    p.write_text(json.dumps({"tokens": list(entries)}))
    return Authenticator.from_file(p)


def _md(token):
    return [("authorization", f"Bearer {token}")]


def test_open_server_admits_everyone_as_admin_of_everything():
    a = Authenticator.open_server()
    assert a.open and a.authenticate([], "LibraryAdmin/PutAdapter") is OPEN
    assert OPEN.may_use_adapter("anything") and OPEN.may_see_library("any")


def test_token_maps_to_roles_and_globs(tmp_path):
    a = _auth(tmp_path, {"name": "h", "sha256": token_digest("t1"), "roles": ["route"],
                         "adapters": ["team-a-*", "shared"], "libraries": ["prod-*"]})
    p = a.authenticate(_md("t1"), "Router/Route")
    assert p.name == "h" and p.visible(["team-a-x", "team-b-x", "shared", "shared2"]) == ["team-a-x", "shared"]
    assert p.may_see_library("prod-1") and not p.may_see_library("dev-1")
    with pytest.raises(PermissionDeniedError):
        a.authenticate(_md("t1"), "LibraryAdmin/DeleteAdapter")


@pytest.mark.parametrize("metadata", [[], [("authorization", "Basic abc")], _md("wrong")])
def test_missing_or_unknown_tokens_are_unauthenticated(tmp_path, metadata):
    a = _auth(tmp_path, {"sha256": token_digest("t1"), "roles": ["admin"]})
    with pytest.raises(UnauthenticatedError):
        a.authenticate(metadata, "Router/Route")


@pytest.mark.parametrize("entry,field", [
    ({"sha256": "abc", "roles": ["route"]}, "tokens[0].sha256"),
    ({"sha256": "0" * 64, "roles": ["root"]}, "tokens[0].roles"),
    ({"sha256": "0" * 64, "roles": ["route"], "adapters": []}, "tokens[0].adapters"),
])
def test_malformed_tokens_files_are_refused_naming_the_entry(tmp_path, entry, field):
    with pytest.raises(InvalidArgumentError) as ei:
        _auth(tmp_path, entry)
    assert ei.value.field == field


def test_every_rpc_has_roles_and_admin_may_call_all():
    assert all("admin" in roles for roles in METHOD_ROLES.values())
    assert METHOD_ROLES["Router/Route"] == {"route", "admin"}


def test_new_tokens_are_stored_only_as_digests(tmp_path):
    token, entry = new_token_entry(name="x", roles=["observer"])
    append_token(tmp_path / "t.json", entry)
    text = (tmp_path / "t.json").read_text()
    assert token not in text and token_digest(token) in text
    assert Authenticator.from_file(tmp_path / "t.json").authenticate(_md(token), "LibraryAdmin/ListAdapters").name == "x"
