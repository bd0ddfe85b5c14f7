"""What every SASL mechanism shares: the three answers a step can give, the two interfaces,
and where CRAM-MD5 and SCRAM get their secrets.

The interfaces are zope.interface rather than typing Protocols, like every other seam in
smarthost: fakes and new mechanisms can be checked with ``verifyObject``, mypy-zope checks
implementations statically, and a third-party mechanism could later be found with
``twisted.plugin.getPlugins(ISASLMechanism)``.
"""

from __future__ import annotations

import os
from typing import Protocol

import attrs
from twisted.cred.credentials import ICredentials
from zope.interface import Attribute, Interface, implementer

from smarthost.auth.decoys import Decoys
from smarthost.auth.derived import SCRAM_ITERATIONS, CramMD5Secret, ScramSecret
from smarthost.auth.users import Secret


@attrs.frozen
class Challenge:
    """Send ``334 <base64(data)>`` and pass the client's answer to the next ``step``."""

    data: bytes


@attrs.frozen
class Credentials:
    """The exchange is complete: log in with ``credentials``. Nothing secret reaches repr."""

    credentials: ICredentials = attrs.field(repr=False)
    username: str  # for log lines; the portal decides whether it is real
    # When the portal refuses: send this as one more 334 challenge and answer 535 only after
    # the client's reply (RFC 7628 3.2.2, OAUTHBEARER's error challenge). None: 535 at once.
    failure_challenge: bytes | None = None


@attrs.frozen
class Rejected:
    """The exchange failed before any password check.

    ``malformed`` means the client sent something this mechanism cannot parse (answer
    ``501 5.5.2``); otherwise the request is well formed but refused (answer ``535 5.7.8``).
    Named ``Rejected``, not ``Failure``, so it cannot be confused with Twisted's ``Failure``.
    """

    reason: str  # for logs, never shown to the client
    malformed: bool = False
    username: str | None = None  # when known, for the failed-AUTH log line
    # The user exists but the users file holds no secret for this mechanism (an htpasswd -B
    # line and CRAM-MD5): nothing was guessed. The session answers 535 at once, logs it
    # apart from failures and does not count it, so the client falls back to another
    # mechanism without being throttled or banned.
    no_secret: bool = False


Step = Challenge | Credentials | Rejected


class ISASLExchange(Interface):
    """One authentication attempt in progress; used once, then thrown away."""

    def step(response: bytes | None) -> Step:
        """Take the client's next decoded response (``None``: no initial response was given)
        and say what happens next. After a ``Credentials`` or ``Rejected`` every further call
        answers ``Rejected``."""


class ISASLMechanism(Interface):
    """A mechanism offered in EHLO; makes a fresh exchange for each AUTH command."""

    name: str = Attribute("Registered name, upper case, as advertised (RFC 4422 3.1).")

    def new() -> ISASLExchange:
        """Start one exchange."""


def decode_utf8(data: bytes, what: str) -> str | Rejected:
    """``data`` as text, or the ``501`` answer naming ``what`` was not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Rejected(f"{what} is not valid UTF-8", malformed=True)


# What every exchange answers once it has given its last answer.
FINISHED = Rejected("exchange already finished", malformed=True)


# --- challenge-response: where the secrets come from ----------------------------------


class ChallengeSecrets(Protocol):
    """What CRAM-MD5 and SCRAM need from the users file (``smarthost.auth.users.UsersFile``).

    Always answers: a name without the secret gets a decoy (``known=False``), so the
    exchange runs the same steps for it and then fails (``Rejected(no_secret=True)`` when
    the secret says ``user_without_secret``).
    """

    def scram(self, name: str, mechanism: str) -> Secret[ScramSecret]: ...

    def cram_md5(self, name: str) -> Secret[CramMD5Secret]: ...


class NoUsers:
    """A source that knows nobody: mechanisms built only to validate a config."""

    def __init__(self) -> None:
        self._decoys = Decoys(os.urandom(32))

    def scram(self, name: str, mechanism: str) -> Secret[ScramSecret]:
        return Secret(self._decoys.scram(name, mechanism, SCRAM_ITERATIONS), known=False)

    def cram_md5(self, name: str) -> Secret[CramMD5Secret]:
        return Secret(self._decoys.cram_md5(name), known=False)


@implementer(ICredentials)
@attrs.frozen
class SecretsUnavailable:
    """The users file could not be read in the middle of an exchange.

    Handed to the portal as the exchange's credentials: no checker takes them, so the login
    fails with ``UnhandledCredentials``, which the session answers ``454 4.7.0`` (our
    fault, try again), just as an unreadable file does for PLAIN; never ``535``.
    """

    reason: str


def unavailable(error: OSError, name: str) -> Credentials:
    """The exchange's answer when the users file cannot be read (see ``SecretsUnavailable``)."""
    return Credentials(SecretsUnavailable(f"users file unreadable: {error}"), name)
