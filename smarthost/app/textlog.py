"""twistd's text log, the same lines at a fraction of the cost.

twistd's ``textFileLogObserver`` on its ``LogFile`` cost a daemon 8.9 µs of the reactor
thread per line (``timeit``, one MailLog line, six lines a reactor iteration; the log lines
were 14% of the reactor's time on the accept path, bench/run --only profile): for every
line it formats the timestamp again
(``datetime.fromtimestamp``, a time zone helper, ``strftime``), renders the text through
``eventAsText`` and ``flatFormat``, then writes the line with one system call under
``threadable``'s lock and flushes. Here:

- :class:`Stamps` formats the timestamp once a second;
- :func:`classic_body` takes the text :class:`~smarthost.core.maillog.MailLog` already
  formatted (it travels in the event under :data:`~smarthost.core.maillog.TEXT_KEY`) instead
  of rendering its literal format again; any other event (a traceback from
  ``log.failure``, twistd's own lines, a real format string) goes through ``eventAsText``;
- :class:`TextFileObserver` puts the two together, line for line what
  ``textFileLogObserver`` writes;
- :class:`BatchedLogFile` writes what it was given in one reactor iteration with one
  system call (MailLog's per-message lines: any other line is flushed at once).

With the worker's lines through :func:`classic_body` too, the profile's "log lines" went from
0.138 to 0.056 ms a message on the accept path and from 0.183 to 0.081 while delivering
(bench/run --only profile, profile-deliver; 2,000 messages, 20 sessions).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from threading import get_ident
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, eventAsText, formatTime
from twisted.python import threadable
from twisted.python.logfile import LogFile
from zope.interface import implementer

from smarthost.core.maillog import TEXT_KEY


def in_reactor_thread() -> bool:
    """``threadable.isInIOThread()``, in one call instead of three: asked at every line."""
    return threadable.ioThread == get_ident()


class Stamps:
    """``formatTime``'s text (twistd's ``%Y-%m-%dT%H:%M:%S%z``, the local offset included),
    formatted once per second of the times asked for: the lines of a busy second share
    one. ``formatTime`` rounds to the microsecond, so a time less than half a microsecond
    before a second shows that next second there; here it shows the second it is in."""

    def __init__(self) -> None:
        self._second: float | None = None
        self._stamp = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = when // 1
        if second != self._second:
            self._second, self._stamp = second, formatTime(second)
        return self._stamp


def classic_body(event: LogEvent, stamps: Callable[[float | None], str] | None = None) -> str:
    """The line twistd's text observer writes for ``event``, without its final newline and,
    when ``stamps`` is None, without the timestamp and its space (``[system] text``, as a
    worker writes it); continuation lines start with a tab. Empty when twistd writes
    nothing (an event without text)."""
    text = event.get(TEXT_KEY)
    if text is None or "log_failure" in event or "log_system" in event:
        body = eventAsText(event, includeTimestamp=stamps is not None,
                           formatTime=stamps or formatTime)
        return body.replace("\n", "\n\t")
    if not text:
        return ""
    level = event.get("log_level")
    system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    if stamps is None:
        return f"[{system}] {text}".replace("\n", "\n\t")
    return f"{stamps(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t")


@implementer(ILogObserver)
class TextFileObserver:
    """What ``textFileLogObserver(out)`` writes, through :func:`classic_body` and
    :class:`Stamps`: with :class:`BatchedLogFile`, 1.6 µs a line instead of 8.9 (``timeit``,
    one MailLog line, six lines a reactor iteration). Only MailLog's per-message lines (the
    volume: a few a message) are left to ``out`` (a :class:`BatchedLogFile`) to write at the
    end of the reactor's iteration; any other line is flushed at once, as twistd's observer
    does: a notice, a traceback, twistd's own lines are rare, and someone may be waiting for
    them (systemd's READY=1 comes right after "ready", a test after "stopped")."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._stamps = Stamps()

    def __call__(self, event: LogEvent) -> None:
        line = classic_body(event, self._stamps)
        if line:
            self._out.write(line + "\n")
            if TEXT_KEY not in event:  # not a per-message line: written at once
                self._out.flush()


class BatchedLogFile(LogFile):
    """twistd's log file (a :class:`~twisted.python.logfile.LogFile`) that writes all
    that one reactor iteration gave it with one system call: a daemon writes a few lines
    per message, and each write was a system call under ``threadable``'s lock.

    Written at once instead: what is given when the reactor does not run (the start, the
    last lines of a stop), from another thread (in order with what waits), and at a
    ``flush`` (:class:`TextFileObserver`'s after a rare line, twistd's observer in a master
    after each of its own lines). What waits
    is written before a :meth:`reopen` (SIGUSR1 after logrotate: lines given before it go
    to the old file, as they did line by line), before a :meth:`close`, and after the
    reactor's shutdown (its last iteration may not run the call that writes them)."""

    def __init__(self, name: str, directory: str, *, reactor: Any,
                 in_reactor_thread: Callable[[], bool] = in_reactor_thread,
                 **kwargs: Any) -> None:
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._reactor = reactor
        self._in_reactor_thread = in_reactor_thread
        super().__init__(name, directory, **kwargs)  # type: ignore[no-untyped-call]
        reactor.addSystemEventTrigger("after", "shutdown", self.flush)

    def write(self, data: str | bytes) -> None:
        if isinstance(data, bytes):  # nobody writes bytes; kept exact all the same
            self.flush()
            super().write(data)  # type: ignore[no-untyped-call]
            return
        with self._lock:
            self._pending.append(data)
        if not self._reactor.running or not self._in_reactor_thread():
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(0, self._iteration_done)

    def _iteration_done(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        with self._lock:  # held while writing: another thread's lines stay in order
            if self._pending and not self.closed:
                data = "".join(self._pending)
                self._pending.clear()
                super().write(data)  # type: ignore[no-untyped-call]
                super().flush()  # type: ignore[no-untyped-call]

    def reopen(self) -> None:
        self.flush()
        super().reopen()  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.flush()
        super().close()  # type: ignore[no-untyped-call]
