"""RFC 3464 delivery status notifications: bounces, delay warnings and success reports.

A report is a ``multipart/report; report-type=delivery-status`` message (RFC 6522) built with
the stdlib ``email`` package. It is queued like any other message, but with the null
reverse-path (RFC 5321 4.5.5; see :func:`report_envelope`) so that it can never cause a report
itself: that is what stops two mail systems from bouncing bounces at each other forever.

Nothing here touches the spool, the clock or the network: the scheduler hands in the facts
(who, what happened, when) and gets bytes back, which keeps every report reproducible in tests.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import EmailMessage, Message, MIMEPart
from email.utils import format_datetime
from io import BytesIO
from typing import BinaryIO, Literal, TypeAlias

import attrs

from smarthost.core.envelope import Envelope, Outcome, Recipient, RecipientState

Kind = Literal["failure", "delay", "success"]
_Policy: TypeAlias = "email_policy.EmailPolicy[EmailMessage]"

# Postfix's bounce_size_limit: enough to show the sender which message it was and most of a
# typical text mail, without mailing a 30 MB attachment back across the Internet.
DEFAULT_MAX_RETURNED = 50_000

# How much of the header block is returned at most when the body is left out. A header block
# this large is abuse or a loop; the report stays useful with the first part of it.
MAX_RETURNED_HEADERS = 256 * 1024

# RFC 5322 2.1.1: lines MUST be no more than 998 characters (excluding CRLF).
MAX_LINE = 998
_FOLD_WIDTH = 78

_SUBJECTS: dict[str, str] = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}
_DEFAULT_STATUS: dict[str, str] = {"failure": "5.0.0", "delay": "4.0.0", "success": "2.0.0"}
# The status classes that make sense for each kind. A failure may carry a 4.X.X status: that is
# how a message that expired after only temporary errors is reported (Postfix does the same).
_STATUS_CLASSES: dict[str, str] = {"failure": "54", "delay": "4", "success": "2"}

# RFC 3463 2: status-code = class "." subject "." detail.
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_ENHANCED_IN_REPLY = re.compile(r"[245]\d\d[ -]([245]\.\d{1,3}\.\d{1,3})(?:\s|\Z)")
_SMTP_REPLY = re.compile(r"[245]\d\d(?:[ -]|\Z)")
_WHITESPACE = re.compile(r"\s+")
_NEWLINES = re.compile(rb"\r\n|\r|\n")


@attrs.frozen
class ReportedRecipient:
    """What happened to one recipient, as the report tells it.

    ``remote_mta`` is the DNS name of the host that gave ``diagnostic`` ("" when the reply is
    our own, e.g. a DNS failure or local delivery). ``relayed`` marks a success that only means
    "handed to a next hop that does not offer DSN" (RFC 3461 section 5): it is reported with
    Action ``relayed`` rather than ``delivered``, because we cannot know whether the final
    delivery happened.
    """

    recipient: Recipient
    status: str = ""  # RFC 3463 code, e.g. "5.1.1"; "" = the kind's generic code
    remote_mta: str = ""
    diagnostic: str = ""  # the reply as received ("550 5.1.1 No such user") or our reason
    last_attempt: float | None = None
    relayed: bool = False

    @classmethod
    def from_outcome(
        cls, outcome: Outcome, last_attempt: float | None = None, *, relayed: bool = False
    ) -> ReportedRecipient:
        """From a delivery agent's result; the Remote-MTA is the host name in ``remote``."""
        return cls(
            recipient=outcome.recipient,
            status=outcome.status or status_from_reply(outcome.reply),
            remote_mta=remote_mta_name(outcome.remote),
            diagnostic=outcome.reply,
            last_attempt=last_attempt,
            relayed=relayed,
        )

    @classmethod
    def from_state(
        cls, state: RecipientState, last_attempt: float | None = None
    ) -> ReportedRecipient:
        """From the spool's record (lifetime expiry and delay warnings have no fresh Outcome)."""
        return cls(
            recipient=state.recipient,
            status=status_from_reply(state.last_reply),
            remote_mta=remote_mta_name(state.remote),
            diagnostic=state.last_reply,
            last_attempt=last_attempt,
        )


def status_from_reply(reply: str) -> str:
    """The RFC 3463 code in an SMTP reply ("550 5.1.1 ..." -> "5.1.1"), or "" when absent."""
    match = _ENHANCED_IN_REPLY.match(reply.strip())
    return match.group(1) if match else ""


