"""Crash safety: a forked child writes, replaces, deletes and rotates, and is SIGKILLed.

The child reports each operation to the parent through a pipe *before* it starts ("begin") and
after the store acknowledged it ("ack"); a pipe survives the kill. After every kill the parent
reopens the store and checks: every acknowledged write is present and byte-identical, the one
unacknowledged operation is fully applied or not at all, nothing else exists, and recovery left
no temp files or unreferenced blobs. The store directory carries over between iterations, so
each recovery also starts from the previous one's result.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from seqr_server.store import FailPointHit, FailPoints, KeyFileProvider, LibraryStore, init_key_file
from seqr_server.store.durable_io import is_temp_name
from seqr_server.store.testing import iter_files

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

ITERATIONS = 120
MAX_ADAPTERS = 10


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(rng: random.Random) -> dict[str, bytes]:
    return {
        "adapter_config.json": json.dumps({"r": rng.choice([4, 8, 16])}).encode(),
        "adapter_model.safetensors": rng.randbytes(rng.randint(500, 20_000)),
    }


@dataclass
class Model:
    """What the parent knows the store must contain."""

    adapters: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> file -> sha256
    calibration: str | None = None


def _child(data_dir: Path, key_path: Path, seed: int, out: int, failpoints: FailPoints | None, script: list | None):
    """Runs in the forked child; never returns."""
    code = 0
    log = os.fdopen(out, "w", buffering=1)
    try:
        keys = KeyFileProvider(key_path)
        store = LibraryStore.open(data_dir, keys, failpoints=failpoints)
        log.write("ready\n")
        rng = random.Random(seed)
        ops = iter(script) if script is not None else iter(lambda: _pick(rng, store), None)
        for i, op in enumerate(ops):
            _do(op, store, keys, rng, log, f"s{seed}-{i}")
        log.write("done\n")
    except BaseException:  # noqa: BLE001 - report anything to the parent, then die
        log.write("error " + json.dumps(traceback.format_exc()) + "\n")
        code = 1
    finally:
        os._exit(code)


def _pick(rng: random.Random, store: LibraryStore) -> str:
    count = len(store.library("lib").adapters)
    roll = rng.random()
    if roll < 0.04:
        return "rotate"
    if roll < 0.2:
        return "object"
    if count and (roll < 0.45 or count >= MAX_ADAPTERS):
        return "delete"
    return "put"


def _do(op: str, store: LibraryStore, keys: KeyFileProvider, rng: random.Random, log, name: str) -> None:
    if op == "put":
        files = _files(rng)
        log.write(f"begin put {name} {json.dumps({f: _sha(d) for f, d in files.items()})}\n")
        store.put_adapter("lib", name, files=files, meta={"n": name})
    elif op == "delete":
        victim = rng.choice(store.library("lib").adapters).name
        log.write(f"begin delete {victim}\n")
        store.delete_adapter("lib", victim)
    elif op == "object":
        data = rng.randbytes(rng.randint(100, 5000))
        log.write(f"begin object {_sha(data)}\n")
        store.put_library_object("lib", "calibration", data)
    else:
        log.write("begin rotate\n")
        other = next(k for k in keys.key_ids() if k != keys.primary_key_id)
        store.rotate_kek(other)
    log.write("ack\n")


def _commit(model: Model, op: tuple[str, ...]) -> None:
    """Fold one acknowledged operation into the model."""
    kind = op[0]
    if kind == "put":
        model.adapters[op[1]] = json.loads(op[2])
    elif kind == "delete":
        model.adapters.pop(op[1])
    elif kind == "object":
        model.calibration = op[1]


def _replay(model: Model, lines: list[str]) -> tuple[str, ...] | None:
    pending = None
    for line in lines:
        if line.startswith("error "):
            pytest.fail("child failed:\n" + json.loads(line[6:]))
        if line == "ack":
            _commit(model, pending)
            pending = None
        elif line.startswith("begin "):
            pending = tuple(line.split(" ", 3)[1:])
    return pending


def _actual(store: LibraryStore) -> Model:
    adapters = {
        a.name: {f: _sha(d) for f, d in store.read_adapter_files("lib", a.name).items()}
        for a in store.library("lib").adapters
    }
    calibration = store.read_library_object("lib", "calibration")
    return Model(adapters, None if calibration is None else _sha(calibration))


def _check(model: Model, pending: tuple[str, ...] | None, actual: Model) -> Model:
    """Actual must equal the model, or the model with the pending op applied; returns the truth."""
    candidates = [model]
    if pending is not None:
        applied = Model(dict(model.adapters), model.calibration)
        _commit(applied, pending)
        candidates.append(applied)
    assert actual in candidates, f"pending={pending}\nexpected one of {candidates}\ngot {actual}"
    return actual


def _assert_clean(data_dir: Path, anchor_dir: Path, store: LibraryStore) -> None:
    assert [p for p in iter_files(data_dir, anchor_dir) if is_temp_name(p.name)] == []
    lib = store.library("lib")
    referenced = sum(len(a.sha256) for a in lib.adapters) + len(lib.objects)
    assert len(list((data_dir / "blobs").iterdir())) == referenced


def _run_child(env, seed: int, *, kill: tuple[bool, float] | None, failpoints=None, script=None,
               expect_exit: bool = False) -> list[str]:
    """Fork the workload. ``kill=(after_ready, delay)``: SIGKILL ``delay`` s after the child opened the
    store (or after the fork); None: wait for a failpoint to kill it (or, with ``expect_exit``, for the
    script to finish)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        _child(env.data_dir, env.key_path, seed, write_end, failpoints, script)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        lines = []
        if kill is not None:
            after_ready, delay = kill
            if after_ready:
                lines.append(pipe.readline().strip())
            time.sleep(delay)  # the random moment; not an assertion
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        lines += pipe.read().splitlines()
    if expect_exit:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, lines
    else:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, lines
    return [line for line in lines if line and line != "ready"]


