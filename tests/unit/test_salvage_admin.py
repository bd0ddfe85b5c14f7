"""``smarthost queue salvage`` on both sides of the control channel (the daemon restores,
logs and schedules; the admin tool restores under the lock when no daemon runs), and the
recovery lines the daemon logs at start, naming every queue id damage affected."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from smarthost.app import recoverylog, salvaging
from smarthost.core.envelope import Envelope, QueueEntry, QueueId, Recipient
from smarthost.core.maillog import MailLog
from smarthost.queue.recovery import Affected, Damage, Fate, RecoveryReport
from smarthost.queue.segment import Record, scan
from smarthost.queue.spool import Spool


def _wait(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def queue_two(directory: Path) -> list[QueueEntry]:
    clock = Clock()
    clock.advance(1_700_000_000)
    spool, _ = Spool.open(directory, clock=clock, run_blocking=maybeDeferred)
    done: list[QueueEntry] = []
    for n in range(2):
        clock.advance(0.01)
        message = spool.receive()
        message.write(b"Subject: %d\r\n\r\nhello\r\n" % n)
        message.commit(Envelope("a@example.test", (Recipient("b@example.net"),))).addCallback(
            done.append)
    spool.close()
    return done


def lose_one(directory: Path) -> tuple[QueueEntry, str]:
    """A message acknowledged, then one bit of its header flipped and the spool recovered: it
    is lost, and one bit explains the damage. Returns it and the copy in corrupt/."""
    entry, _ = queue_two(directory)
    segment = directory / "log" / "00000001.seg"
    record = next(r for r in scan(str(segment)).items
                  if isinstance(r, Record) and r.queue_id == entry.queue_id)
    data = bytearray(segment.read_bytes())
    data[record.start + 30] ^= 0x04  # the body length
    segment.write_bytes(bytes(data))
    spool, report = Spool.open(directory, clock=Clock(), run_blocking=maybeDeferred)
    spool.close()
    assert report.lost == (entry.queue_id,)
    return entry, f"corrupt/00000001.{record.start}-{record.end}"


def test_salvage_without_a_daemon_restores_once(tmp_path: Path) -> None:
    entry, copy = lose_one(tmp_path / "spool")
    spool = Spool(tmp_path / "spool", clock=Clock(), run_blocking=maybeDeferred)
    lines = salvaging.in_admin(spool, maybeDeferred, _wait)
    spool.close()
    assert lines[0] == f"restored {entry.queue_id} from {copy} (header byte 30 bit 2 undone)"
    assert lines[-2:] == ["salvage: 1 restored, 0 not", "(delivered when the daemon next starts)"]
    spool = Spool(tmp_path / "spool", clock=Clock(), run_blocking=maybeDeferred)
    assert spool.load(entry.queue_id) == entry
    assert salvaging.in_admin(spool, maybeDeferred, _wait) == [
        f"not restored: {entry.queue_id}: queued already", "salvage: 0 restored, 1 not"]
    spool.close()


class _Scheduler:
    def __init__(self) -> None:
        self.enqueued: list[QueueEntry] = []

    def enqueue(self, entry: QueueEntry) -> None:
        self.enqueued.append(entry)


def _log_lines() -> tuple[list[tuple[str, str]], Callable[[], None]]:
    lines: list[tuple[str, str]] = []

    def seen(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "smarthost":
            lines.append((event["log_level"].name, formatEvent(event)))

    observer = cast(ILogObserver, seen)
    globalLogPublisher.addObserver(observer)
    return lines, lambda: globalLogPublisher.removeObserver(observer)


def test_salvage_in_the_daemon_schedules_and_logs_what_came_back(tmp_path: Path) -> None:
    entry, copy = lose_one(tmp_path / "spool")
    spool, _ = Spool.open(tmp_path / "spool", clock=Clock(), run_blocking=maybeDeferred)
    scheduler = _Scheduler()
    lines, stop = _log_lines()
    try:
        answer = _wait(Deferred.fromCoroutine(salvaging.in_daemon(
            spool, scheduler, MailLog(Clock()), maybeDeferred)))
    finally:
        stop()
        spool.close()
    assert scheduler.enqueued == [entry]
    assert answer[-1] == "salvage: 1 restored, 0 not"
    assert [text for _, text in lines] == [
        f"{entry.queue_id}: restored from {copy} by the operator (header byte 30 bit 2 undone)",
        "salvage: 1 restored, 0 not",
    ]


def test_recovery_is_logged_naming_every_queue_id() -> None:
    lost, held, dropped = (QueueId.new(1_700_000_000 + n) for n in range(3))
    report = RecoveryReport(
        queued=5,
        torn=(Damage("log/00000003.seg", 900, 950, None, "unfinished write at the end of the log",
                     (Affected(dropped, "message", 900, Fate.UNFINISHED),)),),
        corrupt=(Damage("log/00000001.seg", 100, 700, "corrupt/00000001.100-700",
                        "unreadable bytes", (Affected(lost, "message", 100, Fate.LOST),
                                             Affected(held, "state", 400, Fate.HELD))),),
    )
    lines, stop = _log_lines()
    try:
        recoverylog.log_recovery(MailLog(Clock()), "/var/spool", report)
    finally:
        stop()
    assert lines[0] == ("info", "spool /var/spool: 5 queued, 0 unfinished receptions removed, "
                        "1 unfinished writes dropped, 1 damaged places copied to corrupt/, "
                        "1 messages lost")
    levels = {text.split(":")[0]: level for level, text in lines[1:]}
    assert levels == {str(dropped): "info", "spool": "warn", str(lost): "warn",
                      str(held): "warn"}
    text = "\n".join(t for _, t in lines)
    assert f"{lost}: LOST: its message record in log/00000001.seg bytes 100-700" in text
    assert f"{held}: HELD: its state record" in text
