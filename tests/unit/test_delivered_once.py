"""Hardening II, finding 5, in virtual time: whatever fails after an attempt (a report that
cannot be built, a full spool during the outcome write, a failing removal), the recipients the
attempt delivered are never delivered again while the daemon runs, and expiry still ends the
message.

Reports were built before the attempt's outcomes were saved, so a report that raised threw the
attempt away and the delivered recipients got the message at every retry, forever. Each test
here fails on that code. The fakes: a spool whose writes fail as a full disk's do, and a
reporter that notes what the spool held when it was asked for a report, and fails on demand.
"""
# trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

import attrs
from test_scheduler import ALICE, BOB, CAROL, SchedulerTestCase
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from smarthost.core.enums import Result
from smarthost.core.envelope import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    PENDING,
    QueueEntry,
    QueueId,
)
from smarthost.core.maillog import MailLog
from smarthost.delivery.bounce import Kind
from smarthost.delivery.dsn import ReportedRecipient
from smarthost.delivery.recording import RetryPolicy
from smarthost.delivery.reporting import DueReport, Reporter, decode
from smarthost.queue.spool import Spool

DAVE = "dave@remote.test"
UNBUILDABLE = ValueError("Header values may not contain linefeed or carriage return characters")


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


class FullSpool(Spool):
    """A spool whose next ``failing_updates`` updates and ``failing_removes`` removals fail
    the way a full disk makes them fail (a failed Deferred; ``error`` to fail otherwise);
    ``written`` is every entry it was asked to update, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written: list[QueueEntry] = []

    failing_updates = 0
    failing_removes = 0
    error: Exception = disk_full()

    def update(self, entry: QueueEntry) -> Deferred[None]:
        self.written.append(entry)
        if self.failing_updates:
            self.failing_updates -= 1
            return fail(self.error)
        return super().update(entry)

    def remove(self, queue_id: QueueId) -> Deferred[None]:
        if self.failing_removes:
            self.failing_removes -= 1
            return fail(self.error)
        return super().remove(queue_id)


class WatchingReporter(Reporter):
    """Notes, for each report asked for, what the spool held for the message; fails the first
    ``failures`` times with ``error`` (a builder that raises, a spool that is full). With
    ``stalled`` it never answers: the daemon dies before the report is queued."""

    def __init__(self, spool: Spool, clock: Clock) -> None:
        super().__init__(spool, "mx.smarthost.test", clock, MailLog(clock))
        self.watched = spool
        self.asked: list[tuple[Kind, tuple[Result, ...] | None]] = []
        self.failures = 0
        self.error: Exception = UNBUILDABLE
        self.stalled = False

    async def send(self, kind: Kind, entry: QueueEntry,
                   recipients: Sequence[ReportedRecipient],
                   retry_until: float | None = None) -> QueueEntry | None:
        try:
            on_disk: tuple[Result, ...] | None = tuple(
                s.status for s in self.watched.load(entry.queue_id).recipients)
        except KeyError:
            on_disk = None
        self.asked.append((kind, on_disk))
        if self.stalled:
            await Deferred()  # never fires: the "crash" is the restart that follows
        if self.failures:
            self.failures -= 1
            raise self.error
        return await super().send(kind, entry, recipients, retry_until)


class DeliveredOnceTestCase(SchedulerTestCase):
    policy = RetryPolicy(delays=(60, 300), lifetime=86400, delay_warning=0)

    def setUp(self) -> None:
        super().setUp()
        self.restart()

    def restart(self, policy: RetryPolicy | None = None) -> None:
        """A new daemon (spool, reporter, scheduler) on the same spool directory."""
        self.scheduler.stop()
        self.spool = self.open_spool(FullSpool)
        self.reporter = WatchingReporter(self.spool, self.clock)
        self.scheduler = self.make_scheduler(policy, reporter=self.reporter)

    @property
    def full(self) -> FullSpool:
        assert isinstance(self.spool, FullSpool)
        return self.spool

    def tried(self, address: str) -> list[float]:
        """When the MX was asked to take ``address``."""
        return [t for t, _, rcpts in self.mx.attempts if address in rcpts]

    def statuses(self, entry: QueueEntry) -> list[Result]:
        return [s.status for s in self.state(entry).recipients]


class OutcomesFirstTests(DeliveredOnceTestCase):
    def test_outcomes_are_on_disk_before_any_report_is_built(self) -> None:
        self.mx.results = {BOB: DELIVERED, CAROL: BOUNCED, DAVE: DEFERRED}
        entry = self.submit(BOB, CAROL, DAVE)
        self.assertEqual(self.reporter.asked, [("failure", (DELIVERED, BOUNCED, PENDING))])
        self.assertEqual(self.statuses(entry), [DELIVERED, BOUNCED, PENDING])
        [report] = self.mx.reports
        self.assertEqual(report.recipients(), [CAROL])

    def test_a_report_that_cannot_be_built_delivers_nobody_twice(self) -> None:
        self.reporter.failures = 3
        self.mx.results = {BOB: DELIVERED, CAROL: BOUNCED}
        entry = self.submit(BOB, CAROL)
        self.assertEqual(self.statuses(entry), [DELIVERED, BOUNCED])  # kept for the report
        self.clock.pump([60] * 10)
        self.assertEqual([r for _, _, r in self.mx.attempts], [(BOB, CAROL)])
        # Retried on its own, one retry interval apart, until it could be built.
        self.assertEqual([kind for kind, _ in self.reporter.asked], ["failure"] * 4)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 3)
        [report] = self.mx.reports
        self.assertEqual(report.recipients(), [CAROL])
        self.assertEqual(self.queued(), [])

    def test_a_pending_recipient_is_retried_beside_the_owed_report(self) -> None:
        self.reporter.failures = 1
        self.mx.results = {BOB: DELIVERED, CAROL: BOUNCED, DAVE: DEFERRED}
        entry = self.submit(BOB, CAROL, DAVE)
        self.clock.advance(60)
        self.assertEqual([r for _, _, r in self.mx.attempts], [(BOB, CAROL, DAVE), (DAVE,)])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(self.mx.reports), 1)
        self.assertEqual(self.statuses(entry), [DELIVERED, BOUNCED, PENDING])
        self.assertEqual(self.state(entry).attempts, 2)

    def test_a_report_the_full_spool_cannot_take_is_one_log_line_and_retried(self) -> None:
        self.reporter.failures = 2
        self.reporter.error = disk_full()
        self.mx.results = {BOB: DELIVERED, CAROL: BOUNCED}
        self.submit(BOB, CAROL)
        self.clock.pump([60] * 5)
        self.assertEqual(self.tried(BOB), [0])
        self.assertEqual(len(self.mx.reports), 1)
        self.assertEqual(self.flushLoggedErrors(), [])  # an error line, not a traceback
        self.assertEqual(self.queued(), [])

    def test_lifetime_expiry_ends_a_message_whose_report_cannot_be_built(self) -> None:
        self.restart(RetryPolicy(delays=(60, 300), lifetime=600, delay_warning=0))
        self.reporter.failures = 1_000
        entry = self.submit(BOB)
        self.clock.pump([60, 300, 300, 300])
        self.assertEqual(self.mx.attempt_times, [0, 60, 360, 660])
        self.assertEqual(self.statuses(entry), [BOUNCED])  # expired, whatever the report does
        self.clock.pump([300] * 10)
        self.assertEqual(self.mx.attempt_times, [0, 60, 360, 660])
        # Tried for one more lifetime (at 660 and 960), then given up (at 1260) and removed.
        self.assertEqual(len(self.reporter.asked), 3)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        self.assertEqual(self.queued(), [])

    def test_a_deleted_message_owes_nothing(self) -> None:
        self.reporter.failures = 1_000
        self.mx.results = {BOB: BOUNCED}
        entry = self.submit(BOB)
        self.scheduler.forget(entry.queue_id)
        self.successResultOf(self.spool.remove(entry.queue_id))
        self.clock.pump([60] * 5)
        self.assertEqual(len(self.reporter.asked), 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class FullSpoolTests(DeliveredOnceTestCase):
    def test_a_full_spool_during_the_outcome_write_delivers_nobody_twice(self) -> None:
        self.full.failing_updates = 2
        self.mx.results = {BOB: DELIVERED, CAROL: DEFERRED}
        entry = self.submit(BOB, CAROL)
        self.assertEqual(self.statuses(entry), [PENDING, PENDING])  # the disk is behind
        self.clock.pump([60, 300])
        self.assertEqual(self.tried(BOB), [0])
        self.assertEqual(self.tried(CAROL), [0, 60, 360])
        # The third write succeeds and holds all three attempts.
        self.assertEqual(self.statuses(entry), [DELIVERED, PENDING])
        self.assertEqual(self.state(entry).attempts, 3)
        self.assertEqual(self.flushLoggedErrors(), [])  # error lines, not tracebacks

    def test_a_bounce_is_built_only_once_its_outcome_is_saved(self) -> None:
        self.full.failing_updates = 1
        self.mx.results = {BOB: DELIVERED, CAROL: BOUNCED}
        entry = self.submit(BOB, CAROL)
        self.assertEqual(self.reporter.asked, [])
        self.clock.advance(60)
        self.assertEqual(self.tried(BOB), [0])
        self.assertEqual(self.reporter.asked, [("failure", (DELIVERED, BOUNCED))])
        self.assertEqual(len(self.mx.reports), 1)
        self.assertRaises(KeyError, self.spool.load, entry.queue_id)

    def test_a_failing_removal_is_retried_without_delivering_again(self) -> None:
        self.full.failing_removes = 1
        self.mx.result = DELIVERED
        entry = self.submit(BOB)
        self.assertEqual(self.state(entry).queue_id, entry.queue_id)
        self.clock.pump([60] * 5)
        self.assertEqual(self.tried(BOB), [0])
        self.assertEqual(self.queued(), [])

    def test_a_bug_in_the_outcome_write_is_logged_and_retried_the_same_way(self) -> None:
        self.full.failing_updates = 1
        self.full.error = RuntimeError("a bug in the spool")
        self.mx.results = {BOB: DELIVERED, CAROL: DEFERRED}
        entry = self.submit(BOB, CAROL)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(60)
        self.assertEqual(self.tried(BOB), [0])
        self.assertEqual(self.statuses(entry), [DELIVERED, PENDING])

    def test_a_restart_while_the_disk_is_behind_delivers_once_more_not_in_a_loop(self) -> None:
        # The documented at-least-once window: the in-memory results die with the daemon.
        self.full.failing_updates = 1_000
        self.mx.results = {BOB: DELIVERED, CAROL: DEFERRED}
        entry = self.submit(BOB, CAROL)
        self.clock.pump([60, 300])
        self.restart()
        self.full.failing_updates = 1_000
        self.clock.pump([0, 60, 300, 300])
        self.assertEqual(self.tried(BOB), [0, 360])  # once per daemon, not once per retry
        self.full.failing_updates = 0
        self.clock.advance(300)
        self.assertEqual(self.tried(BOB), [0, 360])
        self.assertEqual(self.statuses(entry), [DELIVERED, PENDING])
        self.assertEqual(ALICE, self.state(entry).envelope.sender)


class OwedReportsSurviveTests(DeliveredOnceTestCase):
    """The reports an attempt makes due are saved in the write that saves its outcomes, so a
    restart before they are queued (a crash, a full spool) sends them then: before, they
    lived only in memory, and the restarted daemon removed the message as done, bounce unsent.
    """

    def owed(self, entry: QueueEntry) -> list[DueReport]:
        return [decode(r) for r in self.state(entry).owed_reports]

    def test_outcomes_and_the_reports_they_make_due_are_one_write(self) -> None:
        self.full.failing_updates = 1
        self.mx.results = {BOB: DELIVERED, CAROL: BOUNCED, DAVE: DEFERRED}
        entry = self.submit(BOB, CAROL, DAVE)
        self.assertEqual(self.statuses(entry), [PENDING] * 3)  # the write failed: neither
        self.assertEqual(self.state(entry).owed_reports, ())
        self.reporter.stalled = True
        self.clock.advance(60)
        # The failed write, then the next run's (DAVE tried again): each holds the bounce
        # beside the outcome that made it due.
        first, second = self.full.written
        for written in (first, second):
            self.assertEqual([s.status for s in written.recipients],
                             [DELIVERED, BOUNCED, PENDING])
            [report] = [decode(r) for r in written.owed_reports]
            self.assertEqual((report.kind, [r.recipient.address for r in report.recipients]),
                             ("failure", [CAROL]))
        self.assertEqual(self.state(entry), second)
        self.assertEqual(self.tried(DAVE), [0, 60])

    def test_a_restart_before_the_bounce_is_queued_sends_it_once(self) -> None:
        self.reporter.stalled = True
        self.mx.results = {BOB: DELIVERED, CAROL: BOUNCED}
        entry = self.submit(BOB, CAROL)
        self.assertEqual(self.reporter.asked, [("failure", (DELIVERED, BOUNCED))])
        self.assertEqual(self.mx.reports, [])
        [owed] = self.owed(entry)
        self.assertEqual([r.recipient.address for r in owed.recipients], [CAROL])
        self.clock.advance(5)
        self.restart()
        self.clock.advance(0)  # owed already: run at start, not a retry interval later
        [report] = self.mx.reports
        self.assertEqual((report.kind, report.recipients()), ("failed", [CAROL]))
        self.assertEqual(report.entry.envelope.recipients[0].address, ALICE)
        self.assertEqual(self.queued(), [])
        self.clock.pump([60] * 10)
        self.assertEqual(len(self.mx.reports), 1)
        self.assertEqual(self.tried(BOB), [0])

    def test_a_queued_report_leaves_the_entry_at_once(self) -> None:
        self.mx.results = {BOB: BOUNCED, CAROL: DEFERRED}
        entry = self.submit(BOB, CAROL)
        self.assertEqual(len(self.mx.reports), 1)
        self.assertEqual(self.state(entry).owed_reports, ())  # not at the next attempt only
        self.restart()
        self.clock.pump([0, 60])
        self.assertEqual(len(self.mx.reports), 1)
        self.assertEqual(self.tried(CAROL), [0, 60])

    def test_a_failing_report_survives_a_restart_and_is_retried(self) -> None:
        self.reporter.failures = 1
        self.reporter.error = disk_full()
        self.mx.results = {BOB: BOUNCED}
        entry = self.submit(BOB)
        [owed] = self.owed(entry)
        self.assertEqual(owed.failing_since, self.clock.seconds())
        self.restart()
        self.clock.advance(0)
        self.assertEqual(len(self.reporter.asked), 1)  # the new daemon's reporter
        [report] = self.mx.reports
        self.assertEqual(report.recipients(), [BOB])
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.tried(BOB), [0])

    def test_a_restart_does_not_reset_the_give_up_time(self) -> None:
        policy = RetryPolicy(delays=(60,), lifetime=600, delay_warning=0)
        self.restart(policy)
        self.reporter.failures = 1_000
        self.mx.results = {BOB: BOUNCED}
        entry = self.submit(BOB)
        self.clock.pump([60] * 5)
        self.restart(policy)
        self.reporter.failures = 1_000
        self.clock.pump([0] + [60] * 4 + [59])
        self.assertEqual(self.now(), 599)
        self.assertEqual(self.owed(entry)[0].failing_since, self.clock.seconds() - 599)
        self.clock.advance(1)
        self.assertEqual(self.queued(), [])  # given up one lifetime after the first failure
        self.flushLoggedErrors(ValueError)

    def test_pending_recipients_and_an_owed_report_run_at_start(self) -> None:
        self.reporter.stalled = True
        self.mx.results = {BOB: BOUNCED, CAROL: DEFERRED}
        entry = self.submit(BOB, CAROL)
        self.restart()
        self.clock.advance(0)
        self.assertEqual(self.tried(CAROL), [0, 0])
        self.assertEqual([r.recipients() for r in self.mx.reports], [[BOB]])
        self.assertEqual(self.state(entry).owed_reports, ())
        self.assertEqual(self.state(entry).next_attempt, self.clock.seconds() + 300)

    def test_an_unreadable_owed_report_is_logged_and_dropped(self) -> None:
        self.reporter.stalled = True
        self.mx.results = {BOB: BOUNCED}
        entry = self.submit(BOB)
        damaged = attrs.evolve(self.state(entry), owed_reports=({"kind": "gossip"},))
        self.successResultOf(self.spool.update(damaged))
        self.restart()
        self.clock.advance(0)
        self.assertEqual(self.reporter.asked, [])
        self.assertEqual(self.queued(), [])
