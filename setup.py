"""Package discovery (metadata and dependencies are in pyproject.toml).

Folders keep their short names; the installed import names cannot clash with other
distributions (PyPI already has a `seqr`). Every folder with an ``__init__.py`` below a root is
packaged, so a new subpackage cannot silently drop out of the wheel.
"""

from setuptools import find_packages, setup

ROOTS = {
    "seqr_core": "seqr_core",
    "seqr_server": "server",
    "seqr_client": "client",
    "seqr_cli": "cli",
    "seqr_eval": "eval",
    "seqr_router": "stubs/seqr_router",
}

setup(
    package_dir=ROOTS,
    packages=[sub for name, folder in ROOTS.items()
              for sub in (name, *(f"{name}.{p}" for p in find_packages(where=folder)))],
    package_data={"seqr_router": ["v1/*.pyi"]},
)
