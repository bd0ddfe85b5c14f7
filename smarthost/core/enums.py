"""The closed sets of words the parts pass each other. They are ``StrEnum``s: they compare
equal to, and serialise as, the plain words that the spool's JSON, the config file and the
logs already use, so nothing on disk changes."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """Which ``[listen]`` key a connection came in on; it decides what the session offers."""

    SUBMISSION = "submission"  # RFC 6409: STARTTLS, then AUTH
    SUBMISSIONS = "submissions"  # RFC 8314: implicit TLS, then as submission
    SMTP = "smtp"  # inbound MX: local domains only, no AUTH, never relays


class Result(StrEnum):
    """A recipient's state in the queue (PENDING, DELIVERED, BOUNCED) and what one delivery
    attempt did for it (DELIVERED, DEFERRED, BOUNCED)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


class TLSPolicy(StrEnum):
    """``[delivery] tls``: how hard outbound delivery insists on TLS."""

    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered, plaintext only when it is not
    REQUIRED = "required"  # no STARTTLS offered: defer
    VERIFY = "verify"  # also a certificate valid for the next-hop name
