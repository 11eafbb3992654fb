"""Key providers: fail closed on a missing, wrong or corrupted KEK; key file life cycle; the
external-command (KMS plugin) protocol, exercised with a small stdlib-only plugin."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from seqr_core.errors import (AlreadyExistsError, FailedPreconditionError, IntegrityError, NotFoundError,
                              UnavailableError)
from seqr_server.store import (CommandKeyProvider, EnvKeyProvider, KeyFileProvider, LibraryStore, WrongKeyError,
                               dev_key_file, init_key_file)

FILES = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w" * 1000}


def _b64key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _populate(data_dir: Path, keys, *, anchor_dir: Path) -> None:
    with LibraryStore.open(data_dir, keys, anchor_dir=anchor_dir) as store:
        store.create_library("lib", meta={})
        store.put_adapter("lib", "a", files=FILES, meta={})


def _read_all(data_dir: Path, keys, *, anchor_dir: Path) -> dict[str, bytes]:
    with LibraryStore.open(data_dir, keys, anchor_dir=anchor_dir) as store:
        return store.read_adapter_files("lib", "a")


# ------------------------------------------------------------------ key file


@pytest.fixture
def key_path(tmp_path) -> Path:
    path = tmp_path / "keys" / "kek.json"
    init_key_file(path)
    return path


def test_init_key_file_creates_owner_only_file(key_path):
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    keys = KeyFileProvider(key_path)
    assert keys.key_ids() == [keys.primary_key_id]


def test_init_key_file_refuses_to_overwrite(key_path):
    before = key_path.read_bytes()
    with pytest.raises(AlreadyExistsError, match="refusing to overwrite"):
        init_key_file(key_path)
    assert key_path.read_bytes() == before


def _corrupt_check_value(path: Path) -> None:
    doc = json.loads(path.read_text())
    raw = bytearray(base64.b64decode(doc["keys"][0]["key"]))
    raw[0] ^= 1
    doc["keys"][0]["key"] = base64.b64encode(bytes(raw)).decode()
    path.write_text(json.dumps(doc))


def _edit_json(change):
    def edit(path: Path) -> None:
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))
    return edit


KEY_FILE_DAMAGE = {
    "missing": lambda p: p.unlink(),
    "group_readable": lambda p: p.chmod(0o640),
    "world_readable": lambda p: p.chmod(0o604),
    "group_writable": lambda p: p.chmod(0o620),
    "not_json": lambda p: p.write_text("not json"),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:40]),
    "empty": lambda p: p.write_bytes(b""),
    "key_bit_flipped": _corrupt_check_value,
    "key_too_short": _edit_json(lambda d: d["keys"][0].update(key=base64.b64encode(b"x" * 16).decode())),
    "key_not_base64": _edit_json(lambda d: d["keys"][0].update(key="!!!")),
    "primary_missing": _edit_json(lambda d: d.update(primary="kf-nope")),
    "unknown_format": _edit_json(lambda d: d.update(format=99)),
    "a_directory": lambda p: (p.unlink(), p.mkdir()),
}


@pytest.mark.parametrize("damage", list(KEY_FILE_DAMAGE))
def test_damaged_key_file_is_refused(key_path, damage):
    KEY_FILE_DAMAGE[damage](key_path)
    with pytest.raises(FailedPreconditionError, match=str(key_path)):
        KeyFileProvider(key_path)


def test_wrong_key_file_refuses_to_open_store(tmp_path, key_path):
    anchors = tmp_path / "anchors"
    _populate(tmp_path / "data", KeyFileProvider(key_path), anchor_dir=anchors)
    other = tmp_path / "other.json"
    init_key_file(other)
    with pytest.raises(WrongKeyError, match="wrong or missing key-encryption key"):
        LibraryStore.open(tmp_path / "data", KeyFileProvider(other), anchor_dir=anchors)
    assert _read_all(tmp_path / "data", KeyFileProvider(key_path), anchor_dir=anchors) == FILES  # lock released


def test_key_file_changes_persist(key_path):
    keys = KeyFileProvider(key_path)
    first = keys.primary_key_id
    second = keys.add_key()
    assert KeyFileProvider(key_path).key_ids() == sorted([first, second])
    keys.set_primary(second)
    assert KeyFileProvider(key_path).primary_key_id == second
    keys.retire_key(first)
    assert KeyFileProvider(key_path).key_ids() == [second]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_retiring_the_primary_key_is_refused(key_path):
    keys = KeyFileProvider(key_path)
    with pytest.raises(FailedPreconditionError, match="primary"):
        keys.retire_key(keys.primary_key_id)


@pytest.mark.parametrize("call", ["set_primary", "retire_key"])
def test_unknown_key_id_is_not_found(key_path, call):
    with pytest.raises(NotFoundError, match="kf-unknown"):
        getattr(KeyFileProvider(key_path), call)("kf-unknown")


def test_dev_key_file_is_created_with_a_loud_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        keys = dev_key_file(tmp_path / "data")
    assert keys.path == tmp_path / "dev.kek"
    assert stat.S_IMODE(keys.path.stat().st_mode) == 0o600
    assert any(r.levelno == logging.WARNING and "development only" in r.getMessage() for r in caplog.records)
    again = dev_key_file(tmp_path / "data")  # reused, not replaced
    assert again.key_ids() == keys.key_ids()


# ----------------------------------------------------------- environment var


ENV_DAMAGE = {"unset": None, "empty": "", "not_base64": "@@@", "short_key": base64.b64encode(b"k" * 16).decode()}


@pytest.mark.parametrize("damage", list(ENV_DAMAGE))
def test_bad_env_key_is_refused(damage):
    environ = {} if ENV_DAMAGE[damage] is None else {"SEQR_KEK": ENV_DAMAGE[damage]}
    with pytest.raises(FailedPreconditionError, match="SEQR_KEK"):
        EnvKeyProvider(environ=environ)


def test_wrong_env_key_refuses_to_open_store(tmp_path):
    _populate(tmp_path / "data", EnvKeyProvider(environ={"SEQR_KEK": _b64key()}), anchor_dir=tmp_path / "a")
    with pytest.raises(WrongKeyError):
        LibraryStore.open(tmp_path / "data", EnvKeyProvider(environ={"SEQR_KEK": _b64key()}), anchor_dir=tmp_path / "a")


def test_env_provider_reads_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEK", _b64key())
    keys = EnvKeyProvider("MY_KEK")
    _populate(tmp_path / "data", keys, anchor_dir=tmp_path / "a")
    assert _read_all(tmp_path / "data", EnvKeyProvider("MY_KEK"), anchor_dir=tmp_path / "a") == FILES


def test_env_provider_without_anchor_dir_anchors_beside_the_data_dir(tmp_path):
    keys = EnvKeyProvider(environ={"SEQR_KEK": _b64key()})
    with LibraryStore.open(tmp_path / "data", keys) as store:
        store.create_library("lib", meta={})
    assert len(list((tmp_path / "data.anchor").glob("*.anchor"))) == 1


# ------------------------------------------------------------ command plugin

PLUGIN = textwrap.dedent('''
    """Toy KMS plugin for tests: HMAC-SHA256 keystream + HMAC tag, stdlib only (fast to start)."""
    import base64, hashlib, hmac, json, os, sys

    state = json.load(open(os.environ["TOY_KMS_KEYS"]))
    if state.get("crash"):
        sys.stderr.write("kms unreachable\\n"); sys.exit(3)
    req = json.load(sys.stdin)
    keys = {k: bytes.fromhex(v) for k, v in state["keys"].items()}

    def stream(key, nonce, n):
        out = b"".join(hmac.new(key, nonce + i.to_bytes(4, "big"), hashlib.sha256).digest() for i in range(n // 32 + 1))
        return out[:n]

    def tag(key, key_id, aad, nonce, ct):
        return hmac.new(key, b"tag" + key_id.encode() + b"|" + aad + nonce + ct, hashlib.sha256).digest()[:16]

    def answer(obj):
        print(json.dumps(obj)); sys.exit(0)

    op = req["op"]
    if op == "info":
        answer({"primary_key_id": state["primary"], "key_ids": sorted(keys)})
    if op == "wrap":
        kid, key = state["primary"], keys[state["primary"]]
        pt, aad, nonce = base64.b64decode(req["plaintext"]), base64.b64decode(req["aad"]), os.urandom(16)
        ct = bytes(a ^ b for a, b in zip(pt, stream(key, nonce, len(pt))))
        answer({"key_id": kid, "wrapped": base64.b64encode(nonce + ct + tag(key, kid, aad, nonce, ct)).decode()})
    if op == "unwrap":
        kid = req["key_id"]
        if kid not in keys:
            answer({"error": "no such key " + kid, "kind": "unknown_key"})
        blob, aad = base64.b64decode(req["wrapped"]), base64.b64decode(req["aad"])
        nonce, ct, t = blob[:16], blob[16:-16], blob[-16:]
        if not hmac.compare_digest(t, tag(keys[kid], kid, aad, nonce, ct)):
            answer({"error": "tag mismatch", "kind": "auth_failed"})
        pt = bytes(a ^ b for a, b in zip(ct, stream(keys[kid], nonce, len(ct))))
        answer({"plaintext": base64.b64encode(pt).decode()})
    answer({"error": "unknown op " + op, "kind": "other"})
''')


class ToyKms:
    def __init__(self, root: Path):
        self.script = root / "toy_kms.py"
        self.script.write_text(PLUGIN)
        self.state_path = root / "toy_kms_keys.json"
        self.state = {"primary": "k1", "keys": {"k1": os.urandom(32).hex()}}
        self.save()

    def save(self) -> None:
        self.state_path.write_text(json.dumps(self.state))

    def provider(self, **kwargs) -> CommandKeyProvider:
        return CommandKeyProvider([sys.executable, "-I", "-S", str(self.script)], **kwargs)


@pytest.fixture
def kms(tmp_path, monkeypatch) -> ToyKms:
    toy = ToyKms(tmp_path)
    monkeypatch.setenv("TOY_KMS_KEYS", str(toy.state_path))
    return toy


def test_command_provider_stores_and_rotates(tmp_path, kms):
    anchors = tmp_path / "anchors"
    keys = kms.provider()
    _populate(tmp_path / "data", keys, anchor_dir=anchors)
    kms.state = {"primary": "k2", "keys": {**kms.state["keys"], "k2": os.urandom(32).hex()}}
    kms.save()
    with LibraryStore.open(tmp_path / "data", keys, anchor_dir=anchors) as store:
        assert store.rotate_kek()["resealed"] == len(FILES)
        assert store.key_ids_in_use() == {"k2"}
    del kms.state["keys"]["k1"]
    kms.save()
    assert _read_all(tmp_path / "data", kms.provider(), anchor_dir=anchors) == FILES


def test_command_provider_with_wrong_key_material_fails_closed(tmp_path, kms):
    anchors = tmp_path / "anchors"
    _populate(tmp_path / "data", kms.provider(), anchor_dir=anchors)
    kms.state["keys"]["k1"] = os.urandom(32).hex()  # same key id, different key
    kms.save()
    with pytest.raises(IntegrityError, match="does not unwrap"):
        LibraryStore.open(tmp_path / "data", kms.provider(), anchor_dir=anchors)


@pytest.mark.parametrize(
    ("setup", "error", "match"),
    [
        (lambda k: k.state.update(crash=True), UnavailableError, "kms unreachable"),
        (lambda k: k.state.update(keys={"k9": os.urandom(32).hex()}, primary="k9"), WrongKeyError, "k1"),
    ],
    ids=["plugin_exits_nonzero", "key_missing_from_kms"],
)
def test_command_provider_failures_refuse_to_open(tmp_path, kms, setup, error, match):
    anchors = tmp_path / "anchors"
    _populate(tmp_path / "data", kms.provider(), anchor_dir=anchors)
    setup(kms)
    kms.save()
    with pytest.raises(error, match=match):
        LibraryStore.open(tmp_path / "data", kms.provider(), anchor_dir=anchors)


def test_command_provider_that_cannot_run_is_unavailable(tmp_path):
    keys = CommandKeyProvider([str(tmp_path / "no-such-plugin")])
    with pytest.raises(UnavailableError, match="cannot run key plugin"):
        keys.key_ids()


def test_command_provider_garbage_answer_is_unavailable(tmp_path):
    keys = CommandKeyProvider([sys.executable, "-I", "-S", "-c", "print('hello')"])
    with pytest.raises(UnavailableError, match="not JSON"):
        keys.wrap(os.urandom(32), aad=b"x")


def test_command_provider_unwrap_is_bound_to_aad(kms):
    keys = kms.provider(cache_size=0)
    key_id, wrapped = keys.wrap(b"k" * 32, aad=b"object-1")
    assert keys.unwrap(key_id, wrapped, aad=b"object-1") == b"k" * 32
    with pytest.raises(IntegrityError, match="tag mismatch"):
        keys.unwrap(key_id, wrapped, aad=b"object-2")
