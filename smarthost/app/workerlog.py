"""A worker's log, written by the worker and re-emitted by its master.

A worker writes every event to its standard output (a pipe the master reads) as
``[system] text``, without a timestamp; a text of several lines (a traceback) continues on
lines that start with a tab, as twistd's own format does. The master re-emits each line into
its own log with its own timestamp and the system prefixed with ``worker-<i>``::

    2026-12-06T07:04:30+0000 [worker-2 smarthost#info] Q1A2: accepted from 192.0.2.7 ...

so the master's ``--logfile`` (or its standard output, or syslog) holds every process's lines
in one place, each stamped once. ``[log] events`` is not involved: each worker appends its
JSON lines to that file itself (one ``write`` per line, ``O_APPEND``), and the re-emitted
events are in a namespace of their own (``worker-<i>``), which
:meth:`~smarthost.core.maillog.MailLog.forward` never copies there a second time.

Text rather than twisted.logger's JSON: the worker formats each line once, as a single
daemon does, and the master only splits bytes and stamps them, which matters at thousands of
lines a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    LogLevel,
    eventAsText,
)

Emit = Callable[[dict[str, Any]], None]  # a twisted.logger observer (the global publisher)
MAX_LINE = 65536  # bytes; a longer "line" is cut there (a worker never writes one)


def worker_observer(out: IO[str]) -> ILogObserver:
    """The worker's log observer: one ``[system] text`` line per event on ``out``."""
    return FileLogObserver(out, _format_line)


def _format_line(event: Any) -> str:
    text = eventAsText(event, includeTimestamp=False)
    return text.replace("\n", "\n\t") + "\n"


class LineRelay:
    """Splits what worker ``index`` writes on one descriptor into lines and re-emits each."""

    def __init__(self, index: int, emit: Emit, clock: Any, raw: bool = False) -> None:
        self._name = f"worker-{index}"
        self._emit = emit
        self._clock = clock
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
        for line in lines:
            self._line(line.decode("utf-8", "replace"))

    def flush(self) -> None:
        """What is left without a newline (the worker has ended)."""
        pending, self._pending = self._pending, b""
        if pending:
            self._line(pending.decode("utf-8", "replace"))

    def _line(self, line: str) -> None:
        level: Any = LogLevel.info
        if self._raw:
            system, text, level = f"{self._name} stderr", line, LogLevel.warn
        elif line.startswith("\t"):
            system, text = self._system, line
        else:
            system, text, level = self._parse(line)
            self._system = system
        self._emit({
            "log_namespace": self._name,
            "log_level": level,
            "log_system": system,
            "log_format": "{line}",
            "line": text,
            "log_time": self._clock.seconds(),
        })

    def _parse(self, line: str) -> tuple[str, str, Any]:
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
