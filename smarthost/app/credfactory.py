"""Our users file for any twistd server, and any strcred checker for us.

``--auth smarthost-users:PATH`` (``twisted.cred.strcred``) gives another Twisted server
(``twistd web``, ``twistd ftp``, ...) the bcrypt checker of :mod:`smarthost.auth.users` over a users
file written by ``smarthost passwd``: one password per person for every service. The factory
is in ``twisted/plugins/smarthost_checkers.py``; it imports this module only when used.

The other direction: ``twistd smarthost --auth file:PATH`` (any checker for user name and
password) adds checkers to our portal. A portal keeps one checker per credentials interface,
so registering another password checker would *replace* the users file; :func:`add_checkers`
chains them instead: the users file first, then each ``--auth`` checker in the order given,
and the first that accepts wins. They serve AUTH PLAIN and LOGIN only: CRAM-MD5 and SCRAM need
secrets that only the users file holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from zope.interface import implementer

from smarthost.auth.cred import BcryptChecker
from smarthost.auth.users import UsersFile


def users_checker(argstring: str, auth_type: str = "smarthost-users") -> BcryptChecker:
    """The checker behind ``--auth smarthost-users:PATH`` (the lazy factory in
    twisted/plugins/smarthost_checkers.py calls this when a server asks for it)."""
    from twisted.internet.threads import deferToThread

    if not argstring.strip():
        raise ValueError(f"{auth_type} needs the path of a users file")
    path = Path(argstring)
    # A typo must not start a server where nobody can log in (a missing file means no
    # users to UsersFile, which suits our own default config, not an explicit --auth).
    if not path.is_file():
        raise ValueError(f"{auth_type}: no users file at {path}")
    return BcryptChecker(UsersFile(path), deferToThread)


@implementer(ICredentialsChecker)
class FirstOf:
    """Asks each checker in turn; the first avatar id wins. A refusal (UnauthorizedLogin)
    moves on to the next checker; any other failure (an unreadable file) is the server's
    problem and is passed on, so the session answers 454, not 535."""

    def __init__(self, checkers: Sequence[ICredentialsChecker]) -> None:
        self.checkers = tuple(checkers)
        self.credentialInterfaces = tuple(
            {i: None for c in self.checkers for i in c.credentialInterfaces}
        )

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        return Deferred.fromCoroutine(self._first(credentials))

    async def _first(self, credentials: Any) -> bytes | tuple[()]:
        for checker in self.checkers:
            if not any(i.providedBy(credentials) for i in checker.credentialInterfaces):
                continue
            try:
                avatar_id = await checker.requestAvatarId(credentials)
            except UnauthorizedLogin:
                continue
            # Our realm takes user names as bytes; some checkers answer str.
            return avatar_id.encode("utf-8") if isinstance(avatar_id, str) else avatar_id
        raise UnauthorizedLogin()


def with_checkers(portal: Portal, checkers: Sequence[ICredentialsChecker]) -> Portal:
    """``portal``, with ``checkers`` asked after the ones it has, for each interface they
    check."""
    for checker in checkers:
        for interface in checker.credentialInterfaces:
            existing = portal.checkers.get(interface)
            if existing is None:
                portal.checkers[interface] = checker
            elif isinstance(existing, FirstOf):
                portal.checkers[interface] = FirstOf([*existing.checkers, checker])
            else:
                portal.checkers[interface] = FirstOf([existing, checker])
    return portal
