"""RFC 3464 delivery status notifications: bounces, delay warnings and success reports.

A report is a ``multipart/report; report-type=delivery-status`` message (RFC 6522) built with
the stdlib ``email`` package. It is queued like any other message, but with the null
reverse-path (RFC 5321 4.5.5; see :func:`report_envelope`) so that it can never cause a report
itself: that is what stops two mail systems from bouncing bounces at each other forever.

The report has three parts, each built by its own module: the explanation for a person (here),
the ``message/delivery-status`` fields (:mod:`smarthost.delivery.dsn`) and the returned
original (:mod:`smarthost.delivery.returned`).

Building a report never raises for an envelope the spool can hold. SMTPUTF8 lets a client put
characters into an address that no header may hold (U+2028 LINE SEPARATOR, U+0085 NEXT LINE,
controls in a quoted local part); every value from outside is therefore written by us as one
printable line (:func:`_header_address`, :func:`_plain`, and the DSN fields' own escaping)
instead of being handed to the email package's header parser, which raises on them.

Nothing here touches the spool, the clock or the network: the scheduler hands in the facts
(who, what happened, when) and gets bytes back, which keeps every report reproducible in tests.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Sequence
from email import policy as email_policy
from email.message import EmailMessage, MIMEPart
from io import BytesIO
from typing import BinaryIO, Literal

from smarthost.core.envelope import AddressError, Envelope, Recipient, parse_mailbox
from smarthost.delivery.dsn import (
    ReportedRecipient,
    per_message_fields,
    per_recipient_fields,
    rfc5322_date,
)
from smarthost.delivery.returned import FaithfulGenerator, read_original, returned_part

Kind = Literal["failure", "delay", "success"]

# Postfix's bounce_size_limit: enough to show the sender which message it was and most of a
# typical text mail, without mailing a 30 MB attachment back across the Internet.
DEFAULT_MAX_RETURNED = 50_000

_FOLD_WIDTH = 78
_MAX_LINE = 998  # RFC 5322 2.1.1, without the CRLF

_SUBJECTS: dict[str, str] = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}
_WHITESPACE = re.compile(r"\s+")


def wanted(
    kind: Kind, envelope: Envelope, recipients: Sequence[ReportedRecipient]
) -> list[ReportedRecipient]:
    """The recipients a report of ``kind`` tells about; empty when nobody is to be told.

    Nobody is told when the sender is null (RFC 5321 6.1: never report on a report) or when no
    recipient's NOTIFY asks for this kind (RFC 3461 4.1; the default asks for failure and
    delay). Recipients that did not ask are left out of the report.
    """
    if envelope.sender == "":
        return []
    return [r for r in recipients if r.recipient.wants(kind.upper())]


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
    """The report for the :func:`wanted` ``recipients``, as CRLF message bytes; None when
    nobody is to be told.

    ``original`` is read from its current position. The full message is returned only in a
    failure report, unless RET=HDRS or it is larger than ``max_returned``; success and delay
    reports carry the headers only (RFC 3461 4.3: a DSN without a failure SHOULD return only
    the headers).

    ``retry_until`` (delay reports) is when the message will be given up: Will-Retry-Until.
    """
    if kind not in _SUBJECTS:
        raise ValueError(f"unknown report kind: {kind!r}")
    told = wanted(kind, envelope, recipients)
    if not told:
        return None

    full_wanted = kind == "failure" and envelope.ret != "HDRS"
    headers, body, truncated = read_original(original, full_wanted, max_returned)
    utf8 = not envelope.sender.isascii()
    pol = email_policy.SMTPUTF8 if utf8 else email_policy.SMTP
    # refold_source="none": the fields set with set_raw are folded here already, and must
    # reach the wire exactly as built.
    pol = pol.clone(refold_source="none", max_line_length=_FOLD_WIDTH)

    report = _report_headers(pol, kind, reporting_mta, envelope, headers, now, queue_id)
    notice = MIMEPart(policy=pol)
    text = _explanation(
        kind, reporting_mta, told, queue_id, retry_until, full_wanted, truncated
    )
    # Quoted-printable also folds a line too long for 7bit (an absurd address, say).
    plain = text.isascii() and max(len(line) for line in text.split("\n")) <= _MAX_LINE
    notice.set_content(text, cte="7bit" if plain else "quoted-printable")
    notice["Content-Description"] = "Notification"

    status = MIMEPart(policy=pol)
    status["Content-Type"] = "message/delivery-status"
    status["Content-Description"] = "Delivery report"
    status.set_payload(
        [
            per_message_fields(pol, reporting_mta, envelope, arrival, queue_id),
            *(per_recipient_fields(pol, kind, r, retry_until) for r in told),
        ]
    )
    report.set_payload([notice, status, returned_part(pol, headers, body, kind)])

    out = BytesIO()
    FaithfulGenerator(out, policy=pol.clone(linesep="\r\n")).flatten(report)
    return out.getvalue()


def _report_headers(
    pol: email_policy.EmailPolicy[EmailMessage],
    kind: Kind,
    reporting_mta: str,
    envelope: Envelope,
    original_headers: bytes,
    now: float,
    queue_id: str,
) -> EmailMessage:
    """The report's own header section: from the mailer daemon to the envelope sender, a
    reply in the original's thread, marked auto-replied, a multipart/report."""
    report = EmailMessage(policy=pol)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    # Written by us, not parsed: the header parser raises on what SMTPUTF8 lets through.
    report.set_raw("To", _header_address(envelope.sender))
    report["Subject"] = _SUBJECTS[kind]
    report["Date"] = rfc5322_date(now)
    report["Message-ID"] = f"<{int(now)}.{queue_id}.{secrets.token_hex(6)}@{reporting_mta}>"
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834 5: no auto-replies to this
    _add_threading(report, original_headers)
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report"
    report.set_param("report-type", "delivery-status")
    report.preamble = "This is a MIME-encapsulated message.\r\n"
    return report


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


