"""Checks on everything a caller hands the store, done before any blob is written.

Names never reach the file system (blob names are random), so the rules are about sanity and
about staying safe for whoever materialises uploaded files later (no path separators).
"""

from __future__ import annotations

import json
import re
from typing import Any

from seqr_core.errors import InvalidArgumentError, LimitExceededError

__all__ = [
    "require_bytes",
    "validate_file_name",
    "validate_files",
    "validate_meta",
    "validate_name",
    "validate_objects",
    "validate_role",
]

MAX_NAME_LEN = 200
MAX_META_BYTES = 1 << 20
_ROLE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def validate_name(value: object, *, field: str) -> str:
    """Library and adapter names: 1..200 printable characters without surrounding whitespace."""
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError("must be a non-empty string", field=field, actual=repr(value))
    if len(value) > MAX_NAME_LEN:
        raise InvalidArgumentError("name is too long", field=field, limit=MAX_NAME_LEN, actual=len(value))
    if not value.isprintable() or value != value.strip():
        raise InvalidArgumentError(
            "must be printable, without leading/trailing whitespace", field=field, actual=repr(value)
        )
    return value


def validate_role(value: object) -> str:
    if not isinstance(value, str) or _ROLE.fullmatch(value) is None:
        raise InvalidArgumentError(
            "role must match [a-z][a-z0-9_]{0,63} (e.g. 'calibration')", field="role", actual=repr(value)
        )
    return value


def validate_file_name(value: object) -> str:
    """Uploaded file names; no path separators so nobody can turn them into a path traversal later."""
    name = validate_name(value, field="files")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise InvalidArgumentError("file names must not contain path separators", field="files", actual=name)
    return name


def validate_meta(meta: object, *, field: str = "meta") -> dict[str, Any]:
    """``meta`` must be a JSON object; returns a private deep copy (via a JSON round trip)."""
    if not isinstance(meta, dict):
        raise InvalidArgumentError("must be a JSON object (dict)", field=field, actual=type(meta).__name__)
    try:
        text = json.dumps(meta, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"is not JSON-serialisable: {exc}", field=field) from None
    if len(text) > MAX_META_BYTES:
        raise LimitExceededError("metadata is too large", field=field, limit=MAX_META_BYTES, actual=len(text))
    return json.loads(text)


def require_bytes(data: object, *, field: str) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError("must be bytes", field=field, actual=type(data).__name__)


def validate_files(files: object) -> dict[str, bytes]:
    if not isinstance(files, dict) or not files:
        raise InvalidArgumentError("must be a non-empty dict of file name -> bytes", field="files")
    for name, data in files.items():
        validate_file_name(name)
        require_bytes(data, field=f"files[{name!r}]")
    return {name: bytes(data) for name, data in files.items()}


def validate_objects(objects: object) -> dict[str, bytes]:
    if not isinstance(objects, dict):
        raise InvalidArgumentError("must be a dict of role -> bytes", field="objects")
    for role, data in objects.items():
        validate_role(role)
        require_bytes(data, field=f"objects[{role!r}]")
    return {role: bytes(data) for role, data in objects.items()}
