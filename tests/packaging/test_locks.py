"""locks/ agree with pyproject.toml: fail when a requirement changes and `./dev lock` was not run.

Each install set's lock must (1) carry the stamp of pyproject's current requirement tables,
(2) pin every entry exactly with hashes, and (3) satisfy every requirement of its extra,
self-referencing extras expanded, with a pinned entry; packages shared between locks have one
version everywhere.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pip_requirements_parser import RequirementsFile

from scripts.lock import SETS, STAMP, requirements_stamp

ROOT = Path(__file__).resolve().parents[2]

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCKED_SETS = ("dev", *SETS)


def pins(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of every entry; fails on anything not pinned with ==."""
    rf = RequirementsFile.from_file(str(lock))
    assert not rf.invalid_lines, rf.invalid_lines
    out = {}
    for r in rf.requirements:
        assert r.is_pinned, f"{lock.name}: {r.name} is not pinned with =="
        out[canonicalize_name(r.name)] = (next(iter(r.specifier)).version, r.hash_options)
    return out


def requirements_of(extra: str | None) -> list[Requirement]:
    """Base dependencies plus ``extra``'s, with seqr-router[...] self-references expanded."""
    name = canonicalize_name(PROJECT["name"])
    todo = [Requirement(r) for r in PROJECT["dependencies"]]
    seen, out = set(), []
    extras = [extra] if extra else []
    while extras:
        e = extras.pop()
        if e in seen:
            continue
        seen.add(e)
        for r in map(Requirement, PROJECT["optional-dependencies"][e]):
            if canonicalize_name(r.name) == name:
                extras += sorted(r.extras)
            else:
                todo.append(r)
    for r in todo:
        if r.marker is None or r.marker.evaluate({"python_version": "3.11", "sys_platform": "linux",
                                                  "platform_machine": "x86_64"}):
            out.append(r)
    return out


@pytest.mark.parametrize("name", [*LOCKED_SETS, "build"])
def test_lock_is_stamped_with_the_current_pyproject(name):
    first = (ROOT / "locks" / f"{name}.txt").read_text().splitlines()[0]
    assert first == f"{STAMP}{requirements_stamp()}", f"locks/{name}.txt is stale: run ./dev lock"


@pytest.mark.parametrize("name", LOCKED_SETS)
def test_every_requirement_of_the_set_is_pinned_with_hashes(name):
    locked = pins(ROOT / "locks" / f"{name}.txt")
    assert all(hashes for _, hashes in locked.values())
    for req in requirements_of(name):
        got = locked.get(canonicalize_name(req.name))
        assert got, f"locks/{name}.txt lacks {req} (run ./dev lock)"
        assert req.specifier.contains(got[0], prereleases=True), f"locks/{name}.txt pins {req.name}=={got[0]}, " \
                                                                 f"pyproject wants {req}"


def test_the_server_lock_has_no_model_stack():
    locked = pins(ROOT / "locks" / "server.txt")
    assert not {"torch", "transformers", "peft", "matplotlib", "pytest", "tqdm"} & set(locked)


def test_shared_packages_have_one_version_in_every_lock():
    dev = pins(ROOT / "locks" / "dev.txt")
    for name in (*SETS, "build", "torch-cpu"):
        for pkg, (version, _) in pins(ROOT / "locks" / f"{name}.txt").items():
            assert dev[pkg][0] == version, f"{pkg}: {version} in locks/{name}.txt, {dev[pkg][0]} in dev.txt"


def test_torch_is_the_cpu_build():
    assert pins(ROOT / "locks" / "torch-cpu.txt")["torch"][0].endswith("+cpu")


def test_the_stamp_check_catches_a_changed_requirement(tmp_path):
    doc = (ROOT / "pyproject.toml").read_text().replace('"threadpoolctl>=3.5"', '"threadpoolctl>=9"')
    (tmp_path / "pyproject.toml").write_text(doc)
    assert requirements_stamp(tmp_path / "pyproject.toml") != requirements_stamp()
