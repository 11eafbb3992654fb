"""Caller JSON is bounded before Python's recursive parser sees it."""

import pytest

from seqr_core.bounded_json import json_depth, loads_bounded
from seqr_core.errors import InvalidArgumentError, LimitExceededError

DEPTHS = [
    (b'{"r": 4}', 1),
    (b'{"a": [1, {"b": [[]]}]}', 5),
    (b'"[[[[{"', 0),                              # brackets inside a string do not count
    (b'{"k": "a \\" [[[ \\\\", "x": [1]}', 2),     # escaped quote, escaped backslash
    (b'{"unterminated": "[[[[', 1),
    (b'{"ends with a backslash\\', 1),
    (b"[" * 5000, 5000),
    (b"1", 0),
]


@pytest.mark.parametrize("raw, depth", DEPTHS, ids=[repr(d[0][:24]) for d in DEPTHS])
def test_depth_counts_nesting_outside_strings(raw, depth):
    assert json_depth(raw) == depth


def test_deep_brackets_inside_strings_are_accepted():
    raw = b'{"target_modules": "' + b"[" * 10_000 + b'"}'
    assert loads_bounded(raw, field="f", max_bytes=1 << 20)["target_modules"] == "[" * 10_000


REFUSALS = [
    (b"[" * 33 + b"]" * 33, InvalidArgumentError, "nested too deeply"),
    (b"[" * 1000, InvalidArgumentError, "nested too deeply"),
    (b" " * 1001, LimitExceededError, "too large"),
    (b'{"x": ' + b"1" * 21 + b"}", InvalidArgumentError, "integer too long"),
    (b'{"x": 1e999}', InvalidArgumentError, "out of range"),
    (b'{"x": -Infinity}', InvalidArgumentError, "not JSON"),
    (b'{"x": NaN}', InvalidArgumentError, "not JSON"),
    (b"\xff{}", InvalidArgumentError, "not valid JSON"),
    (b'{"x": }', InvalidArgumentError, "not valid JSON"),
]


@pytest.mark.parametrize("raw, error, text", REFUSALS, ids=[r[2] + repr(r[0][:12]) for r in REFUSALS])
def test_unbounded_json_is_refused_naming_the_field(raw, error, text):
    with pytest.raises(error) as ei:
        loads_bounded(raw, field="adapter_config.json", max_bytes=1000)
    assert ei.value.field == "adapter_config.json" and text in str(ei.value)
