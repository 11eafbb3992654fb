"""Where a store's sealed bytes live: the *medium* behind :class:`LibraryStore`.

The store does all of the cryptography (envelopes, AAD binding, the sealed manifest, rollback
anchors); a medium only keeps opaque sealed blobs and one sealed manifest and answers four
questions: where they live, how one commit is made atomic, how writers are serialised, and how
a reader learns of a newer commit. Two media implement it:

* :class:`~.directory.DirectoryMedium` - today's data directory (temp file + fsync + rename,
  ``MANIFEST`` is the commit point). Exclusive (one process, the default) or shared (several
  processes on one host, writers serialised by a lock file, readers poll ``MANIFEST``).
* :class:`~.postgres.PostgresMedium` - two tables in PostgreSQL; one commit is one transaction,
  writers serialise on an advisory lock (and compare-and-swap the commit counter), a commit
  NOTIFYs the replicas that LISTEN.

Contract (what the store relies on):

* ``writing()`` serialises writers across every process sharing the medium; inside it,
  ``read_manifest()`` returns the latest committed manifest, and ``commit(raw, seq)`` makes the new
  manifest and every blob put in the same block durable at once. Leaving the block by an
  exception before ``commit`` returned leaves no trace (blobs written are removed or rolled back).
* Blob names are never reused, and a blob is only ever removed by ``shred`` once no committed
  manifest references it - so a reader that finds a blob missing either raced a newer commit
  (the head moved: refresh and retry) or is looking at damage.
* ``head()`` is cheap and changes whenever a commit lands; ``wait(timeout)`` returns early when one
  may have (NOTIFY), else after ``timeout``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from contextlib import AbstractContextManager
from typing import Protocol

__all__ = ["Medium", "MediumWrite"]


class MediumWrite(Protocol):
    """One serialised write: started by :meth:`Medium.writing`, ended by leaving the block."""

    def read_manifest(self) -> bytes | None:
        """The latest committed sealed manifest (None for a medium that holds no store yet)."""

    def put_blob(self, name: str, sealed: bytes) -> None:
        """Stage a new blob; durable only with :meth:`commit`."""

    def commit(self, raw: bytes, *, seq: int) -> None:
        """Atomically publish manifest ``raw`` (commit number ``seq``) with the staged blobs."""

    def shred(self, names: Iterable[str]) -> None:
        """After commit: destroy blobs no committed manifest references any more (their wrapped
        data keys). The commit stands whatever happens here."""

    def prepare_empty(self) -> None:
        """Before the first manifest: refuse to initialise over stray data."""

    def sweep(self, referenced: set[str]) -> tuple[int, int]:
        """Remove leftovers of crashed writes; returns (temp files, unreferenced blobs) removed."""


class Medium(Protocol):
    kind: str               # "directory" | "postgres", for logs and errors
    shared: bool            # True when other processes may commit: writers must re-read the head
    location: str           # names the store for its rollback anchor file (no secrets)

    def writing(self) -> AbstractContextManager[MediumWrite]: ...

    def read_manifest(self) -> bytes | None: ...

    def read_blob(self, name: str, what: str) -> bytes:
        """The sealed blob ``name``; MissingBlobError when absent, UnavailableError when unreachable."""

    def head(self) -> Hashable:
        """A cheap token that changes whenever a commit lands."""

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` s; True when a commit was signalled."""

    def close(self) -> None: ...