def _header_address(address: str) -> str:
    """The sender as the report's To: line can hold it.

    Every character a header cannot carry (line and paragraph separators, controls, a lone
    surrogate) becomes ``?``, itself valid in a local part: a mailbox the session accepted
    stays a readable mailbox on one line. Anything else the spool might hold becomes the
    empty group of RFC 5322 3.4, so mail readers can parse the header whatever it was. The
    report's envelope recipient (:func:`report_envelope`) keeps the real address.
    """
    shown = "".join(ch if ch.isprintable() else "?" for ch in address)
    try:
        parse_mailbox(shown, utf8=True)
    except AddressError:
        return "undisclosed-recipients:;"
    return shown


def _plain(text: str) -> str:
    """One line of readable text for the explanation: whitespace runs (line separators
    included) become one space, other unprintable characters ``?``."""
    text = _WHITESPACE.sub(" ", text).strip()
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _add_threading(report: EmailMessage, headers: bytes) -> None:
    """In-Reply-To / References to the original (RFC 3834 3.1.5), so mail clients show the
    report beside the message it is about. Only a plausible Message-ID is copied."""
    match = re.search(rb"^Message-ID:[ \t]*(<[!-;=?-~]{1,250}>)[ \t]*\r?$", headers, re.I | re.M)
    if match:
        msgid = match.group(1).decode("ascii")
        report["In-Reply-To"] = msgid
        report["References"] = msgid


def _explanation(kind: str, reporting_mta: str, recipients: Sequence[ReportedRecipient],
                 queue_id: str, retry_until: float | None, full_wanted: bool,
                 truncated: bool) -> str:
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
        until = f" until {rfc5322_date(retry_until)}" if retry_until is not None else ""
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
    remote = _plain(r.remote_mta)
    if kind == "failure":
        what = "delivery failed"
    elif kind == "delay":
        what = "delivery temporarily failed, still trying"
    elif r.relayed:
        what = f"handed on to {remote or 'the next mail server'}, which does not send "
        what += "delivery reports"
    else:
        what = "delivered"
    lines = [f"<{_plain(r.recipient.address)}>: {what}"]
    if r.diagnostic.strip():
        who = f"{remote} said" if remote else "reason"
        lines.extend(textwrap.wrap(f"{who}: {_plain(r.diagnostic)}", 72, initial_indent="    ",
                                   subsequent_indent="    ", break_on_hyphens=False))
    return "\n".join(lines)
