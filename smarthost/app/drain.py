"""SIGTERM with ``[server] drain``: time for a load balancer to take this node out.

HAProxy (or any balancer) learns that a node is going away from its health check; until the
check has failed ``fall`` times it keeps sending new connections. A daemon that closes its
listeners at SIGTERM refuses those connections (measured behind HAProxy with checks every
200 ms: hundreds of refused sessions in the quarter second before the node was marked down).
With ``drain = N`` the first SIGTERM only turns ``/healthz`` to ``503 stopping`` and keeps
serving, accepting and delivering for N seconds; then the daemon stops as SIGTERM always made
it stop. A second SIGTERM (or SIGINT, whose handler stays Twisted's) stops at once.

With workers the master drains: its ``/healthz`` is the one the balancer asks, and its
workers go on accepting on the shared sockets until the master stops them.

The handler replaces Twisted's own SIGTERM handler, so it is installed once the reactor runs
(Twisted installs its handlers as it starts), and like every handler of ours it only asks the
reactor to act (:mod:`smarthost.app.signals`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.error import ReactorNotRunning

from smarthost.app.config import Config
from smarthost.core.maillog import MailLog

Install = Callable[[int, Any], Any]  # signal.signal's shape


class DrainOnTerm(Service):
    """While the daemon runs, SIGTERM begins the drain (see the module)."""

    def __init__(self, reactor: Any, seconds: float, maillog: MailLog,
                 unhealthy: Callable[[], None], install: Install = signal.signal) -> None:
        self._reactor, self._seconds, self._log = reactor, seconds, maillog
        self._unhealthy, self._install = unhealthy, install
        self._draining = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._reactor.callWhenRunning(self._install, signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.begin)

    def begin(self) -> None:
        if self._draining:
            self._log.notice("SIGTERM again: stopping now")
            self._stop()
            return
        self._draining = True
        self._unhealthy()
        self._log.notice(
            "SIGTERM: draining for {seconds:g} s ([server] drain): /healthz answers 503, "
            "mail is still accepted; a second SIGTERM stops at once", seconds=self._seconds,
        )
        self._reactor.callLater(self._seconds, self._stop)

    def _stop(self) -> None:
        try:
            self._reactor.stop()
        except ReactorNotRunning:  # stopped meanwhile (SIGINT): nothing left to do
            pass


class _Unhealthy(Protocol):
    stopping: bool  # SiteService's: /healthz answers 503 "stopping"


def on_term(reactor: Any, config: Config, maillog: MailLog, site: _Unhealthy) -> Service:
    """The drain of ``[server] drain``, or (0) a service that leaves SIGTERM to Twisted."""
    if not config.server.drain:
        return Service()

    def unhealthy() -> None:
        site.stopping = True

    return DrainOnTerm(reactor, config.server.drain, maillog, unhealthy)
