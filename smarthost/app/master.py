"""``[server] workers`` N > 1: a master process and N workers sharing its listening sockets.

The master is what twistd runs (and what systemd supervises). It

- opens every ``[listen]`` socket in ``privilegedStartService``, before twistd drops to
  ``--uid``/``--gid`` (ports below 1024), and never accepts on them itself;
- starts N workers (:mod:`smarthost.app.worker`), each the single-process daemon with its
  own spool ``<[queue] directory>/worker-<i>`` and its own delivery, inheriting the sockets at
  descriptors 3, 4, ... (systemd's convention, so a worker adopts them with Twisted's
  ``systemd:`` endpoints; :mod:`smarthost.app.workerconfig` derives its configuration,
  :mod:`smarthost.app.workerproc` runs the process); every worker that waits is woken by a
  new connection and they take turns (:func:`smarthost.app.services.share_accepts`). One
  queue of connections rather than ``SO_REUSEPORT`` sockets per worker: a connection the
  kernel queued is taken by whichever worker runs, never left behind a dead worker's socket,
  and the same holds for unix and systemd sockets, which ``SO_REUSEPORT`` does not spread;
- is ``ready`` (the log line, and ``READY=1`` to systemd) once every worker said it is ready,
  through a pipe on which each worker speaks sd_notify (:mod:`smarthost.app.notify`). A
  worker that ends before that stops the whole start with exit status 1, naming the worker
  and the cause the worker gave (its ``STATUS=`` line): all or nothing, as one daemon;
- restarts a worker that dies, after :func:`restart_delay` (0.5 s, doubling to 30 s while it
  keeps dying soon after its start). Nothing it answered 250 is lost: its spool is on disk
  and the restarted worker recovers it, as a restarted single daemon does, while the other
  workers take the new connections;
- fans signals out: SIGTERM (and SIGINT) stop every worker (SIGTERM each, wait for all, SIGKILL
  after :data:`STOP_TIMEOUT`), then the master ends as twistd ends (by the signal that
  stopped it, which systemd counts as a clean stop); SIGHUP re-reads the file (a broken one
  is refused by the master, with nothing sent on), warns about what only a restart of the
  master applies (listeners, workers, ``[http]``, the spool root) and sends SIGHUP to every
  worker, which reloads as one daemon does; SIGUSR1 reopens the master's log and is sent on;
- re-emits every worker's log lines into its own log (:mod:`smarthost.app.workerlog`);
- serves ``[http] listen`` itself (:mod:`smarthost.app.masterhttp`): ``/metrics`` adds up
  what each ready worker serves on its ``http.sock``, ``/healthz`` is 200 while the master
  is ready.

Spools that hold mail and belong to no worker (``workers`` lowered, or raised from 1 with mail
still in the root spool) are named at start and served by worker 1 as well
(:mod:`smarthost.app.orphans`).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import globalLogPublisher, textFileLogObserver
from twisted.python.logfile import LogFile

from smarthost.app import (
    checks,
    drain,
    http,
    masterhttp,
    orphans,
    reload,
    startup,
    tlscert,
    workerspools,
)
from smarthost.app.config import Config, ConfigError
from smarthost.app.logfiles import LogReopener
from smarthost.app.notify import SystemdNotify
from smarthost.app.services import DaemonService, Listener, ListenerService
from smarthost.app.signals import SignalService
from smarthost.app.startup import ExitStatus, Startup, running_as
from smarthost.app.workerconfig import (
    FIRST_LISTEN_FD,
    adopted_description,
)
from smarthost.app.workerlog import Emit, FileSink, PublisherSink, Sink
from smarthost.app.workerproc import WorkerCommand, WorkerProtocol
from smarthost.core.maillog import EventFile, MailLog
from smarthost.queue.segment import DIR_MODE

WORKERS = "workers"  # the start-up step: every worker ready
FIRST_RESTART_DELAY = 0.5  # seconds
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 30.0  # a worker that ran this long before it died is restarted at once again
STOP_TIMEOUT = 60.0  # seconds a worker gets to stop on SIGTERM before SIGKILL
SHARED_KINDS = ("tcp", "tcp6", "unix", "systemd")  # endpoints whose socket a worker adopts
# Keys only a restart of the master applies (the workers never see them change).
MASTER_KEYS = ("listen", "server.workers", "server.cpu_affinity", "http", "queue.directory")


def restart_delay(failures: int) -> float:
    """Seconds before the restart that follows ``failures`` deaths in a row (1, 2, ...)."""
    return min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * 2.0 ** max(0, failures - 1))


def check_listeners(config: Config) -> None:
    """Raises :class:`ConfigError` for a listener a worker cannot adopt: the master passes
    plain sockets, and TLS or a plugin's transport would not come with them."""
    for _, key, description in checks.listeners(config):
        kind = description.removeprefix("haproxy:").partition(":")[0]
        if kind not in SHARED_KINDS:
            raise ConfigError(key, (
                f"{description!r}: with [server] workers > 1 every listener is a socket the "
                "workers share: tcp:, tcp6:, unix: or systemd: (haproxy: in front of any); "
                "submissions listeners get implicit TLS without ssl:"
            ))