def remote_mta_name(remote: str) -> str:
    """The DNS name in an Outcome's ``remote`` ("mx.example.test[192.0.2.1]:25" -> the name).

    Local delivery ("maildir") and an empty value have no Remote-MTA (RFC 3464 2.3.5: the
    field names the MTA that gave the diagnostic, and there was none).
    """
    name = remote.split("[", 1)[0].strip().rstrip(".")
    if ":" in name and not name.startswith("["):
        name = name.rsplit(":", 1)[0]
    if name in ("", "maildir"):
        return ""
    return name


def build_report(
    kind: Kind,
    *,
    reporting_mta: str,
    envelope: Envelope,
    recipients: Sequence[ReportedRecipient],
    original: BinaryIO,
    arrival: float,
    now: float,
    queue_id: str,
    max_returned: int = DEFAULT_MAX_RETURNED,
    retry_until: float | None = None,
) -> bytes | None:
    """The report for ``recipients``, as CRLF message bytes; None when nobody is to be told.

    Nobody is told when the sender is null (RFC 5321 6.1: never report on a report) or when no
    recipient's NOTIFY asks for this kind (RFC 3461 4.1; the default asks for failure and
    delay). Recipients that did not ask are left out of the report.

    ``original`` is read from its current position. The full message is returned only in a
    failure report, unless RET=HDRS or it is larger than ``max_returned``; success and delay
    reports carry the headers only (RFC 3461 4.3: a DSN without a failure SHOULD return only
    the headers).

    ``retry_until`` (delay reports) is when the message will be given up: Will-Retry-Until.
    """
    if kind not in _SUBJECTS:
        raise ValueError(f"unknown report kind: {kind!r}")
    if envelope.sender == "":
        return None
    wanted = [r for r in recipients if r.recipient.wants(kind.upper())]
    if not wanted:
        return None

    full_wanted = kind == "failure" and envelope.ret != "HDRS"
    headers, body, truncated = _read_original(original, full_wanted, max_returned)
    utf8 = not envelope.sender.isascii()
    pol = email_policy.SMTPUTF8 if utf8 else email_policy.SMTP
    # refold_source="none": the fields set with set_raw below are folded here already, and
    # must reach the wire exactly as built.
    pol = pol.clone(refold_source="none", max_line_length=_FOLD_WIDTH)

    report = EmailMessage(policy=pol)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = envelope.sender
    report["Subject"] = _SUBJECTS[kind]
    report["Date"] = format_datetime(_utc(now))
    report["Message-ID"] = f"<{int(now)}.{queue_id}.{secrets.token_hex(6)}@{reporting_mta}>"
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834 5: no auto-replies to this
    _add_threading(report, headers)
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report"
    report.set_param("report-type", "delivery-status")
    report.preamble = "This is a MIME-encapsulated message.\r\n"

    notice = MIMEPart(policy=pol)
    text = _explanation(
        kind, reporting_mta, envelope, wanted, queue_id, retry_until, full_wanted, truncated
    )
    notice.set_content(text, cte="7bit" if text.isascii() else "quoted-printable")
    notice["Content-Description"] = "Notification"

    status = MIMEPart(policy=pol)
    status["Content-Type"] = "message/delivery-status"
    status["Content-Description"] = "Delivery report"
    status.set_payload(
        [
            _per_message_fields(pol, reporting_mta, envelope, arrival, queue_id),
            *(_per_recipient_fields(pol, kind, r, retry_until) for r in wanted),
        ]
    )
    report.set_payload([notice, status, _returned_part(pol, headers, body, kind)])

    out = BytesIO()
    _FaithfulGenerator(out, policy=pol.clone(linesep="\r\n")).flatten(report)
    return out.getvalue()


def report_envelope(report: bytes, envelope: Envelope, now: float) -> Envelope:
    """The envelope a report is queued with.

    The null reverse-path is required for reports (RFC 5321 4.5.5 and 6.1): nothing ever
    reports on them, so a report that cannot be delivered is dropped instead of looping.
    NOTIFY=NEVER says the same to a DSN-aware next hop. BODY=8BITMIME only when the returned
    original is 8-bit, SMTPUTF8 only when the recipient (the original sender) needs it.
    """
    return Envelope(
        sender="",
        recipients=(Recipient(envelope.sender, notify=("NEVER",)),),
        body="8BITMIME" if not report.isascii() else None,
        smtputf8=not envelope.sender.isascii(),
        received_at=now,
    )


