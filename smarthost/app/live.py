"""What a reload replaces, held in one place.

A :class:`Generation` is everything built from one loaded configuration that sessions and
deliveries read: the session factories of each role (policy, portal, limits, plugins, TLS
options and settings inside them), the server certificate, the routing of new deliveries,
the plugins that observe deliveries. :class:`Live` holds the current one, and the long-lived
parts (the listening ports, the scheduler) reach it only through the small adapters below, so
a reload is one assignment: a connection accepted after it gets the new generation, a
session already running keeps the one it started with, and the next delivery attempt routes
by the new rules. Nothing is torn down: the old generation goes when its last session ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from OpenSSL.SSL import Connection
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory
from zope.interface import implementer

from smarthost.app.config import Config
from smarthost.auth.users import UsersFile
from smarthost.core.enums import Role
from smarthost.core.envelope import Outcome, QueueEntry
from smarthost.delivery.courier import Resolve
from smarthost.delivery.routing import Route
from smarthost.smtpd.limits import Limits


@attrs.frozen
class Generation:
    config: Config
    factories: Mapping[Role, Factory]  # one session factory per role
    server_tls: Any  # CertificateOptions: STARTTLS and implicit TLS
    certificate: str  # the leaf certificate, described for the log
    users: UsersFile
    limits: Limits  # the abuse counters, kept by a reload that leaves [limits] alone
    resolve: Resolve  # routing of the next delivery attempts
    observe: Callable[[QueueEntry, Outcome], None]  # the plugins that watch deliveries
    dns: Any  # the DNS client, kept by a reload that does not change the name servers


class Live:
    """The current generation. Made empty, so the long-lived parts can be built with it
    before the first generation (which needs them) exists."""

    def __init__(self) -> None:
        self._current: Generation | None = None

    @property
    def current(self) -> Generation:
        assert self._current is not None, "no configuration loaded yet"
        return self._current

    def swap(self, generation: Generation) -> Generation | None:
        """Make ``generation`` current; the previous one."""
        previous, self._current = self._current, generation
        return previous

    def resolve(self, domain: str, *, mta_sts: bool = True) -> Deferred[Route]:
        # The default is left unsaid, so a generation's one-argument resolver will do.
        resolve = self.current.resolve
        return resolve(domain) if mta_sts else resolve(domain, mta_sts=False)

    def observe(self, entry: QueueEntry, outcome: Outcome) -> None:
        self.current.observe(entry, outcome)


class LiveSessionFactory(Factory):
    """The factory a listening port keeps for its life: each connection is built by the
    current generation's factory for the role."""

    def __init__(self, live: Live, role: Role) -> None:
        self._live, self._role = live, role

    def buildProtocol(self, addr: Any) -> Any:
        return self._live.current.factories[self._role].buildProtocol(addr)


@implementer(IOpenSSLServerConnectionCreator)
class LiveServerTLS:
    """Implicit TLS (port 465) with the current generation's certificate: each handshake
    asks for it, so a renewed certificate is served from the first connection after a
    reload."""

    def __init__(self, live: Live) -> None:
        self._live = live

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Connection:
        options = self._live.current.server_tls
        if IOpenSSLServerConnectionCreator.providedBy(options):
            connection: Connection = options.serverConnectionForTLS(tlsProtocol)
            return connection
        return Connection(options.getContext(), None)
