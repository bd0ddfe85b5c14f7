"""Certificates: the self-signed pair of the embedded default, and test CAs.

Generated with ``cryptography`` in-process (no ``openssl`` subprocess), written with 0600
permissions for keys so a fresh install never leaves a readable private key behind.

The certificates carry the RFC 5280 extensions strict verifiers insist on (key usage, subject
and authority key identifiers), so a test CA made here passes a scanner's path validation, and
live at most a year: Mozilla's TLS guidelines cap a server certificate at 366 days.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smarthost.core.safeio import atomic_write

SELF_SIGNED_DAYS = 365


@attrs.frozen
class KeyPair:
    cert_pem: bytes
    key_pem: bytes = attrs.field(repr=False)


def _names(hostnames: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def issue(
    hostnames: tuple[str, ...],
    *,
    ca: KeyPair | None = None,
    is_ca: bool = False,
    days: int = SELF_SIGNED_DAYS,
    now: datetime.datetime | None = None,
) -> KeyPair:
    """A certificate for ``hostnames``: self-signed when ``ca`` is None, else signed by it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    start = (now or datetime.datetime.now(datetime.UTC)) - datetime.timedelta(minutes=5)
    if ca is None:
        issuer, signing_key = subject, key
    else:
        ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
        loaded = serialization.load_pem_private_key(ca.key_pem, password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        issuer, signing_key = ca_cert.subject, loaded
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(_key_usage(is_ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca is not None:
        # RFC 5280 4.2.1.1: required in every certificate a CA issues (strict verifiers, such
        # as the one sslyze uses, refuse the chain without it).
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(_names(hostnames)), critical=False
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    cert = builder.sign(signing_key, hashes.SHA256())
    return KeyPair(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _key_usage(is_ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not is_ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=is_ca,
        crl_sign=is_ca,
        encipher_only=False,
        decipher_only=False,
    )


def write_pair(pair: KeyPair, cert_path: Path, key_path: Path) -> None:
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    # The key first: a crash in between leaves no certificate, so the next start makes a
    # new pair instead of serving a certificate whose key is missing.
    atomic_write(key_path, pair.key_pem, mode=0o600)
    atomic_write(cert_path, pair.cert_pem, mode=0o644)


def ensure_self_signed(hostname: str, cert_path: Path, key_path: Path) -> bool:
    """Generate a self-signed pair when neither file exists; True when one was made."""
    if cert_path.exists() or key_path.exists():
        return False
    write_pair(issue((hostname, "localhost", "127.0.0.1", "::1")), cert_path, key_path)
    return True
