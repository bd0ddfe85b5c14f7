"""SIGUSR1's log reopening: which file twistd would log to, the observer handed to twistd's
application, and a reopen that cannot open the new file keeps the old one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Application
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver

from smarthost.app.logfiles import LogReopener, observer_for, twistd_log_file
from smarthost.app.services import DaemonService
from smarthost.app.textlog import BatchedLogFile, TextFileObserver
from smarthost.core.maillog import MailLog


@pytest.mark.parametrize("options", [
    None,  # not run by twistd
    {"nodaemon": True, "logfile": None},  # twistd -n: standard output
    {"nodaemon": True, "logfile": "-"},
    {"nodaemon": False, "logfile": "x.log", "syslog": True},
    {"nodaemon": False, "logfile": "x.log", "logger": "my.observer"},
])
def test_nothing_to_reopen_when_twistd_logs_elsewhere(options: dict[str, Any] | None) -> None:
    assert twistd_log_file(options, MemoryReactorClock()) is None


def test_the_file_twistd_would_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # Any: LogFile's methods carry no annotations.
    reactor = MemoryReactorClock()
    named: Any = twistd_log_file({"nodaemon": True, "logfile": str(tmp_path / "smarthost.log")},
                                 reactor)
    default: Any = twistd_log_file({"nodaemon": False, "logfile": None}, reactor)  # twistd.log
    assert named is not None and named.path == str(tmp_path / "smarthost.log")
    assert isinstance(named, BatchedLogFile)  # written once per reactor iteration
    assert default is not None and default.path == str(tmp_path / "twistd.log")
    named.close()
    default.close()


def test_twistd_gets_the_observer_through_its_application(tmp_path: Path) -> None:
    log_file: Any = twistd_log_file({"nodaemon": True, "logfile": str(tmp_path / "a.log")},
                                    MemoryReactorClock())
    observer = observer_for(log_file)
    assert isinstance(observer, TextFileObserver)
    application = Application("smarthost")
    DaemonService(observer).setServiceParent(application)
    assert application.getComponent(ILogObserver) is observer
    assert log_file is not None
    log_file.close()


def test_a_reopen_that_cannot_open_the_new_file_keeps_the_old(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log_file: Any = twistd_log_file({"nodaemon": True, "logfile": str(logs / "a.log")},
                                    MemoryReactorClock())
    assert log_file is not None
    os.rename(logs / "a.log", tmp_path / "a.log.1")
    logs.rmdir()  # the new one cannot be made
    LogReopener(log_file, MailLog(Clock())).reopen()
    log_file.write("still written\n")
    log_file.flush()
    assert (tmp_path / "a.log.1").read_text() == "still written\n"
    log_file.close()
