"""Errors echo caller values in statuses and logs: every echoed part is cut to a short prefix."""

from __future__ import annotations

import numpy as np
import pytest

from seqr_core.errors import MAX_ECHO, InvalidArgumentError, NotFoundError, bounded

HUGE = 8 << 20

CASES = [
    ("60 MB string actual", dict(actual="m" * (60 << 20)), f"…({60 << 20} chars)"),
    ("8 MB bytes actual", dict(actual=b"\x00" * HUGE), f"…({HUGE} bytes)"),
    ("list of huge names", dict(actual=["n" * HUGE, "x"]), "…("),
    ("many small names", dict(actual=[f"adapter-{i}" for i in range(100_000)]), "…("),
    ("huge int", dict(actual=10 ** 5000), "<int of 16610 bits>"),
    ("huge limit", dict(limit="L" * HUGE), f"…({HUGE} chars)"),
    ("huge field", dict(field="tensors[" + "k" * HUGE + "]"), "…("),
    ("huge interpolated message", dict(message=f"module {'q' * HUGE!r} is not in the signature"), "…("),
]


@pytest.mark.parametrize("case,kw,marker", CASES, ids=[c[0] for c in CASES])
def test_echoed_values_are_cut_with_their_length(case, kw, marker):
    err = InvalidArgumentError(kw.pop("message", "bad value"), **kw)
    text = str(err)
    assert len(text) < 1500 and marker in text
    for part in (err.message, err.field, str(err.limit), str(err.actual)):
        assert len(part) < 600


def test_small_values_keep_their_type_and_text():
    err = NotFoundError("no adapter 'x'", field="candidates", limit=256, actual=(12, 576))
    assert (err.field, err.limit, err.actual) == ("candidates", 256, (12, 576))
    assert str(err) == "candidates: no adapter 'x'; limit=256; actual=(12, 576)"
    assert bounded(["a", "b"]) == ["a", "b"] and bounded(None) is None and bounded(1.5) == 1.5
    assert bounded("x" * MAX_ECHO) == "x" * MAX_ECHO


def test_arrays_are_rendered_briefly():
    assert len(str(bounded(np.zeros((4096, 4096), np.float32)))) <= MAX_ECHO + 20
