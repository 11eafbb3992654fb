"""AES-256-GCM envelope format for everything the store writes.

Each stored object version is sealed with its own fresh 256-bit data key; the data key is wrapped
by a key-encryption key (KEK) from a :class:`~seqr_server.store.key_providers.KeyProvider`.

Layout (big-endian; every byte up to and including the nonce is the *header*)::

    offset  size  field
    0       4     magic  b"SQRE"
    4       1     format version (1)
    5       1     flags (reserved, must be 0)
    6       8     object version (the manifest sequence number the object was written at)
    14      1     key id length n (1..64), then n bytes of ASCII key id
    ..      2     wrapped data key length m (1..1024), then m bytes
    ..      1     nonce length (must be 12), then the 12-byte nonce
    ..      ..    AES-GCM ciphertext || 16-byte tag

Associated data of the body is ``header || context``. The header carries the format version, the
object version and the key id, and ``context`` names the object (store id, library, adapter,
adapter id, role), so a blob that is moved to another object, swapped with another version or
given an edited header fails authentication. The data key's wrapping is bound to the same context
and version (:func:`wrap_aad`), so a wrapped key cannot be transplanted into another header either.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from seqr_core.errors import IntegrityError

from .errors import BlobFormatError, RollbackError, SwappedBlobError, TamperedBlobError

if TYPE_CHECKING:
    from .key_providers import KeyProvider

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "NONCE_LEN",
    "EnvelopeHeader",
    "blob_context",
    "open_sealed",
    "parse_header",
    "seal",
    "wrap_aad",
]

MAGIC = b"SQRE"
FORMAT_VERSION = 1
NONCE_LEN = 12
DATA_KEY_LEN = 32
TAG_LEN = 16
MAX_KEY_ID_LEN = 64
MAX_WRAPPED_LEN = 1024
_FIXED = struct.Struct(">4sBBQ")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")


@dataclass(frozen=True)
class EnvelopeHeader:
    """The authenticated, unencrypted part of a sealed blob."""

    version: int
    key_id: str
    wrapped_key: bytes
    nonce: bytes
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # Enforced on both the write and the parse path: GCM's security rests on 96-bit nonces.
        if len(self.nonce) != NONCE_LEN:
            raise BlobFormatError(
                "nonce must be exactly 12 bytes", field="nonce", limit=NONCE_LEN, actual=len(self.nonce)
            )
        if not 1 <= len(self.key_id) <= MAX_KEY_ID_LEN or not self.key_id.isascii():
            raise BlobFormatError("key id must be 1..64 ASCII characters", field="key_id", actual=self.key_id)
        if not 1 <= len(self.wrapped_key) <= MAX_WRAPPED_LEN:
            raise BlobFormatError(
                "wrapped data key has an invalid length",
                field="wrapped_key",
                limit=MAX_WRAPPED_LEN,
                actual=len(self.wrapped_key),
            )
        if not 0 <= self.version < 2**64:
            raise BlobFormatError("object version out of range", field="version", actual=self.version)

    def encode(self) -> bytes:
        key_id = self.key_id.encode("ascii")
        return b"".join(
            (
                _FIXED.pack(MAGIC, self.format_version, 0, self.version),
                _U8.pack(len(key_id)),
                key_id,
                _U16.pack(len(self.wrapped_key)),
                self.wrapped_key,
                _U8.pack(len(self.nonce)),
                self.nonce,
            )
        )


def blob_context(
    store_id: str, library: str, *, role: str, adapter: str | None = None, adapter_id: int | None = None
) -> bytes:
    """Canonical bytes naming one stored object; part of the associated data of its blob."""
    fields = {"store": store_id, "library": library, "adapter": adapter, "adapter_id": adapter_id, "role": role}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def wrap_aad(context: bytes, version: int) -> bytes:
    """Associated data for wrapping a data key: binds the key to its object and version."""
    return b"seqr/data-key/v1\x00" + struct.pack(">Q", version) + context


def seal(plaintext: bytes, *, keys: KeyProvider, context: bytes, version: int) -> bytes:
    """Encrypt ``plaintext`` under a fresh data key wrapped by the provider's primary KEK."""
    data_key = AESGCM.generate_key(bit_length=256)
    key_id, wrapped = keys.wrap(data_key, aad=wrap_aad(context, version))
    header = EnvelopeHeader(version=version, key_id=key_id, wrapped_key=wrapped, nonce=os.urandom(NONCE_LEN))
    encoded = header.encode()
    return encoded + AESGCM(data_key).encrypt(header.nonce, plaintext, encoded + context)


