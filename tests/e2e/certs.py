"""A throwaway CA with a server certificate for 127.0.0.1 and client certificates, made with
the `cryptography` package at test time (EC P-256, valid for one day)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pem:
    key: Path
    cert: Path


class TestCA:
    __test__ = False                   # not a pytest class

    def __init__(self, folder: Path, name: str = "seqr-test-ca"):
        from cryptography import x509
        from cryptography.x509.oid import NameOID
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key, self._cert = self._make(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca=True)
        self.ca = folder / "ca.pem"
        self.ca.write_bytes(self._pem(self._cert))
        self.server = self.issue("server", ips=["127.0.0.1"])

    def issue(self, cn: str, *, sans: tuple[str, ...] = (), dns: tuple[str, ...] = (),
              ips: list[str] | tuple[str, ...] = ()) -> Pem:
        """A certificate for ``cn`` with URI ``sans``, DNS names and IP addresses, signed by this CA."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.x509.oid import NameOID
        alt = ([x509.UniformResourceIdentifier(s) for s in sans] + [x509.DNSName(d) for d in dns]
               + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips])
        key, cert = self._make(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), alt=alt)
        out = Pem(key=self.folder / f"{cn}.key", cert=self.folder / f"{cn}.pem")
        out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        out.cert.write_bytes(self._pem(cert))
        return out

    def _make(self, subject, *, ca: bool = False, alt=()):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        now = datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(subject)
             .issuer_name(subject if ca else self._cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if alt:
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return key, b.sign(key if ca else self._key, hashes.SHA256())

    @staticmethod
    def _pem(cert) -> bytes:
        from cryptography.hazmat.primitives import serialization
        return cert.public_bytes(serialization.Encoding.PEM)
