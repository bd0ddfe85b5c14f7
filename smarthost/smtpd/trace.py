"""The ``Received:`` trace header we put on every accepted message (RFC 5321 4.4)."""

from __future__ import annotations

import email.utils

import attrs


@attrs.frozen
class Hop:
    """What the header records about how the message reached us."""

    helo: str
    address: str
    esmtp: bool
    tls: tuple[str, str] | None  # (protocol version, cipher) when the session was encrypted
    authenticated: bool
    smtputf8: bool


def received_header(hop: Hop, by: str, queue_id: str, recipients: list[str], when: float) -> bytes:
    """Protocol names per RFC 3848 (ESMTPS, ESMTPSA) and RFC 6531 (UTF8SMTP...); ``for`` only
    with a single recipient, so one message does not reveal its other recipients."""
    protocol = ("ESMTP" if hop.esmtp else "SMTP") + ("S" if hop.tls else "")
    if hop.authenticated:
        protocol += "A"
    if hop.smtputf8:
        protocol = "UTF8" + protocol
    tls = f"\r\n\t(using {hop.tls[0]} with cipher {hop.tls[1]})" if hop.tls else ""
    rcpt = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    date = email.utils.formatdate(when, localtime=True)
    return (
        f"Received: from {_comment_safe(hop.helo)} ([{hop.address}])\r\n"
        f"\tby {by} (smarthost) with {protocol} id {queue_id}{tls}{rcpt};\r\n\t{date}\r\n"
    ).encode()


def tls_details(transport: object) -> tuple[str, str]:
    """The negotiated TLS version and cipher, from pyOpenSSL's connection."""
    try:
        handle = transport.getHandle()  # type: ignore[attr-defined]
        return handle.get_protocol_version_name(), handle.get_cipher_name()
    except Exception:
        return "TLS", "unknown"


def _comment_safe(text: str) -> str:
    """The client's HELO as header text: printable, no parentheses to break the syntax."""
    return "".join(c if c.isprintable() and c not in "()" else "?" for c in text) or "unknown"
