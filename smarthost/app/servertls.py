"""The server's certificate and key, checked file by file before OpenSSL sees them, so that a
start-up or a reload that cannot use them names the key to fix (``tls.certificate`` or
``tls.key``) and the reason, instead of OpenSSL's error stack.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smarthost.core.errors import ConfigError


def check_pair(certificate: Path, key: Path) -> str:
    """Read and parse both files; a description of the leaf certificate (for the log of a
    reload that replaced it). Raises :class:`ConfigError` naming the file's key."""
    cert_pem = _read("tls.certificate", certificate)
    key_pem = _read("tls.key", key)
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ConfigError(
            "tls.certificate", f"{certificate} holds no PEM certificate"
        ) from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            "tls.key", f"{key} holds no PEM private key (or one protected by a password)"
        ) from None
    if private.public_key() != leaf.public_key():
        raise ConfigError("tls.key", f"{key} is not the key of {certificate}")
    return describe(leaf)


def describe(leaf: x509.Certificate) -> str:
    return (
        f"{leaf.subject.rfc4514_string()}, serial {leaf.serial_number:x}, "
        f"valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    )


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror or e}") from None
