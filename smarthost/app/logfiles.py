"""SIGUSR1: reopen the log files, for logrotate (``postrotate: kill -USR1 ...``).

twistd's own answer to SIGUSR1 is to *rotate* its log (rename it to ``.1``), which after
logrotate has already moved the file does nothing at all, and its log file is out of reach
of the application. So the daemon opens the file twistd would have opened itself, from
twistd's own options, and hands twistd the observer through the documented
``ILogObserver`` component of the application (see
:class:`smarthost.app.services.DaemonService`); twistd then installs no handler of its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import IO, Any, cast

from twisted.logger import ILogObserver
from twisted.python.logfile import LogFile

from smarthost.app.textlog import BatchedLogFile, TextFileObserver
from smarthost.core.maillog import MailLog


def twistd_log_file(twistd_options: Mapping[str, Any] | None,
                    reactor: Any = None) -> LogFile | None:
    """The file twistd would log to with these options, opened as twistd opens it but
    written once per iteration of ``reactor`` (by default the global one):
    :class:`~smarthost.app.textlog.BatchedLogFile`; None when it logs elsewhere (standard
    output, syslog, a ``--logger`` of its own), where there is nothing to reopen."""
    if twistd_options is None or twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    name = twistd_options.get("logfile") or ""
    if name == "-" or (not name and twistd_options.get("nodaemon")):
        return None
    # No rotation of our own (twistd's default rotates at 1 MB into numbered files): that is
    # logrotate's job, and SIGUSR1 reopens the file after it.
    if reactor is None:
        from twisted.internet import reactor
    log_file: LogFile = BatchedLogFile.fromFullPath(  # type: ignore[no-untyped-call]
        name or "twistd.log", rotateLength=None, reactor=reactor
    )
    return log_file


def twistd_logs_to_stdout(twistd_options: Mapping[str, Any] | None) -> bool:
    """Whether twistd, with these options, logs to its standard output (``-n`` without
    ``--logfile``, or ``--logfile=-``)."""
    if twistd_options is None or twistd_options.get("syslog") or twistd_options.get("logger"):
        return False
    name = twistd_options.get("logfile") or ""
    return name == "-" or (not name and bool(twistd_options.get("nodaemon")))


def observer_for(log_file: LogFile | None) -> ILogObserver | None:
    """twistd's text lines, made cheaply (:class:`~smarthost.app.textlog.TextFileObserver`).
    A LogFile is file-like enough for the observer (``write``), as twistd uses it."""
    return TextFileObserver(cast(IO[str], log_file)) if log_file is not None else None


class LogReopener:
    """Reopens twistd's log file and the ``[log] events`` file under their configured names."""

    def __init__(self, log_file: LogFile | None, maillog: MailLog) -> None:
        self._file = log_file
        self._log = maillog

    def reopen(self) -> None:
        if self._file is not None:
            path = self._file.path
            try:
                # Opened once first: LogFile.reopen closes the old file before it opens the
                # new one, and a failure in between would leave no log at all.
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
            except OSError as e:
                self._log.error(
                    "cannot reopen the log file {path}: {error}; logging on to the old one",
                    path=path, error=e.strerror or str(e),
                )
            else:
                self._file.reopen()  # type: ignore[no-untyped-call]
        try:
            self._log.reopen()
        except OSError as e:
            self._log.error("cannot reopen the events file: {error}", error=str(e))
        self._log.notice("reopened the log files")
