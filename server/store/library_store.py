"""LibraryStore: encrypted, durable, versioned storage of libraries and adapters.

The store seals everything (envelopes, AAD binding, the sealed manifest, the rollback anchor)
and keeps the sealed bytes in a *medium* (see ``medium``): a data directory (``directory``;
exclusive to one process, or shared by a process group on one host) or PostgreSQL
(``postgres``; any number of replicas on any hosts). Every mutating call stages its new blobs,
commits the new manifest through the medium (the single commit point), advances the rollback
anchor and only then publishes the new state in memory and returns: acknowledged means
durable. A crash at any point leaves the old or the new manifest, never a mix; blobs that lost
their reference are removed on the next open. Replaced or deleted blobs are destroyed right
after the commit: their wrapped data keys live only there, so that is the crypto-shred.

On a shared medium other processes commit too: a writer re-reads the latest manifest under the
medium's writer lock (so ids are never reused and no update is lost), and :meth:`refresh`
adopts newer commits - each verified exactly like a manifest at open, and never older than one
this store has already seen.

The threat model (what the encryption and the anchor do and do not protect) is in the
package docstring (``seqr_server.store``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

from seqr_core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    IntegrityError,
    NotFoundError,
    UnavailableError,
)

from .adapter_edits import adapter_objects_edit, new_adapters_edit, now, replace_adapter_edit
from .anchor import AnchorFile, resolve_anchor_dir
from .commit import Committer, Txn
from .directory import DirectoryMedium
from .durable_io import DurableIO, FailPoints
from .envelope import open_sealed, parse_header
from .errors import ConflictError, TamperedBlobError
from .key_providers import KeyProvider
from .manifest import (
    adapter_context,
    adapter_object_context,
    adapter_refs,
    find_adapter,
    find_library,
    iter_blob_refs,
    iter_refs,
    library_blob_names,
    note_adapter_deleted,
    note_library_change,
    object_context,
    successor,
    writable_library,
)
from .medium import Medium
from .records import AdapterRecord, LibraryRecord, adapter_record, library_record
from .recovery import recover, verify_newer
from .rotation import reseal_all, select_primary
from .rwlock import ReadWriteLock
from .validation import require_bytes, validate_files, validate_meta, validate_name, validate_objects, validate_role

__all__ = ["LibraryStore"]

_R = TypeVar("_R")


class LibraryStore:
    """Thread-safe store: many concurrent readers, one writer at a time. Create with :meth:`open`
    (a data directory) or :meth:`connect` (PostgreSQL)."""

    def __init__(self, *, medium: Medium, keys: KeyProvider, io: DurableIO, anchor_file: AnchorFile,
                 manifest: dict[str, Any], manifest_key_id: str, manifest_sha256: str, recovery: dict[str, int]):
        self._medium = medium
        self._keys = keys
        self._io = io
        self._anchor_file = anchor_file
        self._open = True
        self._manifest = manifest
        self._manifest_key_id = manifest_key_id
        self._manifest_sha256 = manifest_sha256
        self._head: object = None             # medium head token the published manifest was read at
        self._committer = Committer(medium=medium, keys=keys, io=io, anchor_file=anchor_file)
        self._write_lock = threading.Lock()
        self._rw = ReadWriteLock()
        self.recovery = recovery

    @classmethod
    def open(
        cls,
        data_dir: str | os.PathLike[str],
        keys: KeyProvider,
        *,
        create: bool = True,
        anchor_dir: str | os.PathLike[str] | None = None,
        accept_unanchored: bool = False,
        failpoints: FailPoints | None = None,
        shared: bool = False,
    ) -> LibraryStore:
        """Open (or create) the store in ``data_dir``; verifies the manifest and cleans up crashes.

        Refuses with ``WrongKeyError`` (a FailedPreconditionError) when the KEK is missing or wrong,
        ``IntegrityError`` when the manifest was tampered with and ``RollbackError`` when it is older
        than the rollback anchor. ``anchor_dir`` overrides where the anchor lives (see module doc);
        ``accept_unanchored`` adopts a store whose anchor is missing (after moving it). ``shared``
        lets several processes open the directory at once (each may write; see ``directory``).
        """
        path = Path(data_dir).absolute()
        io = DurableIO(failpoints=failpoints)
        if not path.is_dir():
            if not create:
                raise FailedPreconditionError(f"data directory {path} does not exist", field="data_dir")
            path.mkdir(mode=0o700, parents=True)
            io.fsync_dir(path.parent)
        anchors = resolve_anchor_dir(path, keys.anchor_dir, anchor_dir)
        return cls.on_medium(DirectoryMedium(path, io, shared=shared), keys, io=io, anchor_dir=anchors,
                             create=create, accept_unanchored=accept_unanchored)

    @classmethod
    def connect(cls, dsn: str, keys: KeyProvider, *, anchor_dir: str | os.PathLike[str], create: bool = True,
                accept_unanchored: bool = True, **options: Any) -> LibraryStore:
        """Open (or create) the store in the PostgreSQL database ``dsn`` (see ``postgres``).

        The anchor lives in ``anchor_dir`` on this host. A host without an anchor for this
        database adopts its current state (``accept_unanchored``, trust on first use)."""
        from .postgres import PostgresMedium   # psycopg is only needed for this medium

        return cls.on_medium(PostgresMedium(dsn, **options), keys, io=DurableIO(),
                             anchor_dir=Path(anchor_dir).absolute(), create=create,
                             accept_unanchored=accept_unanchored)

    @classmethod
    def on_medium(cls, medium: Medium, keys: KeyProvider, *, io: DurableIO, anchor_dir: Path, create: bool,
                  accept_unanchored: bool) -> LibraryStore:
        with ExitStack() as cleanup:
            cleanup.callback(medium.close)
            anchor_file = AnchorFile(anchor_dir, medium.location, io)
            anchor_file.prepare()
            found = recover(medium=medium, keys=keys, anchor_file=anchor_file, create=create,
                            accept_unanchored=accept_unanchored)
            store = cls(medium=medium, keys=keys, io=io, anchor_file=anchor_file, manifest=found.manifest,
                        manifest_key_id=found.manifest_key_id, manifest_sha256=found.manifest_sha256,
                        recovery={"temp_files": found.removed_temp_files, "orphan_blobs": found.removed_orphan_blobs})
            cleanup.pop_all()
            return store

    # ----------------------------------------------------------------- reads

    @property
    def data_dir(self) -> Path | None:
        """The data directory (None for a database store)."""
        return getattr(self._medium, "data_dir", None)

    @property
    def medium(self) -> str:
        return self._medium.kind

    @property
    def shared(self) -> bool:
        """Whether other processes may commit to this store (then :meth:`refresh` follows them)."""
        return self._medium.shared

    @property
    def store_id(self) -> str:
        """Random id of this store, bound into every blob's associated data."""
        return self._manifest["store_id"]

    @property
    def manifest_seq(self) -> int:
        """Sequence number of the last committed manifest (grows by one per commit)."""
        return self._manifest["seq"]

    def list_libraries(self) -> list[str]:
        self._check_open()
        return sorted(self._manifest["libraries"])

    def library_stamps(self) -> dict[str, tuple[str, int]]:
        """(created_at, version) of every library: changes whenever the library does."""
        self._check_open()
        return {name: (lib["created_at"], lib["version"]) for name, lib in self._manifest["libraries"].items()}

    def library(self, name: str, *, adapters: bool = True) -> LibraryRecord:
        """The library's record; ``adapters=False`` leaves its adapter records out (empty): building
        them copies every adapter's entry, which a writer that knows what it changed can skip."""
        self._check_open()
        return library_record(name, find_library(self._manifest, name), adapters=adapters)

    def library_head(self, name: str) -> tuple[int, int]:
        """(version, next adapter id) of a library, without building its adapter records."""
        self._check_open()
        lib = find_library(self._manifest, name)
        return lib["version"], lib["next_adapter_id"]

    def adapter(self, library: str, name: str) -> AdapterRecord:
        self._check_open()
        return adapter_record(name, find_adapter(self._manifest, library, name))

    def read_adapter_files(self, library: str, name: str) -> dict[str, bytes]:
        """Decrypt and return the adapter's files exactly as uploaded (checked against their sha256)."""
        self._check_open()
        with self._rw.read():
            manifest = self._manifest
            entry = find_adapter(manifest, library, name)
            out = {}
            for file_name, ref in entry["files"].items():
                context = adapter_context(manifest["store_id"], library, name, entry["adapter_id"], file_name)
                what = f"library {library!r} adapter {name!r} file {file_name!r}"
                data = self._read_blob(ref, context, what)
                if hashlib.sha256(data).hexdigest() != entry["sha256"][file_name]:
                    raise TamperedBlobError(f"{what}: plaintext does not match its recorded sha256")
                out[file_name] = data
            return out

    def read_adapter_object(self, library: str, name: str, role: str) -> bytes | None:
        """The adapter's derived object for ``role`` (e.g. "index"), or None if it has none."""
        self._check_open()
        validate_role(role)
        with self._rw.read():
            manifest = self._manifest
            entry = find_adapter(manifest, library, name)
            ref = entry.get("objects", {}).get(role)
            if ref is None:
                return None
            context = adapter_object_context(manifest["store_id"], library, name, entry["adapter_id"], role)
            return self._read_blob(ref, context, f"library {library!r} adapter {name!r} object {role!r}")

    def read_library_object(self, library: str, role: str) -> bytes | None:
        """The library's object for ``role`` (e.g. "calibration"), or None if it has none."""
        self._check_open()
        validate_role(role)
        with self._rw.read():
            manifest = self._manifest
            ref = find_library(manifest, library)["objects"].get(role)
            if ref is None:
                return None
            context = object_context(manifest["store_id"], library, role)
            return self._read_blob(ref, context, f"library {library!r} object {role!r}")

    def key_ids_in_use(self) -> set[str]:
        """KEK ids any stored object (or the manifest) is wrapped under; retire only keys not listed."""
        self._check_open()
        with self._rw.read():  # the manifest and its key id are published together
            return {ref["key_id"] for ref in iter_refs(self._manifest)} | {self._manifest_key_id}

    def blob_name(self, library: str, *, adapter: str | None = None, file: str | None = None,
                  role: str | None = None) -> str:
        """The random name of an object's blob in the medium (for diagnostics and tamper tests)."""
        self._check_open()
        if adapter is not None:
            entry = find_adapter(self._manifest, library, adapter)
            ref = entry["files"].get(file) if role is None else entry.get("objects", {}).get(role)
        else:
            ref = find_library(self._manifest, library)["objects"].get(role)
        if ref is None:
            raise NotFoundError("no such file or role", field="file" if adapter else "role", actual=file or role)
        return ref["blob"]

    def blob_path(self, library: str, *, adapter: str | None = None, file: str | None = None,
                  role: str | None = None) -> Path:
        """Where an object's blob lives on disk (directory stores; diagnostics and tamper tests)."""
        name = self.blob_name(library, adapter=adapter, file=file, role=role)
        if not isinstance(self._medium, DirectoryMedium):
            raise FailedPreconditionError(f"a {self._medium.kind} store keeps no blob files", field="store")
        return self._medium.blob_file(name)

    def verify(self) -> dict[str, Any]:
        """Read and authenticate every blob; returns counts and a list of (object, error) failures."""
        self._check_open()
        failures: list[tuple[str, str]] = []
        checked = 0
        with self._rw.read():
            for ref, context, what in iter_blob_refs(self._manifest):
                checked += 1
                try:
                    self._read_blob(ref, context, what)
                except IntegrityError as exc:
                    failures.append((what, str(exc)))
        return {"checked": checked, "failed": failures}

    # ---------------------------------------------------------------- writes

    def create_library(self, name: str, *, meta: dict, objects: dict[str, bytes] | None = None,
                       if_seq: int | None = None) -> LibraryRecord:
        validate_name(name, field="library")
        meta = validate_meta(meta)
        objects = validate_objects(objects or {})

        def edit(manifest: dict[str, Any], txn: Txn) -> LibraryRecord:
            if name in manifest["libraries"]:
                raise AlreadyExistsError(f"library {name!r} already exists", field="library", actual=name)
            lib = {"version": 1, "meta": meta, "next_adapter_id": 0, "created_at": now(), "objects": {},
                   "adapters": {}, "changed": 1, "deleted": {}}
            manifest["libraries"][name] = lib
            for role, data in objects.items():
                lib["objects"][role] = self._write_blob(txn, data, object_context(manifest["store_id"], name, role))
            return library_record(name, lib)

        return self._mutate(edit, if_seq=if_seq)

    def delete_library(self, name: str) -> None:
        """Delete a library and crypto-shred every blob in it."""

        def edit(manifest: dict[str, Any], txn: Txn) -> None:
            txn.obsolete.extend(library_blob_names(find_library(manifest, name)))
            del manifest["libraries"][name]

        self._mutate(edit)

    def put_adapter(self, library: str, name: str, *, files: dict[str, bytes], meta: dict, replace: bool = False,
                    objects: dict[str, bytes] | None = None, library_objects: dict[str, bytes] | None = None,
                    if_seq: int | None = None) -> AdapterRecord:
        """Store a new adapter; it gets the library's next adapter id, never reused after a delete.
        ``objects``: derived per-adapter objects (role -> bytes, e.g. its routing index),
        committed with the files.

        ``replace``: store a new version of the existing adapter ``name`` instead (NotFoundError if
        there is none): same id, ``version`` + 1, and the old version's blobs (files and objects)
        are unlinked after the commit (crypto-shredded). ``library_objects``: library objects
        replaced in the same commit. ``if_seq``: as for ``_mutate``.
        """
        checked = (validate_name(name, field="adapter"), validate_files(files), validate_meta(meta),
                   validate_objects(objects or {}))
        lib_objects = validate_objects(library_objects or {})
        return self._mutate(replace_adapter_edit(library, checked, lib_objects, self._write_blob, replace=replace),
                            if_seq=if_seq)

    def put_adapters(self, library: str, items: list[tuple[str, dict[str, bytes], dict, dict[str, bytes]]]
                     ) -> list[AdapterRecord]:
        """Store several new adapters — (name, files, meta, objects) each — in one commit, ids in
        order; the library version grows by one per adapter, as separate puts would."""
        checked = []
        for name, files, meta, objects in items:
            name, meta = validate_name(name, field="adapter"), validate_meta(meta)
            checked.append((name, validate_files(files), meta, validate_objects(objects)))

        return self._mutate(new_adapters_edit(library, checked, self._write_blob))

    def put_adapter_objects(self, library: str, objects: dict[str, dict[str, bytes]]) -> LibraryRecord:
        """Add or replace derived objects of existing adapters ({adapter: {role: bytes}}) in one
        commit. Derived data (e.g. an index rebuilt from the files by a newer version) changes
        nothing a caller sees, so the library version stays; replaced blobs are shredded."""
        checked = {validate_name(n, field="adapter"): validate_objects(o) for n, o in objects.items()}

        return self._mutate(adapter_objects_edit(library, checked, self._write_blob))

    def delete_adapter(self, library: str, name: str, *, record: bool = True,
                       if_seq: int | None = None) -> LibraryRecord | None:
        """Remove an adapter and crypto-shred its files and objects; bumps the library version.
        ``record=False`` skips building the library's record (a copy of every adapter's)."""

        def edit(manifest: dict[str, Any], txn: Txn) -> LibraryRecord | None:
            entry = find_adapter(manifest, library, name)
            lib = writable_library(manifest, library)
            txn.obsolete.extend(ref["blob"] for ref in adapter_refs(entry))
            del lib["adapters"][name]
            note_adapter_deleted(lib, name)
            return library_record(library, lib) if record else None

        return self._mutate(edit, if_seq=if_seq)

    def put_library_object(self, library: str, role: str, data: bytes, *,
                           if_seq: int | None = None) -> LibraryRecord:
        """Store (or replace) the library's object for ``role``; bumps the library version."""
        return self.put_library_objects(library, {role: data}, if_seq=if_seq)

    def put_library_objects(self, library: str, objects: dict[str, bytes], *,
                            if_seq: int | None = None) -> LibraryRecord:
        """Store (or replace) several library objects in one commit (one version bump)."""
        for role, data in objects.items():
            validate_role(role)
            require_bytes(data, field=role)
        objects = {role: bytes(data) for role, data in objects.items()}

        def edit(manifest: dict[str, Any], txn: Txn) -> LibraryRecord:
            lib = writable_library(manifest, library)
            for role, data in objects.items():
                old = lib["objects"].get(role)
                if old is not None:
                    txn.obsolete.append(old["blob"])
                lib["objects"][role] = self._write_blob(txn, data, object_context(manifest["store_id"], library, role))
            note_library_change(lib)
            return library_record(library, lib)

        return self._mutate(edit, if_seq=if_seq)

    def delete_library_object(self, library: str, role: str) -> LibraryRecord:
        """Remove (and crypto-shred) the library's object for ``role``; bumps the library version."""
        validate_role(role)

        def edit(manifest: dict[str, Any], txn: Txn) -> LibraryRecord:
            lib = writable_library(manifest, library)
            old = lib["objects"].pop(role, None)
            if old is None:
                raise NotFoundError(f"library {library!r} has no {role!r} object", field="role", actual=role)
            txn.obsolete.append(old["blob"])
            note_library_change(lib)
            return library_record(library, lib)

        return self._mutate(edit)

    def rotate_kek(self, new_primary_key_id: str | None = None) -> dict:
        """Re-seal every data key under the provider's primary KEK (optionally making ``new_primary_key_id``
        primary first). Readers keep working: they use the old blobs until the new manifest is published.
        Afterwards no object references an older key id, so it can be retired."""
        self._check_open()
        target = select_primary(self._keys, new_primary_key_id)
        result = self._mutate(
            lambda manifest, txn: reseal_all(
                manifest, target=target, read=self._read_blob, obsolete=txn.obsolete,
                write=lambda data, context: self._write_blob(txn, data, context),
            ),
            deep=True,  # rotation rewrites references in place
        )
        stale = self.key_ids_in_use() - {target}
        if stale:
            raise FailedPreconditionError(
                f"primary key changed during rotation; objects still use {sorted(stale)} - rotate again",
                field="key_id",
            )
        return result

    # ------------------------------------------------------------- following

    def refresh(self) -> bool:
        """Adopt the medium's latest commit if another process made one; True when it changed.

        The new manifest is verified like one at open (authenticated, anchored, same store) and
        must be newer than the current one: an older or altered one raises IntegrityError and the
        store keeps serving what it has."""
        self._check_open()
        head = self._medium.head()
        if head == self._head:
            return False
        raw = self._medium.read_manifest()
        with self._write_lock:
            changed = self._adopt(raw)
            self._head = head
        return changed

    def wait_for_commit(self, timeout: float) -> bool:
        """Block up to ``timeout`` s or until the medium signals a commit (True)."""
        return self._medium.wait(timeout)

    def close(self) -> None:
        """Release the medium; later calls raise UnavailableError. Idempotent."""
        with self._write_lock, self._rw.write():
            if self._open:
                self._open = False
                self._medium.close()

    def __enter__(self) -> LibraryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if not self._open:
            raise UnavailableError("the store is closed", field="store")
        self._io.check()

    def _mutate(self, edit: Callable[[dict[str, Any], Txn], _R], *, deep: bool = False,
                if_seq: int | None = None) -> _R:
        """Apply ``edit`` to a successor of the latest manifest and commit it durably; the only write path.

        ``if_seq``: commit only if the latest manifest is still commit ``if_seq`` (ConflictError
        otherwise) - for a caller whose checks ran on that state while other processes commit too."""
        with self._write_lock:
            self._check_open()
            with self._medium.writing() as write:
                if self._medium.shared:   # others commit too: edit the latest, never a stale copy
                    self._adopt(write.read_manifest())
                if if_seq is not None and self._manifest["seq"] != if_seq:
                    raise ConflictError("the store changed since the caller read it; retry on its current state",
                                        field="store", limit=if_seq, actual=self._manifest["seq"])
                manifest = successor(self._manifest, deep=deep)
                txn = Txn(version=manifest["seq"], write=write)
                result = edit(manifest, txn)
                self._committer.commit(manifest, txn, publish=lambda raw: self._publish(manifest, raw))
            self._head = None     # the next refresh re-reads (and finds this commit)
            return result

    def _adopt(self, raw: bytes | None) -> bool:
        """Verify a committed manifest read from the medium and publish it if it is newer."""
        manifest = verify_newer(raw, keys=self._keys, anchor_file=self._anchor_file, current=self._manifest,
                                current_sha256=self._manifest_sha256, medium=self._medium.kind)
        if manifest is None:
            return False
        self._committer.anchor(manifest, raw)
        self._publish(manifest, raw)
        return True

    def _publish(self, manifest: dict[str, Any], raw: bytes) -> None:
        key_id = parse_header(raw, what="MANIFEST")[0].key_id
        with self._rw.write():  # also waits out readers still using blobs of the old manifest
            self._manifest = manifest
            self._manifest_key_id = key_id
            self._manifest_sha256 = hashlib.sha256(raw).hexdigest()

    def _write_blob(self, txn: Txn, data: bytes, context: bytes) -> dict[str, Any]:
        return self._committer.write_blob(txn, data, context)

    def _read_blob(self, ref: dict[str, Any], context: bytes, what: str) -> bytes:
        blob = self._medium.read_blob(ref["blob"], what)
        return open_sealed(blob, keys=self._keys, context=context, what=what, expected_version=ref["version"],
                           expected_key_id=ref["key_id"])
