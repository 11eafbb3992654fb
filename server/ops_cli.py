"""Operator commands that open the store offline: `seqr keys rotate|ls`, `seqr backup`, `seqr restore`.

``keys rotate`` and ``restore`` take the store's directory lock, so the server must be stopped;
``backup`` does not need the lock and copies a consistent snapshot while the server runs. Each
prints one JSON document (ids, counts, never key material) for runbooks and scripts.

With a PostgreSQL store (``--store-dsn``): ``keys ls`` and ``keys rotate`` work while the
replicas run (the rotation is one commit like any write; replicas follow it). ``backup`` and
``restore`` are for data directories only and refuse a DSN, naming what to do instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from seqr_core.errors import FailedPreconditionError, InvalidArgumentError

from .app import key_provider
from .config import KeySource
from .store import KeyFileProvider, KeyProvider, LibraryStore
from .store.anchor import resolve_anchor_dir
from .store.backup import restore_backup, write_backup

NO_DATABASE_BACKUP = ("works on a data directory, and this store is in PostgreSQL (--store-dsn): back the database "
                      "up with pg_dump or the database team's backups (its rows hold only ciphertext), and keep "
                      "the key file and the rollback anchors apart from them")


def dsn_from_args(a) -> str | None:
    """The PostgreSQL DSN of --store-dsn / --store-dsn-file (their SEQR_* variables included), or None."""
    if getattr(a, "store_dsn_file", None) is not None:
        try:
            return Path(a.store_dsn_file).read_text().strip() or None
        except OSError as e:
            raise InvalidArgumentError(f"cannot read --store-dsn-file {a.store_dsn_file}: {e.strerror}",
                                       field="store_dsn_file") from None
    dsn = getattr(a, "store_dsn", None) or getattr(a, "store_dsn_env", None)
    return str(dsn) if dsn else None


def open_offline(a, keys: KeyProvider) -> LibraryStore:
    """The existing store the flags name: a data directory (locked: the server must be stopped) or
    a PostgreSQL database (shared with running replicas)."""
    dsn = dsn_from_args(a)
    if dsn is None:
        return LibraryStore.open(a.data_dir, keys, create=False, anchor_dir=a.anchor_dir)
    anchors = a.anchor_dir or resolve_anchor_dir(Path(a.data_dir).absolute(), keys.anchor_dir, None)
    return LibraryStore.connect(dsn, keys, anchor_dir=anchors, create=False)


def provider(keys: KeySource, data_dir: Path):
    """The KEK provider of an offline command: the server's, except that without a key source
    only an existing dev key is used (an offline command never creates one)."""
    if keys.is_dev and not (Path(data_dir).absolute().parent / "dev.kek").is_file():
        raise FailedPreconditionError("no key source: pass --key-file, --key-env or --key-command", field="key_file")
    return key_provider(keys, data_dir)


def _keys(a) -> KeySource:
    return KeySource(key_file=Path(a.key_file) if a.key_file else None, key_env=a.key_env,
                     key_command=a.key_command)


def _print(doc: dict) -> int:
    print(json.dumps(doc, indent=2, sort_keys=True))
    return 0


def cmd_keys_rotate(a) -> int:
    """Add (or pick) a KEK, make it primary, re-encrypt every data key under it, optionally retire the rest."""
    keys = provider(_keys(a), a.data_dir)
    if a.to is None and not isinstance(keys, KeyFileProvider):
        raise FailedPreconditionError("this key source cannot create keys: add the new key in the KMS or "
                                      "environment, then pass its id with --to", field="to")
    with open_offline(a, keys) as store:  # a directory is locked: is the server stopped?
        added = keys.add_key() if a.to is None else None
        result = store.rotate_kek(a.to or added)
        in_use = store.key_ids_in_use()
    retired: list[str] = []
    if a.retire_old:
        if not isinstance(keys, KeyFileProvider):
            raise FailedPreconditionError("only key files can retire keys here; retire them in the KMS", field="retire_old")
        for key_id in sorted(set(keys.key_ids()) - in_use):
            keys.retire_key(key_id)
            retired.append(key_id)
    return _print({**result, "added_key_id": added, "retired_key_ids": retired, "key_ids": keys.key_ids(),
                   "key_ids_in_use": sorted(in_use)})


def cmd_keys_ls(a) -> int:
    keys = provider(_keys(a), a.data_dir)
    doc = {"primary_key_id": keys.primary_key_id, "key_ids": keys.key_ids()}
    if dsn_from_args(a) is not None or (Path(a.data_dir) / "MANIFEST").is_file():
        with open_offline(a, keys) as store:
            doc["key_ids_in_use"] = sorted(store.key_ids_in_use())
    return _print(doc)


def cmd_backup(a) -> int:
    if dsn_from_args(a) is not None:
        raise FailedPreconditionError(f"seqr backup {NO_DATABASE_BACKUP}", field="store_dsn")
    keys = provider(_keys(a), a.data_dir)
    return _print(write_backup(a.data_dir, a.out, keys, anchor_dir=a.anchor_dir).as_dict())


def cmd_restore(a) -> int:
    if dsn_from_args(a) is not None:
        raise FailedPreconditionError(f"seqr restore {NO_DATABASE_BACKUP}; restore the database there, or "
                                      "restore this backup into a data directory", field="store_dsn")
    keys = provider(_keys(a), a.data_dir)
    return _print(restore_backup(a.backup, a.data_dir, keys, anchor_dir=a.anchor_dir,
                                 accept_rollback=a.accept_rollback))


def add_keys_commands(keys, *, add_store_flags) -> None:
    p = keys.add_parser("rotate", help="new primary KEK, re-encrypt every data key, optionally retire old keys",
                        description="Rotate the key-encryption key: add a new key to the key file (or use "
                                    "--to KEY_ID, e.g. one added in a KMS), make it primary, re-seal every "
                                    "stored object's data key under it in one commit, and with --retire-old "
                                    "destroy the keys nothing uses any more. Stop the server first (the store "
                                    "is locked). Backups made before a retirement need the retired key: keep "
                                    "a copy of the old key file as long as you keep those backups.")
    p.add_argument("--to", metavar="KEY_ID", help="rotate to this existing key id instead of adding one")
    p.add_argument("--retire-old", action="store_true", help="destroy every key no stored object uses afterwards")
    add_store_flags(p, what="the store to re-encrypt")
    p.set_defaults(func=cmd_keys_rotate)
    p = keys.add_parser("ls", help="key ids, the primary, and which ones the store uses",
                        description="List the key ids the key source holds, its primary, and the key ids "
                                    "stored objects are sealed under (never key material).")
    add_store_flags(p, what="the store to inspect")
    p.set_defaults(func=cmd_keys_ls)


def add_backup_commands(sub, *, add_store_flags) -> None:
    p = sub.add_parser("backup", help="write a verified backup (store + anchor record + key ids, never keys)",
                       description="Write one tar file with the sealed MANIFEST, every blob it references "
                                   "(each authenticated while copied), the rollback anchor record and the key "
                                   "ids needed to read it - never key material; back the key file up "
                                   "separately. Works while the server runs (a consistent snapshot).")
    p.add_argument("out", type=Path, help="backup file to create (must not exist; mode 0600)")
    add_store_flags(p, what="the store to back up")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="restore a backup into a new directory and verify every blob",
                       description="Check a backup (member names, sha256 of every file) and that the key "
                                   "source holds every key id it needs, then build the store in a new or "
                                   "empty --data-dir, anchor it, and authenticate every blob. Refuses to roll "
                                   "back a directory whose anchor is newer unless --accept-rollback.")
    p.add_argument("backup", type=Path, help="backup file made by `seqr backup`")
    p.add_argument("--accept-rollback", action="store_true",
                   help="replace a newer rollback anchor for --data-dir (a deliberate rollback)")
    add_store_flags(p, what="where to restore (new or empty)")
    p.set_defaults(func=cmd_restore)


__all__ = ["add_backup_commands", "add_keys_commands", "dsn_from_args", "open_offline", "provider"]
