"""PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login): the password in the clear,
which is why the session offers them only over TLS.

Neither sees the users file: both hand ``UsernamePassword`` to the portal, whose checker
runs bcrypt (``smarthost.auth.cred.BcryptChecker``).
"""

from __future__ import annotations

import attrs
from twisted.cred.credentials import UsernamePassword
from zope.interface import implementer

from smarthost.auth.sasl.base import (
    FINISHED,
    Challenge,
    Credentials,
    ISASLExchange,
    ISASLMechanism,
    Rejected,
    Step,
    decode_utf8,
)

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
            return FINISHED
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
    authzid = decode_utf8(raw_authzid, "PLAIN authorization identity")
    authcid = decode_utf8(raw_authcid, "PLAIN user name")
    checked_password = decode_utf8(password, "PLAIN password")
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
            checked = decode_utf8(password, "LOGIN password")
            if isinstance(checked, Rejected):
                return attrs.evolve(checked, username=self._name)
            return Credentials(UsernamePassword(self._username, password), self._name)
        return FINISHED

    def _take_username(self, response: bytes) -> Step:
        name = decode_utf8(response, "LOGIN user name")
        if isinstance(name, Rejected):
            self._state = "done"
            return name
        if not name:
            self._state = "done"
            return Rejected("LOGIN user name is empty", malformed=True)
        self._state = "password"
        self._username, self._name = response, name
        return Challenge(b"Password:")
