"""Envelope format: round trip, what the associated data binds, and header validation."""

from __future__ import annotations

import base64
import os
import struct

import pytest

from seqr_core.errors import IntegrityError
from seqr_server.store import (BlobFormatError, EnvKeyProvider, RollbackError, SwappedBlobError, TamperedBlobError,
                               WrongKeyError)
from seqr_server.store.envelope import NONCE_LEN, EnvelopeHeader, blob_context, open_sealed, parse_header, seal
from seqr_server.store.testing import header_layout

CTX = blob_context("store-1", "lib", role="file:adapter_model.safetensors", adapter="a1", adapter_id=0)


def _keys(*keks: bytes) -> EnvKeyProvider:
    value = ",".join(base64.b64encode(k).decode() for k in keks)
    return EnvKeyProvider("KEK", environ={"KEK": value})


@pytest.fixture(scope="module")
def keys() -> EnvKeyProvider:
    return _keys(os.urandom(32), os.urandom(32))


def test_sealed_blob_round_trips(keys):
    blob = seal(b"weights" * 100, keys=keys, context=CTX, version=7)
    assert open_sealed(blob, keys=keys, context=CTX, what="t", expected_version=7) == b"weights" * 100


def test_sealing_twice_gives_different_ciphertext(keys):
    assert seal(b"x", keys=keys, context=CTX, version=1) != seal(b"x", keys=keys, context=CTX, version=1)


def test_plaintext_does_not_appear_in_sealed_blob(keys):
    secret = os.urandom(64)
    assert secret not in seal(secret, keys=keys, context=CTX, version=1)


@pytest.mark.parametrize(
    "other",
    [
        blob_context("store-2", "lib", role="file:adapter_model.safetensors", adapter="a1", adapter_id=0),
        blob_context("store-1", "lib2", role="file:adapter_model.safetensors", adapter="a1", adapter_id=0),
        blob_context("store-1", "lib", role="file:adapter_config.json", adapter="a1", adapter_id=0),
        blob_context("store-1", "lib", role="file:adapter_model.safetensors", adapter="a2", adapter_id=0),
        blob_context("store-1", "lib", role="file:adapter_model.safetensors", adapter="a1", adapter_id=1),
        blob_context("store-1", "lib", role="object:calibration"),
    ],
    ids=["store", "library", "role", "adapter", "adapter_id", "object"],
)
def test_blob_opened_for_another_object_fails_to_open(keys, other):
    blob = seal(b"payload", keys=keys, context=CTX, version=3)
    with pytest.raises(TamperedBlobError):
        open_sealed(blob, keys=keys, context=other, what="t", expected_version=3)


def test_blob_from_older_version_is_a_rollback(keys):
    blob = seal(b"payload", keys=keys, context=CTX, version=3)
    with pytest.raises(RollbackError):
        open_sealed(blob, keys=keys, context=CTX, what="t", expected_version=4)


def test_blob_from_newer_version_is_a_swap(keys):
    blob = seal(b"payload", keys=keys, context=CTX, version=5)
    with pytest.raises(SwappedBlobError):
        open_sealed(blob, keys=keys, context=CTX, what="t", expected_version=4)


def test_blob_under_unexpected_key_id_is_a_swap(keys):
    blob = seal(b"payload", keys=keys, context=CTX, version=5)
    with pytest.raises(SwappedBlobError):
        open_sealed(blob, keys=keys, context=CTX, what="t", expected_version=5, expected_key_id="env-0000")


def test_blob_under_unknown_kek_fails_closed(keys):
    blob = seal(b"payload", keys=keys, context=CTX, version=5)
    with pytest.raises(WrongKeyError):
        open_sealed(blob, keys=_keys(os.urandom(32)), context=CTX, what="t")


def test_wrapped_key_moved_to_another_header_fails_to_unwrap(keys):
    a = seal(b"a", keys=keys, context=CTX, version=5)
    b = seal(b"b", keys=keys, context=blob_context("store-1", "lib", role="object:calibration"), version=5)
    la, lb = header_layout(a), header_layout(b)
    spliced = a[: la.wrapped.start] + b[lb.wrapped] + a[la.wrapped.stop:]
    with pytest.raises(TamperedBlobError, match="does not unwrap"):
        open_sealed(spliced, keys=keys, context=CTX, what="t")


@pytest.mark.parametrize("length", [0, 8, 11, 13, 16, 24])
def test_header_with_wrong_nonce_length_is_refused_on_write(length):
    with pytest.raises(BlobFormatError, match="12 bytes"):
        EnvelopeHeader(version=1, key_id="k", wrapped_key=b"w", nonce=os.urandom(length))


@pytest.mark.parametrize("length", [8, 16])
def test_blob_with_wrong_nonce_length_is_refused_on_read(keys, length):
    blob = seal(b"payload", keys=keys, context=CTX, version=1)
    lay = header_layout(blob)
    edited = blob[: lay.nonce_len.start] + bytes([length]) + os.urandom(length) + blob[lay.body]
    with pytest.raises(BlobFormatError, match="12 bytes"):
        parse_header(edited, what="t")


def _edit(blob: bytes, field: str, value: bytes) -> bytes:
    region = getattr(header_layout(blob), field)
    return blob[: region.start] + value + blob[region.stop:]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("magic", b"SQRX", BlobFormatError),
        ("format_version", b"\x02", BlobFormatError),
        ("flags", b"\x01", BlobFormatError),
        ("version", struct.pack(">Q", 8), TamperedBlobError),
        ("key_id_len", b"\xff", BlobFormatError),
        ("wrapped_len", b"\x00\x00", BlobFormatError),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_edited_header_field_fails_to_open(keys, field, value, error):
    blob = seal(b"payload", keys=keys, context=CTX, version=7)
    with pytest.raises(error):
        open_sealed(_edit(blob, field, value), keys=keys, context=CTX, what="t")


@pytest.mark.parametrize("cut", [0, 3, 14, 20, -17, -1])
def test_truncated_blob_fails_to_open(keys, cut):
    blob = seal(b"payload", keys=keys, context=CTX, version=7)
    with pytest.raises(IntegrityError):
        open_sealed(blob[:cut], keys=keys, context=CTX, what="t")


def test_nonce_is_twelve_random_bytes(keys):
    headers = [parse_header(seal(b"x", keys=keys, context=CTX, version=1), what="t")[0] for _ in range(20)]
    assert {len(h.nonce) for h in headers} == {NONCE_LEN}
    assert len({h.nonce for h in headers}) == 20
