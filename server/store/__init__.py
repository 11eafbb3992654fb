"""Encrypted, durable, versioned storage of libraries and adapters (``seqr_server.store``).

Quick start::

    from seqr_server.store import LibraryStore, KeyFileProvider, init_key_file

    init_key_file("/etc/seqr/kek.json")                     # once; mode 0600
    store = LibraryStore.open("/var/lib/seqr", KeyFileProvider("/etc/seqr/kek.json"))
    store.create_library("demo", meta={"base_model": "..."})
    store.put_adapter("demo", "a1", files={"adapter_config.json": b"{}"}, meta={})

See ``library_store`` for the on-disk layout and the threat model, ``envelope`` for the blob
format, ``key_providers``/``command_provider`` for KEK sources, ``medium`` for where the sealed
bytes live (``directory``, ``postgres``) and ``durable_io`` for the directory's write path.

Threat model (what the encryption and the anchor do and do not protect):

* An attacker who can read the data directory or the database (a stolen disk, a backup, a shared
  volume, a DBA) learns only the number and sizes of blobs (which hint at adapter shapes), the
  commit counter, key ids, and when writes happened.
  Names, metadata and weights are sealed; data keys exist on disk only wrapped by the KEK, which
  lives elsewhere.
* An attacker who can also *write* the data directory can destroy data (we cannot prevent that)
  but cannot make the store serve anything it did not write for that object: bit flips,
  truncations, appends, header edits, blobs swapped between objects or versions, and blobs moved
  from another store all fail with an ``IntegrityError``. Replaying an older manifest, deleting it,
  or restoring an old copy of the whole directory is caught by the rollback anchor - *provided*
  the anchor directory (default: ``<key file>.anchors/``; for other providers ``<data_dir>.anchor/``
  next to the data directory, or ``anchor_dir=``) is not writable by that attacker. Someone who
  can rewind both the data directory and the anchor (e.g. restore a snapshot of the whole host)
  can roll the store back to an earlier *genuine* state; only an external monotonic counter
  (a KMS/TPM) closes that gap, and is not implemented here.
* An attacker with the KEK and the data directory has everything; the KEK must be protected.
* Crypto-shredding removes the only copies of a deleted object's wrapped data keys from the live
  directory. Copies in backups, filesystem journals or SSD spare blocks remain decryptable while
  the KEK that wrapped them exists: rotate the KEK and retire the old key to finish the job.
* Plaintext (weights, keys) lives only in process memory (Python cannot wipe it reliably).
* Crash safety assumes a local POSIX file system that honours fsync and atomic rename (ext4, xfs);
  network file systems need their own verification. PostgreSQL brings its own (WAL, fsync).
* With PostgreSQL every host keeps its own anchor: a replica refuses any manifest older than one
  it has seen. A host with no anchor yet (a new pod) adopts the database's current state on first
  contact (``accept_unanchored``) - keep anchors on a persistent volume to close that window.
"""

from .command_provider import CommandKeyProvider
from .durable_io import FailPointHit, FailPoints
from .errors import (
    BlobFormatError,
    ConflictError,
    FailStopError,
    MissingBlobError,
    RollbackError,
    SwappedBlobError,
    TamperedBlobError,
    WrongKeyError,
)
from .key_providers import EnvKeyProvider, KeyFileProvider, KeyProvider, dev_key_file, init_key_file
from .library_store import LibraryStore
from .records import AdapterRecord, LibraryRecord

__all__ = [
    "AdapterRecord",
    "BlobFormatError",
    "CommandKeyProvider",
    "ConflictError",
    "EnvKeyProvider",
    "FailPointHit",
    "FailPoints",
    "FailStopError",
    "KeyFileProvider",
    "KeyProvider",
    "LibraryRecord",
    "LibraryStore",
    "MissingBlobError",
    "RollbackError",
    "SwappedBlobError",
    "TamperedBlobError",
    "WrongKeyError",
    "dev_key_file",
    "init_key_file",
]