class Handle(Protocol):
    """The slice of Twisted's process transport the supervisor uses."""

    pid: int | None

    def signalProcess(self, signal: str | int) -> None: ...


class StartupSteps(Protocol):
    ready: bool
    failed: bool

    def done(self, step: str) -> None: ...

    def fail(self, key: str, problem: str) -> None: ...


Launch = Callable[[int], Handle]  # start worker i (its ProcessProtocol reports back)


@attrs.define
class _Slot:
    index: int
    process: Handle | None = None
    started_at: float = 0.0
    ready: bool = False
    failures: int = 0  # deaths in a row, each soon after its start
    status: str = ""  # the worker's last STATUS= line: why it could not start
    restart: IDelayedCall | None = None
    reloading: bool = False


class Supervisor:
    """Keeps N workers running: starts, readiness, restarts, signals, stop.

    Time is the injected ``clock`` and a process is whatever ``launch`` returns, so the
    restart schedule is tested in virtual time (tests/unit/test_master.py).
    """

    def __init__(self, clock: Any, count: int, launch: Launch, maillog: MailLog,
                 starting: StartupSteps, notify: SystemdNotify) -> None:
        self._clock = clock
        self._launch = launch
        self._log = maillog
        self._startup = starting
        self._notify = notify
        self.slots = [_Slot(i) for i in range(1, count + 1)]
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._kill: IDelayedCall | None = None

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        slot.restart = None
        if self._stopping:
            return
        slot.ready, slot.status, slot.reloading = False, "", False
        slot.started_at = self._clock.seconds()
        try:
            slot.process = self._launch(slot.index)
        except OSError as e:
            slot.process = None
            self._died(slot, f"could not be started: {e.strerror or e}")

    # -- what a worker says ------------------------------------------------------------

    def notified(self, index: int, field: str) -> None:
        slot = self.slots[index - 1]
        if field.startswith("STATUS="):
            slot.status = field.removeprefix("STATUS=")
        elif field == "READY=1":
            if slot.reloading:
                slot.reloading = False
                self._reload_progress()
            elif not slot.ready:
                slot.ready = True
                if self._startup.ready:
                    self._log.notice("worker-{index} is back", index=index)
                elif all(s.ready for s in self.slots):
                    self._startup.done(WORKERS)

    def ended(self, index: int, how: str) -> None:
        slot = self.slots[index - 1]
        slot.process = None
        if self._stopping:
            self._check_stopped()
            return
        self._died(slot, how)

    def _died(self, slot: _Slot, how: str) -> None:
        if slot.reloading:
            slot.reloading = False
            self._reload_progress()
        if not self._startup.ready:
            # All or nothing: a worker that cannot start fails the master's start.
            cause = slot.status.removeprefix("cannot start: ") or f"worker {how}"
            self._startup.fail(f"worker-{slot.index}", cause)
            return
        ran = self._clock.seconds() - slot.started_at
        slot.failures = 1 if slot.ready and ran >= STABLE_AFTER else slot.failures + 1
        slot.ready = False
        delay = restart_delay(slot.failures)
        self._log.warning(
            "worker-{index} {how}{why}; restarting it in {delay:g} s",
            index=slot.index, how=how, delay=delay,
            why=f" ({slot.status})" if slot.status else "",
        )
        slot.restart = self._clock.callLater(delay, self._spawn, slot)

    # -- signals ---------------------------------------------------------------------------

    def serving(self) -> list[int]:
        """The workers that run and said they are ready (their HTTP side listens)."""
        return [slot.index for slot in self.slots if slot.process is not None and slot.ready]

    def send(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None:
                _signal(slot.process, signum)

    def reload(self) -> None:
        """SIGHUP to every running worker; READY=1 to systemd once each has reloaded."""
        self._notify.reloading()
        for slot in self.slots:
            if slot.process is not None and slot.ready:
                slot.reloading = True
                _signal(slot.process, signal.SIGHUP)
        self._reload_progress()

    def _reload_progress(self) -> None:
        if not any(s.reloading for s in self.slots):
            self._notify.ready()

    def stop(self) -> Deferred[None]:
        """SIGTERM to every worker; fires once all have ended (SIGKILL after a timeout)."""
        self._stopping = True
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
        self._stopped = Deferred()
        self.send(signal.SIGTERM)
        self._kill = self._clock.callLater(STOP_TIMEOUT, self._kill_remaining)
        stopped = self._stopped
        self._check_stopped()
        return stopped

    def _kill_remaining(self) -> None:
        self._kill = None
        for slot in self.slots:
            if slot.process is not None:
                self._log.warning(
                    "worker-{index} did not stop within {timeout:g} s of SIGTERM; SIGKILL",
                    index=slot.index, timeout=STOP_TIMEOUT,
                )
                _signal(slot.process, signal.SIGKILL)

    def _check_stopped(self) -> None:
        if self._stopped is None or any(s.process is not None for s in self.slots):
            return
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self._kill = None
        stopped, self._stopped = self._stopped, None
        stopped.callback(None)


def _signal(process: Handle, signum: int) -> None:
    try:
        process.signalProcess(signum)
    except (OSError, ProcessExitedAlready):
        pass  # it ended meanwhile: its processEnded is on its way


class _NoSessions(Factory):
    """The master's listeners never accept; should one ever, the connection is closed."""

    noisy = False  # no "Starting factory" lines

    def buildProtocol(self, addr: Any) -> None:
        return None


class WorkersService(Service):
    """Starts the workers once the listeners listen (after twistd's privilege drop), stops
    them on stop."""

    def __init__(self, reactor: Any, config: Config, command: WorkerCommand,
                 listeners: ListenerService, keys: list[Listener], maillog: MailLog,
                 starting: Startup, notify: SystemdNotify, sinks: Callable[[int], Sink]) -> None:
        self._reactor = reactor
        self._config = config
        self._command = command
        self._listeners = listeners
        self._keys = keys
        self._log = maillog
        self._startup = starting
        self._sinks = sinks
        self.supervisor = Supervisor(reactor, command.count, self._launch, maillog, starting,
                                     notify)
        self._fds: list[int] = []
        self._listen: dict[str, tuple[str, ...]] = {}
        self._names: list[str] = []
        self._orphans: tuple[Path, ...] = ()  # served by worker 1 (smarthost.app.orphans)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._startup.failed:
            return
        self._listeners.opened.addCallback(self._opened)

    def _opened(self, ports: list[IListeningPort]) -> None:
        if not self.running or self._startup.failed or not self._make_spools():
            return
        listen: dict[str, list[str]] = {}
        for k, (listener, port) in enumerate(zip(self._keys, ports, strict=True)):
            sock: socket.socket = port.socket  # type: ignore[attr-defined]
            self._fds.append(sock.fileno())
            self._names.append(listener.key)
            listen.setdefault(listener.role, []).append(
                adopted_description(listener.description, sock.family, k)
            )
        self._listen = {role: tuple(found) for role, found in listen.items()}
        self._orphans = tuple(orphans.unserved(self._config, self._command.count,
                                               self._reactor, self._log))
        self._log.notice("starting {count} workers", count=self._command.count)
        self.supervisor.start()

    def _make_spools(self) -> bool:
        """Each worker's spool directory, made by the master (as the user it runs as): a
        worker serves its HTTP side in it before its own start-up would make it."""
        for i in range(1, self._command.count + 1):
            path = workerspools.worker_spool(self._config, i)
            try:
                os.makedirs(path, mode=DIR_MODE, exist_ok=True)
            except OSError as e:
                problem = f"cannot make the spool {path}: {e.strerror or e} ({running_as()})"
                self._startup.fail("queue.directory", problem)
                return False
        return True

    def _launch(self, index: int) -> Handle:
        notify_fd = FIRST_LISTEN_FD + len(self._fds)
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r", notify_fd: "r"}
        for k, fd in enumerate(self._fds):
            child_fds[FIRST_LISTEN_FD + k] = fd
        protocol = WorkerProtocol(index, self.supervisor, self._sinks(index), notify_fd,
                                  self._reactor)
        argv = self._command.argv(index)
        env = self._command.environment(index, self._listen, self._names, notify_fd,
                                        os.environ, self._orphans if index == 1 else ())
        try:
            process: Any = self._reactor.spawnProcess(
                protocol, argv[0], argv, env=env, childFDs=child_fds
            )
        except OSError as e:  # the interpreter cannot be run by the user the master runs as
            raise OSError(e.errno, f"{e.strerror or e}: {argv[0]} ({running_as()})") from None
        process.closeStdin()  # a worker reads nothing from the master: EOF at once
        self._log.notice("worker-{index} started (pid {pid})", index=index, pid=process.pid)
        handle: Handle = process
        return handle

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.supervisor.stop()


def make_master_service(
    config: Config,
    reactor: Any,
    *,
    count: int,
    command: WorkerCommand,
    load: Callable[[], Config],
    environ: Mapping[str, str] = os.environ,
    log_file: LogFile | None = None,
    log_stdout: bool = False,
) -> MultiService:
    """The master as one twistd service (see the module docstring). ``log_file`` is twistd's
    log file, ``log_stdout`` says twistd logs to standard output instead: in both cases the
    master holds the file its workers' lines are written to."""
    events = EventFile(str(config.log.events)) if config.log.events else None
    maillog = MailLog(reactor, events)
    notify = SystemdNotify.from_environment(
        environ, lambda text: maillog.warning("{detail}", detail=text)
    )
    steps = (startup.LISTENERS, WORKERS, *((http.STEP,) if config.http.listen else ()))
    starting = Startup(reactor, maillog, notify, ExitStatus(), steps)
    out: Any = log_file if log_file is not None else sys.stdout if log_stdout else None
    top = DaemonService(None if out is None else textFileLogObserver(out))
    _self_signed(config, maillog)
    keys = [Listener(key, role, description, _NoSessions(), None)
            for role, key, description in checks.listeners(config)]
    listeners = ListenerService(reactor, maillog, keys, starting, accept=False)
    shared = FileSink(out, reactor) if out is not None else None

    def sinks(index: int) -> Sink:
        emit: Emit = globalLogPublisher
        return shared or PublisherSink(emit, reactor, f"worker-{index}")

    workers = WorkersService(reactor, config, command, listeners, keys, maillog, starting,
                             notify, sinks)
    supervisor = workers.supervisor
    # First, so that it stops last: /healthz answers 503 while the workers stop.
    sources = masterhttp.MasterSources(
        sockets=lambda: [workerspools.http_socket(config, i) for i in supervisor.serving()],
        ready=lambda: starting.ready, startup=starting, hostname=lambda: config.hostname,
        maillog=maillog, expected=lambda: count,
    )
    site = masterhttp.make_master_http_service(reactor, config.http.listen, sources)
    site.setServiceParent(top)  # type: ignore[no-untyped-call]
    # The master drains: its /healthz is what a balancer asks; the workers go on accepting.
    drain.on_term(reactor, config, maillog, site).setServiceParent(top)  # type: ignore[no-untyped-call]
    for service in (listeners, workers):
        service.setServiceParent(top)  # type: ignore[no-untyped-call]
    _signals(reactor, config, load, maillog, starting, notify, supervisor,
             LogReopener(log_file, maillog)).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top


def _signals(reactor: Any, config: Config, load: Callable[[], Config], maillog: MailLog,
             starting: Startup, notify: SystemdNotify, supervisor: Supervisor,
             reopener: LogReopener) -> SignalService:
    """SIGHUP: the file checked by the master, then a reload of every worker; SIGUSR1: the
    master's log reopened, then every worker's."""

    def hangup() -> None:
        if not starting.ready:
            maillog.warning("SIGHUP ignored: the daemon is still starting")
            return
        if _reload_master(config, load, maillog):
            supervisor.reload()
        else:  # systemd (Type=notify-reload) waits for READY=1 after a refusal too
            notify.reloading()
            notify.ready()

    def reopen() -> None:
        reopener.reopen()
        supervisor.send(signal.SIGUSR1)

    return SignalService(reactor, {signal.SIGHUP: hangup, signal.SIGUSR1: reopen})


def _self_signed(config: Config, maillog: MailLog) -> None:
    """A self-signed pair made by the master, before any worker exists: N workers would race
    to write one (each loads the pair; a worker that cannot says so and fails the start)."""
    try:
        made = tlscert.ensure_self_signed(config.hostname, config.tls.certificate,
                                          config.tls.key)
    except OSError:
        return  # the workers' start-up names the problem
    if made:
        maillog.notice("generated a self-signed certificate for {hostname} in {path}",
                       hostname=config.hostname, path=str(config.tls.certificate))


def _reload_master(running: Config, load: Callable[[], Config], maillog: MailLog) -> bool:
    """The file checked by the master before the workers load it; False: refused."""
    try:
        loaded = load()
    except ConfigError as e:
        key = e.key or "config"
        maillog.error(
            "reload refused: {key}: {problem}; the running configuration stays",
            key=key, problem=str(e).removeprefix(f"{key}: "),
        )
        return False
    for key in reload.changed_keys(running, loaded):
        if any(key == k or key.startswith(k + ".") for k in MASTER_KEYS):
            maillog.warning(
                "reload: {key} changed; it needs a restart of the master (the running value "
                "stays)", key=key,
            )
    maillog.notice("reload: SIGHUP sent to the workers")
    return True
