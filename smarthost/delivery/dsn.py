"""The machine-readable part of a report: what happened to each recipient, as the
``message/delivery-status`` fields of RFC 3464 section 2.

Every value here comes from outside (the envelope the client gave, the replies remote servers
sent) and ends up in a header-like field, so each one passes through :func:`field_text` or
:func:`address_field`: one line of printable ASCII, whatever the spool holds. That is what
keeps a report buildable for any envelope, and no value able to add a field of its own.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import EmailMessage, Message
from email.utils import format_datetime
from typing import TypeAlias

import attrs

from smarthost.core.envelope import Envelope, Outcome, Recipient, RecipientState

_Policy: TypeAlias = "email_policy.EmailPolicy[EmailMessage]"

_FOLD_WIDTH = 78
_DEFAULT_STATUS: dict[str, str] = {"failure": "5.0.0", "delay": "4.0.0", "success": "2.0.0"}
# The status classes that make sense for each kind. A failure may carry a 4.X.X status: that is
# how a message that expired after only temporary errors is reported (Postfix does the same).
_STATUS_CLASSES: dict[str, str] = {"failure": "54", "delay": "4", "success": "2"}

# RFC 3463 2: status-code = class "." subject "." detail.
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_ENHANCED_IN_REPLY = re.compile(r"[245]\d\d[ -]([245]\.\d{1,3}\.\d{1,3})(?:\s|\Z)")
_SMTP_REPLY = re.compile(r"[245]\d\d(?:[ -]|\Z)")
_WHITESPACE = re.compile(r"\s+")


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


def per_message_fields(pol: _Policy, reporting_mta: str, envelope: Envelope,
                       arrival: float, queue_id: str) -> Message:
    fields = Message(policy=pol)
    # RFC 3464 2.2.1: the ENVID exactly as given to us (the envelope holds it xtext-decoded).
    if envelope.envid:
        _set_field(fields, "Original-Envelope-Id", field_text(envelope.envid))
    _set_field(fields, "Reporting-MTA", f"dns; {field_text(reporting_mta)}")
    _set_field(fields, "X-Smarthost-Queue-ID", field_text(queue_id))
    _set_field(fields, "X-Smarthost-Sender", f"{address_field(envelope.sender)}")
    _set_field(fields, "Arrival-Date", rfc5322_date(arrival))
    return fields


def per_recipient_fields(pol: _Policy, kind: str, r: ReportedRecipient,
                         retry_until: float | None) -> Message:
    fields = Message(policy=pol)
    if r.recipient.orcpt:
        # RFC 3461 4.2: ORCPT is "addr-type;address"; RFC 3464 2.3.1 copies it as given.
        addr_type, sep, value = r.recipient.orcpt.partition(";")
        if not sep:
            addr_type, value = "rfc822", r.recipient.orcpt
        _set_field(fields, "Original-Recipient",
                   f"{field_text(addr_type.strip()) or 'rfc822'};{field_text(value.strip())}")
    _set_field(fields, "Final-Recipient", address_field(r.recipient.address))
    _set_field(fields, "Action", _action(kind, r))
    _set_field(fields, "Status", _status(kind, r.status))
    if r.remote_mta:
        _set_field(fields, "Remote-MTA", f"dns; {field_text(r.remote_mta)}")
    if r.diagnostic.strip():
        diagnostic = field_text(r.diagnostic)
        # RFC 3464 2.3.6: "smtp" only for what an SMTP server actually replied.
        dtype = "smtp" if _SMTP_REPLY.match(diagnostic) else "X-Smarthost"
        _set_field(fields, "Diagnostic-Code", f"{dtype}; {diagnostic}")
    if r.last_attempt is not None:
        _set_field(fields, "Last-Attempt-Date", rfc5322_date(r.last_attempt))
    if kind == "delay" and retry_until is not None:
        _set_field(fields, "Will-Retry-Until", rfc5322_date(retry_until))
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


def field_text(text: str) -> str:
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


def address_field(address: str) -> str:
    """``rfc822;addr`` (RFC 3464 2.3.2), or RFC 6533 3 ``utf-8;`` with utf-8-addr-xtext for an
    internationalized address, which message/delivery-status cannot hold as is."""
    if address.isascii():
        return f"rfc822;{field_text(address)}"
    encoded = []
    for ch in address:
        if "!" <= ch <= "~" and ch not in "+=\\":
            encoded.append(ch)
        else:
            encoded.append(f"\\x{{{ord(ch):X}}}")
    return "utf-8;" + "".join(encoded)


def rfc5322_date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))
