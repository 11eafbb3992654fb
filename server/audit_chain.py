"""The audit log's line format and its verification (pure functions; the writer is audit.py).

One record per line, canonical JSON (sorted keys, no spaces, ASCII only, so control and
non-ASCII characters are escaped and a record is always exactly one line). Every record
carries:

* ``seq``  - 1 on the first line of a file, then +1 per line;
* ``prev`` - sha256 (hex) of the previous line's bytes (without its newline); 64 zeros on line 1;
* ``hash`` - sha256 of the record's canonical JSON without ``hash`` (so an edited line is
  reported at that line, not only at the next one).

What the chain proves: an edited, inserted, deleted, reordered or cut line is found at its
line number, unless whoever edits it also rewrites every line after it. Removing whole lines
from the end leaves a shorter valid chain; compare the head (seq and sha256 of the last
line) with a copy kept elsewhere (e.g. shipped logs) to catch that.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

GENESIS = "0" * 64
MAX_STRING = 256           # any string value is cut to this many characters
MAX_ITEMS = 32             # items of one list / keys of one dict inside a record
MAX_KEY = 64               # characters of a dict key
MAX_DEPTH = 3
MAX_LINE = 16 << 10        # bytes of one record line; the writer refuses larger records
_INT_LIMIT = 1 << 63


@dataclass(frozen=True)
class Head:
    """Where a chain ends: the last sequence number and the sha256 of the last line."""

    seq: int = 0
    sha256: str = GENESIS

    def __str__(self) -> str:
        return f"{self.seq}:{self.sha256}"


@dataclass(frozen=True)
class Verdict:
    """Result of ``verify``: ok, or the first broken line (1-based) and why."""

    ok: bool
    records: int                       # lines that verified before the break (all, if ok)
    head: Head
    line: int = 0                      # first broken line; 0 when ok
    reason: str = ""
    open_intents: int = 0              # mutation intents without a result (a crash, or in flight)


def cut(text: str, limit: int = MAX_STRING) -> str:
    """``text`` if short enough, else its start and how much was cut, in ``limit`` characters."""
    if len(text) <= limit:
        return text
    tail = f"...(+{len(text)} chars)"
    return text[: limit - len(tail)] + tail


def bounded(value: Any, *, depth: int = 0) -> Any:
    """A JSON-safe, size-bounded copy of ``value``. Bytes and arrays are refused: audit records
    hold names, ids and codes, never weights, activations or secrets."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_INT_LIMIT <= value < _INT_LIMIT else cut(str(value))
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return cut(value)
    if depth >= MAX_DEPTH:
        return "...(nested too deep)"
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        out = [bounded(v, depth=depth + 1) for v in items[:MAX_ITEMS]]
        return out + ([f"...(+{len(items) - MAX_ITEMS} items)"] if len(items) > MAX_ITEMS else [])
    if isinstance(value, dict):
        keys = list(value)[:MAX_ITEMS]
        return {cut(str(k), MAX_KEY): bounded(value[k], depth=depth + 1) for k in keys}
    raise TypeError(f"audit records hold only str/int/float/bool/None/list/dict, not {type(value).__name__}")


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def line_digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def seal(body: dict, *, seq: int, prev: str) -> bytes:
    """The line (without newline) for ``body`` as record ``seq`` after a line hashing to ``prev``."""
    record = {k: v for k, v in body.items() if k not in ("seq", "prev", "hash")}
    record.update(seq=seq, prev=prev)
    record["hash"] = hashlib.sha256(canonical(record)).hexdigest()
    return canonical(record)


def check_line(line: bytes) -> tuple[dict | None, str]:
    """Parse one line and check it is a self-consistent record: (record, "") or (None, why)."""
    try:
        record = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None, "not a JSON record"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    seq, prev, digest = record.get("seq"), record.get("prev"), record.get("hash")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev, str) or not isinstance(digest, str):
        return None, "missing seq, prev or hash"
    if canonical(record) != line:
        return None, "not in canonical form (edited)"
    body = {k: v for k, v in record.items() if k != "hash"}
    if hashlib.sha256(canonical(body)).hexdigest() != digest:
        return None, "hash does not match the record (edited)"
    return record, ""


def check_link(record: dict, *, expect_seq: int, expect_prev: str) -> str:
    """Why ``record`` does not follow the line before it ("" if it does)."""
    if record["seq"] != expect_seq:
        return f"seq {record['seq']} where {expect_seq} was expected (a line was deleted, inserted or moved)"
    if record["prev"] != expect_prev:
        return "prev does not match the sha256 of the line before (that line was changed)"
    return ""


def _lines(path: str | os.PathLike[str], chunk: int = 1 << 16) -> Iterator[tuple[bytes, bool]]:
    """(line without newline, ended with a newline) for each line of the file."""
    with open(path, "rb") as f:
        pending = b""
        while block := f.read(chunk):
            pending += block
            *full, pending = pending.split(b"\n")
            for line in full:
                yield line, True
            if len(pending) > MAX_LINE:
                yield pending, False
                return
        if pending:
            yield pending, False


def _follows(line: bytes, complete: bool, head: Head) -> tuple[dict | None, str]:
    """(record, "") if ``line`` is a whole record that continues the chain ending at ``head``."""
    if not complete:
        return None, "the line is cut (no newline at its end) or too long"
    record, why = check_line(line)
    if record is None:
        return None, why
    why = check_link(record, expect_seq=head.seq + 1, expect_prev=head.sha256)
    return (None, why) if why else (record, "")


def verify(path: str | os.PathLike[str]) -> Verdict:
    """Check the whole chain; the first broken line wins. Raises OSError if unreadable."""
    head, intents = Head(), set()
    for n, (line, complete) in enumerate(_lines(path), start=1):
        record, why = _follows(line, complete, head)
        if record is None:
            return Verdict(ok=False, records=n - 1, head=head, line=n, reason=why, open_intents=len(intents))
        if record.get("event") == "mutation":
            (intents.add if record.get("phase") == "intent" else intents.discard)(record.get("id"))
        head = Head(seq=record["seq"], sha256=line_digest(line))
    return Verdict(ok=True, records=head.seq, head=head, open_intents=len(intents))


def read_tail(fd: int, size: int) -> Head:
    """The head of the chain in an open file of ``size`` bytes, after checking its last two
    lines. Raises ValueError (with the reason) when the tail is damaged."""
    if size == 0:
        return Head()
    start = max(0, size - 2 * MAX_LINE - 2)
    data = os.pread(fd, size - start, start)
    if not data.endswith(b"\n"):
        raise ValueError("the last line is cut (no newline at its end)")
    lines = data[:-1].split(b"\n")
    if start > 0 and len(lines) < 3:       # the first piece may be a partial line: need two whole ones
        raise ValueError("the last line is longer than any record")
    last, why = check_line(lines[-1])
    if last is None:
        raise ValueError(f"last line: {why}")
    if len(lines) == 1:                    # start == 0 here: the file holds one line
        why = check_link(last, expect_seq=1, expect_prev=GENESIS)
    else:
        before, why = check_line(lines[-2])
        if before is None:
            raise ValueError(f"line before the last: {why}")
        why = check_link(last, expect_seq=before["seq"] + 1, expect_prev=line_digest(lines[-2]))
    if why:
        raise ValueError(f"last line: {why}")
    return Head(seq=last["seq"], sha256=line_digest(lines[-1]))
