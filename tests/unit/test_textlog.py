"""The cheap text log (smarthost.app.textlog) writes what twistd's ``textFileLogObserver``
writes, byte for byte, for our lines and everyone else's; its timestamps are
``formatTime``'s across second boundaries, time zones and a change of offset; and its log
file writes once per reactor iteration without losing or misplacing a line (another thread,
a stop, a reopen after logrotate)."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    eventAsText,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from smarthost.app.textlog import BatchedLogFile, Stamps, TextFileObserver, classic_body
from smarthost.core.maillog import TEXT_KEY, MailLog

NOW = 1_764_999_999.25  # 2025-12-06T05:46:39Z


def _events() -> list[LogEvent]:
    """One of each kind a daemon's log sees."""
    events: list[LogEvent] = []
    publisher = LogPublisher(cast(ILogObserver, events.append))
    globalLogPublisher.addObserver(publisher)
    try:
        _maillog_events(MailLog(MemoryReactorClock()))
    finally:
        globalLogPublisher.removeObserver(publisher)
    other = Logger(namespace="twisted.web.server", observer=publisher)
    other.info("{site} starting on {port!r}", site="Site", port=8080)  # a real format
    other.error("two\nlines")
    other.failure("unhandled", Failure(ValueError("x")))
    events.append({"log_system": "worker-1 smarthost#info", "log_format": "{line}",
                   "line": "Q9: accepted", "log_level": LogLevel.info, "log_namespace": "w"})
    events.append({"log_namespace": "nothing", "log_level": LogLevel.info})  # no text
    for event in events:
        event["log_time"] = NOW  # not the wall clock: the same second every run
    events.append({"log_format": "no time", "log_level": LogLevel.info})
    return events


def _maillog_events(maillog: MailLog) -> None:
    maillog.refused("192.0.2.7", "RCPT", "bob@example.org", "550 5.1.1 no {such} user")
    maillog.notice("spool {path}: {count} messages", path="/var/spool/smarthost", count=3)
    maillog.warning("réseau: {name} répond lentement", name="mx.exemple.fr")  # non-ASCII
    maillog.auth_failed("192.0.2.9", "ålice", "PLAIN")
    try:
        1 / 0  # noqa: B018 - a traceback to log
    except ZeroDivisionError:
        maillog.failure("delivery of {queue_id} crashed", queue_id="Q1")


def test_maillog_per_message_events_carry_their_line() -> None:
    per_message, notice = _events()[:2]
    assert per_message[TEXT_KEY] == ("refused RCPT <bob@example.org> from 192.0.2.7: "
                                     "550 5.1.1 no {such} user")
    assert TEXT_KEY not in notice  # written at once


@pytest.mark.parametrize("event", _events(), ids=lambda e: str(e.get("log_namespace")))
def test_a_line_is_what_twistd_writes(event: LogEvent) -> None:
    out = io.StringIO()
    TextFileObserver(out)(event)
    assert out.getvalue() == (formatEventAsClassicLogText(event) or "")
    # A worker's line: the same without the timestamp (eventAsText's, tabs after breaks).
    assert classic_body(event) == eventAsText(event, includeTimestamp=False).replace(
        "\n", "\n\t")


