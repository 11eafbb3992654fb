"""The package graph points one way (DESIGN §2): a contract over every import, top level or not.

seqr_core imports nothing of ours; the server and the client only the core and the stubs;
seqr_eval (evaluation, demo) may use all three; seqr_cli dispatches to everything. Nothing
installed imports bench/ or tests/, or reaches them through sys.path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"seqr_core": "seqr_core", "seqr_router": "stubs/seqr_router", "seqr_server": "server",
           "seqr_client": "client", "seqr_eval": "eval", "seqr_cli": "cli"}
ALLOWED = {
    "seqr_core": set(),
    "seqr_router": set(),
    "seqr_server": {"seqr_core", "seqr_router"},
    "seqr_client": {"seqr_core", "seqr_router"},
    "seqr_eval": {"seqr_core", "seqr_router", "seqr_server", "seqr_client"},
    "seqr_cli": {"seqr_core", "seqr_server", "seqr_client", "seqr_eval"},
}
# Ours but never importable from an installed package (bench/ modules used to be reached by path).
NOT_PACKAGES = {"bench", "tests", "server", "client", "stubs", "cli", "eval", "scripts", "corpora", "eval_lib",
                "pipeline", "train_adapters", "evaluate", "research"}


def _package_files():
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield package, path


def imports_of(path: Path, package: str) -> set[str]:
    """Top-level names of every module ``path`` imports, relative imports resolved to ``package``."""
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add(package if node.level else node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant):
            mods.add(str(node.args[0].value).split(".")[0])
    return mods


def touches_sys_path(path: Path) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "path" and getattr(n.value, "id", None) == "sys"
               for n in ast.walk(ast.parse(path.read_text())))


@pytest.mark.parametrize("package,path", list(_package_files()),
                         ids=[str(p.relative_to(ROOT)) for _, p in _package_files()])
def test_imports_point_one_way(package, path):
    ours = set(FOLDERS) | NOT_PACKAGES
    bad = (imports_of(path, package) & ours) - ALLOWED[package] - {package}
    assert not bad, f"{path.relative_to(ROOT)} ({package}) imports {sorted(bad)}"
    assert not touches_sys_path(path), f"{path.relative_to(ROOT)} edits sys.path"


def test_the_contract_catches_a_server_module_importing_the_client(tmp_path):
    bad = tmp_path / "cli.py"
    bad.write_text("def f():\n    from seqr_client import RouterClient\n")
    assert "seqr_client" in imports_of(bad, "seqr_server") - ALLOWED["seqr_server"]


def test_every_package_folder_is_covered():
    """A new top-level folder with an __init__.py must get a place in the contract."""
    tops = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert tops <= {Path(f).parts[0] for f in FOLDERS.values()}, tops
