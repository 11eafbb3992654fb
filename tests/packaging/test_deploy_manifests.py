"""deploy/: the Kubernetes base validates offline against the Kubernetes JSON schemas and keeps its
promises (one replica, restricted security context, native gRPC probes, selectors that match);
the systemd unit verifies with systemd-analyze and carries the hardening; the Containerfile is
multi-stage, installs only from the bundle and runs non-root with a gRPC health check. Every
SEQR_* variable they set is one `seqr serve` (or the client) actually reads.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from seqr_cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes" / "base"
UNIT = ROOT / "deploy" / "systemd" / "seqr-router.service"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
K8S_VERSION = "1.30.0"      # oldest release the base targets (native gRPC probes are GA since 1.27)


@pytest.fixture(scope="module")
def known_variables() -> set[str]:
    """Every SEQR_* variable `seqr serve --help` and `seqr health --help` document."""
    out = io.StringIO()
    for cmd in (["serve"], ["health"]):
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            build_parser().parse_args([*cmd, "--help"])
    return set(re.findall(r"SEQR_[A-Z_]+", out.getvalue()))


def resources() -> list[dict]:
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    files = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == files, "every manifest is listed in kustomization.yaml"
    return [doc for f in kust["resources"] for doc in yaml.safe_load_all((BASE / f).read_text()) if doc]


def by_kind(kind: str) -> dict:
    (doc,) = [d for d in resources() if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("doc", resources(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_resource_validates_against_the_schema(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_schema_check_catches_a_wrong_field():
    bad = {**by_kind("Service"), "spec": {**by_kind("Service")["spec"], "port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_one_replica_recreated_with_restricted_security_and_grpc_probes():
    dep = by_kind("Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["readOnlyRootFilesystem"] is True
        assert not sc.get("capabilities", {}).get("add")
    (main,) = pod["containers"]
    grpc_port = next(p["containerPort"] for p in main["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["grpc"]["port"] == grpc_port, probe


def test_selectors_match_the_pod_and_the_service_targets_its_ports():
    dep = by_kind("Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for kind, selector in (("Deployment", dep["spec"]["selector"]["matchLabels"]),
                           ("Service", by_kind("Service")["spec"]["selector"]),
                           ("PodDisruptionBudget", by_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]),
                           ("NetworkPolicy", by_kind("NetworkPolicy")["spec"]["podSelector"]["matchLabels"])):
        assert selector.items() <= labels.items(), kind
    names = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in by_kind("Service")["spec"]["ports"]} <= names
    mounts = {v["name"] for c in dep["spec"]["template"]["spec"]["containers"] for v in c["volumeMounts"]}
    assert mounts <= {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}


def test_configmap_sets_only_variables_seqr_reads(known_variables):
    data = by_kind("ConfigMap")["data"]
    assert set(data) <= known_variables, set(data) - known_variables
    assert data["SEQR_ANCHOR_DIR"] != str(Path(data["SEQR_KEY_FILE"]).parent), "anchor beside a read-only key"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_kustomize_renders_the_base():
    out = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, check=True).stdout
    rendered = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out) if d)
    assert rendered == sorted((d["kind"], d["metadata"]["name"]) for d in resources())


HARDENING = ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
             "CapabilityBoundingSet=", "ReadWritePaths=", "LoadCredential=kek.json:", "RestrictAddressFamilies=")


def test_systemd_unit_carries_the_hardening(known_variables):
    text = UNIT.read_text()
    lines = set(text.splitlines())
    for directive in HARDENING:
        assert any(line.startswith(directive) for line in lines), directive
    variables = set(re.findall(r"Environment=(SEQR_[A-Z_]+)=", text))
    assert variables <= known_variables, variables - known_variables


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    seqr = Path(shutil.which("seqr") or ROOT / ".venv" / "bin" / "seqr")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/seqr-router/bin/seqr", str(seqr)))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    ours = [line for line in out.stderr.splitlines() if unit.name in line]
    assert out.returncode == 0 and not ours, out.stderr


def test_containerfile_is_multi_stage_bundle_only_non_root_with_health_check(known_variables):
    text = "\n".join(x for x in CONTAINERFILE.read_text().splitlines() if not x.startswith("#"))
    assert len(re.findall(r"^FROM ", text, flags=re.M)) == 2
    assert "install.sh" in text and not re.search(r"pip[^\n]* install", text)     # only via the bundle
    user = re.search(r"^USER (\S+)", text, flags=re.M).group(1)
    assert user.split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*\n?.*seqr\", \"health\"", text, flags=re.M)
    assert "VOLUME" in text
    assert set(re.findall(r"(SEQR_[A-Z_]+)=", text)) <= known_variables
    install = (ROOT / "deploy" / "airgap" / "install.sh").read_text()
    assert "--no-index" in install and "--require-hashes" in install and "sha256sum --check" in install
