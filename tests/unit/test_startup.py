"""All-or-nothing start-up, the exit status twistd cannot give, and the signal handlers:
each on a fake reactor whose start and stop the test drives."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import provider

from smarthost.app import startup
from smarthost.app.notify import SystemdNotify
from smarthost.app.signals import SignalService
from smarthost.app.startup import ExitStatus, Startup
from smarthost.core.maillog import MailLog


class FakeReactor:
    """What Startup and SignalService use of the reactor, and nothing running."""

    def __init__(self) -> None:
        self.running = False
        self.stopped = 0
        self._when_running: list[Callable[[], object]] = []
        self.triggers: list[tuple[str, str, Callable[[], object]]] = []
        self.from_thread: list[Callable[[], object]] = []

    def callWhenRunning(self, f: Callable[[], object]) -> None:
        if self.running:
            f()
        else:
            self._when_running.append(f)

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], object]) -> None:
        self.triggers.append((phase, event, f))

    def run(self) -> None:
        self.running = True
        hooks, self._when_running = self._when_running, []
        for f in hooks:
            f()

    def stop(self) -> None:
        if not self.running:
            raise ReactorNotRunning()
        self.running = False
        self.stopped += 1

    def callFromThread(self, f: Callable[[], object]) -> None:
        self.from_thread.append(f)


class Recorder(SystemdNotify):
    def __init__(self) -> None:
        super().__init__(None, lambda text: None)
        self.sent: list[str] = []

    def send(self, *fields: str) -> None:
        self.sent.append(fields[0])


class FakeExit(ExitStatus):
    def __init__(self) -> None:
        self.registered: list[Callable[[], object]] = []
        self.exited: list[int] = []
        super().__init__(register=self.registered.append, exit=self.exited.append)


@pytest.fixture
def lines() -> Iterator[list[str]]:
    found: list[str] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "smarthost":
            found.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield found
    globalLogPublisher.removeObserver(observe)


def make(reactor: FakeReactor) -> tuple[Startup, Recorder, FakeExit]:
    notify, exit_status = Recorder(), FakeExit()
    return Startup(reactor, MailLog(Clock()), notify, exit_status), notify, exit_status


def test_ready_after_every_step_and_once_the_reactor_runs(lines: list[str]) -> None:
    reactor = FakeReactor()
    starting, notify, exit_status = make(reactor)
    starting.done(startup.LISTENERS)
    starting.done(startup.QUEUE)
    assert "ready" not in lines
    starting.done(startup.CONTROL)
    assert "ready" not in lines  # not before the reactor runs
    reactor.run()
    assert lines.count("ready") == 1 and starting.ready
    assert notify.sent == ["READY=1"]
    assert exit_status.registered == [] and reactor.stopped == 0


def test_a_failure_logs_one_line_never_ready_and_exits_1(lines: list[str]) -> None:
    reactor = FakeReactor()
    starting, notify, exit_status = make(reactor)
    starting.done(startup.LISTENERS)
    starting.fail("queue.directory", "cannot use the spool /x: [Errno 13] Permission denied")
    starting.fail("auth.users", "a consequence, not logged")
    starting.done(startup.QUEUE)
    starting.done(startup.CONTROL)
    reactor.run()
    assert lines == [
        "cannot start: queue.directory: cannot use the spool /x: [Errno 13] Permission denied;"
        " stopping"
    ]
    assert reactor.stopped == 1 and starting.failed and not starting.ready
    assert notify.sent == ["STATUS=cannot start: queue.directory: cannot use the spool /x: "
                           "[Errno 13] Permission denied"]
    # The status is set at exit, after twistd's own cleanup.
    assert len(exit_status.registered) == 1 and exit_status.exited == []
    exit_status.registered[0]()
    assert exit_status.exited == [1]


def test_a_failure_while_running_stops_the_reactor_at_once() -> None:
    reactor = FakeReactor()
    reactor.run()
    starting, _, _ = make(reactor)
    starting.fail("listen.smtp[0]", "in use")
    assert reactor.stopped == 1


def test_stopping_is_sent_at_shutdown() -> None:
    reactor = FakeReactor()
    _, notify, _ = make(reactor)
    [(phase, event, trigger)] = reactor.triggers
    assert (phase, event) == ("before", "shutdown")
    trigger()
    assert notify.sent == ["STOPPING=1"]


def test_signal_handlers_hand_the_action_to_the_reactor_and_are_restored() -> None:
    reactor = FakeReactor()
    installed: dict[int, Any] = {signal.SIGHUP: signal.SIG_DFL}
    calls: list[str] = []

    def install(signum: int, handler: Any) -> Any:
        previous = installed.get(signum)
        installed[signum] = handler
        return previous

    service = SignalService(reactor, {signal.SIGHUP: lambda: calls.append("reload")}, install)
    service.startService()
    installed[signal.SIGHUP](signal.SIGHUP, None)
    assert calls == []  # not inside the signal handler
    [action] = reactor.from_thread
    action()
    assert calls == ["reload"]
    service.stopService()
    assert installed[signal.SIGHUP] == signal.SIG_DFL
