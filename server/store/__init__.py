"""Encrypted, durable, versioned storage of libraries and adapters (``seqr_server.store``).

Quick start::

    from seqr_server.store import LibraryStore, KeyFileProvider, init_key_file

    init_key_file("/etc/seqr/kek.json")                     # once; mode 0600
    store = LibraryStore.open("/var/lib/seqr", KeyFileProvider("/etc/seqr/kek.json"))
    store.create_library("demo", meta={"base_model": "..."})
    store.put_adapter("demo", "a1", files={"adapter_config.json": b"{}"}, meta={})

See ``library_store`` for the on-disk layout and the threat model, ``envelope`` for the blob
format, ``key_providers``/``command_provider`` for KEK sources and ``durable_io`` for the write path.
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