def test_the_same_file_as_textFileLogObserver(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    old: Any = LogFile("old.log", str(tmp_path), rotateLength=None)
    new = BatchedLogFile("new.log", str(tmp_path), rotateLength=None, reactor=reactor)
    for event in _events():
        textFileLogObserver(old)(event)
        TextFileObserver(cast(Any, new))(event)
    old.close()
    new.close()
    text = (tmp_path / "old.log").read_text(encoding="utf-8")
    assert "\tTraceback" in text and "réseau" in text  # what the comparison covers
    assert (tmp_path / "new.log").read_text(encoding="utf-8") == text


@pytest.fixture
def time_zone() -> Iterator[None]:
    """New York's local time (-0500, -0400 from 8 March 2026), put back after the test."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.mark.usefixtures("time_zone")
def test_stamps_are_format_times_in_a_time_zone_and_across_its_change() -> None:
    change = 1_772_953_200.0  # 2026-03-08T07:00:00Z: 02:00 EST becomes 03:00 EDT
    stamps = Stamps()
    for when in (NOW, NOW + 0.5, NOW + 0.74, NOW + 0.75, NOW + 1.3, NOW + 61.0, NOW,
                 change - 1.0, change - 0.25, change, change + 0.5, change + 1.0):
        assert stamps(when) == formatTime(when), when
    assert stamps(change - 0.25).endswith("T01:59:59-0500")
    assert stamps(change).endswith("T03:00:00-0400")
    assert stamps(None) == formatTime(None) == "-"


class Running(MemoryReactorClock):
    """A reactor in its loop: each ``advance(0)`` is the end of an iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.running = True


class Writes(BatchedLogFile):
    """Counts the system calls (LogFile.write on its unbuffered file)."""

    calls = 0

    def _openFile(self) -> None:
        super()._openFile()
        raw = self._file
        counted = self

        class Counting(io.RawIOBase):
            def write(self, data: Any) -> int:
                counted.calls += 1
                return int(raw.write(data))

            def flush(self) -> None:
                raw.flush()

            def close(self) -> None:
                raw.close()

        self._file = cast(BinaryIO, Counting())


def _line(text: str) -> LogEvent:
    return {"log_namespace": "smarthost", "log_level": LogLevel.info, "log_time": NOW,
            "log_format": text, "log_flattened": {}, TEXT_KEY: text}


def _open(tmp_path: Path, reactor: MemoryReactorClock, **kwargs: Any) -> Writes:
    return Writes("a.log", str(tmp_path), rotateLength=None, reactor=reactor, **kwargs)


def test_one_write_per_reactor_iteration(tmp_path: Path) -> None:
    reactor = Running()
    log_file = _open(tmp_path, reactor, in_reactor_thread=lambda: True)
    observe = TextFileObserver(cast(Any, log_file))
    for text in ("one", "two", "three"):
        observe(_line(text))
    assert (tmp_path / "a.log").read_text() == "" and log_file.calls == 0
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(0)
    stamp = formatTime(NOW)
    assert (tmp_path / "a.log").read_text() == "".join(
        f"{stamp} [smarthost#info] {t}\n" for t in ("one", "two", "three"))
    assert log_file.calls == 1
    observe(_line("four"))
    reactor.advance(0)
    assert log_file.calls == 2
    log_file.close()


def test_written_at_once_when_the_reactor_does_not_run(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()  # before the start, or after the stop
    log_file = _open(tmp_path, reactor, in_reactor_thread=lambda: True)
    TextFileObserver(cast(Any, log_file))(_line("Server Shut Down."))
    assert (tmp_path / "a.log").read_text().endswith("] Server Shut Down.\n")
    assert reactor.getDelayedCalls() == []
    log_file.close()


def test_another_threads_line_goes_out_at_once_after_what_waits(tmp_path: Path) -> None:
    reactor = Running()
    main = threading.get_ident()
    log_file = _open(tmp_path, reactor, in_reactor_thread=lambda: threading.get_ident() == main)
    observe = TextFileObserver(cast(Any, log_file))
    observe(_line("reactor first"))
    thread = threading.Thread(target=observe, args=(_line("from a thread"),))
    thread.start()
    thread.join(10)
    lines = (tmp_path / "a.log").read_text().splitlines()
    assert [line.split("] ")[1] for line in lines] == ["reactor first", "from a thread"]
    reactor.advance(0)  # nothing left for the iteration's write
    assert log_file.calls == 1
    log_file.close()


def test_the_last_lines_are_written_at_the_reactors_shutdown(tmp_path: Path) -> None:
    reactor = Running()
    log_file = _open(tmp_path, reactor, in_reactor_thread=lambda: True)
    TextFileObserver(cast(Any, log_file))(_line("stopped"))
    reactor.running = False  # its last iteration ended before the delayed write
    for trigger, args, kwargs in reactor.triggers["after"]["shutdown"]:
        trigger(*args, **kwargs)
    assert (tmp_path / "a.log").read_text().endswith("] stopped\n")
    log_file.close()


def test_a_reopen_writes_what_waits_to_the_old_file_first(tmp_path: Path) -> None:
    reactor = Running()
    log_file = _open(tmp_path, reactor, in_reactor_thread=lambda: True)
    observe = TextFileObserver(cast(Any, log_file))
    observe(_line("before the rotation"))
    os.rename(tmp_path / "a.log", tmp_path / "a.log.1")  # logrotate, then SIGUSR1
    observe(_line("before the signal"))
    log_file.reopen()
    observe(_line("reopened"))
    reactor.advance(0)
    old = (tmp_path / "a.log.1").read_text().splitlines()
    assert [line.split("] ")[1] for line in old] == ["before the rotation", "before the signal"]
    assert (tmp_path / "a.log").read_text().endswith("] reopened\n")
    log_file.close()


def test_a_close_writes_what_waits(tmp_path: Path) -> None:
    reactor = Running()
    log_file = _open(tmp_path, reactor, in_reactor_thread=lambda: True)
    TextFileObserver(cast(Any, log_file))(_line("last"))
    log_file.close()
    reactor.advance(0)  # the iteration's write finds the file closed and nothing to write
    assert (tmp_path / "a.log").read_text().endswith("] last\n")


def test_other_lines_are_written_at_once_after_what_waits(tmp_path: Path) -> None:
    reactor = Running()
    log_file = _open(tmp_path, reactor, in_reactor_thread=lambda: True)
    observe = TextFileObserver(cast(Any, log_file))
    observe(_line("Q1: accepted"))
    ready = {"log_namespace": "smarthost", "log_level": LogLevel.info, "log_time": NOW,
             "log_format": "ready", "log_flattened": {}}  # a notice: systemd waits for it
    observe(ready)
    assert [line.split("] ")[1] for line in (tmp_path / "a.log").read_text().splitlines()] == [
        "Q1: accepted", "ready"]
    assert log_file.calls == 1
    log_file.close()
