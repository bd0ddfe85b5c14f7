"""The addresses a message claims to be from: every mailbox in its ``From:`` and ``Sender:``
header fields (RFC 5322 3.6.2), read with the ``email`` package's header registry so group
syntax, comments, encoded words and several addresses are understood as mail readers do.

Used by the relay policy to stop an authenticated user from writing someone else's address
in ``From:`` (what the reader sees) while using its own in the envelope. Anything a reader
might show differently than we parse it is refused rather than guessed at: a defect in either
field, a second ``From:`` or ``Sender:``, bytes that are not UTF-8 in them, or a ``From:``
line hidden after a broken line of the header section.
"""

from __future__ import annotations

import re
from email.errors import MissingHeaderBodySeparatorDefect, NonASCIILocalPartDefect
from email.headerregistry import AddressHeader, BaseHeader
from email.message import Message
from email.parser import HeaderParser
from email.policy import SMTPUTF8

_FIELDS = ("from", "sender")
# A From:/Sender: field after the line where the parser gave up on the header section.
_FIELD_LINE = re.compile(r"^(?:from|sender)[ \t]*:", re.IGNORECASE | re.MULTILINE)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class HeaderError(ValueError):
    """The ``From:`` or ``Sender:`` header cannot be read unambiguously."""


def claimed_senders(header_section: bytes) -> list[str]:
    """Every address (``local@domain``, local part quoted only where RFC 5322 needs it) in the
    ``From:`` and ``Sender:`` fields of ``header_section``; empty when there are none."""
    # Surrogates keep non-UTF-8 bytes visible, so we can refuse them where they matter only.
    text = header_section.decode("utf-8", errors="surrogateescape")
    message = HeaderParser(policy=SMTPUTF8).parsestr(text)
    raw = {field: [v for name, v in message.raw_items() if name.lower() == field]
           for field in _FIELDS}
    _check_structure(message, text, sum(map(len, raw.values())))
    addresses: list[str] = []
    for field, values in raw.items():
        if len(values) > 1:
            raise HeaderError(f"more than one {field} header")  # RFC 5322 3.6: at most one
        if values:
            addresses += _addresses(field, values[0])
    return addresses


def _check_structure(message: Message, text: str, fields: int) -> None:
    for defect in message.defects:
        # A body that starts without the empty line (mail written by a script) is common and
        # harmless; the count below catches what matters in it.
        if not isinstance(defect, MissingHeaderBodySeparatorDefect):
            raise HeaderError(f"header section: {defect}")
    # Where the parser stopped reading fields (a broken line, "From :" with a blank before the
    # colon, which RFC 5322 4.5.8 still allows, or a first line it takes for an mbox
    # separator), a lenient reader may go on: a From: or Sender: it did not read is refused.
    if len(_FIELD_LINE.findall(text)) != fields:
        raise HeaderError("a From: or Sender: field where the header section seems to end")


def _addresses(field: str, value: str) -> list[str]:
    if any("\udc80" <= c <= "\udcff" for c in value):
        raise HeaderError(f"{field}: bytes that are not UTF-8")
    unfolded = _LINE_BREAK.sub("", value)  # RFC 5322 2.2.3, as the email package does itself
    try:
        header = SMTPUTF8.header_factory(field, unfolded)
    except Exception as e:  # the parser's own bugs on hostile input must not become a 451
        raise HeaderError(f"{field}: {e}") from e
    assert isinstance(header, BaseHeader) and isinstance(header, AddressHeader)
    # RFC 6532 3.2 allows UTF-8 local parts; every other defect is a reason to refuse.
    defects = [d for d in header.defects if not isinstance(d, NonASCIILocalPartDefect)]
    if defects:
        raise HeaderError(f"{field}: {defects[0]}")
    found = []
    for address in header.addresses:
        if not address.username or not address.domain:
            raise HeaderError(f"{field}: an address without a local part or domain")
        found.append(address.addr_spec)
    return found
