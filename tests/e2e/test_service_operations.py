"""Health, graceful shutdown, metrics, reflection, TLS, export — the service as operators meet it."""

from __future__ import annotations

import datetime
import threading
import urllib.request

import grpc
import numpy as np
import pytest

from seqr_client import RouterClient, SeqrError, UnavailableError, tls_credentials
from seqr_server.config import TLSConfig

from ..peft_factory import read_dir
from .conftest import LIB, activations, populate


def _until(predicate, tries: int = 2000):
    """Poll without wall-clock assertions: the machine may be busy."""
    ev = threading.Event()
    for _ in range(tries):
        if predicate():
            return True
        ev.wait(0.01)
    return False


def test_health_goes_serving_only_after_the_libraries_are_loaded(world, start_server, populated):
    h, client = populated
    data_dir = h.config.data_dir
    h.stop(grace=1.0)
    h2 = start_server(data_dir, load=False)
    with RouterClient(h2.target) as c:
        assert c.health() == "NOT_SERVING"
        assert c.health("seqr_router.v1.Router") == "NOT_SERVING"
        with pytest.raises(UnavailableError):
            c.describe(LIB)
        h2.load()
        assert c.health() == "SERVING" and c.health("seqr_router.v1.LibraryAdmin") == "SERVING"
        assert len(c.describe(LIB).adapters) == len(world.adapters)


def test_shutdown_reports_not_serving_while_draining_and_still_answers(world, start_server, tmp_path):
    h = start_server(tmp_path / "d", drain_s=1.0)
    c = populate(h, world)
    stopper = threading.Thread(target=h.stop)
    stopper.start()
    assert _until(lambda: c.health() == "NOT_SERVING")
    assert c.route(LIB, activations(world)).choices        # in-flight and drain-time calls still served
    stopper.join()
    with pytest.raises(SeqrError):
        c.health(timeout=2)
    c.close()


def test_shutdown_under_load_loses_no_acknowledged_admin_write(world, start_server, populated):
    h, client = populated
    files = read_dir(world.adapters["shared-a0"])
    files = {k: files[k] for k in ("adapter_config.json", "adapter_model.safetensors")}
    acked: list[str] = []
    x = activations(world)

    def writer(k: int) -> None:
        with RouterClient(h.target, timeout=30) as c:
            for i in range(10_000):
                try:
                    c.put_adapter_files(files, name=f"w{k}-{i}", library=LIB)
                except SeqrError:
                    return
                acked.append(f"w{k}-{i}")

    def reader() -> None:
        with RouterClient(h.target, timeout=30) as c:
            while True:
                try:
                    c.route(LIB, x)
                except SeqrError:
                    return

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)] + \
              [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    assert _until(lambda: len(acked) >= 6)
    h.stop(grace=5.0)
    for t in threads:
        t.join()
    h2 = start_server(h.config.data_dir)
    with RouterClient(h2.target) as c:
        names = {a.name for a in c.list_adapters(LIB)}
        info = c.describe(LIB)
    written = {n for n in names if n.startswith("w")}
    assert set(acked) <= written
    assert len(written - set(acked)) <= 2            # at most the one in flight per writer
    assert info.version == 1 + len(names)            # one version per stored adapter, nothing half-applied


def test_metrics_endpoint_reports_latency_choices_versions_and_errors(world, start_server, tmp_path):
    h = start_server(tmp_path / "d", metrics_port=0)
    c = populate(h, world)
    r = c.route(LIB, activations(world))
    with pytest.raises(SeqrError):
        c.route("nope", activations(world))
    text = urllib.request.urlopen(f"http://127.0.0.1:{h.metrics_port}/metrics", timeout=10).read().decode()
    assert 'seqr_route_latency_seconds_count{form="activations",library="tiny"} 1.0' in text
    assert f'seqr_route_choices_total{{adapter="{r.best.name}",library="tiny"}} 1.0' in text
    assert f'seqr_library_version{{library="tiny"}} {float(1 + len(world.adapters))}' in text
    assert 'seqr_rpc_errors_total{code="NOT_FOUND",method="Router/Route"} 1.0' in text
    c.close()


def test_reflection_lists_the_services(populated):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    h, _ = populated
    with grpc.insecure_channel(h.target) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"seqr_router.v1.Router", "seqr_router.v1.LibraryAdmin", "grpc.health.v1.Health"} <= services


def test_export_scorer_streams_an_onnx_model(world, populated):
    onnx = pytest.importorskip("onnx")
    _, client = populated
    raw = client.export_scorer(LIB)
    model = onnx.load_from_string(raw)
    assert {p.key: p.value for p in model.metadata_props}["seqr.library"] == LIB


def _certs(tmp_path):
    """A CA, a server cert for 127.0.0.1 and a client cert, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress
    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer_key=None, issuer_name=None, *, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca = make("seqr-test-ca", ca=True)
    out = {}
    for name, san in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), ("client", None)):
        key, cert = make(name, ca_key, ca.subject, san=san)
        out[name] = (tmp_path / f"{name}.key", tmp_path / f"{name}.pem")
        out[name][0].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        out[name][1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out["ca"] = tmp_path / "ca.pem"
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return out


def test_mtls_admits_only_clients_with_a_certificate_from_the_ca(world, start_server, tmp_path):
    pem = _certs(tmp_path)
    h = start_server(tmp_path / "d", demo=True, tls=TLSConfig(cert_file=pem["server"][1], key_file=pem["server"][0],
                                                               client_ca_file=pem["ca"]))
    good = tls_credentials(ca_file=str(pem["ca"]), cert_file=str(pem["client"][1]), key_file=str(pem["client"][0]))
    with RouterClient(h.target, good) as c:
        assert c.health() == "SERVING"
        assert c.describe("demo").adapters
    with RouterClient(h.target, tls_credentials(ca_file=str(pem["ca"])), timeout=3) as c:
        with pytest.raises(UnavailableError):
            c.describe("demo")
    with RouterClient(h.target, timeout=3) as c:    # plaintext to a TLS port
        with pytest.raises(UnavailableError):
            c.describe("demo")


def test_calls_beyond_the_concurrent_rpc_limit_are_resource_exhausted(start_server, tmp_path):
    from seqr_client import LimitExceededError
    from seqr_server.config import Limits
    h = start_server(tmp_path / "d", demo=True, limits=Limits(max_concurrent_rpcs=1))
    release = threading.Event()
    with RouterClient(h.target) as c:
        info = c.describe("demo")
        demo_x = {m.name: np.ones((1, m.d_in), np.float32) for m in info.modules if m.shared_rank}

        def steps():                # an open decode stream holds the only slot
            yield demo_x
            release.wait(30)
            yield demo_x

        stream = c.route_stream(steps(), library="demo")
        next(stream)
        with pytest.raises(LimitExceededError):
            c.route("demo", demo_x)
        release.set()
        assert len(list(stream)) == 1
        assert c.route("demo", demo_x).choices


def test_an_unexpected_server_fault_is_internal_without_details(start_server, tmp_path):
    from seqr_client import InternalError
    h = start_server(tmp_path / "d", demo=True)

    def boom(*a, **k):
        raise RuntimeError("secret detail of a bug")

    h.manager.get = boom
    with RouterClient(h.target) as c:
        with pytest.raises(InternalError) as ei:
            c.describe("demo")
    assert "secret detail" not in str(ei.value) and "incident" in str(ei.value)