@dataclass(frozen=True)
class Env:
    data_dir: Path
    key_path: Path
    anchor_dir: Path

    def open(self) -> LibraryStore:
        return LibraryStore.open(self.data_dir, KeyFileProvider(self.key_path))


@pytest.fixture
def env(tmp_path) -> Env:
    key_path = tmp_path / "keys" / "kek.json"
    init_key_file(key_path)
    KeyFileProvider(key_path).add_key()  # rotations alternate between the two keys
    e = Env(tmp_path / "data", key_path, key_path.with_name("kek.json.anchors"))
    with e.open() as store:
        store.create_library("lib", meta={})
    return e


def test_sigkill_at_random_moments_loses_nothing_acknowledged(env):
    rng = random.Random(20240611)
    model = Model()
    acked_total = interrupted = 0
    window = 0.05  # adapted so that kills land after a few operations on fast and slow disks alike
    for iteration in range(ITERATIONS):
        during_startup = rng.random() < 0.15
        delay = rng.uniform(0, 0.01 if during_startup else window)
        lines = _run_child(env, seed=iteration, kill=(not during_startup, delay))
        acks = lines.count("ack")
        acked_total += acks
        pending = _replay(model, lines)
        interrupted += pending is not None
        with env.open() as store:
            model = _check(model, pending, _actual(store))
            _assert_clean(env.data_dir, env.anchor_dir, store)
        if not during_startup:
            window = min(window * 1.25, 1.0) if acks == 0 else max(window * 0.8, 0.005) if acks > 4 else window
    print(f"acked={acked_total} interrupted={interrupted} window={window:.3f}")
    assert acked_total >= ITERATIONS // 4  # kills landed mid-workload, not only during start-up
    assert interrupted >= ITERATIONS // 4  # and often in the middle of an operation


def _kill_self(hit: FailPointHit) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _named(name: str):
    return lambda p: p.name == name


def _suffix(suffix: str):
    return lambda p: p.suffix == suffix


# Where to die, on which operation, and whether the operation must then be visible after restart.
KILL_POINTS = [
    ("write", _suffix(".blob"), "put", False),
    ("fsync", _suffix(".blob"), "put", False),
    ("rename", _suffix(".blob"), "put", False),
    ("dir_fsync", _named("blobs"), "put", False),
    ("write", _named("MANIFEST"), "put", False),
    ("fsync", _named("MANIFEST"), "put", False),
    ("rename", _named("MANIFEST"), "put", False),
    ("dir_fsync", _named("data"), "put", True),
    ("write", _suffix(".anchor"), "put", True),
    ("fsync", _suffix(".anchor"), "put", True),
    ("rename", _suffix(".anchor"), "put", True),
    ("dir_fsync", _named("kek.json.anchors"), "put", True),
    ("rename", _named("MANIFEST"), "delete", False),
    ("unlink", _suffix(".blob"), "delete", True),
    ("dir_fsync", _named("blobs"), "delete", True),
    ("rename", _suffix(".blob"), "rotate", False),
    ("unlink", _suffix(".blob"), "rotate", True),
]


@pytest.mark.parametrize(
    ("point", "where", "op", "visible"), KILL_POINTS,
    ids=[f"{op}-{point}-{i}" for i, (point, _, op, _) in enumerate(KILL_POINTS)],
)
def test_sigkill_at_each_commit_step_recovers_old_or_new_state(env, point, where, op, visible):
    with env.open() as store:  # a known starting state, written in-process
        store.put_adapter("lib", "base", files={"a": b"1" * 100, "b": b"2" * 100}, meta={})
        store.put_library_object("lib", "calibration", b"c" * 100)
        model = _actual(store)
        (old_key,) = store.key_ids_in_use()
    new_key = next(k for k in KeyFileProvider(env.key_path).key_ids() if k != old_key)
    failpoints = FailPoints()
    failpoints.arm(point, where=where, action=_kill_self)
    lines = _run_child(env, seed=7, kill=None, failpoints=failpoints, script=[op])
    assert lines[-1] != "ack", "the failpoint never fired"
    pending = _replay(model, lines)
    with env.open() as store:
        actual = _actual(store)
        expected = Model(dict(model.adapters), model.calibration)
        if visible and pending[0] != "rotate":
            _commit(expected, pending)
        assert actual == expected
        # A rotation is all-or-nothing too: every object under the old key, or every one under the new.
        assert store.key_ids_in_use() == ({new_key} if visible and op == "rotate" else {old_key})
        _assert_clean(env.data_dir, env.anchor_dir, store)
        if op == "put" and not visible:  # the half-done put left debris, and recovery removed it
            assert store.recovery["temp_files"] + store.recovery["orphan_blobs"] >= 1


def test_child_workload_runs_to_completion_without_a_kill(env):
    lines = _run_child(env, seed=3, kill=None, script=["put", "object", "delete", "rotate"], expect_exit=True)
    assert lines[-1] == "done" and lines.count("ack") == 4
