"""The ``Received:`` trace header we put on every accepted message (RFC 5321 4.4).

Every line of it stays within 998 octets (RFC 5322 2.1.1) whatever the client sent: the EHLO
name is the only free text in it, and it is cut to :data:`MAX_HELO` octets; the recipient is
a path of at most 256 octets (RFC 5321 4.5.3.1.3, enforced by the parser) on its own folded
line. Otherwise our own DATA reader, and any strict next hop, would refuse the message.
"""

from __future__ import annotations

import email.utils

import attrs

MAX_HELO = 255  # octets of the EHLO name kept in the header


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
        f"Received: from {_helo_text(hop.helo, hop.smtputf8)} ([{hop.address}])\r\n"
        f"\tby {by} (smarthost) with {protocol} id {queue_id}{tls}{rcpt};\r\n\t{date}\r\n"
    ).encode()


def tls_details(transport: object) -> tuple[str, str]:
    """The negotiated TLS version and cipher, from pyOpenSSL's connection."""
    try:
        handle = transport.getHandle()  # type: ignore[attr-defined]
        return handle.get_protocol_version_name(), handle.get_cipher_name()
    except Exception:
        return "TLS", "unknown"


def _helo_text(helo: str, utf8: bool) -> str:
    """The client's EHLO name as header text: visible characters only (US-ASCII unless the
    message is SMTPUTF8, RFC 6532), no space, parenthesis or backslash to break the syntax,
    anything else as "?"; at most MAX_HELO octets (RFC 1035 2.3.4: no domain name is longer,
    and an address literal is shorter), cut with "..." to show it was cut."""
    text = "".join(c if _visible(c, utf8) else "?" for c in helo) or "unknown"
    if len(text.encode("utf-8")) <= MAX_HELO:
        return text
    cut = text.encode("utf-8")[: MAX_HELO - 3].decode("utf-8", "ignore")
    return cut + "..."


def _visible(c: str, utf8: bool) -> bool:
    if c in "()\\":
        return False
    return "!" <= c <= "~" or (utf8 and c > "\x7f" and c.isprintable())
