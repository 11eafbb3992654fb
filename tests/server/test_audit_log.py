"""The audit log on real files: the chain verifies, tampering is found at its line, the writer
resumes the chain, fails closed and stops after a failed write, and records stay bounded."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from seqr_core.errors import FailedPreconditionError, IntegrityError, NotFoundError, UnavailableError
from seqr_server.audit import AuditLog, default_path
from seqr_server.audit_chain import GENESIS, MAX_STRING, seal, verify
from seqr_cli.main import main


def _log(tmp_path: Path, n: int = 6) -> Path:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for i in range(n - 1):                     # + the "audit.open" record
        log.record({"event": "test", "i": i, "library": f"lib-{i}"})
    log.close()                                # + "audit.close"
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write(path: Path, lines: list[bytes], *, newline: bool = True) -> None:
    path.write_bytes(b"\n".join(lines) + (b"\n" if newline else b""))


def test_a_fresh_chain_verifies_and_its_head_is_the_writers(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record({"event": "test", "library": "a"})
    head = log.head
    log.close()
    v = verify(path)
    assert v.ok and v.records == 3 and v.line == 0
    first = json.loads(_lines(path)[0])
    assert first["seq"] == 1 and first["prev"] == GENESIS and first["event"] == "audit.open"
    assert head.seq == 2 and verify(path).head.seq == 3      # the close record came after


def _edit(lines):
    doc = json.loads(lines[2])
    doc["library"] = "changed"
    lines[2] = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return lines


def _edit_and_reseal(lines):
    doc = json.loads(lines[2])
    doc["library"] = "changed"
    lines[2] = seal(doc, seq=doc["seq"], prev=doc["prev"])      # a consistent line, but not the one chained
    return lines


def _reformat(lines):
    lines[2] = json.dumps(json.loads(lines[2]), indent=1).replace("\n", "").encode()
    return lines


TAMPERING = [
    # (how, mutate lines, newline at the end, first broken line, words of the reason)
    ("edit a value", _edit, True, 3, "hash does not match"),
    ("edit and recompute its hash", _edit_and_reseal, True, 4, "prev does not match"),
    ("reformat a line", _reformat, True, 3, "canonical"),
    ("delete a line", lambda ls: ls[:2] + ls[3:], True, 3, "seq 4 where 3"),
    ("reorder two lines", lambda ls: ls[:2] + [ls[3], ls[2]] + ls[4:], True, 3, "seq 4 where 3"),
    ("insert a line", lambda ls: ls[:2] + [ls[1]] + ls[2:], True, 3, "seq 2 where 3"),
    ("delete the first line", lambda ls: ls[1:], True, 1, "seq 2 where 1"),
    ("cut the last line", lambda ls: ls[:-1] + [ls[-1][:30]], False, 7, "cut"),
    ("garbage line", lambda ls: ls[:4] + [b"not json"] + ls[4:], True, 5, "not a JSON"),
]


@pytest.mark.parametrize("how,mutate,newline,line,reason", TAMPERING, ids=[t[0] for t in TAMPERING])
def test_tampering_is_found_at_its_line(tmp_path, how, mutate, newline, line, reason):
    path = _log(tmp_path)
    assert verify(path).ok
    _write(path, mutate(_lines(path)), newline=newline)
    v = verify(path)
    assert not v.ok
    assert (v.line, v.records) == (line, line - 1), v
    assert reason in v.reason


def test_the_writer_resumes_the_chain_across_restarts(tmp_path):
    path = _log(tmp_path, n=3)
    log = AuditLog(path)
    assert log.head.seq == 5                   # 3 records + close, then this open
    log.record({"event": "test"})
    log.close()
    v = verify(path)
    assert v.ok and v.records == 7


@pytest.mark.parametrize("damage", [
    lambda ls: (ls[:-1] + [ls[-1][:-5]], False),       # torn last write
    lambda ls: (ls[:-2] + [ls[-1]], True),
    lambda ls: (ls[:-1] + [ls[-1].replace(b"audit.close", b"audit.kloze")], True),
], ids=["torn last line", "line before the last deleted", "last line edited"])
def test_a_damaged_tail_is_refused_at_open(tmp_path, damage):
    path = _log(tmp_path)
    lines, newline = damage(_lines(path))
    _write(path, lines, newline=newline)
    with pytest.raises(IntegrityError) as ei:
        AuditLog(path)
    assert ei.value.field == "audit_log" and "seqr audit verify" in str(ei.value)


def test_the_log_is_created_private_and_a_wider_mode_is_refused(tmp_path):
    path = _log(tmp_path, n=1)
    assert path.stat().st_mode & 0o777 == 0o600
    os.chmod(path, 0o640)                      # a log shipper's group may read
    AuditLog(path).close()
    os.chmod(path, 0o644)
    with pytest.raises(FailedPreconditionError) as ei:
        AuditLog(path)
    assert ei.value.field == "audit_log"


def test_only_one_writer_at_a_time(tmp_path):
    path = tmp_path / "audit.log"
    first = AuditLog(path)
    with pytest.raises(FailedPreconditionError, match="in use"):
        AuditLog(path)
    first.close()
    AuditLog(path).close()
    assert verify(path).ok


def test_strings_are_cut_and_bytes_are_refused(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record({"event": "test", "library": "L" * 100_000, "names": ["x" * 1000] * 1000})
    with pytest.raises(TypeError):
        log.record({"event": "test", "weights": b"\x00\x01"})
    log.close()
    doc = json.loads(_lines(path)[1])
    assert len(doc["library"]) <= MAX_STRING and doc["library"].startswith("LLL") and "100000" in doc["library"]
    assert len(doc["names"]) <= 33 and all(len(n) <= MAX_STRING for n in doc["names"])
    assert len(_lines(path)) == 3              # the refused record left no trace


def test_records_from_many_threads_form_one_chain(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, fsync=False)

    def work(t):
        for i in range(50):
            log.record({"event": "test", "thread": t, "i": i})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    v = verify(path)
    assert v.ok and v.records == 8 * 50 + 2


def _replace_with_directory(path: Path) -> None:
    path.rename(path.with_name("moved-away.log"))
    path.mkdir()


def test_a_failed_write_stops_the_log_until_restart(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record({"event": "test"})
    _replace_with_directory(path)
    with pytest.raises(UnavailableError) as ei:
        log.record({"event": "test"})
    assert ei.value.field == "audit_log" and "replaced" in str(ei.value)
    path.rmdir()
    path.with_name("moved-away.log").rename(path)      # even with the file back: fail-stop
    with pytest.raises(UnavailableError, match="stopped"):
        log.record({"event": "test"})
    log.close()
    assert verify(path).ok and verify(path).records == 2


def test_another_writer_appending_is_detected(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    with open(path, "ab") as f:
        f.write(b'{"forged":1}\n')
    with pytest.raises(UnavailableError, match="another writer"):
        log.record({"event": "test"})
    log.close()


def test_a_mutation_is_recorded_before_and_after(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    with log.mutation(principal="ops", action="PutAdapter", library="lib", adapter="a") as out:
        seen_inside = [json.loads(line) for line in _lines(path)]
        out["version"] = 7
    with pytest.raises(NotFoundError):
        with log.mutation(principal="ops", action="DeleteAdapter", library="lib", adapter="zz"):
            raise NotFoundError("no adapter", field="name")
    log.close()
    assert seen_inside[-1]["phase"] == "intent" and seen_inside[-1]["adapter"] == "a"
    recs = [json.loads(line) for line in _lines(path)]
    results = [r for r in recs if r.get("phase") == "result"]
    assert [(r["action"], r["code"]) for r in results] == [("PutAdapter", "OK"), ("DeleteAdapter", "NOT_FOUND")]
    assert results[0]["version"] == 7 and results[0]["principal"] == "ops"
    assert results[0]["id"] == seen_inside[-1]["id"]
    assert verify(path).open_intents == 0


def test_a_mutation_whose_intent_cannot_be_written_never_runs(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    _replace_with_directory(path)
    ran = []
    with pytest.raises(UnavailableError):
        with log.mutation(principal="ops", action="CreateLibrary", library="x"):
            ran.append(True)
    assert not ran


def test_auth_failures_are_rate_limited_and_the_suppressed_are_counted(tmp_path):
    now = [0.0]
    path = tmp_path / "audit.log"
    log = AuditLog(path, auth_failures_per_s=1.0, auth_failure_burst=3, clock=lambda: now[0])
    for _ in range(5):
        log.auth_failure("Router/Route", "unknown bearer token", "ipv4:127.0.0.1:1")
    now[0] += 1.0
    log.auth_failure("Router/Route", "unknown bearer token", "ipv4:127.0.0.1:1")
    log.close()
    fails = [json.loads(line) for line in _lines(path) if b"auth.failure" in line]
    assert len(fails) == 4
    assert fails[-1]["suppressed_before"] == 2 and fails[-1]["peer"] == "ipv4:127.0.0.1:1"


def test_the_default_path_sits_beside_the_data_directory(tmp_path):
    assert default_path(tmp_path / "data") == tmp_path / "data.audit.log"


def test_seqr_audit_verify_exit_codes(tmp_path, capsys):
    path = _log(tmp_path)
    assert main(["audit", "verify", str(path)]) == 0
    assert "OK" in capsys.readouterr().out
    _write(path, _edit(_lines(path)))
    assert main(["audit", "verify", str(path)]) == 1
    assert "line 3" in capsys.readouterr().out
    assert main(["audit", "verify", str(tmp_path / "missing.log")]) == 2


def test_keys_init_is_audited_and_refused_when_the_log_is_unavailable(tmp_path, capsys):
    log_path, kek = tmp_path / "audit.log", tmp_path / "keys" / "kek.json"
    assert main(["keys", "init", str(kek), "--audit-log", str(log_path)]) == 0
    recs = [json.loads(line) for line in _lines(log_path)]
    result = [r for r in recs if r.get("phase") == "result"][0]
    assert (result["action"], result["code"], result["path"]) == ("keys.init", "OK", str(kek))
    assert result["key_id"] in kek.read_text() and result["principal"].startswith("local:")
    key_b64 = json.loads(kek.read_text())["keys"][0]["key"]
    assert key_b64.encode() not in log_path.read_bytes()
    held = AuditLog(log_path)                  # a running server holds the log: fail closed
    other = tmp_path / "keys" / "other.json"
    assert main(["keys", "init", str(other), "--audit-log", str(log_path)]) == 1
    assert "in use" in capsys.readouterr().err and not other.exists()
    held.close()
    assert verify(log_path).ok
