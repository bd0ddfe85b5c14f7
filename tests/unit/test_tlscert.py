"""The generated certificates: the embedded default's self-signed pair lives at most a year
(Mozilla's guidelines cap a server certificate at 366 days; it was 825), and a test CA's
certificates pass a strict RFC 5280 verifier (the one sslyze uses)."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import verification

from smarthost.app import tlscert


def test_self_signed_certificate_lives_at_most_365_days(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "certs" / "smarthost.pem", tmp_path / "certs" / "smarthost.key"
    assert tlscert.ensure_self_signed("mx.example.test", cert_path, key_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    lifespan = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifespan <= datetime.timedelta(days=365)
    assert cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC) + datetime.timedelta(
        days=365
    )
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mx.example.test", "localhost"]
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)


def test_an_existing_pair_is_never_replaced(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "c.key"
    cert_path.write_bytes(b"operator's certificate")
    assert not tlscert.ensure_self_signed("mx.example.test", cert_path, key_path)
    assert cert_path.read_bytes() == b"operator's certificate"
    assert not key_path.exists()


def test_a_test_ca_chain_passes_a_strict_verifier() -> None:
    # Before: the leaf had no authority key identifier and the CA no key usage, so sslyze
    # reported "certificate_path_validation" against the test CA.
    ca = tlscert.issue(("Test CA",), is_ca=True)
    leaf = tlscert.issue(("localhost", "127.0.0.1"), ca=ca)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    leaf_cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca_cert]))
        .build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    )
    chain = verifier.verify(leaf_cert, [])
    assert chain[-1] == ca_cert


def test_key_usage_says_what_each_key_is_for() -> None:
    ca = x509.load_pem_x509_certificate(tlscert.issue(("CA",), is_ca=True).cert_pem)
    leaf = x509.load_pem_x509_certificate(tlscert.issue(("localhost",)).cert_pem)
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    leaf_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_usage.key_cert_sign and not ca_usage.digital_signature
    assert leaf_usage.digital_signature and not leaf_usage.key_cert_sign
    with pytest.raises(x509.ExtensionNotFound):
        # Self-signed: no issuer key to point at.
        leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
