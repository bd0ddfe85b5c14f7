"""Users from the office directory: Active Directory or OpenLDAP through ldaptor (SPEC
"Users from the office directory").

A password is checked the way every LDAP-aware service does it: the service account
(``bind_dn``) searches for the one entry matching the name, then a fresh connection binds
as that entry's DN with the client's password. The directory is only ever spoken to over
TLS (``ldaps://`` or StartTLS, verified against ``[tls] ca_file`` or the system's CAs): a
simple bind carries the password in the clear, so :class:`LdapSettings` refuses a plain
``ldap://`` URL without StartTLS, and the bind is only written once ``startTLS`` has
switched the transport (Twisted's TLS layer holds every write until the handshake, and a
failed verification closes the connection before anything leaves).

Answers the portal can act on:

- the user and the password match: a :class:`DirectoryUser` (name, DN, the senders it
  owns), kept for ``cache_seconds`` under a keyed hash of name and password, so a burst of
  logins (a phone polling every minute) does not hammer the directory;
- no entry has that name: :class:`smarthost.auth.cred.UnknownName`, so the next backend of
  ``[auth] backends`` may know it;
- wrong password, an empty one (an "unauthenticated bind" succeeds in LDAP, RFC 4513
  5.1.2), or not in ``require_group``: ``UnauthorizedLogin`` (535, counted);
- the directory does not answer (refused, timeout, TLS failure, the service account
  refused): :class:`DirectoryUnavailable`, which the session answers ``454 4.7.0`` without
  counting it against anyone (SPEC: never a wrong accept, never a lockout).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Coroutine, Iterator, Mapping
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import attrs
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldaperrors, ldapsyntax
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from smarthost.auth.cred import UnknownName

_log = Logger(namespace="smarthost.ldap")
_T = TypeVar("_T")

MAX_CACHED = 10_000


class DirectoryUnavailable(Exception):
    """The directory did not answer as a directory should: our problem, not the client's."""


def url_problem(url: str, starttls: bool) -> str | None:
    """Why ``url`` with ``starttls`` cannot be used (None: it can): only TLS is allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        return f"{url!r} is not an ldap:// or ldaps:// URL"
    if parts.scheme == "ldap" and not starttls:
        return "a password would cross the network in the clear: use ldaps:// or starttls = true"
    if parts.scheme == "ldaps" and starttls:
        return "ldaps:// is already TLS: starttls = true is for ldap://"
    return None


@attrs.frozen
class LdapSettings:
    """``[auth.ldap]``, with the service account's password already read from its file."""

    url: str
    base: str
    bind_dn: str
    bind_password: str = attrs.field(repr=False)
    starttls: bool = False
    filter: str = "(&(objectClass=person)(|(uid={user})(mail={user})(userPrincipalName={user})))"
    sender_attributes: tuple[str, ...] = ("mail",)
    require_group: str = ""
    timeout: float = 10.0
    cache_seconds: float = 60.0

    def __attrs_post_init__(self) -> None:
        problem = url_problem(self.url, self.starttls)
        if problem is not None:
            raise ValueError(problem)
        if "{user}" not in self.filter:
            raise ValueError("filter must contain {user}")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (636 if parts.scheme == "ldaps" else 389)

    @property
    def implicit_tls(self) -> bool:
        return urlsplit(self.url).scheme == "ldaps"


@attrs.frozen
class DirectoryUser:
    name: str
    dn: str
    senders: frozenset[str]


def owned_senders(entry: Mapping[str, Any], attributes: tuple[str, ...]) -> frozenset[str]:
    """The addresses an entry owns as senders: every value of ``attributes`` and the
    ``smtp:`` entries of Active Directory's ``proxyAddresses`` (``SMTP:`` is the primary
    one; ``X400:``, ``SIP:`` and the rest are not mail addresses)."""
    found: set[str] = set()
    for name, values in entry.items():
        key = name.lower()
        for raw in values:
            value = _text(raw)
            if key == "proxyaddresses":
                scheme, _, address = value.partition(":")
                if scheme.lower() == "smtp" and "@" in address:
                    found.add(address.strip().lower())
            elif key in {a.lower() for a in attributes} and "@" in value:
                found.add(value.strip().lower())
    return frozenset(found)