class _FaithfulGenerator(BytesGenerator):
    """A BytesGenerator that writes a string payload of a ``message/*`` part byte for byte.

    The returned original is carried as its own bytes (decoded with surrogateescape), never
    parsed and regenerated: regenerating would refold headers (breaking DKIM signatures the
    sender may want to inspect) and a malformed original could make the generator fail.
    BytesGenerator already writes surrogate-escaped text parts and headers unchanged; only its
    ``_encode`` for ``message/*`` string payloads is strict ASCII, so 8-bit originals need this.
    """

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


def _read_original(original: BinaryIO, full: bool, limit: int) -> tuple[bytes, bytes | None, bool]:
    """(header block, body or None, whether the body was left out for size).

    Both come back with CRLF line endings and no line over 998 octets, so the report is valid
    on the wire whatever the spool holds.
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


def _returned_part(pol: _Policy, headers: bytes, body: bytes | None,
                   kind: str) -> MIMEPart:
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


def _add_threading(report: EmailMessage, headers: bytes) -> None:
    """In-Reply-To / References to the original (RFC 3834 3.1.5), so mail clients show the
    report beside the message it is about. Only a plausible Message-ID is copied."""
    match = re.search(rb"^Message-ID:[ \t]*(<[!-;=?-~]{1,250}>)[ \t]*\r?$", headers, re.I | re.M)
    if match:
        msgid = match.group(1).decode("ascii")
        report["In-Reply-To"] = msgid
        report["References"] = msgid


def _per_message_fields(pol: _Policy, reporting_mta: str, envelope: Envelope,
                        arrival: float, queue_id: str) -> Message:
    fields = Message(policy=pol)
    # RFC 3464 2.2.1: the ENVID exactly as given to us (the envelope holds it xtext-decoded).
    if envelope.envid:
        _set_field(fields, "Original-Envelope-Id", _field_text(envelope.envid))
    _set_field(fields, "Reporting-MTA", f"dns; {_field_text(reporting_mta)}")
    _set_field(fields, "X-Smarthost-Queue-ID", _field_text(queue_id))
    _set_field(fields, "X-Smarthost-Sender", f"{_address_field(envelope.sender)}")
    _set_field(fields, "Arrival-Date", format_datetime(_utc(arrival)))
    return fields


def _per_recipient_fields(pol: _Policy, kind: str, r: ReportedRecipient,
                          retry_until: float | None) -> Message:
    fields = Message(policy=pol)
    if r.recipient.orcpt:
        # RFC 3461 4.2: ORCPT is "addr-type;address"; RFC 3464 2.3.1 copies it as given.
        addr_type, sep, value = r.recipient.orcpt.partition(";")
        if not sep:
            addr_type, value = "rfc822", r.recipient.orcpt
        _set_field(fields, "Original-Recipient",
                   f"{_field_text(addr_type.strip()) or 'rfc822'};{_field_text(value.strip())}")
    _set_field(fields, "Final-Recipient", _address_field(r.recipient.address))
    _set_field(fields, "Action", _action(kind, r))
    _set_field(fields, "Status", _status(kind, r.status))
    if r.remote_mta:
        _set_field(fields, "Remote-MTA", f"dns; {_field_text(r.remote_mta)}")
    if r.diagnostic.strip():
        diagnostic = _field_text(r.diagnostic)
        # RFC 3464 2.3.6: "smtp" only for what an SMTP server actually replied.
        dtype = "smtp" if _SMTP_REPLY.match(diagnostic) else "X-Smarthost"
        _set_field(fields, "Diagnostic-Code", f"{dtype}; {diagnostic}")
    if r.last_attempt is not None:
        _set_field(fields, "Last-Attempt-Date", format_datetime(_utc(r.last_attempt)))
    if kind == "delay" and retry_until is not None:
        _set_field(fields, "Will-Retry-Until", format_datetime(_utc(retry_until)))
    return fields


def _action(kind: str, r: ReportedRecipient) -> str:
    if kind == "failure":
        return "failed"
    if kind == "delay":
        return "delayed"
    return "relayed" if r.relayed else "delivered"


def _status(kind: str, status: str) -> str:
    if _STATUS.match(status) and status[0] in _STATUS_CLASSES[kind]:
        return status
    return _DEFAULT_STATUS[kind]


def _set_field(fields: Message, name: str, value: str) -> None:
    """Store a DSN field folded by us: the email header registry would turn long diagnostics
    into RFC 2047 encoded-words, which have no place in message/delivery-status."""
    fields.set_raw(name, _fold(len(name) + 2, value))


def _fold(used: int, value: str) -> str:
    """Fold at spaces to 78 columns (RFC 5322 2.2.3); cut words too long for a 998-octet line."""
    words: list[str] = []
    for word in value.split(" "):
        words.extend(word[i : i + 900] for i in range(0, len(word), 900))
    lines: list[str] = []
    current = ""
    width = _FOLD_WIDTH - used
    for word in words:
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current, width = word, _FOLD_WIDTH - 1
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n ".join(lines)


def _field_text(text: str) -> str:
    """One line of ASCII text for a DSN field.

    Whitespace runs (multi-line SMTP replies included) become one space, control characters
    are dropped (no field can smuggle in another), and non-ASCII characters are written as
    ``\\x{HEX}`` (RFC 6533 3), since message/delivery-status is ASCII only.
    """
    text = _WHITESPACE.sub(" ", text).strip()
    out = []
    for ch in text:
        if ch.isascii():
            if ch.isprintable():
                out.append(ch)
        elif ch.isprintable():
            out.append(f"\\x{{{ord(ch):X}}}")
    return "".join(out)


def _address_field(address: str) -> str:
    """``rfc822;addr`` (RFC 3464 2.3.2), or RFC 6533 3 ``utf-8;`` with utf-8-addr-xtext for an
    internationalized address, which message/delivery-status cannot hold as is."""
    if address.isascii():
        return f"rfc822;{_field_text(address)}"
    encoded = []
    for ch in address:
        if "!" <= ch <= "~" and ch not in "+=\\":
            encoded.append(ch)
        else:
            encoded.append(f"\\x{{{ord(ch):X}}}")
    return "utf-8;" + "".join(encoded)


def _explanation(kind: str, reporting_mta: str, envelope: Envelope,
                 recipients: Sequence[ReportedRecipient], queue_id: str,
                 retry_until: float | None, full_wanted: bool, truncated: bool) -> str:
    """The human-readable part: what happened, to whom, and what the sender can do."""
    paragraphs = [f"This is the mail system at host {reporting_mta}."]
    if kind == "failure":
        paragraphs.append(
            "Your message could not be delivered to one or more recipients. The delivery "
            "attempts have been given up. The reasons are below; the message is attached."
            if full_wanted and not truncated else
            "Your message could not be delivered to one or more recipients. The delivery "
            "attempts have been given up. The reasons are below; the headers of the message "
            "are attached."
        )
        if truncated:
            paragraphs.append(
                "The message was too large to be returned in full, so only its headers are "
                "attached."
            )
        paragraphs.append(
            "If you need help, forward this report to your postmaster; please include the "
            "part below."
        )
    elif kind == "delay":
        until = (
            f" until {format_datetime(_utc(retry_until))}" if retry_until is not None else ""
        )
        paragraphs.append(
            "Your message has not yet been delivered to the recipients below. It is still in "
            f"the queue and delivery will be retried{until}; you will be told if it finally "
            "fails. You do not need to send it again."
        )
    else:
        paragraphs.append(
            "Your message was delivered to the recipients below, as you asked to be told."
        )
    text = [textwrap.fill(p, 72) for p in paragraphs]
    text.append(f"Queue ID: {queue_id}")
    for r in recipients:
        text.append(_recipient_text(kind, r))
    return "\n\n".join(text) + "\n"


def _recipient_text(kind: str, r: ReportedRecipient) -> str:
    if kind == "failure":
        what = "delivery failed"
    elif kind == "delay":
        what = "delivery temporarily failed, still trying"
    elif r.relayed:
        what = f"handed on to {r.remote_mta or 'the next mail server'}, which does not send "
        what += "delivery reports"
    else:
        what = "delivered"
    lines = [f"<{_WHITESPACE.sub(' ', r.recipient.address)}>: {what}"]
    if r.diagnostic.strip():
        who = f"{r.remote_mta} said" if r.remote_mta else "reason"
        reply = _WHITESPACE.sub(" ", r.diagnostic).strip()
        lines.extend(textwrap.wrap(f"{who}: {reply}", 72, initial_indent="    ",
                                   subsequent_indent="    ", break_on_hyphens=False))
    return "\n".join(lines)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)
