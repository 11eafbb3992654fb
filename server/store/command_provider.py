"""CommandKeyProvider: key-encryption keys held by an external KMS/HSM plugin the operator supplies.

The store never sees the KEK. For every operation it runs ``argv`` once, writes one JSON object to
the plugin's stdin, closes stdin, and reads one JSON object from its stdout. Binary values are
base64 (standard alphabet, padded). The plugin must exit 0 after answering.

Requests and answers::

    {"op": "info"}
        -> {"primary_key_id": "k2", "key_ids": ["k1", "k2"]}
    {"op": "wrap", "plaintext": <b64 data key>, "aad": <b64>}
        -> {"key_id": "k2", "wrapped": <b64>}            # wrapped under the primary key
    {"op": "unwrap", "key_id": "k1", "wrapped": <b64>, "aad": <b64>}
        -> {"plaintext": <b64 data key>}

``aad`` must be authenticated by the plugin's wrapping (AES-GCM associated data, or KMS
"encryption context"): unwrap with different ``aad`` must fail. A refusal is answered as
``{"error": "<message>", "kind": "unknown_key" | "auth_failed" | "other"}`` (still exit 0):
``unknown_key`` becomes WrongKeyError, ``auth_failed`` IntegrityError, ``other``
FailedPreconditionError. A non-zero exit, a timeout or unparsable output means the KMS is not
reachable and becomes UnavailableError (with the plugin's stderr, which must never contain keys).

Each call is a process start, so unwrapped data keys are cached in memory (LRU, ``cache_size``
entries, keyed by key id + wrapped bytes + aad); ``cache_size=0`` disables the cache.
"""

from __future__ import annotations

import base64
import binascii
import json
import subprocess
import threading
from collections import OrderedDict
from typing import Any

from seqr_core.errors import FailedPreconditionError, IntegrityError, InvalidArgumentError, UnavailableError

from .errors import WrongKeyError
from .key_providers import KeyProvider

__all__ = ["CommandKeyProvider"]

_STDERR_TAIL = 500


class CommandKeyProvider(KeyProvider):
    """Wraps and unwraps data keys through an external command (see module docstring for the protocol)."""

    def __init__(self, argv: list[str], *, timeout_s: float = 10.0, cache_size: int = 1024):
        if not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidArgumentError("must be a non-empty list of strings", field="argv", actual=repr(argv))
        self._argv = list(argv)
        self._timeout_s = timeout_s
        self._cache: OrderedDict[tuple[str, bytes, bytes], bytes] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()

    @property
    def primary_key_id(self) -> str:
        return _text(self._call({"op": "info"}), "primary_key_id")

    def key_ids(self) -> list[str]:
        ids = self._call({"op": "info"}).get("key_ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise UnavailableError("key plugin answered info without a key_ids list", field="key_ids")
        return sorted(ids)

    def wrap(self, data_key: bytes, *, aad: bytes) -> tuple[str, bytes]:
        answer = self._call({"op": "wrap", "plaintext": _b64(data_key), "aad": _b64(aad)})
        return _text(answer, "key_id"), _unb64(answer, "wrapped")

    def unwrap(self, key_id: str, wrapped: bytes, *, aad: bytes) -> bytes:
        cache_key = (key_id, bytes(wrapped), bytes(aad))
        with self._cache_lock:
            cached = self._cache.get(cache_key)
            if cached is not None:
                self._cache.move_to_end(cache_key)
                return cached
        answer = self._call({"op": "unwrap", "key_id": key_id, "wrapped": _b64(wrapped), "aad": _b64(aad)})
        data_key = _unb64(answer, "plaintext")
        self._remember(cache_key, data_key)
        return data_key

    def _remember(self, cache_key: tuple[str, bytes, bytes], data_key: bytes) -> None:
        if self._cache_size <= 0:
            return
        with self._cache_lock:
            self._cache[cache_key] = data_key
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        try:
            done = subprocess.run(
                self._argv, input=json.dumps(request).encode("utf-8"), capture_output=True,
                timeout=self._timeout_s, check=False,
            )
        except subprocess.TimeoutExpired:
            raise UnavailableError(
                f"key plugin {self._argv[0]!r} did not answer {op!r} in time", field="argv", limit=self._timeout_s
            ) from None
        except OSError as exc:
            raise UnavailableError(f"cannot run key plugin {self._argv[0]!r}: {exc.strerror}", field="argv") from exc
        if done.returncode != 0:
            raise UnavailableError(
                f"key plugin {self._argv[0]!r} failed on {op!r}: {_tail(done.stderr)}", field="argv",
                actual=done.returncode,
            )
        try:
            answer = json.loads(done.stdout)
        except ValueError:
            raise UnavailableError(
                f"key plugin answered {op!r} with something that is not JSON", field="argv"
            ) from None
        if not isinstance(answer, dict):
            raise UnavailableError(f"key plugin answered {op!r} with a non-object", field="argv")
        if "error" in answer:
            raise _refusal(op, request.get("key_id"), answer)
        return answer


def _refusal(op: str, key_id: str | None, answer: dict[str, Any]) -> Exception:
    message = f"key plugin refused {op!r}: {answer.get('error')}"
    kind = answer.get("kind")
    if kind == "unknown_key":
        return WrongKeyError(message + " (wrong, missing or retired key)", field="key_id", actual=key_id)
    if kind == "auth_failed":
        return IntegrityError(message, field="wrapped_key", actual=key_id)
    return FailedPreconditionError(message, field="argv")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(answer: dict[str, Any], key: str) -> bytes:
    try:
        return base64.b64decode(_text(answer, key), validate=True)
    except binascii.Error:
        raise UnavailableError(f"key plugin answer field {key!r} is not base64", field=key) from None


def _text(answer: dict[str, Any], key: str) -> str:
    value = answer.get(key)
    if not isinstance(value, str) or not value:
        raise UnavailableError(f"key plugin answer lacks the string field {key!r}", field=key)
    return value


def _tail(stderr: bytes) -> str:
    text = stderr.decode("utf-8", "replace").strip()
    return text[-_STDERR_TAIL:] or "(no stderr)"

