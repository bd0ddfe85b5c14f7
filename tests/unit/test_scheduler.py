"""The scheduler in virtual time: the retry schedule, lifetime and delay reports, NOTIFY,
flush/forget, fairness between new mail and retries, crashes, restarts, holds, concurrency.

Everything runs on a ``task.Clock`` over a real :class:`Spool` in a temporary directory with a
synchronous ``run_blocking``; the delivery attempt is a fake that returns scripted outcomes.
"""
# trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import email
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase

from smarthost.core.enums import Result
from smarthost.core.envelope import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    PENDING,
    Envelope,
    Outcome,
    QueueEntry,
    QueueId,
    Recipient,
)
from smarthost.core.maillog import MailLog
from smarthost.delivery.courier import AttemptResult, Courier
from smarthost.delivery.hostcache import HostCache
from smarthost.delivery.recording import EXPIRED_STATUS, RetryPolicy, expire, record
from smarthost.delivery.reporting import Reporter
from smarthost.delivery.routing import (
    MAILDIR,
    SMTP,
    Host,
    HostFailure,
    PermanentRouteError,
    Route,
    TemporaryRouteError,
)
from smarthost.delivery.scheduler import Scheduler, _Ready
from smarthost.delivery.smtpagent import HopResult
from smarthost.queue.spool import Spool

T0 = 1_700_000_000.0
ALICE = "alice@example.test"
BOB = "bob@remote.test"
CAROL = "carol@remote.test"
BODY = b"From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: hi\r\n\r\nHello.\r\n"

REPLIES = {
    DELIVERED: "250 2.0.0 OK queued",
    DEFERRED: "451 4.3.0 Try again later",
    BOUNCED: "550 5.1.1 No such user here",
}


class Crash(Exception):
    """A bug inside a delivery attempt."""


def run_now(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args, **kwargs)


@attrs.define
class Report:
    entry: QueueEntry  # the report's own queue entry (null sender, to the original sender)
    message: Message

    @property
    def kind(self) -> str:
        actions = {fields["Action"] for fields in self.status_fields()[1:]}
        assert len(actions) == 1, actions
        return actions.pop()

    def status_fields(self) -> list[Message]:
        parts: Any = self.message.get_payload()
        status: Message = parts[1]
        assert status.get_content_type() == "message/delivery-status"
        fields: list[Message] = status.get_payload()  # type: ignore[assignment]
        return fields

    def recipients(self) -> list[str]:
        return [f["Final-Recipient"].split(";", 1)[1] for f in self.status_fields()[1:]]


