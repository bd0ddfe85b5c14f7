"""The twisted.cred glue: how a SASL exchange's credentials become an authenticated user.

Every login goes through one ``Portal`` (:func:`build_portal`), so every success and every
failure passes the same place whatever the mechanism:

- PLAIN and LOGIN hand over ``UsernamePassword``; :class:`BcryptChecker` asks the users
  file, off the reactor thread.
- CRAM-MD5 and SCRAM check the proof themselves during the exchange and hand over an
  :class:`IVerifiedUser`; :class:`VerifiedUserChecker` only makes sure the proof was checked
  against its own users file and that the user still exists.
- Bearer tokens (OAUTHBEARER, XOAUTH2) have their own checker in :mod:`smarthost.auth.oauth`.
- GSSAPI (Kerberos) hands over an :class:`IVerifiedPrincipal`, checked by
  :class:`VerifiedPrincipalChecker` against the acceptor that established the context.
- With ``[auth] backends`` naming more than one source of passwords (the users file, the
  office directory of :mod:`smarthost.auth.ldap`), :class:`FirstThatKnows` asks them in
  order: a checker that does not know the name raises :class:`UnknownName` and the next
  one is asked; the first that knows it answers, right or wrong.

The avatar is an :class:`IUser`, a name and nothing else. The checkers see the users file
only through :class:`UserDirectory`, the two questions they ask of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Attribute, Interface, implementer

from smarthost.core.types import RunBlocking


class NamedEntry(Protocol):
    @property
    def name(self) -> str:
        """The user name exactly as in the users file."""


class UserDirectory(Protocol):
    """What the checkers ask of the users file (:class:`smarthost.auth.users.UsersFile`).

    Both calls may block (stat, read, bcrypt): the checkers run them through ``run_blocking``.
    Both find a user under the name as presented or as SASLprep prepares it, and answer with
    the name as stored, which is the one the avatar (and sender ownership) goes by.
    """

    def verify(self, name: str, password: bytes) -> str | None:
        """The user's stored name when ``password`` is theirs, else None; as slow for
        unknown names as for known ones."""

    def lookup(self, name: str) -> NamedEntry | None:
        """The user's entry, or None when there is no such user."""


class IUser(Interface):
    """The avatar of an authenticated submission: who the client proved to be."""

    name: str = Attribute("The user name exactly as in the users file.")


@implementer(IUser)
@attrs.frozen
class User:
    name: str


class UnknownName(UnauthorizedLogin):
    """This backend does not know the name: :class:`FirstThatKnows` asks the next one."""


@implementer(ICredentialsChecker)
class BcryptChecker:
    """Checks user name and password against the users file, off the reactor thread.

    Deliberately free of policy (throttling, lockout, logging): those wrap the login, so this
    stays a pure "is this the password" answer.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: UserDirectory, run_blocking: RunBlocking,
                 *, say_unknown: bool = False) -> None:
        self._users = users
        self._run_blocking = run_blocking
        # In a chain with a backend after it: an unknown name raises UnknownName (after the
        # same dummy check), so the next backend is asked.
        self._say_unknown = say_unknown

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        creds: IUsernamePassword = credentials
        try:
            name = creds.username.decode("utf-8")
        except UnicodeDecodeError:
            name = ""  # cannot be in the file: costs the dummy check like any unknown name
        d = self._run_blocking(self._users.verify, name, creds.password)

        def result(stored: str | None) -> bytes | tuple[()]:
            if stored is None:
                raise UnauthorizedLogin()
            return stored.encode("utf-8")

        def unknown(stored: str | None) -> Deferred[str | None]:
            if stored is not None:
                return succeed(stored)
            known = self._run_blocking(self._users.lookup, name)

            def say(entry: NamedEntry | None) -> None:
                if entry is None:
                    raise UnknownName()

            return known.addCallback(say)

        if self._say_unknown:
            d.addCallback(unknown)
        return d.addCallback(result)


@implementer(ICredentialsChecker)
class FirstThatKnows:
    """``[auth] backends`` in order, for passwords: the first checker that knows the name
    answers; :class:`UnknownName` from the last is a plain failed login."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, checkers: Sequence[ICredentialsChecker]) -> None:
        self._checkers = checkers

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        return Deferred.fromCoroutine(self._ask(credentials))

    async def _ask(self, credentials: Any) -> bytes | tuple[()]:
        for checker in self._checkers:
            try:
                result: bytes | tuple[()] = await checker.requestAvatarId(credentials)
                return result
            except UnknownName:
                continue
        raise UnauthorizedLogin()


class IVerifiedUser(ICredentials):
    """A user whose proof a challenge-response mechanism (CRAM-MD5, SCRAM) has already
    checked against the users file during the SASL exchange.

    Only those mechanisms create these: PLAIN and LOGIN only ever build ``UsernamePassword``,
    so nothing a client sends through them can become one. The checker further accepts only
    objects vouched for by its own users file (``issuer``).
    """

    name: str = Attribute("The user name as the client presented it.")
    mechanism: str = Attribute("The SASL mechanism that checked the proof.")
    issuer: object = Attribute("The UsersFile whose secrets the proof was checked against.")


