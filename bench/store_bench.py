"""Benchmark of the encrypted library store: open time, put/read/delete latency, rotation.

Fills one library with ``--adapters`` small random adapters (a JSON config plus ``--size`` bytes of
weights each), then measures how long opening the store takes (authenticating and parsing the
manifest, recovery scan) and the latency of single puts, reads and deletes. Every put and delete
is durable on return (several fsyncs), so the numbers mostly reflect the disk's fsync latency.

    .venv/bin/python bench/store_bench.py [--adapters 1000] [--size 4096] [--dir /path/on/target/disk]

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from seqr_server.store import KeyFileProvider, LibraryStore, init_key_file


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _files(rng: random.Random, size: int) -> dict[str, bytes]:
    config = json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}).encode()
    return {"adapter_config.json": config, "adapter_model.safetensors": rng.randbytes(size)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(root: Path, *, adapters: int, size: int, samples: int, opens: int) -> list[tuple[str, str]]:
    rng = random.Random(0)
    key_path = root / "keys" / "kek.json"
    init_key_file(key_path)
    data_dir = root / "data"
    keys = KeyFileProvider(key_path)
    rows: list[tuple[str, str]] = []

    with LibraryStore.open(data_dir, keys) as store:
        store.create_library("bench", meta={"base_model": "bench"}, objects={"calibration": rng.randbytes(2048)})
        fill = [_timed(lambda i=i: store.put_adapter("bench", f"a{i}", files=_files(rng, size), meta={"i": i}))
                for i in range(adapters)]
    manifest_kib = (data_dir / "MANIFEST").stat().st_size / 1024

    open_times = []
    for _ in range(opens):
        start = time.perf_counter()
        store = LibraryStore.open(data_dir, KeyFileProvider(key_path))
        open_times.append(time.perf_counter() - start)
        store.close()

    with LibraryStore.open(data_dir, KeyFileProvider(key_path)) as store:
        names = [f"a{i}" for i in rng.sample(range(adapters), samples)]
        reads = [_timed(lambda n=n: store.read_adapter_files("bench", n)) for n in names]
        puts = [_timed(lambda j=j: store.put_adapter("bench", f"extra{j}", files=_files(rng, size), meta={}))
                for j in range(samples)]
        deletes = [_timed(lambda n=n: store.delete_adapter("bench", n)) for n in names]
        new_key = store._keys.add_key()  # noqa: SLF001 - the bench owns this provider
        blobs = len(list((data_dir / "blobs").iterdir())) + 1
        rotation = _timed(lambda: store.rotate_kek(new_key))

    rows.append((f"open, {adapters} adapters (median of {opens})", _ms(statistics.median(open_times))))
    rows.append((f"open, {adapters} adapters (min)", _ms(min(open_times))))
    rows.append((f"manifest size, {adapters} adapters", f"{manifest_kib:.0f} KiB"))
    rows.append((f"put p50 / p99 (library at {adapters}, n={samples})",
                 f"{_ms(_percentile(puts, 0.5))} / {_ms(_percentile(puts, 0.99))}"))
    rows.append((f"put p50 / p99 (filling 0..{adapters})",
                 f"{_ms(_percentile(fill, 0.5))} / {_ms(_percentile(fill, 0.99))}"))
    rows.append((f"delete p50 / p99 (n={samples})",
                 f"{_ms(_percentile(deletes, 0.5))} / {_ms(_percentile(deletes, 0.99))}"))
    rows.append((f"read p50 / p99 (n={samples})", f"{_ms(_percentile(reads, 0.5))} / {_ms(_percentile(reads, 0.99))}"))
    rows.append((f"KEK rotation, {blobs} objects", _ms(rotation)))
    return rows


def _fsync_latency(root: Path) -> float:
    path = root / "fsync-probe"
    samples = []
    with open(path, "wb") as f:
        for _ in range(50):
            f.write(b"x" * 4096)
            f.flush()
            samples.append(_timed(lambda: os.fsync(f.fileno())))
    path.unlink()
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000, help="adapters in the library (default 1000)")
    parser.add_argument("--size", type=int, default=4096, help="bytes of random weights per adapter (default 4096)")
    parser.add_argument("--samples", type=int, default=200, help="puts, reads and deletes to time (default 200)")
    parser.add_argument("--opens", type=int, default=5, help="store opens to time (default 5)")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the store (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="seqr-store-bench-") as tmp:
        root = Path(tmp)
        fsync = _fsync_latency(root)
        rows = run(root, adapters=args.adapters, size=args.size, samples=args.samples, opens=args.opens)
    print(f"seqr-router store benchmark - Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{args.size} B weights/adapter, median fsync {_ms(fsync)}\n")
    print("| metric | value |")
    print("|---|---|")
    for metric, value in rows:
        print(f"| {metric} | {value} |")


if __name__ == "__main__":
    main()
