"""SMTP replies: one value type and every reply the core sends, in one place — the fixed
ones as constants, the ones that carry a value (host name, queue id, SASL challenge) as small
functions at the end.

Tests assert codes and enhanced codes, never the prose, so texts can be improved freely.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import attrs


@attrs.frozen
class Reply:
    code: int
    enhanced: str  # RFC 3463 enhanced status code, e.g. "5.7.1"; "" for 220/221 banners
    text: str
    # Further lines of a multi-line reply (RFC 5321 4.2.1), such as the EHLO extensions.
    lines: tuple[str, ...] = attrs.field(default=(), kw_only=True)
    # A refusal the client already had, repeated for the BDAT chunks it had pipelined behind
    # the refused one (RFC 3030 2): the session's error limits count the failure only once.
    repeated: bool = attrs.field(default=False, kw_only=True, eq=False)

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    def repeat(self) -> Reply:
        return attrs.evolve(self, repeated=True)

    def to_bytes(self) -> bytes:
        """Wire form: one line, or a multi-line reply when there are further ``lines``."""
        lines = [self.text, *self.lines]
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            prefix = f"{self.enhanced} " if self.enhanced and i == 0 else ""
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
RESET = Reply(250, "2.0.0", "Reset state")
VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
BYE = Reply(221, "2.0.0", "Bye")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

SYNTAX = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
PARAM_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
PARAM_UNKNOWN = Reply(555, "5.5.4", "Parameter not recognized or not implemented")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by authenticated user")
# The From:/Sender: header check at the end of DATA (SPEC [relay] check_header_from).
HEADER_FROM_NOT_OWNED = Reply(550, "5.7.1", "From: or Sender: address not owned by this user")
HEADER_FROM_INVALID = Reply(550, "5.7.1", "From: or Sender: header cannot be parsed")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
# Fatal: the session answers this and closes (as Postfix smtpd_forbid_bare_newline).
BARE_LINE_ENDING = Reply(521, "5.5.2", "Bare CR or LF in message data; lines must end with CRLF")
DATA_LINE_TOO_LONG = Reply(550, "5.6.0", "Message line longer than 1000 octets")
# NUL is allowed in neither 7bit nor 8bit data (RFC 2045 2.7-2.8; RFC 6152 8BITMIME is 8bit).
NUL_IN_DATA = Reply(554, "5.6.0", "NUL octets are not allowed in message data")
# BDAT (RFC 3030): the chunk is framed by its size, so a bare CR/LF is refused without a close.
BDAT_BARE_LINE_ENDING = Reply(
    550, "5.6.0", "Bare CR or LF in message data; lines must end with CRLF"
)
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA not allowed after BDAT in the same transaction")
RCPT_AFTER_BDAT = Reply(503, "5.5.1", "RCPT not allowed after BDAT")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
# RFC 8689: REQUIRETLS is offered only after TLS; X.7.10 is "Encryption needed" (RFC 5248).
REQUIRETLS_NEEDS_TLS = Reply(530, "5.7.10", "REQUIRETLS needs TLS: issue STARTTLS first")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down")

# Session commands
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
AUTH_NOT_OFFERED = Reply(503, "5.5.1", "Authentication not enabled")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
NOT_ACCEPTED = Reply(502, "5.5.1", "Command not implemented")
PROTOCOL_PROBE = Reply(500, "5.5.1", "This is an SMTP server; closing")
HELP = Reply(
    214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY"
)

# Abuse limits
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_YOU = Reply(421, "4.7.0", "Too many connections from your address")
AUTH_BLOCKED = Reply(454, "4.7.0", "Too many failed authentications, try again later")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many failed authentications, closing")
RATE_LIMITED = Reply(451, "4.7.1", "Sending rate exceeded, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")

# AUTH exchange
BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")

# Relay policy
USER_UNKNOWN = Reply(550, "5.1.1", "Recipient address rejected: user unknown")

# Storage
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")

# Plugins
PLUGIN_FAILED = Reply(451, "4.3.0", "Temporary local problem, try again later")


# Replies that carry a value


def greeting(hostname: str) -> Reply:
    """The 220 banner; RFC 2034 3 gives it no enhanced code."""
    return Reply(220, "", f"{hostname} ESMTP smarthost")


def hello(hostname: str, extensions: Sequence[str] = ()) -> Reply:
    """The answer to EHLO (with its extensions, RFC 5321 4.1.1.1) or HELO (without)."""
    return Reply(250, "", hostname, lines=tuple(extensions))


def queued(queue_id: str) -> Reply:
    """The end of DATA: the message is on disk and is ours now."""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def chunk_received(size: int) -> Reply:
    """A BDAT chunk (not the last) is read and kept (RFC 3030 2)."""
    return Reply(250, "2.0.0", f"{size} octets received")


def challenge(data: bytes) -> Reply:
    """A SASL challenge: base64 only, no enhanced code (RFC 4954 4)."""
    return Reply(334, "", base64.b64encode(data).decode("ascii"))
