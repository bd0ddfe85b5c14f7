"""Values that travel with a message: addresses, recipients, envelopes, queue ids.

Everything here is a frozen value with no behaviour beyond parsing and formatting, so every
stage (session, policy, spool, scheduler, outbound, bounce) can share it without coupling.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import secrets
from collections.abc import Mapping
from typing import Any

import attrs

from smarthost.core.enums import Result, Role

# RFC 5321 4.1.2: atext for dot-atom local parts.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
# RFC 5321 4.1.2: qtextSMTP is %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP is "\" %d32-126.
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
# With SMTPUTF8 (RFC 6531 3.3) any non-ASCII UTF-8 character is also atext / a label character.
_UTEXT = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])"
_UDOT_ATOM = re.compile(rf"{_UTEXT}+(?:\.{_UTEXT}+)*\Z")
# U+3002, U+FF0E and U+FF61 are full stops to IDNA (RFC 3490 3.1): a label holding one would
# become two labels in DNS, so the domain the policy compares would not be the one routed to.
_U = r"[^\x00-\x7f\u3002\uff0e\uff61]"
_ULABEL = re.compile(rf"(?:[A-Za-z0-9]|{_U})(?:(?:[A-Za-z0-9-]|{_U}){{0,61}}"
                     rf"(?:[A-Za-z0-9]|{_U}))?\Z")
_SOURCE_ROUTE = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 4.5.3.1.3


class AddressError(ValueError):
    """The text is not an RFC 5321 mailbox; the message says what is wrong."""


@attrs.frozen
class Address:
    """A parsed mailbox. ``domain`` is kept as written; compare with :attr:`domain_key`."""

    local: str
    domain: str

    @property
    def domain_key(self) -> str:
        """The domain as routing compares it: lower case, no trailing dot."""
        return self.domain.lower().rstrip(".")

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def needs_smtputf8(self) -> bool:
        return not str(self).isascii()

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def parse_mailbox(text: str, *, utf8: bool = False) -> Address:
    """Parse ``local@domain`` (no angle brackets) per RFC 5321 4.1.2.

    Only what RFC 5321 allows is accepted: relay tricks such as ``a%b@c``'s ``%`` stay part of
    the local part (so the domain that the relay rule sees is always the real next hop), while
    ``!``-paths, bare ``@`` in unquoted local parts, missing domains and trailing dots are
    refused outright.
    """
    if len(text.encode("utf-8")) > MAX_PATH:
        raise AddressError("address too long")
    at = text.rfind("@")
    if at <= 0:
        raise AddressError("address must be local-part@domain")
    local, domain = text[:at], text[at + 1 :]
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    dot_atom = _UDOT_ATOM if utf8 else _DOT_ATOM
    if not (dot_atom.match(local) or _QUOTED.match(local)):
        if local.startswith('"') and utf8 and _quoted_utf8(local):
            pass
        else:
            raise AddressError("invalid local part")
    if "!" in local and not local.startswith('"'):
        # RFC 5321 does not forbid "!" in atext, but UUCP bang paths are a classic relay trick
        # and no real mailbox needs one.
        raise AddressError("bang paths are not accepted")
    _check_domain(domain, utf8=utf8)
    return Address(local, domain)


def _quoted_utf8(local: str) -> bool:
    body = local[1:-1] if len(local) >= 2 and local.endswith('"') else None
    if body is None:
        return False
    ascii_only = "".join(c if c.isascii() else "a" for c in body)
    return bool(_QUOTED.match(f'"{ascii_only}"'))


def _check_domain(domain: str, *, utf8: bool) -> None:
    if not domain:
        raise AddressError("missing domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("domain too long")
    if domain.startswith("[") and domain.endswith("]"):
        _check_literal(domain[1:-1])
        return
    label = _ULABEL if utf8 else _LABEL
    labels = domain.split(".")
    if len(labels) < 2 and domain.lower() != "localhost":
        # An unqualified name would be completed by a resolver's search list: never route it.
        raise AddressError("domain must be fully qualified")
    for part in labels:
        if not label.match(part):
            raise AddressError("invalid domain")


def _check_literal(literal: str) -> None:
    if "%" in literal:
        # ipaddress accepts IPv6 zone ids ("fe80::1%eth0"); RFC 5321 4.1.3 has none, and a
        # "%" in a domain must never look like a route.
        raise AddressError("invalid address literal")
    try:
        if literal.lower().startswith("ipv6:"):
            ipaddress.IPv6Address(literal[5:])
        else:
            ipaddress.IPv4Address(literal)
    except ValueError:
        raise AddressError("invalid address literal") from None


def parse_path(text: str, *, utf8: bool = False, allow_null: bool = False) -> Address | None:
    """Parse a reverse- or forward-path as written after ``MAIL FROM:`` / ``RCPT TO:``.

    Returns ``None`` for the null path ``<>`` when ``allow_null``. RFC 5321 4.1.1.3 says
    source routes SHOULD be ignored; they are stripped so only the final mailbox routes.
    """
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("path must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return None
        raise AddressError("null path not allowed here")
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end() :]
    return parse_mailbox(inner, utf8=utf8)


@attrs.frozen(cache_hash=True)  # a dict and set key everywhere: hash once per object
class QueueId:
    """A queue id: safe to use as a file name, sortable by arrival time."""

    value: str = attrs.field()

    @value.validator
    def _check(self, _attr: object, value: str) -> None:
        if not _QUEUE_ID.match(value):
            raise ValueError(f"invalid queue id: {value!r}")

    @classmethod
    def new(cls, now: float, origin: str = "") -> QueueId:
        # Time first (hex, fixed width) so ids sort by arrival, then randomness for uniqueness,
        # then the worker that made it (``origin``, two hex digits with [server] workers > 1):
        # each worker checks only its own spool, so two could otherwise draw the same id.
        return cls(f"{int(now * 1000):012X}{secrets.token_hex(5).upper()}{origin}")

    def __str__(self) -> str:
        return self.value


_QUEUE_ID = re.compile(r"[0-9A-F]{12,32}\Z")


# RFC 3461 4.1: NOTIFY is NEVER alone, or a set of SUCCESS, FAILURE, DELAY.
NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


@attrs.frozen
class Recipient:
    """One envelope recipient with its RFC 3461 DSN parameters.

    ``notify`` empty means "not given", which RFC 3461 4.1 says to treat as FAILURE (and
    optionally DELAY); ``("NEVER",)`` suppresses every report.
    """

    address: str
    notify: tuple[str, ...] = ()
    orcpt: str | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower().rstrip(".")

    def wants(self, kind: str) -> bool:
        """Whether a report of ``kind`` (SUCCESS, FAILURE, DELAY) should be sent."""
        if not self.notify:
            return kind in ("FAILURE", "DELAY")
        return kind in self.notify


@attrs.frozen
class Envelope:
    """Everything the session learned about one message, stored beside its body."""

    sender: str  # "" is the null reverse-path
    recipients: tuple[Recipient, ...]
    client_address: str = ""
    client_name: str = ""  # the HELO/EHLO argument
    user: str | None = None  # authenticated user, None otherwise
    ret: str | None = None  # RFC 3461 RET: "FULL" or "HDRS"
    envid: str | None = None  # RFC 3461 ENVID (xtext-decoded)
    body: str | None = None  # "7BIT" or "8BITMIME" as given in MAIL
    smtputf8: bool = False
    received_at: float = 0.0
    held: bool = False  # accepted but not to be delivered until released
    # RFC 8689: the sender asked for REQUIRETLS; delivered only over TLS verified by MTA-STS
    # or "verify", to next hops that offer REQUIRETLS. Absent in older spools: False.
    requiretls: bool = False
    # RFC 8689 5: the header section has "TLS-Required: No", seen when the message was taken
    # in. None: not known (older spools; a header section too long to keep), read from the
    # body at each attempt (smarthost.delivery.tlsrequired).
    tls_required_no: bool | None = None

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["recipients"] = [attrs.asdict(r) for r in self.recipients]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        values = {k: v for k, v in data.items() if k in _ENVELOPE_FIELDS}
        values["recipients"] = tuple(
            Recipient(
                address=r["address"],
                notify=tuple(r.get("notify") or ()),
                orcpt=r.get("orcpt"),
            )
            for r in data["recipients"]
        )
        return cls(**values)


_ENVELOPE_FIELDS = frozenset(f.name for f in attrs.fields(Envelope))


# Per-recipient delivery state, as the spool records it and the scheduler updates it.
PENDING, DELIVERED, BOUNCED = Result.PENDING, Result.DELIVERED, Result.BOUNCED


@attrs.frozen
class RecipientState:
    recipient: Recipient
    status: Result = attrs.field(default=PENDING, converter=Result)  # PENDING|DELIVERED|BOUNCED
    last_reply: str = ""  # the last remote (or local) reply or error text for this recipient
    remote: str = ""  # the next hop that gave last_reply
    attempts: int = 0


@attrs.frozen
class QueueEntry:
    """A committed message's envelope plus its delivery state: what ``queue list`` shows."""

    queue_id: QueueId
    envelope: Envelope
    size: int
    queued_at: float
    recipients: tuple[RecipientState, ...]
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    delay_warned: bool = False
    # The reports the sender is owed and that are not queued yet (bounces, success reports,
    # the delay warning), saved in the same write as the outcomes that made them due so a
    # restart cannot lose one. Plain JSON data: smarthost.delivery.reporting reads and writes
    # it. Absent in older spools and in the JSON while empty: nothing owed. Not hashed (dicts).
    owed_reports: tuple[Mapping[str, Any], ...] = attrs.field(default=(), hash=False)

    @functools.cached_property
    def pending(self) -> tuple[RecipientState, ...]:
        """The recipients still to deliver to. Cached: the entry is frozen, and one attempt
        asks this of the same entry about eight times (scheduler, courier, recording)."""
        return tuple(r for r in self.recipients if r.status == PENDING)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.queue_id),
            "envelope": self.envelope.to_json(),
            "size": self.size,
            "queued_at": self.queued_at,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": self.last_error,
            "delay_warned": self.delay_warned,
            "recipients": [
                {
                    "address": r.recipient.address,
                    "status": r.status,
                    "last_reply": r.last_reply,
                    "remote": r.remote,
                    "attempts": r.attempts,
                }
                for r in self.recipients
            ],
        }
        if self.owed_reports:
            data["owed_reports"] = list(self.owed_reports)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueueEntry:
        envelope = Envelope.from_json(data["envelope"])
        states = {r["address"]: r for r in data.get("recipients", [])}
        recipients = tuple(
            RecipientState(
                recipient=rcpt,
                status=states.get(rcpt.address, {}).get("status", PENDING),
                last_reply=states.get(rcpt.address, {}).get("last_reply", ""),
                remote=states.get(rcpt.address, {}).get("remote", ""),
                attempts=states.get(rcpt.address, {}).get("attempts", 0),
            )
            for rcpt in envelope.recipients
        )
        return cls(
            queue_id=QueueId(data["id"]),
            envelope=envelope,
            size=data["size"],
            queued_at=data["queued_at"],
            recipients=recipients,
            attempts=data.get("attempts", 0),
            next_attempt=data.get("next_attempt", 0.0),
            last_error=data.get("last_error", ""),
            delay_warned=data.get("delay_warned", False),
            owed_reports=_owed_reports(owed) if (owed := data.get("owed_reports")) else (),
        )

    @classmethod
    def new(cls, queue_id: QueueId, envelope: Envelope, size: int) -> QueueEntry:
        return cls(
            queue_id=queue_id,
            envelope=envelope,
            size=size,
            queued_at=envelope.received_at,
            recipients=tuple(RecipientState(r) for r in envelope.recipients),
            next_attempt=envelope.received_at,
        )


