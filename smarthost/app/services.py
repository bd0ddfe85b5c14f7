"""The twistd services of a running smart host: the checks of what the daemon's user must
read, the queue (spool recovery, the scheduler and the control socket), the listeners, and
the signal handlers, under one :class:`DaemonService`. twistd starts them in order; the ports
open in ``privilegedStartService`` (before ``--uid``/``--gid`` drops root), everything else in
``startService`` (after it, so the spool belongs to the user that runs the daemon and the
checks read files as that user). Each reports to the :class:`~smarthost.app.startup.Startup`,
which says ``ready`` after the last or stops the whole start at the first that fails.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from smarthost.app import control, heap, startup
from smarthost.app.live import Live
from smarthost.app.recoverylog import log_recovery
from smarthost.app.startup import Startup, running_as
from smarthost.core.maillog import MailLog
from smarthost.delivery.scheduler import Scheduler
from smarthost.queue.spool import Spool
from smarthost.smtpd import listen


class DaemonService(MultiService):
    """The whole daemon. When twistd adds it to its application, it also hands twistd the
    log observer to use (the application's ``ILogObserver`` component, which twistd prefers
    to its own), so that the daemon holds the log file and can reopen it on SIGUSR1."""

    def __init__(self, log_observer: ILogObserver | None = None) -> None:
        super().__init__()
        self._log_observer = log_observer

    def setServiceParent(self, parent: Any) -> None:
        if (self._log_observer is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver) is None):
            parent.setComponent(ILogObserver, self._log_observer)
        super().setServiceParent(parent)


@attrs.frozen
class Listener:
    key: str  # the config key, e.g. "listen.smtp[0]"
    role: str
    description: str  # the endpoint string
    factory: Factory
    tls: Any  # the connection creator for implicit TLS, or None


class ListenerService(Service):
    """Opens every configured listener on start (all of them, or the start fails) and closes
    them on stop.

    A master of worker processes (:mod:`smarthost.app.master`) opens them with ``accept``
    False: the sockets listen (the kernel queues connections) but this process never
    accepts; its workers, which inherit the sockets, do. :attr:`opened` fires with the
    ports, in the order of ``listeners``, once every one listens.
    """

    def __init__(
        self, reactor: Any, maillog: MailLog, listeners: list[Listener], starting: Startup,
        *, accept: bool = True, shared: bool = False,
    ) -> None:
        self._reactor = reactor
        self._log = maillog
        self._listeners = listeners
        self._startup = starting
        self._accept = accept
        self._shared = shared  # a worker's: other processes accept on the same sockets
        self._ports: list[IListeningPort] = []
        self._stopped = False
        self.opened: Deferred[list[IListeningPort]] = Deferred()

    def privilegedStartService(self) -> None:
        # Before twistd drops to --uid/--gid: ports below 1024 (25, 465, 587) need root.
        super().privilegedStartService()
        # Most endpoints listen at once, so a failure is known before the drop; others (a
        # plugin's endpoint) answer later, and the start waits for them.
        Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        for listener in self._listeners:
            try:
                port = await listen.start_listener(
                    self._reactor, listener.description, listener.factory,
                    implicit_tls=listener.tls, clock=self._reactor,
                )
            except Exception as e:
                self._startup.fail(listener.key, _cannot_listen(listener.description, e))
                return
            if self._stopped:  # the start failed elsewhere while this port was opening
                await _stop(port)
                return
            if not self._accept:
                # Before the reactor runs (privilegedStartService): nothing was accepted.
                port.stopReading()  # type: ignore[attr-defined]
            if self._shared:
                share_accepts(port, self._reactor)
            self._ports.append(port)
            host = port.getHost()
            self._log.notice(
                "{role} listening on {address} ({description})",
                role=listener.role,
                address=f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}",
                description=listener.description,
            )
        self._startup.done(startup.LISTENERS)
        self.opened.callback(list(self._ports))

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self._stopped = True
        ports, self._ports = self._ports, []
        return DeferredList([Deferred.fromCoroutine(_stop(p)) for p in ports])


ACCEPT_PAUSE = 0.001  # seconds a worker leaves a shared socket to the others after an accept


def share_accepts(port: IListeningPort, clock: Any) -> None:
    """Accept on a socket several worker processes share, taking turns.

    Every worker waiting on the socket is woken by a new connection, and the first to run
    wins it; Twisted's port then accepts up to 100 more in one go. So the worker that woke
    first took all 20 connections a client opened at once, and the other idled for the whole
    run (measured with bench/run --workers 2: one worker at 0.0 s of CPU). Here a worker
    accepts one connection per wakeup and, after each it won, leaves the socket alone for
    :data:`ACCEPT_PAUSE`: the next connection goes to another worker that waits, or, when
    none does (all busy, or this is the only one running), waits that long at most. A worker
    busy with its sessions is not in the reactor's wait and leaves new ones to idle workers
    anyway. The port is Twisted's ``tcp.Port`` or ``unix.Port``: ``doRead`` accepts up to
    ``numberAccepts`` connections and counts them in ``sessionno``."""
    if not (hasattr(port, "numberAccepts") and hasattr(port, "sessionno")):
        return
    shared: Any = port
    read = shared.doRead

    def doRead() -> object:
        shared.numberAccepts = 1
        before = shared.sessionno
        result = read()
        if shared.sessionno != before and shared.connected:
            shared.stopReading()
            clock.callLater(ACCEPT_PAUSE, resume)
        return result

    def resume() -> None:
        if shared.connected and not shared.disconnecting:
            shared.startReading()

    shared.doRead = doRead


def _cannot_listen(description: str, error: Exception) -> str:
    if isinstance(error, CannotListenError):
        return f"cannot listen on {description!r}: {error}"
    # serverFromString's complaints: an unknown endpoint type, a port that is not a number.
    return f"{description!r} is not an endpoint Twisted can listen on: {error}"


class AccessCheck(Service):
    """Reads, as the user the daemon runs as (twistd has dropped to ``--uid`` by
    ``startService``), the files it will need while it runs: a users file only root can read
    would otherwise fail every login with 454 and nothing said at start."""

    def __init__(self, live: Live, maillog: MailLog, starting: Startup) -> None:
        self._live = live
        self._log = maillog
        self._startup = starting

    def startService(self) -> None:
        super().startService()
        if self._startup.failed:
            return
        current = self._live.current
        try:
            current.users.reload()
        except OSError as e:
            self._startup.fail(
                "auth.users",
                f"cannot read {current.users.path}: {e.strerror or e} ({running_as()})",
            )
            return
        tls = current.config.tls
        for key, path in (("tls.certificate", tls.certificate), ("tls.key", tls.key)):
            try:
                path.open("rb").close()
            except OSError as e:
                # Loaded as root before the drop, so the daemon runs; only a reload cannot.
                self._log.warning(
                    "{key}: {path}: {error} ({user}): a reload (SIGHUP) cannot load a "
                    "renewed one",
                    key=key, path=str(path), error=e.strerror or str(e), user=running_as(),
                )


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
        starting: Startup,
        steps: tuple[str, str] = (startup.QUEUE, startup.CONTROL),
    ) -> None:
        self._reactor = reactor
        self._steps = steps  # what it reports: the spool recovered, the control socket
        self._spool = spool
        self._scheduler = scheduler
        self._log = maillog
        self._commands = commands
        self._startup = starting
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        if self._startup.failed:
            return  # never take the spool's lock for a start that is already over
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
            heap.settle()
            self._startup.done(self._steps[0])
            self._listen_control()

    def _start_queue(self) -> bool:
        """Recover the spool and schedule what it holds; False when the spool is unusable."""
        try:
            report = self._spool.recover()
        except OSError as e:
            # No spool, no mail: refusing to run beats accepting what cannot be kept.
            problem = f"cannot use the spool {self._spool.directory}: {e}"
            if isinstance(e, PermissionError):
                problem += f" ({running_as()})"
            self._startup.fail("queue.directory", problem)
            return False
        log_recovery(self._log, self._spool.directory, report)  # every queue id damage hit
        count = self._scheduler.start()
        self._log.notice("scheduler started with {count} queued", count=count)
        return True

    def _listen_control(self) -> None:
        control.listen_control(
            self._reactor, str(self._spool.directory), self._commands
        ).addCallbacks(self._listening, self._control_failed)

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        self._startup.done(self._steps[1])

    def _control_failed(self, failure: Failure) -> None:
        # Without it `smarthost queue flush|delete` cannot reach this daemon: not a full start.
        path = Path(self._spool.directory) / control.SOCKET_NAME
        problem = failure.getErrorMessage().removeprefix("queue.directory: ")
        self._startup.fail("queue.directory", f"cannot make the control socket {path}: {problem}")

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        self._scheduler.stop()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None
