"""The two twistd services of a running smart host: the listeners, and the queue (spool
recovery, the scheduler and the control socket). twistd starts them in order; the ports open
in ``privilegedStartService`` (before ``--uid``/``--gid`` drops root), the spool is recovered
in ``startService`` (after it, so the spool belongs to the user that runs the daemon).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory

from smarthost.app import control
from smarthost.core.maillog import MailLog
from smarthost.delivery.scheduler import Scheduler
from smarthost.queue.spool import Spool
from smarthost.smtpd import listen


class ListenerService(Service):
    """Opens every configured listener on start and closes them on stop."""

    def __init__(
        self, reactor: Any, maillog: MailLog, listeners: list[tuple[str, str, Factory, Any]]
    ) -> None:
        self._reactor = reactor
        self._log = maillog
        self._listeners = listeners
        self._ports: list[IListeningPort] = []

    def privilegedStartService(self) -> None:
        # Before twistd drops to --uid/--gid: ports below 1024 (25, 465, 587) need root.
        super().privilegedStartService()
        Deferred.fromCoroutine(self._start()).addErrback(self._failed)

    async def _start(self) -> None:
        for role, description, factory, tls in self._listeners:
            port = await listen.start_listener(
                self._reactor, description, factory, implicit_tls=tls, clock=self._reactor
            )
            self._ports.append(port)
            host = port.getHost()
            self._log.notice(
                "{role} listening on {address} ({description})",
                role=role,
                address=f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}",
                description=description,
            )
        # "ready" once everything has started: the spool is recovered in startService, after
        # the listeners (opened before twistd drops privileges) but before any connection.
        self._reactor.callWhenRunning(self._log.notice, "ready")

    def _failed(self, failure: Any) -> None:
        # A port that cannot be opened is fatal: an MTA silently missing a listener is worse.
        self._log.failure("cannot open a listener", failure=failure)
        if self._reactor.running:
            self._reactor.stop()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ports, self._ports = self._ports, []
        return DeferredList([Deferred.fromCoroutine(_stop(p)) for p in ports])


async def _stop(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


class QueueService(Service):
    """Recovers the spool, runs the scheduler, and serves the control socket the admin tool
    talks to."""

    def __init__(
        self,
        reactor: Any,
        spool: Spool,
        scheduler: Scheduler,
        maillog: MailLog,
        commands: control.ControlCommands,
    ) -> None:
        self._reactor = reactor
        self._spool = spool
        self._scheduler = scheduler
        self._log = maillog
        self._commands = commands
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        # Start-up reads every queued entry and schedules each: with 100,000 deferred messages
        # that is as many long-lived objects, and with the collector on every generation-2
        # pass walks all of them again (a fifth of recovery and half of scheduling, measured).
        collecting = gc.isenabled()
        gc.disable()
        try:
            started = self._start_queue()
        finally:
            if collecting:
                gc.enable()
        if started:
            self._listen_control()

    def _start_queue(self) -> bool:
        """Recover the spool and schedule what it holds; False when the spool is unusable."""
        try:
            report = self._spool.recover()
        except OSError as e:
            # No spool, no mail: refusing to run beats accepting what cannot be kept.
            self._log.error(
                "cannot use the spool {directory}: {error}; stopping",
                directory=self._spool.directory, error=str(e),
            )
            self._reactor.callWhenRunning(self._reactor.stop)
            return False
        self._log.notice(
            "spool {directory}: {queued} queued, {tmp} unfinished receptions removed, "
            "{torn} unfinished writes dropped, {corrupt} damaged places copied to corrupt/",
            directory=self._spool.directory,
            queued=report.queued,
            tmp=len(report.removed_tmp),
            torn=len(report.torn),
            corrupt=len(report.corrupt),
        )
        for damage in report.corrupt:
            self._log.warning(
                "spool: {segment} bytes {start}-{end} copied to {moved_to}: {reason}",
                segment=damage.segment, start=damage.start, end=damage.end,
                moved_to=damage.moved_to, reason=damage.reason,
            )
        count = self._scheduler.start()
        self._log.notice("scheduler started with {count} queued", count=count)
        return True

    def _listen_control(self) -> None:
        path = Path(self._spool.directory) / control.SOCKET_NAME
        endpoint = UNIXServerEndpoint(self._reactor, str(path), mode=0o600, wantPID=True)
        factory = control.ControlFactory(self._commands.handlers())
        endpoint.listen(factory).addCallbacks(
            self._listening, lambda f: self._log.failure("control socket", failure=f)
        )

    def _listening(self, port: IListeningPort) -> None:
        self._port = port

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        self._scheduler.stop()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None