def _owed_reports(data: Any) -> tuple[Mapping[str, Any], ...]:
    """A list of JSON objects, or the entry is unreadable (what each one holds is for the
    delivery side to judge: it may not import it)."""
    if not isinstance(data, list | tuple) or not all(isinstance(r, dict) for r in data):
        raise ValueError("owed_reports is not a list of objects")
    return tuple(data)


# What one delivery attempt did for one recipient: DELIVERED, DEFERRED or BOUNCED.
DEFERRED = Result.DEFERRED


@attrs.frozen
class Outcome:
    """One recipient's result from one delivery attempt (outbound SMTP or local maildir).

    Delivery agents return these and never touch the spool: the scheduler records them.
    """

    recipient: Recipient
    result: Result
    reply: str  # the remote reply as received ("550 5.1.1 No such user"), or our own reason
    remote: str = ""  # "mx.example.test[192.0.2.1]", "maildir", ... for logs and DSN Remote-MTA
    status: str = ""  # RFC 3463 code for the DSN Status field, e.g. "5.1.1"
    # The next hop took our RFC 3461 parameters (it offered DSN): success and delay reports
    # are its job from here on, so we send none (RFC 3461 6.2).
    dsn_passed: bool = False


@attrs.frozen
class Client:
    """What is known about the connected client when a check runs (policy, plugins)."""

    address: str  # IP address as text (the proxied one behind HAProxy)
    role: Role
    tls: bool = False
    user: str | None = None  # authenticated user name
    helo: str = ""
