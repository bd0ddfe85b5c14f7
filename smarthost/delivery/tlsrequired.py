"""``TLS-Required: No`` (RFC 8689 5): the sender asks that the recipient domain's TLS policy
(MTA-STS here) be ignored, so that the message is delivered even where that policy would
hold it back; TLS is still used opportunistically. Per RFC 8689 4.1 the header field means
nothing when the envelope carries REQUIRETLS: the stronger request wins.

The operator's own rules (``[delivery] tls`` and ``[delivery.tls_policy]``) are not the
recipient domain's policy and still apply. The header field stays in the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from smarthost.core.envelope import Envelope

FIELD = b"tls-required"
MAX_HEADER_BYTES = 256 * 1024  # a header section past this is not searched: policies apply
MAX_LINE = 8192  # one readline; a longer physical line is read in pieces


def says_no(body: BinaryIO) -> bool:
    """Whether the header section of ``body`` has a ``TLS-Required`` field whose value is
    ``No`` (RFC 8689 5's ABNF; case-insensitive, as ABNF strings are). Reads only up to the
    empty line that ends the header section, or :data:`MAX_HEADER_BYTES`."""
    fields: list[bytes] = []
    seen = 0
    while seen < MAX_HEADER_BYTES:
        line = body.readline(MAX_LINE)
        seen += len(line)
        if line in (b"", b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line  # RFC 5322 2.2.3: a folded continuation of the field above
        else:
            fields.append(line)
    for field in fields:
        name, colon, value = field.partition(b":")
        if colon and name.strip().lower() == FIELD:
            if b"".join(value.split()).lower() == b"no":
                return True
    return False


def policies_apply(envelope: Envelope, open_body: Callable[[], BinaryIO]) -> bool:
    """False when the sender waived the recipient domain's TLS policy for this message: a
    ``TLS-Required: No`` header field and no REQUIRETLS on the envelope (RFC 8689 4.1, which
    also spares opening the body)."""
    if envelope.requiretls:
        return True
    with open_body() as body:
        return not says_no(body)