class FakeMX:
    """The delivery attempt: records when it was called and answers from a script.

    ``results`` maps recipient addresses to DELIVERED/DEFERRED/BOUNCED (default ``result``).
    Reports (null sender, multipart/report) are "delivered" at once and kept in ``reports``;
    they do not count as attempts. With ``manual`` every attempt waits until the test fires
    the Deferred in ``in_flight``; with ``duration`` it takes that many virtual seconds.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.result = DEFERRED
        self.results: dict[str, Result] = {}
        self.crash = False
        self.dsn_passed = False
        self.manual = False
        self.duration = 0.0
        self.attempts: list[tuple[float, QueueId, tuple[str, ...]]] = []
        self.reports: list[Report] = []
        self.in_flight: list[Deferred[None]] = []
        self.max_in_flight = 0
        self._running = 0

    @property
    def attempt_times(self) -> list[float]:
        return [t for t, _, _ in self.attempts]

    def attempted(self, queue_id: QueueId) -> list[float]:
        return [t for t, q, _ in self.attempts if q == queue_id]

    async def attempt(
        self, entry: QueueEntry, open_body: Callable[[], BinaryIO]
    ) -> AttemptResult:
        return AttemptResult(tuple(await self.outcomes(entry, open_body)))

    async def outcomes(
        self, entry: QueueEntry, open_body: Callable[[], BinaryIO]
    ) -> list[Outcome]:
        with open_body() as f:
            data = f.read()
        pending = [s.recipient for s in entry.pending]
        if entry.envelope.sender == "" and b"Content-Type: multipart/report" in data:
            self.reports.append(Report(entry, email.message_from_bytes(data)))
            return [Outcome(r, DELIVERED, REPLIES[DELIVERED], "maildir") for r in pending]
        self.attempts.append(
            (self.clock.seconds() - T0, entry.queue_id, tuple(r.address for r in pending))
        )
        self._running += 1
        self.max_in_flight = max(self.max_in_flight, self._running)
        try:
            if self.manual:
                d: Deferred[None] = Deferred()
                self.in_flight.append(d)
                await d
            elif self.duration:
                d = Deferred()
                self.clock.callLater(self.duration, d.callback, None)
                await d
        finally:
            self._running -= 1
        if self.crash:
            raise Crash("boom")
        outcomes = []
        for r in pending:
            result = self.results.get(r.address, self.result)
            outcomes.append(
                Outcome(r, result, REPLIES[result], "mx1.remote.test[192.0.2.1]",
                        REPLIES[result].split()[1],
                        dsn_passed=self.dsn_passed and result == DELIVERED)
            )
        return outcomes

    def finish(self, count: int = 1) -> None:
        for _ in range(count):
            self.in_flight.pop(0).callback(None)


class FlakySpool(Spool):
    """A spool whose next ``update`` fails, as a full disk would."""

    fail_updates = 0

    def update(self, entry: QueueEntry) -> Deferred[None]:
        if self.fail_updates:
            self.fail_updates -= 1
            raise OSError(28, "No space left on device")
        return super().update(entry)


class SchedulerTestCase(SynchronousTestCase):
    policy = RetryPolicy(delays=(60, 300), lifetime=86400, delay_warning=0)
    concurrency = 20

    def setUp(self) -> None:
        # Durability is test_spool's business; here thousands of fsyncs would only cost time.
        self.patch(os, "fsync", lambda fd: None)
        self.patch(os, "fdatasync", lambda fd: None)
        self.directory = Path(tempfile.mkdtemp(prefix="scheduler-test-"))
        self.addCleanup(shutil.rmtree, self.directory)
        self.clock = Clock()
        self.clock.advance(T0)
        self.spool = self.open_spool()
        self.mx = FakeMX(self.clock)
        self.scheduler = self.make_scheduler()

    def open_spool(self, kind: type[Spool] = Spool) -> Spool:
        """A daemon's spool; the one before (a "crashed" daemon) gives up its lock first."""
        previous: Spool | None = getattr(self, "spool", None)
        if previous is not None:
            previous.close()
        spool = kind(self.directory / "spool", clock=self.clock, run_blocking=run_now)
        spool.recover()
        self.addCleanup(spool.close)
        return spool

    def make_scheduler(self, policy: RetryPolicy | None = None,
                       concurrency: int | None = None, start: bool = True,
                       **options: Any) -> Scheduler:
        maillog = MailLog(self.clock)
        policy = policy or self.policy
        self.hosts = HostCache(self.clock, first_retry=policy.delay(1))
        reporter = options.pop("reporter", None) or Reporter(
            self.spool, "mx.smarthost.test", self.clock, maillog
        )
        scheduler = Scheduler(
            self.clock, self.spool, options.pop("attempt", self.mx.attempt), reporter, policy,
            maillog, options.pop("hosts", self.hosts),
            concurrency=concurrency or self.concurrency, **options,
        )
        if start:
            scheduler.start()
        return scheduler

    def submit(self, *recipients: str | Recipient, sender: str = ALICE, held: bool = False,
               schedule: bool = True) -> QueueEntry:
        rcpts = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in recipients)
        incoming = self.spool.receive()
        incoming.write(BODY)
        entry: QueueEntry = self.successResultOf(incoming.commit(Envelope(
            sender=sender, recipients=rcpts or (Recipient(BOB),), client_address="127.0.0.1",
            received_at=self.clock.seconds(), held=held,
        )))
        if schedule:
            self.scheduler.enqueue(entry)
        return entry

    def queued(self) -> list[QueueEntry]:
        return list(self.spool.entries())

    def state(self, entry: QueueEntry) -> QueueEntry:
        return self.spool.load(entry.queue_id)

    def now(self) -> float:
        return self.clock.seconds() - T0


class RetryPolicyTests(SynchronousTestCase):
    def test_delay_follows_the_list_and_repeats_the_last(self) -> None:
        policy = RetryPolicy(delays=(60, 300, 900))
        self.assertEqual([policy.delay(n) for n in range(1, 7)], [60, 300, 900, 900, 900, 900])

    def test_delay_of_attempt_zero_is_the_first(self) -> None:
        self.assertEqual(RetryPolicy(delays=(5, 10)).delay(0), 5)


class RecordTests(SynchronousTestCase):
    def entry(self) -> QueueEntry:
        envelope = Envelope(ALICE, (Recipient(BOB), Recipient(CAROL), Recipient("d@x.test")))
        return QueueEntry.new(QueueId.new(T0), envelope, 10)

    def test_each_recipient_gets_its_status_and_reply(self) -> None:
        e = self.entry()
        after = record(e, [
            Outcome(Recipient(BOB), DELIVERED, "250 ok", "mx[1.2.3.4]"),
            Outcome(Recipient(CAROL), DEFERRED, "451 later", "mx[1.2.3.4]"),
        ])
        self.assertEqual([s.status for s in after.recipients], [DELIVERED, PENDING, PENDING])
        self.assertEqual([s.attempts for s in after.recipients], [1, 1, 0])
        self.assertEqual(after.attempts, 1)
        self.assertEqual(after.last_error, "451 later")
        self.assertEqual(after.recipients[1].remote, "mx[1.2.3.4]")

    def test_finished_recipients_are_never_changed_again(self) -> None:
        e = record(self.entry(), [Outcome(Recipient(BOB), BOUNCED, "550 no")])
        again = record(e, [Outcome(Recipient(BOB), DELIVERED, "250 ok")])
        self.assertEqual(again.recipients[0].status, BOUNCED)
        self.assertEqual(again.recipients[0].last_reply, "550 no")

    def test_expire_bounces_only_pending(self) -> None:
        e = record(self.entry(), [Outcome(Recipient(BOB), DELIVERED, "250 ok")])
        after, expired = expire(e)
        self.assertEqual([s.recipient.address for s in expired], [CAROL, "d@x.test"])
        self.assertEqual([s.status for s in after.recipients], [DELIVERED, BOUNCED, BOUNCED])
        self.assertEqual(after.pending, ())