def parse_header(blob: bytes, *, what: str) -> tuple[EnvelopeHeader, int]:
    """Parse and validate the header; returns it and the offset where the ciphertext starts."""
    reader = _Reader(blob, what)
    magic, fmt, flags, version = reader.take_struct(_FIXED, "fixed header")
    if magic != MAGIC:
        raise BlobFormatError(f"{what}: not a seqr envelope (bad magic)", field="magic", actual=magic.hex())
    if fmt != FORMAT_VERSION:
        raise BlobFormatError(
            f"{what}: unsupported envelope format version", field="format_version", limit=FORMAT_VERSION, actual=fmt
        )
    if flags != 0:
        raise BlobFormatError(f"{what}: reserved header flags are set", field="flags", actual=flags)
    key_id_raw = reader.take(reader.take_struct(_U8, "key id length")[0], "key id")
    wrapped = reader.take(reader.take_struct(_U16, "wrapped key length")[0], "wrapped key")
    nonce_len = reader.take_struct(_U8, "nonce length")[0]
    if nonce_len != NONCE_LEN:
        raise BlobFormatError(
            f"{what}: nonce must be exactly 12 bytes", field="nonce", limit=NONCE_LEN, actual=nonce_len
        )
    nonce = reader.take(nonce_len, "nonce")
    if len(blob) - reader.offset < TAG_LEN:
        raise BlobFormatError(f"{what}: ciphertext shorter than the GCM tag (truncated)", field="ciphertext")
    try:
        key_id = key_id_raw.decode("ascii")
    except UnicodeDecodeError:
        raise BlobFormatError(f"{what}: key id is not ASCII", field="key_id") from None
    header = EnvelopeHeader(version=version, key_id=key_id, wrapped_key=wrapped, nonce=nonce, format_version=fmt)
    return header, reader.offset


def open_sealed(
    blob: bytes,
    *,
    keys: KeyProvider,
    context: bytes,
    what: str,
    expected_version: int | None = None,
    expected_key_id: str | None = None,
) -> bytes:
    """Authenticate and decrypt a blob sealed by :func:`seal` for ``context``.

    ``expected_version``/``expected_key_id`` come from the manifest; a mismatch is reported before
    any key is unwrapped so the error says *why* (rolled back vs swapped) rather than just "bad tag".
    """
    header, body_offset = parse_header(blob, what=what)
    _check_expectations(header, what=what, expected_version=expected_version, expected_key_id=expected_key_id)
    data_key = _unwrap(keys, header, context=context, what=what)
    aad = blob[:body_offset] + context
    try:
        return AESGCM(data_key).decrypt(header.nonce, blob[body_offset:], aad)
    except InvalidTag:
        raise TamperedBlobError(
            f"{what}: authentication failed (modified, truncated, extended or moved from another object)"
        ) from None


def _check_expectations(
    header: EnvelopeHeader, *, what: str, expected_version: int | None, expected_key_id: str | None
) -> None:
    if expected_version is not None and header.version < expected_version:
        raise RollbackError(
            f"{what}: blob is from an older version (rolled back)",
            field="version",
            limit=expected_version,
            actual=header.version,
        )
    if expected_version is not None and header.version != expected_version:
        raise SwappedBlobError(
            f"{what}: blob belongs to another object or version", field="version", limit=expected_version,
            actual=header.version,
        )
    if expected_key_id is not None and header.key_id != expected_key_id:
        raise SwappedBlobError(
            f"{what}: blob header names a different key id than the manifest", field="key_id",
            limit=expected_key_id, actual=header.key_id,
        )


def _unwrap(keys: KeyProvider, header: EnvelopeHeader, *, context: bytes, what: str) -> bytes:
    try:
        data_key = keys.unwrap(header.key_id, header.wrapped_key, aad=wrap_aad(context, header.version))
    except IntegrityError as exc:
        raise TamperedBlobError(
            f"{what}: the data key does not unwrap ({exc.message}): wrong KEK, or the data was tampered with"
        ) from None
    if len(data_key) != DATA_KEY_LEN:
        raise TamperedBlobError(f"{what}: unwrapped data key has the wrong length", actual=len(data_key))
    return data_key


class _Reader:
    """Bounds-checked cursor so every truncation is reported as a format error, not IndexError."""

    def __init__(self, blob: bytes, what: str):
        self._blob = blob
        self._what = what
        self.offset = 0

    def take(self, n: int, name: str) -> bytes:
        end = self.offset + n
        if end > len(self._blob):
            raise BlobFormatError(f"{self._what}: header truncated in {name}", field=name, actual=len(self._blob))
        chunk = self._blob[self.offset:end]
        self.offset = end
        return chunk

    def take_struct(self, fmt: struct.Struct, name: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, name))