@implementer(IVerifiedUser)
@attrs.frozen
class VerifiedUser:
    name: str
    mechanism: str
    issuer: object = attrs.field(repr=False, eq=False)


@implementer(ICredentialsChecker)
class VerifiedUserChecker:
    """Accepts :class:`IVerifiedUser` from our own mechanisms, if the user still exists.

    The proof was checked during the exchange; what is left is to make sure it was checked
    against this portal's users file and that the user was not deleted meanwhile.
    """

    credentialInterfaces = (IVerifiedUser,)

    def __init__(self, users: UserDirectory, run_blocking: RunBlocking) -> None:
        self._users = users
        self._run_blocking = run_blocking

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        creds: IVerifiedUser = credentials
        name = creds.name
        trusted = creds.issuer is self._users
        d = self._run_blocking(self._users.lookup, name)

        def result(entry: NamedEntry | None) -> bytes | tuple[()]:
            if not trusted or entry is None:
                raise UnauthorizedLogin()
            return entry.name.encode("utf-8")

        return d.addCallback(result)


class IVerifiedPrincipal(ICredentials):
    """A Kerberos principal whose GSSAPI context the mechanism has established (RFC 4752),
    already mapped to a user name within the service's realm.

    Only :mod:`smarthost.auth.sasl.gssapi` creates these, and :class:`VerifiedPrincipalChecker`
    accepts only those vouched for by its own acceptor (``issuer``). Not an
    :class:`IVerifiedUser`: the user need not be in the users file, the KDC vouched for them.
    """

    principal: str = Attribute("The client's principal, e.g. alice@EXAMPLE.TEST.")
    user: str = Attribute("The principal's local part: the name the avatar goes by.")
    issuer: object = Attribute("The acceptor (keytab) that established the context.")


@implementer(IVerifiedPrincipal)
@attrs.frozen
class VerifiedPrincipal:
    principal: str
    user: str
    issuer: object = attrs.field(repr=False, eq=False)


@implementer(ICredentialsChecker)
class VerifiedPrincipalChecker:
    """Accepts :class:`IVerifiedPrincipal` established with this generation's keytab."""

    credentialInterfaces = (IVerifiedPrincipal,)

    def __init__(self, issuer: object) -> None:
        self._issuer = issuer

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        creds: IVerifiedPrincipal = credentials
        if creds.issuer is not self._issuer:
            return fail(UnauthorizedLogin())
        return succeed(creds.user.encode("utf-8"))


def _logout() -> None:
    """Nothing to release: an avatar is a plain value."""


@implementer(IRealm)
class UserRealm:
    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], object, Callable[[], None]]:
        if IUser not in interfaces or not isinstance(avatarId, bytes):
            raise NotImplementedError("only named IUser avatars exist")
        return IUser, User(avatarId.decode("utf-8")), _logout


def build_portal(users: UserDirectory, run_blocking: RunBlocking,
                 password_backends: Sequence[ICredentialsChecker] | None = None) -> Portal:
    """Passwords (PLAIN, LOGIN) are checked with bcrypt; CRAM-MD5 and SCRAM users arrive
    already verified by the exchange, against the same ``users``.

    ``password_backends`` (``[auth] backends`` built, e.g. the users file's checker and
    an :class:`~smarthost.auth.ldap.LdapChecker`) replaces the bcrypt checker for
    passwords; they are asked in order (:class:`FirstThatKnows`)."""
    passwords: ICredentialsChecker = (
        FirstThatKnows(password_backends) if password_backends
        else BcryptChecker(users, run_blocking)
    )
    return Portal(UserRealm(), [passwords, VerifiedUserChecker(users, run_blocking)])


def login(portal: Portal, credentials: ICredentials) -> Deferred[User]:
    """Log in with a SASL mechanism's credentials and return the avatar.

    Fails with ``UnauthorizedLogin`` for bad credentials. Any other failure (unreadable users
    file, no checker for this kind of credentials) is the server's fault: the session should
    answer ``454 4.7.0``, not ``535``. Throttling of failures belongs in a wrapper around this
    (or in the session), not in the checker.
    """
    d = portal.login(credentials, None, IUser)

    def avatar(result: tuple[type[Interface], object, Callable[[], None]]) -> User:
        user = result[1]
        assert isinstance(user, User)
        return user

    return d.addCallback(avatar)


class PortalLogin:
    """:func:`login` as the callable the session takes: fires with the user name."""

    def __init__(self, portal: Portal) -> None:
        self._portal = portal

    def __call__(self, credentials: ICredentials) -> Deferred[str]:
        return login(self._portal, credentials).addCallback(lambda user: user.name)