class RetryScheduleTests(SchedulerTestCase):
    def test_follows_schedule_and_repeats_last_delay(self) -> None:
        entry = self.submit(BOB)
        self.clock.pump([0, 60, 300, 300])
        self.assertEqual(self.mx.attempt_times, [0, 60, 360, 660])
        state = self.state(entry)
        self.assertEqual(state.attempts, 4)
        self.assertEqual(state.recipients[0].attempts, 4)
        self.assertEqual(state.next_attempt, T0 + 960)
        self.assertEqual(state.last_error, REPLIES[DEFERRED])

    def test_nothing_happens_between_attempts(self) -> None:
        self.submit(BOB)
        self.clock.advance(59.9)
        self.assertEqual(self.mx.attempt_times, [0])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # one timer for the whole heap

    def test_delivered_message_leaves_the_spool_and_the_schedule(self) -> None:
        self.mx.result = DELIVERED
        self.submit(BOB)
        self.assertEqual(self.queued(), [])
        self.clock.advance(10_000)
        self.assertEqual(self.mx.attempt_times, [0])
        self.assertEqual(self.mx.reports, [])

    def test_only_pending_recipients_are_tried_again(self) -> None:
        self.mx.results = {BOB: DELIVERED}
        entry = self.submit(BOB, CAROL)
        self.clock.advance(60)
        self.assertEqual([r for _, _, r in self.mx.attempts], [(BOB, CAROL), (CAROL,)])
        self.mx.results = {}
        self.mx.result = DELIVERED
        self.clock.advance(300)
        self.assertEqual([r for _, _, r in self.mx.attempts][-1], (CAROL,))
        self.assertRaises(KeyError, self.spool.load, entry.queue_id)
        self.assertEqual(self.mx.reports, [])

    def test_many_waiting_messages_share_one_timer(self) -> None:
        for _ in range(50):
            self.submit(BOB)
            self.clock.advance(1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(60)
        self.assertEqual(len(self.mx.attempts), 100)


class ReportTests(SchedulerTestCase):
    def test_permanent_failure_bounces_once_with_the_null_sender(self) -> None:
        self.mx.result = BOUNCED
        entry = self.submit(BOB)
        self.assertRaises(KeyError, self.spool.load, entry.queue_id)
        [report] = self.mx.reports
        self.assertEqual(report.entry.envelope.sender, "")
        self.assertEqual([r.address for r in report.entry.envelope.recipients], [ALICE])
        self.assertEqual(report.message.get_content_type(), "multipart/report")
        self.assertEqual(report.kind, "failed")
        self.assertEqual(report.recipients(), [BOB])
        [fields] = report.status_fields()[1:]
        self.assertEqual(fields["Status"], "5.1.1")
        self.assertIn("550 5.1.1", fields["Diagnostic-Code"])
        self.assertEqual(fields["Remote-MTA"], "dns; mx1.remote.test")
        self.clock.advance(100_000)
        self.assertEqual(len(self.mx.reports), 1)
        self.assertEqual(self.queued(), [])

    def test_mixed_outcome_bounces_only_the_failed_recipient(self) -> None:
        self.mx.results = {BOB: BOUNCED, CAROL: DEFERRED}
        entry = self.submit(BOB, CAROL)
        [report] = self.mx.reports
        self.assertEqual(report.recipients(), [BOB])
        [state] = self.queued()
        self.assertEqual(state.queue_id, entry.queue_id)
        self.assertEqual([s.status for s in state.recipients], [BOUNCED, PENDING])

    def test_lifetime_expiry_bounces_once(self) -> None:
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(RetryPolicy(delays=(60, 300), lifetime=600,
                                                         delay_warning=0))
        entry = self.submit(BOB)
        self.clock.pump([0, 60, 300, 300, 300, 300])
        self.assertEqual(self.mx.attempt_times, [0, 60, 360, 660])
        self.assertRaises(KeyError, self.spool.load, entry.queue_id)
        [report] = self.mx.reports
        self.assertEqual(report.kind, "failed")
        self.assertEqual([r.address for r in report.entry.envelope.recipients], [ALICE])
        self.assertEqual(report.entry.envelope.sender, "")
        [fields] = report.status_fields()[1:]
        self.assertEqual(fields["Status"], EXPIRED_STATUS)
        self.assertIn("451 4.3.0", fields["Diagnostic-Code"])  # the last reply is kept
        self.assertEqual(self.queued(), [])

    def test_never_a_report_for_the_null_sender(self) -> None:
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(RetryPolicy(delays=(60,), lifetime=100,
                                                         delay_warning=30))
        self.mx.results = {CAROL: BOUNCED}
        self.submit(BOB, CAROL, sender="")
        self.clock.pump([60, 60, 60])
        self.assertEqual(self.mx.attempt_times, [0, 60, 120])
        self.assertEqual(self.mx.reports, [])
        self.assertEqual(self.queued(), [])

    def test_delay_warning_is_sent_once(self) -> None:
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(RetryPolicy(delays=(60,), lifetime=86400,
                                                         delay_warning=100))
        entry = self.submit(BOB)
        self.clock.pump([60] * 10)
        self.assertEqual(len(self.mx.attempts), 11)
        [report] = self.mx.reports
        self.assertEqual(report.kind, "delayed")
        self.assertIn("Will-Retry-Until", report.status_fields()[1])
        self.assertTrue(self.state(entry).delay_warned)
        self.assertEqual(len(self.queued()), 1)  # the message itself is still being retried

    def test_delay_warning_survives_a_restart(self) -> None:
        policy = RetryPolicy(delays=(60,), lifetime=86400, delay_warning=100)
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(policy)
        self.submit(BOB)
        self.clock.pump([60, 60])
        self.assertEqual(len(self.mx.reports), 1)
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(policy)
        self.clock.pump([60] * 5)
        self.assertEqual(len(self.mx.attempts), 8)
        self.assertEqual(len(self.mx.reports), 1)

    def test_notify_never_suppresses_every_report(self) -> None:
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(RetryPolicy(delays=(60,), lifetime=300,
                                                         delay_warning=100))
        never = Recipient(BOB, notify=("NEVER",))
        self.submit(never)  # deferred: delay warning, then expiry
        self.mx.results = {CAROL: BOUNCED}
        self.submit(Recipient(CAROL, notify=("NEVER",)))  # bounced at once
        self.clock.pump([60] * 10)
        self.assertEqual(self.mx.reports, [])
        self.assertEqual(self.queued(), [])

    def test_notify_success_reports_delivery_when_the_next_hop_did_not_take_dsn(self) -> None:
        self.mx.result = DELIVERED
        self.submit(Recipient(BOB, notify=("SUCCESS",)))
        [report] = self.mx.reports
        self.assertEqual(report.kind, "relayed")  # handed to a next hop without DSN
        self.assertEqual(report.recipients(), [BOB])

    def test_notify_success_is_left_to_a_next_hop_that_took_dsn(self) -> None:
        self.mx.result = DELIVERED
        self.mx.dsn_passed = True
        self.submit(Recipient(BOB, notify=("SUCCESS",)))
        self.assertEqual(self.mx.reports, [])
        self.assertEqual(self.queued(), [])

    def test_default_notify_gives_no_success_report(self) -> None:
        self.mx.result = DELIVERED
        self.submit(BOB)
        self.assertEqual(self.mx.reports, [])


class WatchedHostCache(HostCache):
    """A failed-host memory that calls ``forgetting`` when told to forget, then forgets."""

    def __init__(self, clock: Clock, first_retry: float, forgetting: Callable[[], None]) -> None:
        super().__init__(clock, first_retry)
        self._forgetting = forgetting

    def forget_all(self) -> None:
        self._forgetting()
        super().forget_all()


class FlushForgetTests(SchedulerTestCase):
    def test_flush_retries_now(self) -> None:
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(RetryPolicy(delays=(3600,), delay_warning=0))
        entry = self.submit(BOB)
        self.clock.advance(10)
        self.mx.result = DELIVERED
        self.assertEqual(self.scheduler.flush(), 1)
        self.assertEqual(self.mx.attempt_times, [0, 10])
        self.assertRaises(KeyError, self.spool.load, entry.queue_id)
        self.clock.advance(7200)
        self.assertEqual(self.mx.attempt_times, [0, 10])

    def test_flush_first_forgets_suspended_next_hops(self) -> None:
        self.scheduler.stop()
        seen: list[int] = []  # attempts made when the scheduler asked to forget
        self.mx.manual = True
        hosts = WatchedHostCache(self.clock, 60, lambda: seen.append(len(self.mx.attempt_times)))
        self.scheduler = self.make_scheduler(hosts=hosts)
        self.submit(BOB)
        self.mx.finish()
        self.scheduler.flush()
        self.assertEqual(seen, [1])  # before the flushed attempt started
        self.assertEqual(len(self.mx.attempt_times), 2)

    def test_flush_after_failure_reschedules_from_the_flush(self) -> None:
        self.submit(BOB)
        self.clock.advance(30)
        self.scheduler.flush()
        self.clock.advance(59)
        self.assertEqual(self.mx.attempt_times, [0, 30])
        self.clock.advance(1)
        self.assertEqual(self.mx.attempt_times, [0, 30])  # the old timer is gone
        self.clock.advance(240)  # 30 + 300 (second delay)
        self.assertEqual(self.mx.attempt_times, [0, 30, 330])

    def test_flush_while_active_tries_again_right_after(self) -> None:
        self.mx.manual = True
        entry = self.submit(BOB)
        self.assertEqual(self.scheduler.flush(), 1)
        self.mx.finish()
        self.assertEqual(self.mx.attempted(entry.queue_id), [0, 0])

    def test_flush_never_touches_held_mail(self) -> None:
        self.submit(BOB, held=True)
        self.scheduler.flush()
        self.assertEqual(self.mx.attempts, [])

    def test_forget_drops_a_waiting_message(self) -> None:
        entry = self.submit(BOB)
        self.scheduler.forget(entry.queue_id)
        self.clock.advance(10_000)
        self.assertEqual(self.mx.attempt_times, [0])
        self.scheduler.flush()
        self.assertEqual(self.mx.attempt_times, [0])

    def test_forget_drops_a_ready_message(self) -> None:
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(concurrency=1)
        self.mx.manual = True
        first = self.submit(BOB)
        second = self.submit(BOB)
        self.scheduler.forget(second.queue_id)
        self.mx.finish()
        self.assertEqual([q for _, q, _ in self.mx.attempts], [first.queue_id])

    def test_delete_during_an_attempt_is_not_an_error(self) -> None:
        self.mx.manual = True
        entry = self.submit(BOB)
        self.scheduler.forget(entry.queue_id)
        self.successResultOf(self.spool.remove(entry.queue_id))
        self.mx.finish()
        self.assertEqual(self.queued(), [])
        self.clock.advance(10_000)
        self.assertEqual(self.mx.attempt_times, [0])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_delete_before_removal_after_delivery_is_not_an_error(self) -> None:
        self.mx.manual = True
        self.mx.result = DELIVERED
        entry = self.submit(BOB)
        self.successResultOf(self.spool.remove(entry.queue_id))  # the admin tool, directly
        self.mx.finish()
        self.assertEqual(self.flushLoggedErrors(), [])


class RefusingMX:
    """The SMTP agent for an MX that refuses connections until ``up`` is set: it reports the
    refusing host unreachable, as the real agent does."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.up = False
        self.refusing_takes = 0.0  # virtual seconds before the refusal (DNS, a slow network)
        self.tries: list[float] = []

    async def deliver(self, route: Route, envelope: Envelope, recipients: Any,
                      open_body: Any, size: int) -> HopResult:
        self.tries.append(self.clock.seconds() - T0)
        host = route.hosts[0]
        if not self.up and self.refusing_takes:
            await deferLater(self.clock, self.refusing_takes, lambda: None)
        if self.up:
            return HopResult(tuple(Outcome(r, DELIVERED, REPLIES[DELIVERED], host.remote, "2.0.0")
                                   for r in recipients))
        why = f"connection refused by {host}"
        return HopResult(tuple(Outcome(r, DEFERRED, why, host.remote, "4.4.1") for r in recipients),
                         (HostFailure(host, why, "4.4.1"),))


class FailedHostTests(SchedulerTestCase):
    """The issue's bug: after an MX refused a connection its mail waited 60 s, whatever the
    retry schedule said. The failed-host memory now lasts the first retry interval at most."""

    def scheduled(self, policy: RetryPolicy) -> RefusingMX:
        """A scheduler whose attempts go through the courier to one refusing MX."""
        self.scheduler.stop()
        mx = RefusingMX(self.clock)
        route = Route(SMTP, hosts=(Host("mx.remote.test", "192.0.2.1", 25),))
        hosts = HostCache(self.clock, first_retry=policy.delay(1))
        courier = Courier(lambda domain, *, mta_sts=True: succeed(route), mx, FakeMaildir, hosts)
        self.scheduler = self.make_scheduler(policy, attempt=courier.attempt, hosts=hosts)
        return mx

    def test_refused_then_accepted_is_delivered_at_the_second_attempt(self) -> None:
        mx = self.scheduled(RetryPolicy(delays=(1, 1, 2), delay_warning=0))
        entry = self.submit(BOB)
        self.assertEqual(self.state(entry).last_error, "connection refused by "
                         "mx.remote.test[192.0.2.1]:25")
        mx.up = True  # the MX starts
        self.clock.advance(1)
        self.assertEqual(mx.tries, [0, 1])  # tried again, not "temporarily suspended"
        self.assertEqual(self.queued(), [])

    def test_the_hold_counts_from_the_start_of_the_attempt_not_the_refusal(self) -> None:
        mx = self.scheduled(RetryPolicy(delays=(1, 1, 2), delay_warning=0))
        mx.refusing_takes = 0.5
        self.submit(BOB)
        self.clock.advance(0.5)
        mx.up = True
        self.clock.advance(0.5)  # the second attempt, 1 s after the first began
        self.assertEqual(mx.tries, [0, 1])
        self.assertEqual(self.queued(), [])

    def test_within_the_hold_other_mail_for_the_route_is_deferred_untried(self) -> None:
        mx = self.scheduled(RetryPolicy(delay_warning=0))  # the default: 60 s, 300 s, ...
        self.submit(BOB)
        self.clock.advance(10)
        second = self.submit(CAROL)
        self.assertEqual(mx.tries, [0])
        self.assertEqual(self.state(second).last_error, "delivery temporarily suspended: "
                         "connection refused by mx.remote.test[192.0.2.1]:25")
        mx.up = True
        self.clock.advance(50)  # the first message's retry: the hold (60 s) is over
        self.assertEqual(mx.tries, [0, 60])
        self.clock.advance(10)
        self.assertEqual(mx.tries, [0, 60, 70])
        self.assertEqual(self.queued(), [])

    def test_flush_tries_a_suspended_route_now(self) -> None:
        mx = self.scheduled(RetryPolicy(delay_warning=0))
        self.submit(BOB)
        self.clock.advance(10)
        mx.up = True
        self.scheduler.flush()
        self.assertEqual(mx.tries, [0, 10])
        self.assertEqual(self.queued(), [])


class FairnessTests(SchedulerTestCase):
    def backlog(self, count: int) -> list[QueueEntry]:
        """``count`` deferred messages due now, scheduled by a (re)start."""
        entries = [self.submit(BOB, schedule=False) for _ in range(count)]
        self.scheduler.stop()
        self.mx.duration = 1
        self.scheduler = self.make_scheduler(concurrency=1)
        self.clock.advance(0)
        return entries

    def test_new_mail_is_not_starved_by_a_retry_backlog(self) -> None:
        self.backlog(100)
        new = self.submit(BOB)
        for _ in range(5):
            self.clock.advance(1)
        order = [q for _, q, _ in self.mx.attempts]
        self.assertIn(new.queue_id, order[:3])

    def test_retries_are_not_starved_by_new_mail(self) -> None:
        [old] = self.backlog(1)
        self.mx.duration = 1
        self.mx.manual = False
        # The backlog's message is running; a flood of new mail arrives, and the old message
        # is due again (flush) while the flood waits.
        for _ in range(30):
            self.submit(BOB)
        self.clock.advance(1)
        self.scheduler.flush()
        for _ in range(5):
            self.clock.advance(1)
        order = [q for _, q, _ in self.mx.attempts]
        self.assertEqual(order[0], old.queue_id)
        self.assertIn(old.queue_id, order[1:4])

    def test_a_large_synchronous_backlog_does_not_recurse(self) -> None:
        for _ in range(300):
            self.submit(BOB, schedule=False)
        self.scheduler.stop()
        self.mx.result = DELIVERED
        self.scheduler = self.make_scheduler(concurrency=1)
        self.clock.advance(0)
        self.assertEqual(len(self.mx.attempts), 300)
        self.assertEqual(self.queued(), [])


class ConcurrencyTests(SchedulerTestCase):
    def test_limit_is_respected(self) -> None:
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(concurrency=3)
        self.mx.manual = True
        self.mx.result = DELIVERED
        for _ in range(10):
            self.submit(BOB)
        self.assertEqual(len(self.mx.in_flight), 3)
        self.mx.finish()
        self.assertEqual(len(self.mx.in_flight), 3)
        self.assertEqual(len(self.mx.attempts), 4)
        while self.mx.in_flight:
            self.mx.finish()
        self.assertEqual(len(self.mx.attempts), 10)
        self.assertEqual(self.mx.max_in_flight, 3)
        self.assertEqual(self.queued(), [])

    def test_one_destination_cannot_take_every_slot(self) -> None:
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(concurrency=4, per_destination=2)
        self.mx.manual = True
        self.mx.result = DELIVERED
        slow = [self.submit(BOB) for _ in range(5)]  # remote.test
        other = self.submit("dave@other.test")
        self.assertEqual(len(self.mx.in_flight), 3)  # two for remote.test, one for other.test
        self.assertEqual(self.mx.attempted(other.queue_id), [0])
        while self.mx.in_flight:
            self.mx.finish()
        self.assertEqual(len(self.mx.attempts), 6)
        self.assertEqual({q for _, q, _ in self.mx.attempts[:2]},
                         {e.queue_id for e in slow[:2]})
        self.assertEqual(self.queued(), [])

    def test_a_busy_destination_keeps_arrival_order(self) -> None:
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(concurrency=4, per_destination=2)
        self.mx.manual = True
        self.mx.result = DELIVERED
        slow = [self.submit(BOB) for _ in range(6)]
        gone = slow[3]
        self.scheduler.forget(gone.queue_id)  # deleted by the operator while set aside
        self.successResultOf(self.spool.remove(gone.queue_id))
        while self.mx.in_flight:
            self.mx.finish()
        self.assertEqual([q for _, q, _ in self.mx.attempts],
                         [e.queue_id for e in slow if e is not gone])
        self.assertEqual(self.queued(), [])

    def test_a_busy_destination_backlog_is_not_walked_on_every_pump(self) -> None:
        # 300 messages for one domain with 2 slots: the old scheduler looked at every waiting
        # message each time a slot freed (about 45,000 looks); set aside, each is looked at
        # a few times.
        looks = 0

        class Counting(deque[QueueId]):
            def popleft(self) -> QueueId:
                nonlocal looks
                looks += 1
                return super().popleft()

        self.scheduler.stop()
        self.scheduler = self.make_scheduler(concurrency=4, per_destination=2)
        self.scheduler._fresh = _Ready(Counting())
        self.mx.manual = True
        self.mx.result = DELIVERED
        for _ in range(300):
            self.submit(BOB)
        while self.mx.in_flight:
            self.mx.finish()
        self.assertEqual(len(self.mx.attempts), 300)
        self.assertLess(looks, 3 * 300)

    def test_observers_see_every_outcome(self) -> None:
        seen: list[tuple[QueueId, str, str]] = []
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(
            observe=lambda e, o: seen.append((e.queue_id, o.recipient.address, o.result)))
        self.mx.results = {BOB: DELIVERED, CAROL: BOUNCED}
        entry = self.submit(BOB, CAROL)
        self.assertIn((entry.queue_id, BOB, DELIVERED), seen)
        self.assertIn((entry.queue_id, CAROL, BOUNCED), seen)

    def test_idle_is_called_when_nothing_is_left(self) -> None:
        idle: list[float] = []
        self.scheduler.idle = lambda: idle.append(self.now())
        self.mx.duration = 5
        self.submit(BOB)
        self.clock.advance(5)
        self.assertEqual(idle, [5])


class CrashTests(SchedulerTestCase):
    def test_a_crash_in_the_attempt_is_a_deferral(self) -> None:
        self.mx.crash = True
        entry = self.submit(BOB)
        self.assertEqual(len(self.flushLoggedErrors(Crash)), 1)
        state = self.state(entry)
        self.assertEqual(state.attempts, 1)
        self.assertEqual(state.recipients[0].status, PENDING)
        self.assertEqual(state.next_attempt, T0 + 60)
        self.assertIn("internal error", state.last_error)
        self.mx.crash = False
        self.mx.result = DELIVERED
        self.clock.advance(60)
        self.assertEqual(self.mx.attempt_times, [0, 60])
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.mx.reports, [])

    def test_a_failure_to_record_the_attempt_is_retried(self) -> None:
        self.spool = self.open_spool(FlakySpool)
        self.scheduler.stop()
        self.scheduler = self.make_scheduler()
        assert isinstance(self.spool, FlakySpool)
        self.spool.fail_updates = 1
        entry = self.submit(BOB)
        self.assertEqual(self.state(entry).attempts, 0)  # the record did not reach the disk
        self.clock.advance(60)
        self.assertEqual(self.mx.attempt_times, [0, 60])
        # Hardening II: the unsaved first attempt was kept in memory, not thrown away (which
        # re-delivered everyone the attempt had delivered): the second write holds both.
        self.assertEqual(self.state(entry).attempts, 2)


class RestartTests(SchedulerTestCase):
    def test_restart_keeps_attempts_and_next_attempt(self) -> None:
        entry = self.submit(BOB)
        self.clock.advance(60)
        before = self.state(entry)
        self.assertEqual((before.attempts, before.next_attempt), (2, T0 + 360))
        self.scheduler.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)  # the daemon is down for a while
        self.spool = self.open_spool()
        self.scheduler = self.make_scheduler(start=False)
        self.assertEqual(self.scheduler.start(), 1)
        self.clock.advance(199)
        self.assertEqual(self.mx.attempt_times, [0, 60])
        self.clock.advance(1)
        self.assertEqual(self.mx.attempt_times, [0, 60, 360])
        self.assertEqual(self.state(entry).attempts, 3)
        self.assertEqual(self.state(entry).next_attempt, T0 + 660)  # the last delay repeats

    def test_overdue_messages_are_tried_at_start(self) -> None:
        self.submit(BOB)
        self.scheduler.stop()
        self.clock.advance(10_000)
        self.scheduler = self.make_scheduler()
        self.clock.advance(0)
        self.assertEqual(self.mx.attempt_times, [0, 10_000])

    def test_new_mail_accepted_before_start_is_tried_once(self) -> None:
        self.scheduler.stop()
        self.scheduler = self.make_scheduler(start=False)
        self.submit(BOB)  # enqueue before start, and the spool has it too
        self.assertEqual(self.mx.attempts, [])
        self.scheduler.start()
        self.clock.advance(0)
        self.assertEqual(self.mx.attempt_times, [0])


class HeldTests(SchedulerTestCase):
    def test_held_mail_is_never_attempted(self) -> None:
        entry = self.submit(BOB, held=True)
        self.clock.advance(10_000)
        self.scheduler.stop()
        self.scheduler = self.make_scheduler()  # start() skips it too
        self.scheduler.flush()
        self.clock.advance(10_000)
        self.assertEqual(self.mx.attempts, [])
        self.assertEqual(self.state(entry).attempts, 0)


class FakeSMTP:
    def __init__(self, crash: bool = False) -> None:
        self.calls: list[tuple[Route, tuple[str, ...]]] = []
        self.crash = crash

    async def deliver(self, route: Route, envelope: Envelope, recipients: Any,
                      open_body: Any, size: int) -> HopResult:
        self.calls.append((route, tuple(r.address for r in recipients)))
        if self.crash:
            raise Crash("smtp agent bug")
        return HopResult(tuple(Outcome(r, DELIVERED, "250 ok", "mx[127.0.0.1]")
                               for r in recipients))


class FakeMaildir:
    def __init__(self, root: Path) -> None:
        self.root = root

    async def deliver(self, envelope: Envelope, recipients: Any,
                      open_body: Any) -> list[Outcome]:
        return [Outcome(r, DELIVERED, "delivered to maildir", "maildir") for r in recipients]


class CourierTests(SynchronousTestCase):
    """One attempt: resolve each domain once, one connection per route."""

    def setUp(self) -> None:
        shared = Route(SMTP, hosts=(Host("mx.shared.test", "127.0.0.1", 25),))
        self.routes: dict[str, Route | Exception] = {
            "a.test": shared,
            "b.test": shared,
            "c.test": Route(SMTP, hosts=(Host("mx.c.test", "127.0.0.2", 25),)),
            "local.test": Route(MAILDIR, maildir="/nonexistent"),
            "gone.test": PermanentRouteError("domain gone.test does not exist", "5.1.2"),
            "flaky.test": TemporaryRouteError("MX lookup for flaky.test failed: SERVFAIL",
                                              "4.4.3"),
            "bug.test": Crash("resolver bug"),
        }
        self.resolved: list[str] = []
        self.smtp = FakeSMTP()

    def resolve(self, domain: str, *, mta_sts: bool = True) -> Deferred[Route]:
        self.resolved.append(domain)
        route = self.routes[domain]
        if isinstance(route, Exception):
            return Deferred.fromCoroutine(_raise(route))
        return succeed(route)

    def attempt(self, *addresses: str) -> list[Outcome]:
        envelope = Envelope(ALICE, tuple(Recipient(a) for a in addresses))
        entry = QueueEntry.new(QueueId.new(T0), envelope, 10)
        courier = Courier(self.resolve, self.smtp, FakeMaildir, HostCache(Clock(), 60))
        result: AttemptResult = self.successResultOf(
            Deferred.fromCoroutine(courier.attempt(entry, lambda: _no_body()))
        )
        return list(result.outcomes)

    def test_one_connection_per_route_and_one_lookup_per_domain(self) -> None:
        outcomes = self.attempt("x@a.test", "y@b.test", "z@a.test", "w@c.test")
        self.assertEqual(sorted(self.resolved), ["a.test", "b.test", "c.test"])
        self.assertEqual([rcpts for _, rcpts in self.smtp.calls],
                         [("x@a.test", "z@a.test", "y@b.test"), ("w@c.test",)])
        self.assertEqual({o.result for o in outcomes}, {DELIVERED})
        self.assertEqual(len(outcomes), 4)

    def test_route_errors_bounce_or_defer_per_domain(self) -> None:
        outcomes = {o.recipient.address: o for o in
                    self.attempt("a@gone.test", "b@flaky.test", "c@a.test", "d@local.test")}
        self.assertEqual(outcomes["a@gone.test"].result, BOUNCED)
        self.assertEqual(outcomes["a@gone.test"].status, "5.1.2")
        self.assertEqual(outcomes["b@flaky.test"].result, DEFERRED)
        self.assertEqual(outcomes["b@flaky.test"].status, "4.4.3")
        self.assertEqual(outcomes["c@a.test"].result, DELIVERED)
        self.assertEqual(outcomes["d@local.test"].remote, "maildir")

    def test_a_resolver_bug_defers_only_that_domain(self) -> None:
        outcomes = {o.recipient.address: o for o in self.attempt("a@bug.test", "b@a.test")}
        self.assertEqual(len(self.flushLoggedErrors(Crash)), 1)
        self.assertEqual(outcomes["a@bug.test"].result, DEFERRED)
        self.assertEqual(outcomes["b@a.test"].result, DELIVERED)

    def test_an_agent_bug_defers_its_recipients(self) -> None:
        self.smtp.crash = True
        outcomes = self.attempt("a@a.test", "b@local.test")
        self.assertEqual(len(self.flushLoggedErrors(Crash)), 1)
        self.assertEqual([o.result for o in outcomes], [DEFERRED, DELIVERED])

    def test_an_agent_bug_with_one_next_hop_defers_every_recipient(self) -> None:
        """One next hop is awaited without gathering: its crash is still a deferral of all of
        its recipients, logged once."""
        self.smtp.crash = True
        outcomes = self.attempt("a@a.test", "b@b.test")
        self.assertEqual(len(self.flushLoggedErrors(Crash)), 1)
        self.assertEqual([(o.result, o.status) for o in outcomes], [(DEFERRED, "4.3.0")] * 2)

    def test_one_next_hop_waits_for_its_agent(self) -> None:
        answer: Deferred[None] = Deferred()
        smtp = self.smtp

        class SlowSMTP:
            async def deliver(self, route: Route, envelope: Envelope, recipients: Any,
                              open_body: Any, size: int) -> HopResult:
                await answer
                return await smtp.deliver(route, envelope, recipients, open_body, size)

        envelope = Envelope(ALICE, (Recipient("a@a.test"),))
        courier = Courier(self.resolve, SlowSMTP(), FakeMaildir, HostCache(Clock(), 60))
        attempt = Deferred.fromCoroutine(
            courier.attempt(QueueEntry.new(QueueId.new(T0), envelope, 10), _no_body)
        )
        self.assertNoResult(attempt)
        answer.callback(None)
        self.assertEqual([o.result for o in self.successResultOf(attempt).outcomes], [DELIVERED])

async def _raise(e: Exception) -> Route:
    raise e


def _no_body() -> BinaryIO:
    raise AssertionError("the fakes never read the body")
