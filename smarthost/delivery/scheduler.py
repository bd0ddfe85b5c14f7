"""When each queued message is tried, and what its results do to it.

State lives on disk (the spool); in memory there is only a heap of (next attempt, id) and two
ready queues. New mail has its own ready queue so a backlog of retries cannot starve it
(Postfix's qmgr alternates the same way). One timer serves the whole heap, so start-up with a
large deferred queue costs one heap push per message and no timers.

The retry schedule is a pure function of the attempt number (:class:`RetryPolicy`), recording
results a pure function of the entry and the outcomes (:func:`record`), so both are tested
in virtual time without a reactor.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, BinaryIO, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from smarthost.api import ISpool
from smarthost.core.envelope import (
    BOUNCED,
    DELIVERED,
    PENDING,
    Outcome,
    QueueEntry,
    QueueId,
    RecipientState,
)
from smarthost.core.errors import CorruptEntry
from smarthost.core.maillog import MailLog
from smarthost.delivery.bounce import Kind, build_report, report_envelope
from smarthost.delivery.courier import AttemptResult
from smarthost.delivery.dsn import ReportedRecipient
from smarthost.delivery.hostcache import HostCache

EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired


@attrs.frozen
class RetryPolicy:
    delays: tuple[float, ...] = (60, 300, 900, 1800, 3600)
    lifetime: float = 432000
    delay_warning: float = 14400  # 0 = never

    def delay(self, attempts: int) -> float:
        """Seconds to wait after attempt number ``attempts`` (1-based); the last repeats."""
        return self.delays[min(max(attempts, 1), len(self.delays)) - 1]

    def expired(self, entry: QueueEntry, now: float) -> bool:
        return now - entry.queued_at >= self.lifetime

    def should_warn(self, entry: QueueEntry, now: float) -> bool:
        return (
            self.delay_warning > 0
            and not entry.delay_warned
            and now - entry.queued_at >= self.delay_warning
        )


def record(entry: QueueEntry, outcomes: Iterable[Outcome]) -> QueueEntry:
    """The entry after one attempt: each recipient's status and last reply, the attempt count
    and the last error (what `queue list` shows)."""
    by_address = {o.recipient.address: o for o in outcomes}
    states = []
    last_error = ""
    for state in entry.recipients:
        outcome = by_address.get(state.recipient.address)
        if state.status != PENDING or outcome is None:
            states.append(state)
            continue
        status = outcome.result if outcome.result in (DELIVERED, BOUNCED) else PENDING
        if status == PENDING and not last_error:
            last_error = outcome.reply
        states.append(
            attrs.evolve(
                state,
                status=status,
                last_reply=outcome.reply,
                remote=outcome.remote,
                attempts=state.attempts + 1,
            )
        )
    return attrs.evolve(
        entry, recipients=tuple(states), attempts=entry.attempts + 1, last_error=last_error
    )


def expire(entry: QueueEntry) -> tuple[QueueEntry, list[RecipientState]]:
    """Bounce every recipient still pending once the lifetime is over."""
    expired = list(entry.pending)
    states = tuple(
        attrs.evolve(s, status=BOUNCED) if s.status == PENDING else s for s in entry.recipients
    )
    return attrs.evolve(entry, recipients=states), expired


class Attempt(Protocol):
    def __call__(
        self, entry: QueueEntry, open_body: Callable[[], BinaryIO]
    ) -> Coroutine[Any, Any, AttemptResult]: ...


class Reporter:
    """Builds RFC 3464 reports and commits them to the spool like any message, with the null
    sender; the caller (the scheduler) schedules the entry it returns."""

    def __init__(
        self,
        spool: ISpool,
        hostname: str,
        clock: IReactorTime,
        maillog: MailLog,
    ) -> None:
        self._spool = spool
        self._hostname = hostname
        self._clock = clock
        self._log = maillog

    async def send(
        self,
        kind: Kind,
        entry: QueueEntry,
        recipients: Sequence[ReportedRecipient],
        retry_until: float | None = None,
    ) -> QueueEntry | None:
        """The queued report, or None when there is nothing to report (no recipient, the
        null sender, NOTIFY=NEVER)."""
        if not recipients:
            return None
        now = self._clock.seconds()
        with self._spool.open_body(entry.queue_id) as original:
            report = build_report(
                kind,
                reporting_mta=self._hostname,
                envelope=entry.envelope,
                recipients=recipients,
                original=original,
                arrival=entry.queued_at,
                now=now,
                queue_id=str(entry.queue_id),
                retry_until=retry_until,
            )
        if report is None:
            return None
        incoming = self._spool.receive()
        try:
            incoming.write(report)
        except BaseException:
            incoming.abort()  # disk full: no half report left in tmp/
            raise
        queued = await incoming.commit(report_envelope(report, entry.envelope, now))
        self._log.bounce_sent(entry.queue_id, queued.queue_id, kind)
        return queued


@attrs.define
class _Ready:
    """One ready queue (new mail, or retries) in arrival order. Messages whose destination
    had no free slot when their turn came are set aside per destination, so a big backlog
    for one busy domain is not walked again on every pump; they go back one at a time as
    that domain's slots free up."""

    waiting: deque[QueueId] = attrs.Factory(deque)
    blocked: dict[str, deque[QueueId]] = attrs.Factory(dict)


