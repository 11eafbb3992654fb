"""The audit log through the real server: who changed what and with which result, refused
calls, fail-closed changes when the log cannot be written, and no secret or weight in it."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from seqr_client import NotFoundError, PermissionDeniedError, RouterClient, UnauthenticatedError, UnavailableError
from seqr_core.errors import SeqrError as CoreError
from seqr_server.app import create_server
from seqr_server.audit_chain import MAX_STRING, verify
from seqr_server.auth import new_token_entry
from seqr_server.config import KeySource, ServerConfig
from seqr_server.store import init_key_file

from ..peft_factory import read_dir
from .conftest import LIB, activations, create_library, populate


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def audited(world, start_server, tmp_path):
    """A server with a real key file, tokens and its own audit log; LIB holds every adapter."""
    key_file = tmp_path / "keys" / "kek.json"
    init_key_file(key_file)
    tokens, entries = {}, []
    for name, kw in {"ops": dict(roles=["admin"]), "router": dict(roles=["route"], adapters=["shared-*"])}.items():
        tokens[name], entry = new_token_entry(name=name, **kw)
        entries.append(entry)
    (tmp_path / "tokens.json").write_text(json.dumps({"tokens": entries}))
    audit_log = tmp_path / "audit.log"
    h = start_server(tmp_path / "d", tokens_file=tmp_path / "tokens.json", audit_log=audit_log,
                     keys=KeySource(key_file=key_file))
    admin = populate(h, world, token=tokens["ops"])
    yield h, admin, tokens, audit_log
    admin.close()


def test_admin_changes_exports_and_refusals_are_audited_with_who_and_result(world, audited):
    h, admin, tokens, audit_log = audited
    admin.calibrate([activations(world)], library=LIB)
    admin.delete_adapter("general-g1", library=LIB)
    with pytest.raises(NotFoundError):
        admin.delete_adapter("no-such-adapter", library=LIB)
    assert admin.export_scorer(LIB)
    with RouterClient(h.target, token="not-a-token", timeout=10) as c, pytest.raises(UnauthenticatedError):
        c.list_libraries()
    with RouterClient(h.target, token=tokens["router"], timeout=10) as c, pytest.raises(PermissionDeniedError):
        c.delete_adapter("shared-a0", library=LIB)

    recs = _records(audit_log)
    results = [(r["action"], r.get("adapter"), r["code"], r["principal"]) for r in recs if r.get("phase") == "result"]
    assert results == [("CreateLibrary", None, "OK", "ops"),
                       *[("PutAdapter", n, "OK", "ops") for n in world.adapters],
                       ("Calibrate", None, "OK", "ops"), ("DeleteAdapter", "general-g1", "OK", "ops"),
                       ("DeleteAdapter", "no-such-adapter", "NOT_FOUND", "ops"), ("ExportScorer", None, "OK", "ops")]
    by_id = {}
    for n, r in enumerate(recs):
        if r.get("event") == "mutation":
            by_id.setdefault(r["id"], []).append((n, r["phase"]))
    assert all([p for _, p in v] == ["intent", "result"] for v in by_id.values())
    fails = [r for r in recs if r["event"] == "auth.failure"]
    assert [(f["code"], f["method"], f.get("principal")) for f in fails] == [
        ("UNAUTHENTICATED", "LibraryAdmin/ListLibraries", None),
        ("PERMISSION_DENIED", "LibraryAdmin/DeleteAdapter", "router")]
    assert all(f["peer"].startswith("ipv4:127.0.0.1:") and f["ts"].endswith("Z") for f in fails)
    v = verify(audit_log)
    assert v.ok and v.open_intents == 0


def _replace_with_directory(path: Path) -> None:
    path.rename(path.with_name(path.name + ".moved"))
    path.mkdir()


def test_a_change_is_refused_when_its_audit_record_cannot_be_written(world, audited, start_server, tmp_path):
    h, admin, tokens, audit_log = audited
    before = admin.describe(LIB)
    assert not any(a.calibrated for a in before.adapters)
    _replace_with_directory(audit_log)         # a real failure: the log is no longer the file we write
    changes = {
        "CreateLibrary": lambda: create_library(admin, world, name="another"),
        "PutAdapter": lambda: admin.put_adapter_files(read_dir(world.adapters["shared-a0"]), name="late", library=LIB),
        "DeleteAdapter": lambda: admin.delete_adapter("shared-a0", library=LIB),
        "Calibrate": lambda: admin.calibrate([activations(world)], library=LIB),
        "ExportScorer": lambda: admin.export_scorer(LIB),
    }
    for what, change in changes.items():
        with pytest.raises(UnavailableError) as ei:
            change()
        assert ei.value.field == "audit_log", what
    after = admin.describe(LIB)
    assert (after.version, [a.name for a in after.adapters]) == (before.version, [a.name for a in before.adapters])
    assert [lib.name for lib in admin.list_libraries()] == [LIB]
    assert admin.route(LIB, activations(world)).choices          # reads are not audited and keep working

    h.stop(grace=1.0)                          # the store itself holds nothing of the refused changes
    h2 = start_server(h.config.data_dir, tokens_file=h.config.tokens_file, audit_log=tmp_path / "audit-2.log",
                      keys=h.config.keys)
    with RouterClient(h2.target, token=tokens["ops"], timeout=30) as c:
        again = c.describe(LIB)
        assert (again.version, [a.name for a in again.adapters]) == (before.version,
                                                                      [a.name for a in before.adapters])
        assert not any(a.calibrated for a in again.adapters)
        assert [lib.name for lib in c.list_libraries()] == [LIB]


@pytest.mark.parametrize("make,words", [
    (lambda p: p.mkdir(), "Is a directory"),
    (lambda p: (p.write_bytes(b""), p.chmod(0o644)), "mode 644"),
    (lambda p: (p.write_bytes(b'{"seq":1}'), p.chmod(0o600)), "damaged at its end"),
], ids=["a directory", "world-readable", "damaged"])
def test_a_server_whose_audit_log_is_unusable_does_not_start(tmp_path, make, words):
    make(tmp_path / "audit.log")
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "d", metrics_port=None, demo=False,
                       audit_log=tmp_path / "audit.log")
    with pytest.raises(CoreError) as ei:
        create_server(cfg)
    assert getattr(ei.value, "field", None) == "audit_log" and words in str(ei.value)
    assert ei.value.code in ("FAILED_PRECONDITION", "DATA_LOSS")


def test_the_default_audit_log_sits_beside_the_data_directory(start_server, tmp_path):
    h = start_server(tmp_path / "d", demo=True)
    assert h.audit.path == tmp_path / "d.audit.log"
    h.stop(grace=1.0)
    recs = _records(tmp_path / "d.audit.log")
    assert [r["event"] for r in recs] == ["audit.open", "mutation", "mutation", *["mutation"] * (len(recs) - 4),
                                          "audit.close"]
    assert recs[1]["principal"] == "system" and recs[1]["library"] == "demo"


def test_audit_off_is_possible_and_loud(start_server, tmp_path, caplog):
    h = start_server(tmp_path / "d", demo=True, audit=False)
    assert h.audit.path is None
    assert "AUDIT LOG OFF" in caplog.text
    assert not (tmp_path / "d.audit.log").exists()


def _weight_samples(folder: Path) -> list[bytes]:
    raw = (folder / "adapter_model.safetensors").read_bytes()
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    data = raw[start:]
    return [data[i: i + 16] for i in range(0, len(data) - 16, max(16, len(data) // 8))]


def test_the_audit_log_holds_no_token_key_weight_or_activation(world, audited, tmp_path):
    h, admin, tokens, audit_log = audited
    attacker = "seqr_CANARY" + "q" * 40
    with RouterClient(h.target, token=attacker, timeout=10) as c, pytest.raises(UnauthenticatedError):
        c.describe(LIB)
    with pytest.raises(NotFoundError):
        admin.delete_adapter("z" * 256, library=LIB)   # the longest name the wire lets through
    x = activations(world)
    admin.calibrate([x], library=LIB)
    admin.route(LIB, x)

    text = audit_log.read_bytes()
    keys = json.loads((tmp_path / "keys" / "kek.json").read_text())["keys"]
    secrets = [*tokens.values(), attacker, *(k["key"] for k in keys)]
    binary = [base64.b64decode(k["key"]) for k in keys]
    binary += [s for folder in world.adapters.values() for s in _weight_samples(folder)]
    binary += [np.ascontiguousarray(v[0, :4]).tobytes() for v in x.values()]
    for s in secrets:
        assert s.encode() not in text
    for b in binary:
        for form in (b, b.hex().encode(), base64.b64encode(b)):
            assert form not in text
    for r in _records(audit_log):
        assert all(len(v) <= MAX_STRING for v in r.values() if isinstance(v, str))
    assert any(r.get("adapter", "").startswith("zzz") for r in _records(audit_log))


def test_a_server_restart_continues_the_chain(world, audited, start_server, tmp_path):
    h, admin, tokens, audit_log = audited
    h.stop(grace=1.0)
    assert _records(audit_log)[-1]["event"] == "audit.close"
    seq = _records(audit_log)[-1]["seq"]
    h2 = start_server(h.config.data_dir, tokens_file=h.config.tokens_file, audit_log=audit_log,
                      keys=h.config.keys)
    with RouterClient(h2.target, token=tokens["ops"], timeout=30) as c:
        c.delete_adapter("shared-a1", library=LIB)
    recs = _records(audit_log)
    assert recs[seq]["event"] == "audit.open" and recs[seq]["seq"] == seq + 1
    assert recs[-1]["action"] == "DeleteAdapter" and recs[-1]["code"] == "OK"
    assert verify(audit_log).ok