def _text(value: str | bytes) -> str:
    """ldaptor answers attribute names as bytes or str depending on where they came from."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class Connect(Protocol):
    def __call__(self) -> Deferred[LDAPClient]: ...


class LdapConnector:
    """Opens one TLS connection to the directory: implicit (``ldaps://``) or StartTLS."""

    def __init__(self, reactor: Any, settings: LdapSettings,
                 tls: IOpenSSLClientConnectionCreator) -> None:
        self._reactor, self._settings, self._tls = reactor, settings, tls

    def __call__(self) -> Deferred[LDAPClient]:
        return Deferred.fromCoroutine(self._connect())

    async def _connect(self) -> LDAPClient:
        s = self._settings
        endpoint: Any = HostnameEndpoint(self._reactor, s.host, s.port, timeout=s.timeout)
        if s.implicit_tls:
            endpoint = wrapClientTLS(self._tls, endpoint)
        client = LDAPClient()
        await connectProtocol(endpoint, client)  # type: ignore[no-untyped-call]
        if s.starttls:
            # Answers once the server agreed and the transport switched; a bind written
            # after this waits for the handshake and is dropped if verification fails.
            await client.startTLS(self._tls)
        return client


class LdapDirectory:
    """The questions the checkers ask the directory, over one persistent service connection
    (opened again when it was lost) plus one short connection per password check."""

    def __init__(self, settings: LdapSettings, connect: Connect, clock: IReactorTime) -> None:
        self._settings, self._connect, self._clock = settings, connect, clock
        self._service: LDAPClient | None = None
        self._lock = DeferredLock()
        self._cache: dict[bytes, tuple[float, DirectoryUser]] = {}
        self._cache_key = os.urandom(32)

    @property
    def name(self) -> str:
        return self._settings.url

    async def authenticate(self, name: str, password: bytes) -> DirectoryUser:
        """The user ``name`` proves to be with ``password``; see the module for the errors."""
        key = hmac.new(self._cache_key, name.encode() + b"\0" + password, hashlib.sha256).digest()
        cached = self._cache.get(key)
        now = self._clock.seconds()
        if cached is not None and cached[0] > now:
            return cached[1]
        user = await self.lookup(name)
        if user is None:
            raise UnknownName()
        if not password:
            raise UnauthorizedLogin()
        await self._guarded(self._user_bind(user.dn, password))
        if len(self._cache) >= MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        if len(self._cache) < MAX_CACHED:
            self._cache[key] = (now + self._settings.cache_seconds, user)
        return user

    async def lookup(self, name: str) -> DirectoryUser | None:
        """The entry named ``name`` (None: none), and not a member of ``require_group``
        raises ``UnauthorizedLogin``. Retried once on a new service connection when the
        old one turns out to be closed (the directory restarted)."""
        had_service = self._service is not None
        try:
            return await self._guarded(self._lookup(name))
        except DirectoryUnavailable:
            if not had_service or (self._service is not None and self._service.connected):
                raise
            self._service = None
            return await self._guarded(self._lookup(name))

    async def _lookup(self, name: str) -> DirectoryUser | None:
        s = self._settings
        if not name or len(name) > 256:
            return None
        client = await self._service_client()
        attributes = [*s.sender_attributes, "proxyAddresses"]
        found = await ldapsyntax.LDAPEntry(client, s.base).search(
            filterText=s.filter.replace("{user}", pureldap.escape(name)),
            attributes=attributes, sizeLimit=2, sizeLimitIsNonFatal=True,
        )
        if len(found) != 1:
            return None  # no entry, or two: which one the client meant is unknowable
        entry = found[0]
        dn = entry.dn.getText()
        if s.require_group and not await self._is_member(client, dn):
            _log.info("LDAP: {name} is not a member of {group}", name=name,
                      group=s.require_group)
            raise UnauthorizedLogin()
        values = {_text(k): list(v) for k, v in entry.items()}
        return DirectoryUser(name, dn, owned_senders(values, s.sender_attributes))

    async def _is_member(self, client: LDAPClient, dn: str) -> bool:
        value = pureldap.escape(dn)
        found = await ldapsyntax.LDAPEntry(client, self._settings.require_group).search(
            filterText=f"(|(member={value})(uniqueMember={value}))",
            scope=pureldap.LDAP_SCOPE_baseObject, attributes=["1.1"],
        )
        return len(found) == 1

    async def _service_client(self) -> LDAPClient:
        await self._lock.acquire()
        try:
            if self._service is None or not self._service.connected:
                self._service = None
                client = await self._connect()
                try:
                    await client.bind(self._settings.bind_dn, self._settings.bind_password)
                except ldaperrors.LDAPException as e:
                    client.transport.loseConnection()
                    raise DirectoryUnavailable(f"service account refused: {e}") from None
                self._service = client
            return self._service
        finally:
            self._lock.release()

    async def _user_bind(self, dn: str, password: bytes) -> None:
        client = await self._connect()
        try:
            await client.bind(dn, password)
        except ldaperrors.LDAPInvalidCredentials:
            raise UnauthorizedLogin() from None
        finally:
            if client.connected:
                client.unbind()

    async def _guarded(self, work: Coroutine[Any, Any, _T]) -> _T:
        """``work`` within the timeout; any failure that is not an answer about the user
        becomes :class:`DirectoryUnavailable`, logged naming the directory."""
        d = Deferred.fromCoroutine(work)
        d.addTimeout(self._settings.timeout, self._clock)
        try:
            return await d
        except UnauthorizedLogin:
            raise
        except Exception as e:
            if self._service is not None and not self._service.connected:
                self._service = None
            reason = str(e) or type(e).__name__
            _log.warn("LDAP directory {url} did not answer: {reason}",
                      url=self._settings.url, reason=reason)
            raise DirectoryUnavailable(f"{self._settings.url}: {reason}") from None


class DirectorySenders(Mapping[str, frozenset[str]]):
    """``[relay.senders]`` plus what the directory said each user owns at its last login:
    the mapping the relay policy asks (``RelayPolicy(senders=...)``)."""

    def __init__(self, static: Mapping[str, frozenset[str]]) -> None:
        self._static = static
        self._learned: dict[str, frozenset[str]] = {}

    def learn(self, user: DirectoryUser) -> None:
        self._learned[user.name] = user.senders

    def __getitem__(self, name: str) -> frozenset[str]:
        if name not in self._static and name not in self._learned:
            raise KeyError(name)
        return self._static.get(name, frozenset()) | self._learned.get(name, frozenset())

    def __iter__(self) -> Iterator[str]:
        return iter(set(self._static) | set(self._learned))

    def __len__(self) -> int:
        return len(set(self._static) | set(self._learned))


@implementer(ICredentialsChecker)
class LdapChecker:
    """PLAIN and LOGIN passwords checked against the directory (``"ldap"`` in
    ``[auth] backends``); the senders the user owns go to ``senders`` for the policy."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, directory: LdapDirectory, senders: DirectorySenders) -> None:
        self._directory, self._senders = directory, senders

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, creds: IUsernamePassword) -> bytes | tuple[()]:
        try:
            name = creds.username.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UnknownName() from None
        user = await self._directory.authenticate(name, creds.password)
        self._senders.learn(user)
        return user.name.encode("utf-8")
