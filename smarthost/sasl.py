"""SASL mechanisms for SMTP AUTH (RFC 4954), one small class per mechanism.

The split of work with the session:

- The session owns the SMTP framing: it base64-decodes every client line before calling
  :meth:`ISASLExchange.step` and base64-encodes every :class:`Challenge` into a ``334`` reply.
  Bad base64 is its ``501``; a ``*`` line cancels the exchange (RFC 4954 4) without any call
  here. An initial response on the AUTH command is passed as bytes; no initial response at
  all is ``None``; the initial response ``=`` means "present but empty" (RFC 4954 4) and
  must be passed as ``b""``, which is not the same as ``None``.
- A mechanism only sees decoded octets and answers with one of three values: send a
  challenge, here are credentials for ``Portal.login``, or refuse. ``step`` never raises for
  anything a client can send.
- The session logs in with the credentials (``smarthost.auth.PortalLogin``) and maps outcomes to
  replies. A mechanism never sees the users file, so adding one (CRAM-MD5, SCRAM,
  OAUTHBEARER) means a class here, a checker for its credentials type, and an entry in
  :data:`MECHANISMS`; the session does not change.

The interfaces are zope.interface rather than typing Protocols, like every other seam in
smarthost: fakes and new mechanisms can be checked with ``verifyObject``, mypy-zope checks
implementations statically, and a third-party mechanism could later be found with
``twisted.plugin.getPlugins(ISASLMechanism)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs
from twisted.cred.credentials import ICredentials, UsernamePassword
from zope.interface import Attribute, Interface, implementer


@attrs.frozen
class Challenge:
    """Send ``334 <base64(data)>`` and pass the client's answer to the next ``step``."""

    data: bytes


@attrs.frozen
class Credentials:
    """The exchange is complete: log in with ``credentials``. Nothing secret reaches repr."""

    credentials: ICredentials = attrs.field(repr=False)
    username: str  # for log lines; the portal decides whether it is real


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


def _decode(data: bytes, what: str) -> str | Rejected:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Rejected(f"{what} is not valid UTF-8", malformed=True)


_FINISHED = Rejected("exchange already finished", malformed=True)


# --- PLAIN (RFC 4616) -------------------------------------------------------------------


@implementer(ISASLMechanism)
class PlainMechanism:
    name = "PLAIN"

    def new(self) -> ISASLExchange:
        return PlainExchange()


@implementer(ISASLExchange)
class PlainExchange:
    """``[authzid] NUL authcid NUL passwd`` in one message (RFC 4616 2)."""

    def __init__(self) -> None:
        self._done = False
        self._asked = False

    def step(self, response: bytes | None) -> Step:
        if self._done:
            return _FINISHED
        if response is None and not self._asked:
            # RFC 4616 2 / RFC 4954 4: no initial response, so send an empty challenge and
            # the client answers with the whole message.
            self._asked = True
            return Challenge(b"")
        self._done = True
        return _parse_plain(response or b"")


def _parse_plain(message: bytes) -> Step:
    parts = message.split(b"\0")
    if len(parts) != 3:
        return Rejected("PLAIN message needs exactly two NUL separators", malformed=True)
    raw_authzid, raw_authcid, password = parts
    authzid = _decode(raw_authzid, "PLAIN authorization identity")
    authcid = _decode(raw_authcid, "PLAIN user name")
    checked_password = _decode(password, "PLAIN password")
    for value in (authzid, authcid, checked_password):
        if isinstance(value, Rejected):
            return value
    assert isinstance(authzid, str) and isinstance(authcid, str)
    if not authcid or not password:
        return Rejected("PLAIN user name or password is empty", malformed=True)
    if authzid and authzid != authcid:
        # RFC 4616 2: the server decides whether authcid may act as authzid. Nobody may act
        # as someone else here: sender ownership is decided for the authenticated name only.
        return Rejected("PLAIN authorization identity differs from the user name",
                        username=authcid)
    return Credentials(UsernamePassword(raw_authcid, password), authcid)


# --- LOGIN (draft-murchison-sasl-login) --------------------------------------------------


@implementer(ISASLMechanism)
class LoginMechanism:
    """The obsolete but ubiquitous LOGIN mechanism (Outlook, printers, scanners)."""

    name = "LOGIN"

    def new(self) -> ISASLExchange:
        return LoginExchange()


@implementer(ISASLExchange)
class LoginExchange:
    """Asks ``Username:`` then ``Password:``; an initial response is taken as the user name,
    as Postfix (Cyrus SASL) and Exim do."""

    def __init__(self) -> None:
        self._state = "start"
        self._username = b""
        self._name = ""

    def step(self, response: bytes | None) -> Step:
        if self._state == "start":
            if response is None:
                self._state = "username"
                return Challenge(b"Username:")
            return self._take_username(response)
        if self._state == "username":
            return self._take_username(response or b"")
        if self._state == "password":
            self._state = "done"
            password = response or b""
            if not password:
                return Rejected("LOGIN password is empty", malformed=True, username=self._name)
            checked = _decode(password, "LOGIN password")
            if isinstance(checked, Rejected):
                return attrs.evolve(checked, username=self._name)
            return Credentials(UsernamePassword(self._username, password), self._name)
        return _FINISHED

    def _take_username(self, response: bytes) -> Step:
        name = _decode(response, "LOGIN user name")
        if isinstance(name, Rejected):
            self._state = "done"
            return name
        if not name:
            self._state = "done"
            return Rejected("LOGIN user name is empty", malformed=True)
        self._state = "password"
        self._username, self._name = response, name
        return Challenge(b"Password:")


# --- the registry ------------------------------------------------------------------------

MECHANISMS: dict[str, Callable[[], ISASLMechanism]] = {
    "PLAIN": PlainMechanism,
    "LOGIN": LoginMechanism,
}


def build_mechanisms(names: Iterable[str]) -> list[ISASLMechanism]:
    """The mechanisms named in ``[auth] mechanisms``, in the order given (the EHLO order).

    Raises ``ValueError`` naming the first unknown or repeated mechanism, for config errors.
    Names are matched case-insensitively and advertised upper case.
    """
    result: list[ISASLMechanism] = []
    seen: set[str] = set()
    for name in names:
        key = name.upper()
        if key not in MECHANISMS:
            known = ", ".join(sorted(MECHANISMS))
            raise ValueError(f"unknown SASL mechanism {name!r} (known: {known})")
        if key in seen:
            raise ValueError(f"SASL mechanism {name!r} is listed twice")
        seen.add(key)
        result.append(MECHANISMS[key]())
    return result
