"""Structured logs: one JSON object per line on stderr, with the ``extra=`` fields as keys.

Nothing from a request body is ever logged (no activations, no adapter bytes): only names,
ids, versions, codes and timings. Names come from callers, so every value is bounded here,
whoever logged it: one line stays a few KB even when a caller sends a 60 MB name
(SeqrError already cuts what it echoes; this is the second fence for everything else).
"""

from __future__ import annotations

import json
import logging
import sys
import time

from seqr_core.errors import MAX_ECHO, bounded, cut

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
MAX_MSG = 1000          # the formatted message (it may interpolate caller values)
MAX_EXC = 8000          # a traceback; the head holds the frames, a huge value sits at the end
MAX_LINE = 4000         # a text-format line


def _value(v):
    if v is None or isinstance(v, (str, int, float, bool, bytes, list, tuple, dict, set)):
        return bounded(v, MAX_ECHO)      # small containers stay JSON structures
    return cut(str(v), MAX_ECHO)         # paths, exceptions: their text, as before


class JsonFormatter(logging.Formatter):
    def __init__(self, fields: dict | None = None):
        super().__init__()
        self._fields = dict(fields or {})     # on every line, e.g. which process of a group

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": cut(record.getMessage(), MAX_MSG),
               **self._fields}
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_"):
                doc[cut(k, MAX_ECHO)] = _value(v)
        if record.exc_info:
            doc["exc"] = cut(self.formatException(record.exc_info), MAX_EXC)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return cut(super().format(record), MAX_LINE)


def setup(level: str = "info", *, json_format: bool = True, fields: dict | None = None) -> None:
    """Configure the root logger once for the process (the CLI calls this; tests do not)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(fields) if json_format else TextFormatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
