"""Log lines stay short whatever a caller sent: the formatters cut every value (issue 9, item 3)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from seqr_server.logs import JsonFormatter, TextFormatter

HUGE = "n" * (8 << 20)


def _line(formatter, emit) -> str:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(formatter)
    log = logging.getLogger("seqr.test-log-bounds")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        emit(log)
    finally:
        log.removeHandler(handler)
    return buf.getvalue()


def _raise_with_huge_key(log):
    try:
        {}[HUGE]
    except KeyError:
        log.exception("rpc failed", extra={"incident": "abc"})


EMITS = [
    ("huge extra value", lambda log: log.info("rpc refused", extra={"error": HUGE, "field": "library"})),
    ("huge %-argument", lambda log: log.warning("onnx scorer %s failed", HUGE)),
    ("huge list extra", lambda log: log.info("x", extra={"names": [HUGE] * 3 + ["a"] * 10_000})),
    ("huge object extra", lambda log: log.info("x", extra={"err": KeyError(HUGE)})),
    ("huge exception text", _raise_with_huge_key),
]


@pytest.mark.parametrize("case,emit", EMITS, ids=[e[0] for e in EMITS])
def test_a_json_line_stays_short(case, emit):
    line = _line(JsonFormatter(), emit)
    assert len(line) < 16_000
    doc = json.loads(line)
    assert "…(" in json.dumps(doc, ensure_ascii=False)


@pytest.mark.parametrize("case,emit", EMITS, ids=[e[0] for e in EMITS])
def test_a_text_line_stays_short(case, emit):
    line = _line(TextFormatter("%(levelname)s %(name)s: %(message)s"), emit)
    assert len(line) < 16_000


def test_ordinary_fields_are_logged_unchanged():
    doc = json.loads(_line(JsonFormatter(), lambda log: log.info(
        "adapter stored", extra={"library": "tiny", "adapter_id": 3, "ms": 1.25, "modules": ["q", "v"]})))
    assert (doc["msg"], doc["library"], doc["adapter_id"], doc["ms"], doc["modules"]) == (
        "adapter stored", "tiny", 3, 1.25, ["q", "v"])
