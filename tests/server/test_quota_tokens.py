"""Quotas in the tokens file: parsed into the Principal, malformed ones refused naming the field."""

from __future__ import annotations

import json

import pytest

from seqr_core.errors import InvalidArgumentError
from seqr_server.auth import Authenticator, token_digest
from seqr_server.quotas import Quota


def _entry(**kw) -> dict:
    return {"name": "h", "sha256": token_digest("t"), "roles": ["admin"], **kw}


def _auth(tmp_path, entry) -> Authenticator:
    (tmp_path / "tokens.json").write_text(json.dumps({"tokens": [entry]}))
    return Authenticator.from_file(tmp_path / "tokens.json")


def test_a_quota_is_parsed_into_the_principal(tmp_path):
    a = _auth(tmp_path, _entry(quota={"adapters": 50, "bytes": 1 << 30, "libraries": 0}))
    p = a.authenticate([("authorization", "Bearer t")], "LibraryAdmin/PutAdapter")
    assert p.quota == Quota(libraries=0, adapters=50, bytes=1 << 30)
    assert _auth(tmp_path, _entry()).authenticate([("authorization", "Bearer t")], "Router/Route").quota is None


@pytest.mark.parametrize("entry,field", [
    (_entry(quota=5), "tokens[0].quota"),
    (_entry(quota=[1]), "tokens[0].quota"),
    (_entry(quota={"adapter": 1}), "tokens[0].quota"),
    (_entry(quota={"adapters": -1}), "tokens[0].quota.adapters"),
    (_entry(quota={"bytes": True}), "tokens[0].quota.bytes"),
    (_entry(quota={"libraries": "5"}), "tokens[0].quota.libraries"),
    (_entry(quota={"adapters": 1.5}), "tokens[0].quota.adapters"),
    ({k: v for k, v in _entry(quota={"adapters": 1}).items() if k != "name"}, "tokens[0].name"),
])
def test_malformed_quotas_are_refused_naming_the_field(tmp_path, entry, field):
    with pytest.raises(InvalidArgumentError) as ei:
        _auth(tmp_path, entry)
    assert ei.value.field == field
