"""GSSAPI (RFC 4752): Kerberos logins, with the service's key from a keytab.

The exchange (RFC 4752 3.1, server side):

1. The client's GSS-API tokens go to ``accept_sec_context``; its output tokens go back as
   challenges until the context is established. A last output token (mutual
   authentication) is sent too, and the client answers it with an empty response.
2. The server then sends a wrapped 4-octet message: the security layers it offers (a
   bitmask; we offer only 0x01, "no security layer": TLS already protects the session) and
   the largest buffer it takes (0: none, as there is no layer).
3. The client's wrapped answer must choose 0x01; after its 4 octets comes the authorization
   identity, which must be empty or the user the principal maps to.

The principal maps to a user by its local part, and only within the realm of the service
principal the client asked for (the keytab's): ``alice@EXAMPLE.TEST`` is ``alice``; a
principal of another realm, or with an instance (``alice/admin``), is refused.

Every GSS-API call here is local and fast (the acceptor decrypts the ticket with the key
from the keytab file; the KDC is never contacted), so the exchange runs them in ``step``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import gssapi
from gssapi.raw.misc import GSSError
from gssapi.raw.named_tuples import UnwrapResult, WrapResult
from zope.interface import implementer

from smarthost.auth.cred import VerifiedPrincipal
from smarthost.auth.sasl.base import (
    FINISHED,
    Challenge,
    Credentials,
    ISASLExchange,
    ISASLMechanism,
    Rejected,
    Step,
)

NO_SECURITY_LAYER = 0x01
# No layer offered beyond "none", and no buffer for one (RFC 4752 3.1).
SECURITY_OFFER = bytes([NO_SECURITY_LAYER, 0, 0, 0])


class AcceptContext(Protocol):
    """The slice of ``gssapi.SecurityContext`` (acceptor side) the exchange uses."""

    @property
    def complete(self) -> bool: ...

    @property
    def initiator_name(self) -> object: ...

    @property
    def target_name(self) -> object: ...

    def step(self, token: bytes) -> bytes | None: ...

    def wrap(self, message: bytes, encrypt: bool) -> WrapResult: ...

    def unwrap(self, message: bytes) -> UnwrapResult: ...


class Acceptor(Protocol):
    def accept(self) -> AcceptContext:
        """A fresh acceptor context for one exchange."""


class KeytabError(Exception):
    """The keytab cannot be used to accept contexts (missing, unreadable, empty)."""


class Keytab:
    """The service's acceptor credentials from one keytab, read at start-up (a missing or
    unusable keytab is :class:`KeytabError`, not something to find at the first login).
    Also the issuer :class:`~smarthost.auth.cred.VerifiedPrincipalChecker` trusts."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise KeytabError(f"{path} does not exist")
        try:
            path.open("rb").close()
            self.credentials = gssapi.Credentials(usage="accept", store={"keytab": str(path)})
        except (OSError, GSSError) as e:
            raise KeytabError(f"cannot accept with {path}: {e}") from None
        self.path = path

    def accept(self) -> AcceptContext:
        context: AcceptContext = gssapi.SecurityContext(usage="accept", creds=self.credentials)
        return context


def map_principal(principal: str, service: str) -> str | None:
    """The user ``principal`` is, or None: its local part when its realm is ``service``'s
    and it has no instance. Names are in their displayed form, ``name@REALM``."""
    local, at, realm = principal.rpartition("@")
    _, service_at, service_realm = service.rpartition("@")
    if not at or not service_at or realm != service_realm:
        return None
    if not local or "/" in local or "@" in local or "\\" in local:
        return None
    return local


@implementer(ISASLMechanism)
class GssapiMechanism:
    """AUTH GSSAPI with one keytab (None: a config is only being validated, and nobody
    gets in)."""

    name = "GSSAPI"

    def __init__(self, keytab: Acceptor | None) -> None:
        self._keytab = keytab

    def new(self) -> ISASLExchange:
        return GssapiExchange(self._keytab)


@implementer(ISASLExchange)
class GssapiExchange:
    """One RFC 4752 exchange: states ``context`` -> (``empty``) -> ``layer`` -> done."""

    def __init__(self, keytab: Acceptor | None) -> None:
        self._keytab = keytab  # also the issuer the portal's checker trusts
        self._context: AcceptContext | None = None
        self._state = "start"
        self._principal = ""
        self._user = ""

    def step(self, response: bytes | None) -> Step:
        state, self._state = self._state, "done"
        try:
            if state == "start" and response is None:
                self._state = "context"
                return Challenge(b"")  # client-first: ask for the initial token
            if state in ("start", "context"):
                return self._accept(response or b"")
            if state == "empty":
                return self._offer()
            if state == "layer":
                return self._choice(response or b"")
        except GSSError as e:
            return Rejected(f"GSSAPI: {e.gen_message()}", username=self._principal or None)
        return FINISHED

    def _accept(self, token: bytes) -> Step:
        if self._keytab is None:
            return Rejected("GSSAPI has no keytab")
        if not token:
            return Rejected("GSSAPI: empty context token")
        if self._context is None:
            self._context = self._keytab.accept()
        output = self._context.step(token)
        if not self._context.complete:
            self._state = "context"
            return Challenge(output or b"")
        self._principal = str(self._context.initiator_name)
        user = map_principal(self._principal, str(self._context.target_name))
        if user is None:
            return Rejected(f"GSSAPI: principal {self._principal} is not a user of the "
                            f"realm of {self._context.target_name}", username=self._principal)
        self._user = user
        if output:
            self._state = "empty"
            return Challenge(output)  # RFC 4752 3.1: the client answers it with nothing
        return self._offer()

    def _offer(self) -> Step:
        assert self._context is not None
        self._state = "layer"
        return Challenge(self._context.wrap(SECURITY_OFFER, False).message)

    def _choice(self, wrapped: bytes) -> Step:
        assert self._context is not None
        message = self._context.unwrap(wrapped).message
        if len(message) < 4 or message[0] != NO_SECURITY_LAYER:
            return Rejected("GSSAPI: client did not choose 'no security layer'",
                            username=self._principal)
        try:
            authzid = message[4:].decode("utf-8")
        except UnicodeDecodeError:
            return Rejected("GSSAPI: authorization identity is not UTF-8",
                            username=self._principal)
        if authzid and authzid != self._user:
            return Rejected(f"GSSAPI: {self._principal} may not act as {authzid!r}",
                            username=self._principal)
        return Credentials(VerifiedPrincipal(self._principal, self._user, self._keytab),
                           self._user)
