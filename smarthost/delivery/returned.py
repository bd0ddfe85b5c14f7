"""The third part of a report: the original message, or its headers (RFC 6522, RFC 3462).

The original is carried as its own bytes, never parsed and regenerated: regenerating would
refold headers (breaking DKIM signatures the sender may want to inspect) and a malformed
original could make the generator fail. Only line endings and overlong lines are repaired,
so the report is valid on the wire whatever the spool holds.
"""

from __future__ import annotations

import re
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import EmailMessage, MIMEPart
from typing import BinaryIO, TypeAlias

_Policy: TypeAlias = "email_policy.EmailPolicy[EmailMessage]"

# How much of the header block is returned at most when the body is left out. A header block
# this large is abuse or a loop; the report stays useful with the first part of it.
MAX_RETURNED_HEADERS = 256 * 1024

# RFC 5322 2.1.1: lines MUST be no more than 998 characters (excluding CRLF).
MAX_LINE = 998
_NEWLINES = re.compile(rb"\r\n|\r|\n")


class FaithfulGenerator(BytesGenerator):
    """A BytesGenerator that writes a string payload of a ``message/*`` part byte for byte.

    BytesGenerator already writes surrogate-escaped text parts and headers unchanged; only its
    ``_encode`` for ``message/*`` string payloads is strict ASCII, so 8-bit originals need this.
    """

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


def read_original(original: BinaryIO, full: bool, limit: int) -> tuple[bytes, bytes | None, bool]:
    """(header block, body or None, whether the body was left out for size).

    Both come back with CRLF line endings and no line over 998 octets.
    """
    data = original.read(limit + 1) if full else original.read(64 * 1024)
    end = _header_end(data)
    while end is None and len(data) < MAX_RETURNED_HEADERS:
        chunk = original.read(64 * 1024)
        if not chunk:
            break
        data += chunk
        end = _header_end(data)
    if end is None:
        # No blank line: everything is header (or the header block is absurdly long).
        head, rest = data[:MAX_RETURNED_HEADERS], b""
        if len(head) == MAX_RETURNED_HEADERS:
            head = head[: head.rfind(b"\n") + 1] or head
    else:
        head, rest = data[: end[0]], data[end[1] :]
    headers = _wire_lines(head)
    if not full:
        return headers, None, False
    if len(data) > limit:
        return headers, None, True
    return headers, _wire_lines(rest), False


def _header_end(data: bytes) -> tuple[int, int] | None:
    """(end of the header block including its last line break, start of the body)."""
    if data.startswith((b"\r\n", b"\n")):
        return 0, 2 if data.startswith(b"\r\n") else 1
    match = re.search(rb"(\r?\n)(\r?\n)", data)
    if match is None:
        return None
    return match.end(1), match.end(2)


def _wire_lines(data: bytes) -> bytes:
    """CRLF line endings, every line cut to 998 octets.

    The session already refuses bare CR/LF and long lines, so this only matters for mail that
    reached the spool some other way; a cut line beats an invalid report.
    """
    if not data:
        return b""
    lines = _NEWLINES.split(data)
    if lines[-1] == b"":
        lines.pop()
    out = []
    for line in lines:
        while len(line) > MAX_LINE:
            out.append(line[:MAX_LINE])
            line = line[MAX_LINE:]
        out.append(line)
    return b"".join(line + b"\r\n" for line in out)


def returned_part(pol: _Policy, headers: bytes, body: bytes | None, kind: str) -> MIMEPart:
    part = MIMEPart(policy=pol)
    utf8_headers = not headers.isascii()
    if body is None:
        # RFC 6522 text/rfc822-headers; RFC 6533 message/global-headers for UTF-8 ones.
        ctype = "message/global-headers" if utf8_headers else "text/rfc822-headers"
        content = headers
        description = "Message Headers"
    else:
        # RFC 6532 3.7: message/global carries a message whose headers are UTF-8.
        ctype = "message/global" if utf8_headers else "message/rfc822"
        content = headers + b"\r\n" + body
        description = "Message"
    part["Content-Type"] = ctype
    if kind == "failure":
        description = f"Undelivered {description}"
    part["Content-Description"] = description
    # RFC 2046 5.2.1: message/rfc822 allows only 7bit, 8bit or binary.
    part["Content-Transfer-Encoding"] = "7bit" if content.isascii() else "8bit"
    part.set_payload(content.decode("ascii", "surrogateescape"))
    return part
