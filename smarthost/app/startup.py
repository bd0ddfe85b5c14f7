"""Start-up is all or nothing.

Each part of the daemon reports to one :class:`Startup`: the listeners once every port
accepts, the queue once the spool is recovered, the control channel once its socket listens.
``ready`` is logged (and ``READY=1`` sent to systemd) only when all of them have; the first
part that cannot start logs one line naming the config key and the cause, ``ready`` never
comes, and the process stops with exit status 1, so that ``Restart=on-failure`` and an
operator's shell both see the failure instead of a daemon serving half of its listeners.
"""

from __future__ import annotations

import atexit
import os
import pwd
import sys
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.error import ReactorNotRunning

from smarthost.app.notify import SystemdNotify
from smarthost.core.maillog import MailLog

LISTENERS = "listeners"
QUEUE = "queue"
CONTROL = "control"
STEPS = (LISTENERS, QUEUE, CONTROL)


def running_as() -> str:
    """Who the daemon runs as, for errors about files it cannot use (after ``--uid``)."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return f"the daemon runs as user {name}"


class ExitStatus:
    """Makes the process exit with a failure status once twistd is done with it.

    twistd ends with status 0 whenever its reactor stops, whatever stopped it: exceptions in
    shutdown triggers are logged, not raised, and nothing after ``reactor.run()`` reads a
    status. An ``atexit`` handler runs after all of twistd's own cleanup (services stopped,
    pid file removed, "Server Shut Down." logged); it flushes the standard streams (twistd's
    log observers flush every line as they write it) and ends the process there with
    ``os._exit``, the only way left to choose the status.
    """

    def __init__(
        self,
        register: Callable[..., Any] = atexit.register,
        exit: Callable[[int], Any] = os._exit,
    ) -> None:
        self._register = register
        self._exit = exit
        self.status = 0

    def fail(self, status: int = 1) -> None:
        if self.status == 0:
            self._register(self._exit_now)
        self.status = status

    def _exit_now(self) -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass  # closed or broken: nothing more can be said through it
        self._exit(self.status)


class Startup:
    """Collects the start-up steps; says ``ready`` after the last, or fails the whole start."""

    def __init__(
        self,
        reactor: Any,
        maillog: MailLog,
        notify: SystemdNotify,
        exit_status: ExitStatus,
        steps: Iterable[str] = STEPS,
    ) -> None:
        self._reactor = reactor
        self._log = maillog
        self._notify = notify
        self._exit = exit_status
        self._pending = set(steps)
        self.failed = False
        self.ready = False
        reactor.addSystemEventTrigger("before", "shutdown", notify.stopping)

    def done(self, step: str) -> None:
        """``step`` has started; after the last one (and once the reactor runs), ``ready``."""
        self._pending.discard(step)
        if not self._pending and not self.failed:
            self._reactor.callWhenRunning(self._announce)

    def _announce(self) -> None:
        if self.failed or self.ready:
            return
        self.ready = True
        self._log.notice("ready")
        self._notify.ready()

    def fail(self, key: str, problem: str) -> None:
        """Stop the start: one line with the key and the cause, then exit status 1.

        Only the first failure is logged: the others follow from it (or would only repeat
        it), and an operator reads the first line of a failed start.
        """
        if self.failed or self.ready:
            return
        self.failed = True
        problem = problem.rstrip(".")  # Twisted ends some messages with one
        line = f"cannot start: {key}: {problem}"
        self._log.error("cannot start: {key}: {problem}; stopping", key=key, problem=problem)
        self._notify.status(line)
        self._exit.fail(1)
        self._reactor.callWhenRunning(self._stop)

    def _stop(self) -> None:
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass  # already on its way down
