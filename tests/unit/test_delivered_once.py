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
from smarthost.delivery.reporting import Reporter
from smarthost.queue.spool import Spool

DAVE = "dave@remote.test"
UNBUILDABLE = ValueError("Header values may not contain linefeed or carriage return characters")


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


class FullSpool(Spool):
    """A spool whose next ``failing_updates`` updates and ``failing_removes`` removals fail
    the way a full disk makes them fail (a failed Deferred; ``error`` to fail otherwise)."""

    failing_updates = 0
    failing_removes = 0
    error: Exception = disk_full()

    def update(self, entry: QueueEntry) -> Deferred[None]:
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
    ``failures`` times with ``error`` (a builder that raises, a spool that is full)."""

    def __init__(self, spool: Spool, clock: Clock) -> None:
        super().__init__(spool, "mx.smarthost.test", clock, MailLog(clock))
        self.watched = spool
        self.asked: list[tuple[Kind, tuple[Result, ...] | None]] = []
        self.failures = 0
        self.error: Exception = UNBUILDABLE

    async def send(self, kind: Kind, entry: QueueEntry,
                   recipients: Sequence[ReportedRecipient],
                   retry_until: float | None = None) -> QueueEntry | None:
        try:
            on_disk: tuple[Result, ...] | None = tuple(
                s.status for s in self.watched.load(entry.queue_id).recipients)
        except KeyError:
            on_disk = None
        self.asked.append((kind, on_disk))
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