class Scheduler:
    def __init__(
        self,
        clock: IReactorTime,
        spool: ISpool,
        attempt: Attempt,
        reporter: Reporter,
        policy: RetryPolicy,
        maillog: MailLog,
        hosts: HostCache,
        *,
        concurrency: int = 100,
        per_destination: int = 20,
        observe: Callable[[QueueEntry, Outcome], None] = lambda entry, outcome: None,
    ) -> None:
        self._clock = clock
        self._hosts = hosts  # records each attempt's unreachable hosts; a flush forgets them
        self._spool = spool
        self._attempt = attempt
        self._reporter = reporter
        self._policy = policy
        self._log = maillog
        self._concurrency = concurrency
        # Postfix's default_destination_concurrency_limit: one slow or dead domain cannot take
        # every delivery slot. A message's destination is its first pending recipient's domain.
        self._per_destination = per_destination
        self._destination: dict[QueueId, str] = {}
        self._flying: dict[QueueId, str] = {}  # the destination each active attempt counts for
        self._in_flight: Counter[str] = Counter()
        self._observe = observe
        # New messages arrive as entries: their first attempt needs no read from disk.
        self._fresh_entries: dict[QueueId, QueueEntry] = {}
        self._heap: list[tuple[float, int, QueueId]] = []
        self._due: dict[QueueId, float] = {}  # the live heap entry per id (others are stale)
        self._fresh = _Ready()
        self._retry = _Ready()
        self._queued: set[QueueId] = set()  # in a ready queue
        self._active: set[QueueId] = set()
        self._again: set[QueueId] = set()  # flushed while active: try again right after
        self._seq = itertools.count()
        self._timer: IDelayedCall | None = None
        self._turn = 0
        self._running = False
        self._pumping = False
        self.idle: Callable[[], None] | None = None  # tests: called when nothing is active

    # -- feeding ---------------------------------------------------------------------------

    def start(self, entries: Iterable[QueueEntry] | None = None) -> int:
        """Schedule everything in the spool (daemon start); returns how many. ``entries``:
        what recovery already read, so a large queue is not parsed twice."""
        self._running = True
        count = 0
        for entry in self._spool.entries() if entries is None else entries:
            count += 1
            if not entry.envelope.held:
                self._note_destination(entry)
                self._wait(entry.queue_id, entry.next_attempt)
        self._arm()
        return count

    def stop(self) -> None:
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def enqueue(self, entry: QueueEntry) -> None:
        """A newly committed message: try it as soon as a slot is free."""
        if entry.envelope.held:
            return
        self._note_destination(entry)
        self._fresh_entries[entry.queue_id] = entry
        self._make_ready(entry.queue_id, fresh=True)
        self._pump()

    def flush(self) -> int:
        """Retry every waiting message now (``smarthost queue flush``), failed next hops
        included (``postqueue -f`` forgets dead destinations too)."""
        self._hosts.forget_all()
        waiting = [qid for qid in self._due]
        self._heap.clear()
        self._due.clear()
        for qid in waiting:
            self._make_ready(qid, fresh=False)
        self._again |= self._active
        count = len(waiting) + len(self._active)
        self._pump()
        return count

    def forget(self, queue_id: QueueId) -> None:
        """The message was deleted from the spool: drop it from the schedule."""
        self._due.pop(queue_id, None)
        self._fresh_entries.pop(queue_id, None)
        self._again.discard(queue_id)
        if queue_id in self._queued:
            self._queued.discard(queue_id)

    # -- the machinery ---------------------------------------------------------------------

    def _wait(self, queue_id: QueueId, when: float) -> None:
        self._due[queue_id] = when
        heapq.heappush(self._heap, (when, next(self._seq), queue_id))

    def _arm(self) -> None:
        """One timer for the earliest waiting message."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # stale: flushed, forgotten or rescheduled
        if self._heap and self._running:
            delay = max(0.0, self._heap[0][0] - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        while self._heap and self._heap[0][0] <= now:
            when, _, qid = heapq.heappop(self._heap)
            if self._due.get(qid) == when:
                del self._due[qid]
                self._make_ready(qid, fresh=False)
        self._arm()
        self._pump()

    def _make_ready(self, queue_id: QueueId, *, fresh: bool) -> None:
        if queue_id in self._queued or queue_id in self._active:
            return
        self._queued.add(queue_id)
        (self._fresh if fresh else self._retry).waiting.append(queue_id)

    def _note_destination(self, entry: QueueEntry) -> None:
        pending = entry.pending
        self._destination[entry.queue_id] = pending[0].recipient.domain if pending else ""

    def _next_ready(self) -> QueueId | None:
        # New mail first, but every third slot goes to a retry so neither starves.
        self._turn += 1
        order = (self._retry, self._fresh) if self._turn % 3 == 0 else (self._fresh, self._retry)
        for ready in order:
            while ready.waiting:
                qid = ready.waiting.popleft()
                if qid not in self._queued:
                    continue  # forgotten
                destination = self._destination.get(qid, "")
                if self._in_flight[destination] >= self._per_destination:
                    ready.blocked.setdefault(destination, deque()).append(qid)
                    continue
                self._queued.discard(qid)
                return qid
        return None

    def _unblock(self, destination: str) -> None:
        """A slot of ``destination`` freed up: its oldest set-aside message (of each ready
        queue) goes back to the front of that queue."""
        for ready in (self._fresh, self._retry):
            blocked = ready.blocked.get(destination)
            while blocked:
                qid = blocked.popleft()
                if qid in self._queued:  # else forgotten meanwhile
                    ready.waiting.appendleft(qid)
                    break
            if blocked is not None and not blocked:
                del ready.blocked[destination]

    def _pump(self) -> None:
        # An attempt can finish before fromCoroutine returns (a local delivery, a report to a
        # sender with no route); its _finished then calls _pump again. Without this guard every
        # such attempt nests one level deeper and a large backlog hits the recursion limit;
        # with it the loop below simply picks up where the nested call would have.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._running and len(self._active) < self._concurrency:
                qid = self._next_ready()
                if qid is None:
                    break
                self._active.add(qid)
                destination = self._flying[qid] = self._destination.get(qid, "")
                self._in_flight[destination] += 1
                Deferred.fromCoroutine(self._guarded(qid))
        finally:
            self._pumping = False

    async def _guarded(self, queue_id: QueueId) -> None:
        try:
            await self._run(queue_id)
        except GeneratorExit:
            raise  # closed unfinished (shutdown, garbage collection): start nothing new
        except Exception:
            # Recording the attempt failed (disk full, a bug in a report): the entry is still in
            # the spool as it was before the attempt, so it is simply tried again later.
            self._log.failure("{queue_id}: scheduling error", queue_id=str(queue_id))
            self._retry_later(queue_id)
        self._finished(queue_id)

    def _retry_later(self, queue_id: QueueId) -> None:
        if queue_id in self._due:
            return
        try:
            attempts = self._spool.load(queue_id).attempts
        except KeyError:
            return  # deleted: nothing to retry
        except Exception:
            attempts = 1
        self._wait(queue_id, self._clock.seconds() + self._policy.delay(attempts))

    def _finished(self, queue_id: QueueId) -> None:
        self._active.discard(queue_id)
        destination = self._flying.pop(queue_id, "")
        self._in_flight[destination] -= 1
        if self._in_flight[destination] <= 0:
            del self._in_flight[destination]
        self._unblock(destination)
        if queue_id in self._again:
            self._again.discard(queue_id)
            if queue_id in self._due:
                del self._due[queue_id]
                self._make_ready(queue_id, fresh=False)
        if queue_id not in self._due and queue_id not in self._queued:
            self._destination.pop(queue_id, None)  # done, deleted or held: forget it
        self._arm()
        self._pump()
        if not self._active and not self._queued and self.idle is not None:
            self.idle()

    # -- one attempt -----------------------------------------------------------------------

    async def _run(self, queue_id: QueueId) -> None:
        try:
            entry = self._fresh_entries.pop(queue_id, None) or self._spool.load(queue_id)
        except KeyError:
            return  # deleted meanwhile
        except CorruptEntry as e:
            self._log.warning("{queue_id}: unreadable queue entry: {e}", queue_id=str(queue_id),
                              e=str(e))
            return
        if entry.envelope.held:
            return
        now = self._clock.seconds()

        def open_body() -> BinaryIO:
            return self._spool.open_body(queue_id)

        try:
            result = await self._attempt(entry, open_body)
        except Exception:
            # A crash inside delivery is a temporary failure: the message stays queued.
            self._log.failure("{queue_id}: delivery attempt failed", queue_id=str(queue_id))
            result = AttemptResult(())
        # Remembered from the start of this attempt, so this message's next attempt (one
        # retry interval later at the earliest) finds the hold over and tries the host again.
        for failure in result.unreachable:
            self._hosts.failed(failure, since=now)
        outcomes = list(result.outcomes)
        for outcome in outcomes:
            self._log.attempt(queue_id, outcome)
            self._observe(entry, outcome)
        entry = record(entry, outcomes)
        if not outcomes:
            entry = attrs.evolve(entry, last_error="internal error during delivery")
        await self._report(entry, outcomes, now)
        if entry.pending and self._policy.expired(entry, now):
            entry, expired = expire(entry)
            await self._send_report(
                "failure",
                entry,
                [
                    attrs.evolve(
                        ReportedRecipient.from_state(s, now),
                        status=EXPIRED_STATUS,
                        diagnostic=s.last_reply or "delivery time expired",
                    )
                    for s in expired
                ],
            )
            for s in expired:
                self._log.attempt(
                    queue_id,
                    Outcome(s.recipient, BOUNCED, f"lifetime expired; last: {s.last_reply}",
                            s.remote, EXPIRED_STATUS),
                )
        elif entry.pending and self._policy.should_warn(entry, now):
            await self._send_report(
                "delay",
                entry,
                [ReportedRecipient.from_state(s, now) for s in entry.pending],
                retry_until=entry.queued_at + self._policy.lifetime,
            )
            entry = attrs.evolve(entry, delay_warned=True)
        if not entry.pending:
            self._due.pop(queue_id, None)
            try:
                await self._spool.remove(queue_id)
            except KeyError:
                return  # deleted by the operator while we were delivering
            self._log.removed(queue_id, "done")
            return
        next_attempt = now + self._policy.delay(entry.attempts)
        entry = attrs.evolve(entry, next_attempt=next_attempt)
        try:
            await self._spool.update(entry)
        except KeyError:
            return  # deleted while we were delivering
        self._note_destination(entry)
        self._wait(queue_id, next_attempt)

    async def _report(self, entry: QueueEntry, outcomes: list[Outcome], now: float) -> None:
        """Failure reports for this attempt's bounces, success reports where NOTIFY asks."""
        bounced = [ReportedRecipient.from_outcome(o, now) for o in outcomes if o.result == BOUNCED]
        await self._send_report("failure", entry, bounced)
        delivered = [
            ReportedRecipient.from_outcome(o, now, relayed=o.remote != "maildir")
            for o in outcomes
            if o.result == DELIVERED and o.recipient.wants("SUCCESS") and not o.dsn_passed
        ]
        await self._send_report("success", entry, delivered)

    async def _send_report(
        self,
        kind: Kind,
        entry: QueueEntry,
        recipients: Sequence[ReportedRecipient],
        retry_until: float | None = None,
    ) -> None:
        report = await self._reporter.send(kind, entry, recipients, retry_until)
        if report is not None:
            self.enqueue(report)
