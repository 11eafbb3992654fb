"""Store-specific refinements of the project's error types.

Every class here subclasses one of ``seqr_core.errors`` so the service maps it to the right gRPC
status without knowing the store: all integrity failures are ``IntegrityError`` (DATA_LOSS), a
missing or wrong key-encryption key is ``FailedPreconditionError`` and a store that stopped after
an I/O failure is ``UnavailableError``. The subclasses exist so tests and operators can tell *which*
check caught a problem (a flipped bit, a swapped file, a replayed manifest) from the type alone.
"""

from __future__ import annotations

from seqr_core.errors import FailedPreconditionError, IntegrityError, UnavailableError

__all__ = [
    "BlobFormatError",
    "ConflictError",
    "FailStopError",
    "MissingBlobError",
    "RollbackError",
    "SwappedBlobError",
    "TamperedBlobError",
    "WrongKeyError",
]


class BlobFormatError(IntegrityError):
    """A stored file is not a well-formed envelope: bad magic, unknown format version, a nonce
    that is not 12 bytes, or a header/body cut short."""


class TamperedBlobError(IntegrityError):
    """Authentication failed: ciphertext, tag, header or wrapped key were modified, or the blob was
    moved to an object (library, adapter, role) it was not sealed for."""


class SwappedBlobError(IntegrityError):
    """The blob's authenticated header names a different version or key id than the manifest
    expects for this object: a blob of another object or a newer version was put in its place."""


class RollbackError(IntegrityError):
    """An older copy was put back: a manifest older than the rollback anchor, a missing manifest
    for an anchored store, or a blob from an earlier version of the same object."""


class MissingBlobError(IntegrityError):
    """A blob the manifest references is not in the data directory."""


class ConflictError(FailedPreconditionError):
    """A conditional write found the library changed by another process since the caller read it."""


class WrongKeyError(FailedPreconditionError):
    """The key provider does not hold the key-encryption key the data was sealed under."""


class FailStopError(UnavailableError):
    """The store stopped after an I/O failure whose outcome on disk is unknown (an fsync error or
    a failure after the commit point). It never retries; restart the process to recover."""
