"""A worker's log, written by the worker and re-emitted by its master.

A worker writes every event to its standard output (a pipe the master reads) as
``[system] text``, without a timestamp; a text of several lines (a traceback) continues on
lines that start with a tab, as twistd's own format does. The master re-emits each line into
its own log with its own timestamp and the system prefixed with ``worker-<i>``::

    2026-12-06T07:04:30+0000 [worker-2 smarthost#info] Q1A2: accepted from 192.0.2.7 ...

so the master's ``--logfile`` (or its standard output, or syslog) holds every process's lines
in one place, each stamped once (with the time the master read it: a few milliseconds after
the worker wrote it). ``[log] events`` is not involved: each worker appends its
JSON lines to that file itself (one ``write`` per line, ``O_APPEND``), and the re-emitted
events are in a namespace of their own (``worker-<i>``), which
:meth:`~smarthost.core.maillog.MailLog.forward` never copies there a second time.

Text rather than twisted.logger's JSON: the worker formats each line once, as a single
daemon does, and the master only splits bytes and stamps them, which matters at thousands of
lines a second.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, Any

from twisted.logger import ILogObserver, InvalidLogLevelError, LogLevel
from zope.interface import implementer

from smarthost.app import textlog

Emit = Callable[[dict[str, Any]], None]  # a twisted.logger observer (the global publisher)
MAX_LINE = 65536  # bytes; a longer "line" is cut there (a worker never writes one)


def worker_observer(out: IO[str], reactor: Any,
                    in_reactor_thread: Callable[[], bool] | None = None) -> ILogObserver:
    """The worker's log observer: one ``[system] text`` line per event on ``out``."""
    return _Batched(out, reactor, in_reactor_thread or textlog.in_reactor_thread)


@implementer(ILogObserver)
class _Batched:
    """Writes each line into ``out``'s buffer and flushes once per reactor iteration (at
    once when the reactor does not run: start-up and the last lines of a stop). A worker
    logs a few lines per message: one write for all of an iteration's spares the worker a
    system call per line and the master a read and a write per line. A SIGKILL loses at most
    the lines of the iteration it interrupts; ``[log] events`` is written line by line."""

    def __init__(self, out: IO[str], reactor: Any, in_reactor_thread: Callable[[], bool]) -> None:
        self._out = out
        self._reactor = reactor
        self._in_reactor_thread = in_reactor_thread
        self._pending = False

    def __call__(self, event: Any) -> None:
        self._out.write(_format_line(event))
        if not self._reactor.running or not self._in_reactor_thread():  # e.g. a thread's
            self._out.flush()
        elif not self._pending:
            self._pending = True
            self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._pending = False
        self._out.flush()


def _format_line(event: Any) -> str:
    # MailLog's lines are taken as they are (classic_body): a worker's few lines a message
    # cost it a tenth of what eventAsText did.
    return textlog.classic_body(event) + "\n"


Line = tuple[str, str, Any]  # (system, text, LogLevel) of one re-emitted line
Sink = Callable[[Sequence[Line]], None]  # takes the lines of one read, in order


class PublisherSink:
    """Re-emits each line as a twisted.logger event (namespace ``worker-<i>``): for a master
    whose log twistd holds (syslog, a ``--logger`` of its own)."""

    def __init__(self, emit: Emit, clock: Any, namespace: str) -> None:
        self._emit = emit
        self._clock = clock
        self._namespace = namespace

    def __call__(self, lines: Sequence[Line]) -> None:
        now = self._clock.seconds()
        for system, text, level in lines:
            self._emit({
                "log_namespace": self._namespace, "log_level": level, "log_system": system,
                "log_format": "{line}", "line": text, "log_time": now,
            })


class FileSink:
    """Writes the lines of one read straight into the master's log file (or its standard
    output), formatted as twistd's observer formats an event, in one write: at thousands of
    lines a second the observer's per-event formatting and flush cost the master a tenth of
    the server's CPU (measured with bench/run --workers 2)."""

    def __init__(self, out: Any, clock: Any) -> None:
        self._out = out  # the file the master's own observer writes to
        self._clock = clock
        self._stamps = textlog.Stamps()
        # twistd's log file writes at the end of the reactor's iteration by itself: the
        # reads of both workers' pipes in one iteration go out in one write.
        self._flush = not isinstance(out, textlog.BatchedLogFile)

    def __call__(self, lines: Sequence[Line]) -> None:
        stamp = self._stamps(self._clock.seconds())
        self._out.write("".join(f"{stamp} [{system}] {text}\n" for system, text, _ in lines))
        if self._flush:  # standard output
            self._out.flush()


class LineRelay:
    """Splits what worker ``index`` writes on one descriptor into lines for ``sink``."""

    def __init__(self, index: int, sink: Sink, raw: bool = False) -> None:
        self._name = f"worker-{index}"
        self._sink = sink
        self._raw = raw  # standard error: lines in no format of ours
        self._pending = b""
        self._system = f"{self._name} smarthost#info"  # for continuation lines

    def feed(self, data: bytes) -> None:
        self._pending += data
        if b"\n" not in self._pending:
            if len(self._pending) > MAX_LINE:
                self.flush()
            return
        *lines, self._pending = self._pending.split(b"\n")
        self._sink([self._line(line.decode("utf-8", "replace")) for line in lines])

    def flush(self) -> None:
        """What is left without a newline (the worker has ended)."""
        pending, self._pending = self._pending, b""
        if pending:
            self._sink([self._line(pending.decode("utf-8", "replace"))])

    def _line(self, line: str) -> Line:
        if self._raw:
            return f"{self._name} stderr", line, LogLevel.warn
        if line.startswith("\t"):
            return self._system, line, LogLevel.info
        parsed = self._parse(line)
        self._system = parsed[0]
        return parsed

    def _parse(self, line: str) -> Line:
        end = line.find("] ") if line.startswith("[") else -1
        if end < 0:
            return self._name, line, LogLevel.info
        system = line[1:end]
        _, _, name = system.rpartition("#")
        try:
            level = LogLevel.levelWithName(name)
        except InvalidLogLevelError:  # "#" in no system of ours: a plain line
            level = LogLevel.info
        return f"{self._name} {system}", line[end + 2:], level
