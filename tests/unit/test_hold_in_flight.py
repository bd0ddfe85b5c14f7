"""``smarthost queue hold`` and ``delete`` while the message is being delivered, in virtual
time: the control commands over the real scheduler and spool, a delivery attempt that takes
its time (or waits for the test), and a disk that can be paused mid-write.

The hold used to forget the message in the scheduler and write the held flag on what the disk
had: the attempt in flight then saved its results without the hold and scheduled the message
again, and a hold while results were unsaved wrote the delivered recipients back as pending.
Each ``hold`` test here fails on that code.
"""
# trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from test_scheduler import BOB, CAROL, FlakySpool, SchedulerTestCase, run_now
from twisted.internet.defer import Deferred, maybeDeferred

from smarthost.app import control
from smarthost.core.envelope import BOUNCED, DEFERRED, DELIVERED, PENDING, QueueEntry
from smarthost.core.maillog import MailLog
from smarthost.queue.spool import Spool


class Disk:
    """The spool's ``run_blocking``: each write at once, or, while paused, when resumed."""

    def __init__(self) -> None:
        self.paused = False
        self._waiting: list[tuple[Deferred[Any], Callable[[], Any]]] = []

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        if not self.paused:
            return run_now(f, *args, **kwargs)
        d: Deferred[Any] = Deferred()
        self._waiting.append((d, lambda: f(*args, **kwargs)))
        return d

    def resume(self) -> None:
        self.paused = False
        while self._waiting:
            d, job = self._waiting.pop(0)
            maybeDeferred(job).chainDeferred(d)


class HoldInFlightTests(SchedulerTestCase):
    def setUp(self) -> None:
        self.disk = Disk()
        super().setUp()
        self.mx.results = {BOB: DELIVERED, CAROL: DEFERRED}
        self.control = control.ControlCommands(self.spool, self.scheduler, MailLog(self.clock))

    def open_spool(self, kind: type[Spool] = Spool) -> Spool:
        previous: Spool | None = getattr(self, "spool", None)
        if previous is not None:
            previous.close()
        spool = kind(self.directory / "spool", clock=self.clock, run_blocking=self.disk.run)
        spool.recover()
        self.addCleanup(spool.close)
        return spool

    def hold(self, entry: QueueEntry) -> Deferred[dict[str, list[str]]]:
        return self.control.hold([str(entry.queue_id)])

    def release(self, entry: QueueEntry) -> None:
        answer = self.successResultOf(self.control.release_ids([str(entry.queue_id)]))
        self.assertEqual(answer[control.DONE], [str(entry.queue_id)])

    def statuses(self, entry: QueueEntry) -> list[str]:
        return [r.status for r in self.state(entry).recipients]

    def test_a_hold_during_an_attempt_is_kept_and_nothing_is_tried_again(self) -> None:
        self.mx.duration = 30
        entry = self.submit(BOB, CAROL)
        self.clock.advance(10)
        answer = self.successResultOf(self.hold(entry))
        self.assertEqual(answer[control.DONE], [str(entry.queue_id)])
        self.clock.advance(20)  # the attempt ends: BOB delivered, CAROL deferred
        self.assertTrue(self.state(entry).envelope.held)
        self.assertEqual(self.statuses(entry), [DELIVERED, PENDING])
        self.clock.advance(10_000)
        self.scheduler.flush()
        self.clock.advance(10_000)
        self.assertEqual(self.mx.attempt_times, [0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

        self.mx.results[CAROL] = DELIVERED
        self.release(entry)
        self.clock.advance(30)
        self.assertEqual(self.mx.attempts[1][2], (CAROL,))  # BOB stays delivered
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_hold_while_the_attempt_saves_keeps_its_results(self) -> None:
        self.mx.manual = True
        entry = self.submit(BOB, CAROL)
        self.disk.paused = True
        self.mx.finish()  # the attempt's results are on their way to the disk
        held = self.hold(entry)
        self.disk.resume()
        self.assertEqual(self.successResultOf(held)[control.DONE], [str(entry.queue_id)])
        self.assertTrue(self.state(entry).envelope.held)
        self.assertEqual(self.statuses(entry), [DELIVERED, PENDING])
        self.clock.advance(10_000)
        self.assertEqual(self.mx.attempt_times, [0])

    def test_a_hold_keeps_results_not_saved_yet_and_reports_owed(self) -> None:
        self.spool = self.open_spool(FlakySpool)
        self.scheduler.stop()
        self.scheduler = self.make_scheduler()
        self.control = control.ControlCommands(self.spool, self.scheduler, MailLog(self.clock))
        assert isinstance(self.spool, FlakySpool)
        self.spool.fail_updates = 1  # the attempt's results stay in memory
        self.mx.results = {BOB: DELIVERED, CAROL: BOUNCED}
        dave = "dave@remote.test"
        entry = self.submit(BOB, CAROL, dave)
        self.assertEqual(self.state(entry).attempts, 0)
        self.successResultOf(self.hold(entry))
        self.assertEqual(self.statuses(entry), [DELIVERED, BOUNCED, PENDING])
        self.assertEqual(self.mx.reports, [])  # owed: the run after the release sends it
        self.mx.results[dave] = DELIVERED
        self.release(entry)
        self.assertEqual(self.mx.attempts[1][2], (dave,))
        self.assertEqual([(r.kind, r.recipients()) for r in self.mx.reports],
                         [("failed", [CAROL])])
        self.assertEqual(self.queued(), [])

    def test_a_release_during_the_attempt_undoes_the_hold(self) -> None:
        self.mx.duration = 30
        entry = self.submit(BOB, CAROL)
        self.clock.advance(10)
        self.successResultOf(self.hold(entry))
        self.release(entry)
        self.clock.advance(20)
        self.assertFalse(self.state(entry).envelope.held)
        self.mx.results[CAROL] = DELIVERED
        self.clock.pump([30, 30])  # the retry is due at 60 (one delay after the first start)
        self.assertEqual(self.mx.attempt_times, [0, 60])
        self.assertEqual(self.queued(), [])

    def test_a_delete_during_an_attempt_stays_deleted(self) -> None:
        self.mx.duration = 30
        self.mx.results = {BOB: BOUNCED, CAROL: DEFERRED}
        entry = self.submit(BOB, CAROL)
        self.clock.advance(10)
        answer = self.successResultOf(self.control.delete([str(entry.queue_id)]))
        self.assertEqual(answer[control.DONE], [str(entry.queue_id)])
        self.clock.advance(20)
        self.clock.advance(10_000)
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.mx.attempt_times, [0])
        self.assertEqual(self.mx.reports, [])  # deleted: nobody is told
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_delete_while_the_attempt_saves_stays_deleted(self) -> None:
        self.mx.manual = True
        entry = self.submit(BOB, CAROL)
        self.disk.paused = True
        self.mx.finish()
        deleted = self.control.delete([str(entry.queue_id)])
        self.disk.resume()
        self.assertEqual(self.successResultOf(deleted)[control.DONE], [str(entry.queue_id)])
        self.clock.advance(10_000)
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.mx.attempt_times, [0])
        self.assertEqual(self.flushLoggedErrors(), [])
