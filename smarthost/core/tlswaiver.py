"""``TLS-Required: No`` (RFC 8689 5) in a header section: the sender's waiver of the recipient
domain's TLS policy. Read once, when the message is taken in (the session already holds its
header section), and kept in the envelope; a spool written before that, or a header section
too long to keep, is read again from the body at each attempt
(:mod:`smarthost.delivery.tlsrequired`). Reading the body's header section at every attempt
cost a fifth of each accepted message's delivery work in a profile (bench/run, a next hop
that is down), for a field almost no message carries.
"""

from __future__ import annotations

import io
from typing import BinaryIO

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


def header_says_no(header: bytes) -> bool:
    """:func:`says_no` for a header section in memory. Most have no such field at all, which
    one search of the lowered bytes shows without splitting them into fields."""
    if FIELD not in header.lower():
        return False
    return says_no(io.BytesIO(header))
