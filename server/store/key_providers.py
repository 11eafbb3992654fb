"""Key-encryption-key (KEK) providers: the one small interface the store wraps data keys through.

* :class:`KeyFileProvider` - a JSON key file (mode 0600 or narrower, refused otherwise) holding one
  or more 256-bit KEKs, one of them primary. It supports online rotation: :meth:`add_key`,
  :meth:`set_primary`, :meth:`retire_key`, each persisted atomically (temp file, fsync, rename,
  directory fsync). Each key carries a check value, so a corrupted key file is refused instead of
  being mistaken for tampered data.
* :class:`EnvKeyProvider` - base64 key material in an environment variable (comma-separated list,
  first one primary, so an operator can rotate by prepending a new key). Key ids are derived from
  the key with HMAC, so a wrong key shows up as an unknown key id.
* :class:`~seqr_server.store.command_provider.CommandKeyProvider` - an external KMS/HSM plugin.

Local providers wrap a data key as ``nonce(12) || AES-256-GCM(KEK, data_key, aad)``; the
associated data binds the key id and the caller's ``aad`` (object identity and version).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import threading
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from seqr_core.errors import AlreadyExistsError, FailedPreconditionError, IntegrityError, NotFoundError

from .durable_io import DurableIO
from .errors import WrongKeyError

__all__ = [
    "EnvKeyProvider",
    "KeyFileProvider",
    "KeyProvider",
    "dev_key_file",
    "init_key_file",
]

log = logging.getLogger(__name__)

KEK_LEN = 32
_KEY_FILE_FORMAT = 1
_WRAP_NONCE_LEN = 12
_WRAP_DOMAIN = b"seqr/kek-wrap/v1\x00"


class KeyProvider(ABC):
    """Holds key-encryption keys and wraps/unwraps data keys with them.

    ``anchor_dir`` is where the store keeps its rollback anchor by default; providers whose state
    lives outside the data directory (a key file) offer their own location, others return None.
    """

    anchor_dir: Path | None = None

    @property
    @abstractmethod
    def primary_key_id(self) -> str:
        """Key id new data keys are wrapped under."""

    @abstractmethod
    def key_ids(self) -> list[str]:
        """Every key id this provider can unwrap with."""

    @abstractmethod
    def wrap(self, data_key: bytes, *, aad: bytes) -> tuple[str, bytes]:
        """Wrap ``data_key`` under the primary KEK; returns (key id, wrapped bytes)."""

    @abstractmethod
    def unwrap(self, key_id: str, wrapped: bytes, *, aad: bytes) -> bytes:
        """Unwrap; raises WrongKeyError for an unknown key id, IntegrityError if it does not authenticate."""


def kek_wrap(kek: bytes, key_id: str, data_key: bytes, aad: bytes) -> bytes:
    """Wrap with a local AES-256 KEK (shared by the file and env providers)."""
    nonce = os.urandom(_WRAP_NONCE_LEN)
    return nonce + AESGCM(kek).encrypt(nonce, data_key, _wrap_aad(key_id, aad))


def kek_unwrap(kek: bytes, key_id: str, wrapped: bytes, aad: bytes) -> bytes:
    if len(wrapped) <= _WRAP_NONCE_LEN:
        raise IntegrityError("wrapped data key is truncated", field="wrapped_key", actual=len(wrapped))
    try:
        return AESGCM(kek).decrypt(wrapped[:_WRAP_NONCE_LEN], wrapped[_WRAP_NONCE_LEN:], _wrap_aad(key_id, aad))
    except InvalidTag:
        raise IntegrityError(
            f"wrapped data key does not authenticate under KEK {key_id}", field="wrapped_key"
        ) from None


def _wrap_aad(key_id: str, aad: bytes) -> bytes:
    return _WRAP_DOMAIN + key_id.encode("ascii") + b"\x00" + aad


def key_check_value(kek: bytes) -> str:
    """Public fingerprint of a KEK; detects corrupted key material without revealing it."""
    return hmac.new(kek, b"seqr/kek-check/v1", hashlib.sha256).hexdigest()[:32]


class _Keyring:
    """In-memory KEKs by id; the shared wrap/unwrap logic of the local providers.

    ``added`` keeps each key's creation time so rewriting the key file preserves it.
    """

    def __init__(self, keys: dict[str, bytes], primary: str, added: dict[str, str] | None = None):
        self.keys = dict(keys)
        self.primary = primary
        self.added = {k: (added or {}).get(k) or _now() for k in self.keys}

    def wrap(self, data_key: bytes, aad: bytes) -> tuple[str, bytes]:
        return self.primary, kek_wrap(self.keys[self.primary], self.primary, data_key, aad)

    def unwrap(self, key_id: str, wrapped: bytes, aad: bytes, *, source: str) -> bytes:
        kek = self.keys.get(key_id)
        if kek is None:
            raise WrongKeyError(
                f"{source} does not hold KEK {key_id!r} (it holds {sorted(self.keys)}): wrong, missing or retired key",
                field="key_id",
                actual=key_id,
            )
        return kek_unwrap(kek, key_id, wrapped, aad)


class KeyFileProvider(KeyProvider):
    """KEKs from a 0600 JSON key file; supports add/set-primary/retire for online rotation."""

    def __init__(self, path: str | os.PathLike[str], *, anchor_dir: str | os.PathLike[str] | None = None):
        self._path = Path(path).absolute()
        self._lock = threading.Lock()
        self._io = DurableIO()
        self._keyring = _load_key_file(self._path)
        self.anchor_dir = Path(anchor_dir) if anchor_dir else self._path.with_name(self._path.name + ".anchors")

    @property
    def path(self) -> Path:
        return self._path

    @property
    def primary_key_id(self) -> str:
        return self._keyring.primary

    def key_ids(self) -> list[str]:
        return sorted(self._keyring.keys)

    def wrap(self, data_key: bytes, *, aad: bytes) -> tuple[str, bytes]:
        return self._keyring.wrap(data_key, aad)

    def unwrap(self, key_id: str, wrapped: bytes, *, aad: bytes) -> bytes:
        return self._keyring.unwrap(key_id, wrapped, aad, source=f"key file {self._path}")

    def add_key(self) -> str:
        """Generate a new (non-primary) KEK, persist it, and return its id."""
        with self._lock:
            key_id = _new_key_id()
            keys = {**self._keyring.keys, key_id: AESGCM.generate_key(bit_length=256)}
            self._replace(_Keyring(keys, self._keyring.primary, self._keyring.added))
            return key_id

    def set_primary(self, key_id: str) -> None:
        """Make ``key_id`` the key new data keys are wrapped under."""
        with self._lock:
            self._require(key_id)
            self._replace(_Keyring(self._keyring.keys, key_id, self._keyring.added))

    def retire_key(self, key_id: str) -> None:
        """Destroy a KEK. Only safe once no stored object references it (see LibraryStore.key_ids_in_use)."""
        with self._lock:
            self._require(key_id)
            if key_id == self._keyring.primary:
                raise FailedPreconditionError(
                    "cannot retire the primary key; set another primary and rotate first", field="key_id",
                    actual=key_id,
                )
            keys = {k: v for k, v in self._keyring.keys.items() if k != key_id}
            self._replace(_Keyring(keys, self._keyring.primary, self._keyring.added))

    def _require(self, key_id: str) -> None:
        if key_id not in self._keyring.keys:
            raise NotFoundError(f"key file {self._path} has no key {key_id!r}", field="key_id", actual=key_id)

    def _replace(self, keyring: _Keyring) -> None:
        # Persist first: memory must never hold a key the file would lose on restart.
        self._io.write_file(self._path, _encode_key_file(keyring), mode=0o600)
        self._keyring = keyring


class EnvKeyProvider(KeyProvider):
    """KEKs from an environment variable: comma-separated base64 keys, the first is primary."""

    def __init__(self, var: str = "SEQR_KEK", *, environ: dict[str, str] | None = None):
        raw = (os.environ if environ is None else environ).get(var, "").strip()
        if not raw:
            raise FailedPreconditionError(
                f"environment variable {var} is not set; it must hold base64 of a 32-byte key", field=var
            )
        keks = [_decode_kek(part.strip(), source=f"environment variable {var}") for part in raw.split(",")]
        ids = [_derived_key_id(kek) for kek in keks]
        self._var = var
        self._keyring = _Keyring(dict(zip(ids, keks)), ids[0])

    @property
    def primary_key_id(self) -> str:
        return self._keyring.primary

    def key_ids(self) -> list[str]:
        return sorted(self._keyring.keys)

    def wrap(self, data_key: bytes, *, aad: bytes) -> tuple[str, bytes]:
        return self._keyring.wrap(data_key, aad)

    def unwrap(self, key_id: str, wrapped: bytes, *, aad: bytes) -> bytes:
        return self._keyring.unwrap(key_id, wrapped, aad, source=f"environment variable {self._var}")


def init_key_file(path: str | os.PathLike[str]) -> str:
    """Create a new key file (mode 0600) with one primary KEK; refuses to overwrite. Returns the key id."""
    target = Path(path).absolute()
    if target.exists():
        raise AlreadyExistsError(f"key file {target} already exists; refusing to overwrite it", field="path")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_id = _new_key_id()
    keyring = _Keyring({key_id: AESGCM.generate_key(bit_length=256)}, key_id)
    DurableIO().create_file_exclusive(target, _encode_key_file(keyring), mode=0o600)
    return key_id


def dev_key_file(data_dir: str | os.PathLike[str]) -> KeyFileProvider:
    """Development default: a ``dev.kek`` key file next to ``data_dir``, created if missing.

    The key sits beside the data it protects, so it protects nothing against anyone who can read
    that directory. Production must use ``seqr keys init`` and a separately protected key file.
    """
    path = Path(data_dir).absolute().parent / "dev.kek"
    if not path.exists():
        init_key_file(path)
    log.warning(
        "DEVELOPMENT KEY IN USE: data in %s is encrypted with %s, which sits next to it. "
        "This is for development only - create a real key with `seqr keys init` for production.",
        data_dir,
        path,
    )
    return KeyFileProvider(path)


def _new_key_id() -> str:
    return "kf-" + secrets.token_hex(8)


def _derived_key_id(kek: bytes) -> str:
    return "env-" + hmac.new(kek, b"seqr/kek-id/v1", hashlib.sha256).hexdigest()[:16]


def _decode_kek(text: str, *, source: str) -> bytes:
    try:
        kek = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise FailedPreconditionError(f"{source}: key is not valid base64", field="key") from None
    if len(kek) != KEK_LEN:
        raise FailedPreconditionError(f"{source}: key must be 32 bytes", field="key", limit=KEK_LEN, actual=len(kek))
    return kek


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _encode_key_file(keyring: _Keyring) -> bytes:
    entries = [
        {"id": key_id, "key": base64.b64encode(kek).decode("ascii"), "check": key_check_value(kek),
         "added": keyring.added[key_id]}
        for key_id, kek in sorted(keyring.keys.items())
    ]
    doc = {"format": _KEY_FILE_FORMAT, "primary": keyring.primary, "keys": entries}
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _load_key_file(path: Path) -> _Keyring:
    _check_key_file_mode(path)
    corrupt = f"key file {path} is corrupt"
    try:
        doc = json.loads(path.read_bytes())
        primary = doc["primary"]
        entries = doc["keys"]
        fmt = doc["format"]
    except (ValueError, KeyError, TypeError):
        raise FailedPreconditionError(f"{corrupt}: not a seqr key file", field="path") from None
    if fmt != _KEY_FILE_FORMAT:
        raise FailedPreconditionError(f"{corrupt}: unsupported format", field="format", actual=fmt)
    keys = dict(_load_entry(entry, corrupt) for entry in entries) if isinstance(entries, list) else {}
    if primary not in keys:
        raise FailedPreconditionError(f"{corrupt}: primary key {primary!r} is missing", field="primary")
    added = {e["id"]: str(e.get("added", "")) for e in entries}
    return _Keyring(keys, primary, added)


def _load_entry(entry: object, corrupt: str) -> tuple[str, bytes]:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not isinstance(entry.get("key"), str):
        raise FailedPreconditionError(f"{corrupt}: malformed key entry", field="keys")
    kek = _decode_kek(entry["key"], source=corrupt)
    if not hmac.compare_digest(key_check_value(kek), str(entry.get("check", ""))):
        raise FailedPreconditionError(f"{corrupt}: key {entry['id']!r} fails its check value", field="keys")
    return entry["id"], kek


def _check_key_file_mode(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FailedPreconditionError(
            f"key file {path} does not exist; create one with `seqr keys init`", field="path"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise FailedPreconditionError(f"key file {path} is not a regular file", field="path")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise FailedPreconditionError(
            f"key file {path} is readable or writable by group/others; run `chmod 600 {path}`",
            field="mode",
            limit="0600",
            actual=f"{mode:04o}",
        )
