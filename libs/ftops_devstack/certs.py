"""A throwaway certificate authority for tests and for trying TLS locally: a CA and the
certificates it signs (ECDSA P-256, valid for a day by default), written as PEM files.

    ca = CertificateAuthority.create(tmp_dir)
    registry = ca.issue("registry", hosts=("registry", "localhost", "127.0.0.1"))
    # FTOPS_TLS_CERT_FILE=registry.cert_file FTOPS_TLS_KEY_FILE=registry.key_file
    # FTOPS_TLS_CA_FILE=ca.cert_file

Needs the ``cryptography`` package (a development dependency): never for production keys.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class IssuedCert:
    name: str
    cert_file: Path
    key_file: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Owner-only from the start: the key never exists world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class CertificateAuthority:
    def __init__(
        self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
    ) -> None:
        self.directory = directory
        self._key = key
        self._cert = cert
        self.cert_file = directory / "ca.pem"

    @classmethod
    def create(
        cls, directory: Path, *, name: str = "ftops test CA", days: int = 1
    ) -> CertificateAuthority:
        """A new CA; its certificate is written to ``directory/ca.pem`` (its key stays in
        memory)."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        ca = cls(directory, key, cert)
        ca.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    def issue(
        self,
        name: str,
        *,
        hosts: Sequence[str] = ("localhost", "127.0.0.1"),
        server: bool = True,
        client: bool = True,
        days: int = 1,
    ) -> IssuedCert:
        """A certificate for ``name`` naming ``hosts`` (DNS names or IP addresses), usable
        by a server, a client or both (a service is both), written to
        ``directory/<name>.pem`` and ``<name>-key.pem``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        issued = IssuedCert(
            name, self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"
        )
        issued.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(issued.key_file, key)
        return issued


# The compose stack's names (deploy/docker-compose.tls.yml): each service's certificate
# names the service, and localhost/127.0.0.1 for the healthcheck inside its container.
COMPOSE_SERVICES = ("registry", "trainer", "inference", "gateway", "monitor", "nats")


def write_compose_pki(directory: Path, *, days: int = 30) -> list[IssuedCert]:
    """A CA and a certificate per compose service plus ``operator`` (a client-only
    certificate for the CLI), for trying TLS locally. Not for production keys."""
    ca = CertificateAuthority.create(directory, name="ftops compose CA", days=days)
    issued = [
        ca.issue(name, hosts=(name, "localhost", "127.0.0.1"), client=name != "nats", days=days)
        for name in COMPOSE_SERVICES
    ]
    issued.append(ca.issue("operator", hosts=(), server=False, days=days))
    return issued


def main() -> None:
    import sys

    if len(sys.argv) != 2:
        print("usage: python -m ftops_devstack.certs OUT_DIR", file=sys.stderr)
        sys.exit(2)
    out = Path(sys.argv[1])
    for cert in write_compose_pki(out):
        # The containers run as uid 10001, not as the user who made the files: readable by
        # all, which is fine for a local trial and never for real keys.
        cert.key_file.chmod(0o644)
        print(f"{cert.name}: {cert.cert_file} {cert.key_file}")
    print(f"CA: {out / 'ca.pem'}")


if __name__ == "__main__":
    main()
