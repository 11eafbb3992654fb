"""The offline bundle (deploy/airgap/build.py, server extra), end to end.

Built from the locks, it holds exactly the server's wheels (no model stack), an SBOM of them and
checksums; it builds bit for bit the same twice (SOURCE_DATE_EPOCH); and inside a network
namespace with no route out, install.sh installs it into a fresh venv, `seqr keys init` makes a
key, `seqr serve` reports SERVING and the client routes one request.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"seqr_core": "seqr_core", "seqr_server": "server", "seqr_client": "client", "seqr_eval": "eval",
           "seqr_cli": "cli", "seqr_router": "stubs/seqr_router"}
MODEL_STACK = {"torch", "transformers", "peft", "matplotlib", "pytest", "hypothesis", "tqdm", "onnx",
               "onnxruntime-gpu"}

pytestmark = pytest.mark.slow


def build(out: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "deploy" / "airgap" / "build.py"), "--extras", "server",
                    "--out", str(out)], check=True, capture_output=True)
    return next(out.glob("*.tar.gz"))


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def bundle(tarball, tmp_path_factory) -> Path:
    """The extracted bundle directory."""
    dest = tmp_path_factory.mktemp("bundle")
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="data")
    return next(dest.iterdir())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundle_holds_the_server_wheels_an_sbom_and_checksums(bundle):
    wheels = sorted(p.name for p in (bundle / "wheels").glob("*.whl"))
    names = {w.split("-")[0].replace("_", "-").lower() for w in wheels}
    assert "seqr-router" in names and "grpcio" in names and not names & MODEL_STACK
    sums = dict(reversed(line.split("  ")) for line in (bundle / "SHA256SUMS").read_text().splitlines())
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(sums) == files and all(_sha(bundle / f) == h for f, h in sums.items())
    reqs = (bundle / "requirements.txt").read_text()
    assert reqs.count("--hash=sha256:") == len(wheels) == reqs.count("==")
    sbom = json.loads((bundle / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["metadata"]["component"]["name"] == "seqr-router"
    purls = {c["purl"].split("@")[0].removeprefix("pkg:pypi/") for c in sbom["components"]}
    assert purls == names


def test_our_wheel_holds_every_package_folder(bundle):
    """Discovery, not a list: every folder with __init__.py is in the wheel (and nothing stale)."""
    whl = next((bundle / "wheels").glob("seqr_router-*.whl"))
    have = {n.rsplit("/", 1)[0] for n in zipfile.ZipFile(whl).namelist() if n.endswith("/__init__.py")}
    want = {f"{pkg}/{init.parent.relative_to(ROOT / folder).as_posix()}".removesuffix("/.")
            for pkg, folder in FOLDERS.items() for init in (ROOT / folder).rglob("__init__.py")}
    assert have == want
    entry = zipfile.ZipFile(whl).read(f"{whl.name.split('-')[0]}-{whl.name.split('-')[1]}.dist-info/entry_points.txt")
    assert b"seqr = seqr_cli.main:main" in entry


def test_building_twice_gives_the_same_bytes(tarball, tmp_path):
    again = build(tmp_path)
    assert _sha(again) == _sha(tarball)
    assert (tmp_path / f"{again.name}.sha256").read_text() == (tarball.parent / f"{tarball.name}.sha256").read_text()


SMOKE = r"""
set -eu
ip link set lo up
test -z "$(ip route show)"            # no route out of this namespace
B=$1; V=$2; W=$3; PY=$4
"$B/install.sh" "$V" "$PY"
"$V/bin/seqr" keys init "$W/keys/kek.json"
"$V/bin/seqr" serve --listen 127.0.0.1:50051 --metrics-port off --data-dir "$W/data" \
    --key-file "$W/keys/kek.json" --anchor-dir "$W/anchor" --demo --log-format text 2>"$W/serve.log" &
pid=$!
for i in $(seq 120); do "$V/bin/seqr" health --target 127.0.0.1:50051 --timeout 2 >/dev/null 2>&1 && break; sleep 0.5; done
"$V/bin/seqr" health --target 127.0.0.1:50051 > "$W/health.txt"
"$V/bin/seqr" route --target 127.0.0.1:50051 --library demo --random 8 --json > "$W/route.json"
kill -TERM $pid
wait $pid
"$V/bin/python" -c 'import json, importlib.metadata as m; print(json.dumps(sorted(d.metadata["Name"].lower() for d in m.distributions())))' > "$W/dists.json"
"""


def _netns_available() -> bool:
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _netns_available(), reason="unshare -n needs root (CAP_SYS_ADMIN)")
def test_offline_install_in_a_network_namespace_serves_and_routes(bundle, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    base_python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    out = subprocess.run(["unshare", "-n", "sh", "-c", SMOKE, "smoke", str(bundle), str(tmp_path / "venv"),
                          str(work), str(base_python)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr + (work / "serve.log").read_text(errors="replace") \
        if (work / "serve.log").exists() else out.stdout + out.stderr
    assert (work / "health.txt").read_text().strip() == "SERVING"
    route = json.loads((work / "route.json").read_text())
    assert route["choices"] and all(c["name"].startswith("demo-") for c in route["choices"])
    dists = set(json.loads((work / "dists.json").read_text()))
    assert "seqr-router" in dists and not dists & MODEL_STACK
    assert list((work / "anchor").glob("*.anchor")) and not (work / "keys" / "kek.json.anchors").exists()
