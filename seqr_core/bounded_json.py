"""JSON from callers, bounded before it is parsed.

Python's json recurses once per nesting level and raises RecursionError (not a decode error) on
deep input, and int() refuses numbers of more than 4300 digits with a bare ValueError. Both would
surface as INTERNAL, so size and depth are measured first and long integers are refused while
parsing; what comes out is an InvalidArgumentError (or LimitExceededError) naming the field.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate

from .errors import InvalidArgumentError, LimitExceededError

MAX_DEPTH = 32
MAX_INT_DIGITS = 20          # beyond any int64; long enough for every real config value

# A string token, or an unterminated one running to the end: every quote starts a match, so
# the scan is linear whatever the input (no backtracking across failed matches).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays/objects in ``raw``, ignoring brackets inside strings.

    Exact for valid JSON; for invalid JSON it is only used as a bound before the parser runs.
    """
    brackets = _STRING.sub(b"", raw).translate(None, delete=_NOT_BRACKET)
    return max(accumulate(_STEP[b] for b in brackets), default=0)


def loads_bounded(raw: bytes, *, field: str, max_bytes: int, max_depth: int = MAX_DEPTH):
    """Parse UTF-8 JSON of at most ``max_bytes`` bytes and ``max_depth`` levels of nesting."""
    if len(raw) > max_bytes:
        raise LimitExceededError("JSON document too large", field=field, limit=max_bytes,
                                 actual=len(raw))
    depth = json_depth(raw)
    if depth > max_depth:
        raise InvalidArgumentError("JSON nested too deeply", field=field, limit=max_depth,
                                   actual=depth)

    def parse_int(s: str) -> int:
        if len(s.lstrip("-")) > MAX_INT_DIGITS:
            raise InvalidArgumentError("integer too long", field=field,
                                       limit=f"{MAX_INT_DIGITS} digits", actual=f"{len(s)} digits")
        return int(s)

    def parse_float(s: str) -> float:
        v = float(s)
        if not math.isfinite(v):
            raise InvalidArgumentError("number out of range", field=field, actual=s[:32])
        return v

    def parse_constant(name: str):
        raise InvalidArgumentError(f"{name} is not JSON (only finite numbers are accepted)",
                                   field=field)

    try:
        return json.loads(raw.decode("utf-8"), parse_int=parse_int, parse_float=parse_float,
                          parse_constant=parse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"not valid JSON ({e})", field=field) from None
