"""When each queued message is tried, and what its results do to it.

State lives on disk (the spool); in memory there is only a heap of (next attempt, id) and two
ready queues. New mail has its own ready queue so a backlog of retries cannot starve it
(Postfix's qmgr alternates the same way). One timer serves the whole heap, so start-up with a
large deferred queue costs one heap push per message and no timers.

The retry schedule and what an attempt does to an entry are pure functions
(:mod:`smarthost.delivery.recording`), so this module is only the machinery that applies
them, tested in virtual time without a reactor.

The delivery state, and the reports it makes due to the sender, are saved in one write before
any report is built, and whatever fails afterwards (a report, the write itself) is retried on
its own without delivering to anyone again: see :meth:`Scheduler._run` for what is on disk at
each step and the at-least-once windows.

The operator's hold and release go through here too (:meth:`Scheduler.hold`), because only
the scheduler knows what an attempt in flight is about to write.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, BinaryIO, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from smarthost.api import ISpool
from smarthost.core.envelope import BOUNCED, Outcome, QueueEntry, QueueId
from smarthost.core.errors import CorruptEntry
from smarthost.core.maillog import MailLog
from smarthost.delivery.courier import AttemptResult
from smarthost.delivery.hostcache import HostCache
from smarthost.delivery.recording import EXPIRED_STATUS, RetryPolicy, conclude
from smarthost.delivery.reporting import OwedReports, Reporter, owe


class Attempt(Protocol):
    def __call__(
        self, entry: QueueEntry, open_body: Callable[[], BinaryIO]
    ) -> Coroutine[Any, Any, AttemptResult]: ...


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
        # Queues what each message owes its sender (owed in its entry): at each of its runs.
        self._reports = OwedReports(reporter, clock, maillog, give_up_after=policy.lifetime)
        # Attempts whose results are not on disk yet: each run starts from here, so a failed
        # write never delivers anyone twice (see _run).
        self._unsaved: dict[QueueId, QueueEntry] = {}
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
        self._held_in_flight: set[QueueId] = set()  # held while active: save held, stop there
        self._seq = itertools.count()
        self._timer: IDelayedCall | None = None
        self._turn = 0
        self._running = False
        self._pumping = False
        self.idle: Callable[[], None] | None = None  # tests: called when nothing is active

    # -- feeding ---------------------------------------------------------------------------

    def start(self, entries: Iterable[QueueEntry] | None = None) -> int:
        """Schedule everything in the spool (daemon start); returns how many. ``entries``:
        what recovery already read, so a large queue is not parsed twice.

        A message that owes its sender a report (saved with the outcomes, not queued before
        the previous daemon stopped, or failing to be queued) runs at once: the report is
        late already. Its pending recipients, if any, are then tried early, once per start."""
        self._running = True
        count = 0
        now = self._clock.seconds()
        for entry in self._spool.entries() if entries is None else entries:
            count += 1
            if not entry.envelope.held:
                self._note_destination(entry)
                when = min(entry.next_attempt, now) if entry.owed_reports else entry.next_attempt
                self._wait(entry.queue_id, when)
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
        """The message was deleted from the spool: drop it from the schedule and from memory
        (an attempt in flight then finds it gone when it saves, and stops there)."""
        self._unschedule(queue_id)
        self._held_in_flight.discard(queue_id)
        self._unsaved.pop(queue_id, None)

    async def hold(self, queue_id: QueueId) -> bool:
        """``smarthost queue hold``: keep the message queued but neither tried nor expired
        until :meth:`release`. False when it is held already; KeyError when not queued.

        The hold is written on the newest entry this daemon knows (results not saved yet
        included), and an attempt in flight saves its results held and schedules nothing:
        the hold cannot be undone by a delivery in progress, nor the delivery's results by the
        hold. Unsaved results stay in memory for the message's next run; the reports owed are
        in the entry, so the hold's write saves them too, and they are queued after release.
        """
        entry = self._newest(queue_id)
        if entry.envelope.held or queue_id in self._held_in_flight:
            return False
        self._unschedule(queue_id)
        if queue_id in self._active:
            self._held_in_flight.add(queue_id)
        try:
            await self._write_hold(entry, held=True)
        except Exception as e:
            if not isinstance(e, KeyError):  # not held on disk: deliver it as before
                self._held_in_flight.discard(queue_id)
                if queue_id not in self._active:
                    self._later(entry, entry.next_attempt)
                    self._arm()
            raise
        return True

    async def release(self, queue_id: QueueId) -> bool:
        """``smarthost queue release``: undo :meth:`hold` (or the brake's hold) and try the
        message at once. False when it is not held; KeyError when not queued."""
        entry = self._newest(queue_id)
        if not (entry.envelope.held or queue_id in self._held_in_flight):
            return False
        self._held_in_flight.discard(queue_id)  # an attempt in flight schedules it as usual
        released = await self._write_hold(entry, held=False)
        if queue_id not in self._active:
            self.enqueue(released)
        return True

    def _newest(self, queue_id: QueueId) -> QueueEntry:
        """What the next write of this message starts from: its unsaved results, else the
        disk. KeyError when it is not queued."""
        return self._unsaved.get(queue_id) or self._spool.load(queue_id)

    async def _write_hold(self, entry: QueueEntry, *, held: bool) -> QueueEntry:
        """Save ``entry`` held (or not), unsaved results included; on failure memory is left
        as the disk is."""
        queue_id = entry.queue_id
        changed = attrs.evolve(entry, envelope=attrs.evolve(entry.envelope, held=held))
        if queue_id in self._unsaved:
            self._unsaved[queue_id] = changed  # any save from now on carries the change
        try:
            await self._spool.update(changed)
        except KeyError:
            self.forget(queue_id)  # deleted meanwhile
            raise
        except Exception:
            if self._unsaved.get(queue_id) is changed:
                self._unsaved[queue_id] = entry
            raise
        if self._unsaved.get(queue_id) is changed:
            del self._unsaved[queue_id]  # the results it held are on disk now
        return changed

    def _unschedule(self, queue_id: QueueId) -> None:
        self._due.pop(queue_id, None)
        self._fresh_entries.pop(queue_id, None)
        self._again.discard(queue_id)
        self._queued.discard(queue_id)
        if queue_id not in self._active:
            self._destination.pop(queue_id, None)

    # -- the machinery ---------------------------------------------------------------------

    def _wait(self, queue_id: QueueId, when: float) -> None:
        if queue_id in self._held_in_flight:
            return  # held during this run: release schedules it
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
            # A bug after the attempt: what it did is still in _unsaved (or on disk), so the
            # next run starts from there and delivers nobody twice.
            self._log.failure("{queue_id}: scheduling error", queue_id=str(queue_id))
            self._retry_later(queue_id)
        self._finished(queue_id)

    def _retry_later(self, queue_id: QueueId) -> None:
        if queue_id in self._due:
            return
        try:
            attempts = self._current_attempts(queue_id)
        except KeyError:
            return  # deleted: nothing to retry
        except Exception:
            attempts = 1
        self._wait(queue_id, self._clock.seconds() + self._policy.delay(attempts))

    def _current_attempts(self, queue_id: QueueId) -> int:
        unsaved = self._unsaved.get(queue_id)
        return (unsaved or self._spool.load(queue_id)).attempts

    def _finished(self, queue_id: QueueId) -> None:
        self._active.discard(queue_id)
        self._held_in_flight.discard(queue_id)  # its hold is in _unsaved or on disk now
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

    # -- one run of one message ------------------------------------------------------------

    async def _run(self, queue_id: QueueId) -> None:
        """Deliver to the pending recipients (if any), save what that did, then report.

        What is on disk at each step, and why nobody gets the message twice and no report the
        sender is owed is lost:

        1. The moment the attempt returns, its results (outcomes, lifetime expiry, the delay
           warning, the next attempt: :func:`conclude`) and the reports they make due (owed in
           the entry: ``QueueEntry.owed_reports``) are held in memory (``_unsaved``). Nothing
           that can fail comes first.
        2. They are saved with one ``spool.update`` (or ``spool.remove`` when nothing is
           pending and nothing is owed): the outcomes and the reports they make due reach the
           disk together or not at all. Until that write succeeds the memory is ahead of the
           disk and every later run starts from memory: a write that fails (a full spool, any
           OSError, a bug) is tried again at the next run, which attempts only the recipients
           still pending.
        3. Only then are the reports built and queued (:meth:`_report`), and the entry is
           saved again without the ones queued (the removal when nothing is left). One that
           fails is logged and stays owed; the next run tries it again and, again, delivers
           to nobody who is not pending.
        4. The message is removed once nothing is pending and nothing is owed, so lifetime
           expiry ends delivery at once even when its report keeps failing.

        The at-least-once windows: a restart or crash before step 2 has succeeded loses the
        memory. The disk then holds the entry as of its last successful write, so the
        recipients delivered (or bounced) since then are attempted once more after the restart:
        once per restart, never in a loop, which RFC 5321 6.1 prefers to losing mail. A restart
        between steps 2 and 3 loses nothing: the reports are owed on disk, and :meth:`start`
        runs such a message at once. One after a report was queued but before the entry
        without it was saved sends that report twice, never not at all.
        """
        entry = self._current(queue_id)
        if entry is None or entry.envelope.held:
            return
        now = self._clock.seconds()
        if entry.pending:
            entry = await self._deliver(entry, now)
        if not await self._save(entry, now):
            return
        if entry.owed_reports:
            reported = await self._report(entry, now)
            if reported is None:
                return
            entry = reported
        if entry.pending:
            self._later(entry, entry.next_attempt)
        elif entry.owed_reports:  # a report alone: one retry interval from now
            self._later(entry, now + self._policy.delay(entry.attempts))

    async def _report(self, entry: QueueEntry, now: float) -> QueueEntry | None:
        """Queue the reports the saved ``entry`` owes and save it without those queued (or
        given up); the entry as saved, or None when the run stops here (see :meth:`_save`).
        Saved at once, so a restart does not send a queued report again."""
        queue_id = entry.queue_id
        after, queued = await self._reports.send(entry)
        for report in queued:
            self.enqueue(report)
        if after.owed_reports == entry.owed_reports:
            return entry  # each one failed again: nothing new to save
        if queue_id in self._held_in_flight:  # the operator held it meanwhile
            after = attrs.evolve(after, envelope=attrs.evolve(after.envelope, held=True))
        self._unsaved[queue_id] = after
        return after if await self._save(after, now) else None

    def _current(self, queue_id: QueueId) -> QueueEntry | None:
        """The entry as this daemon knows it: ahead of the disk when a write failed."""
        fresh = self._fresh_entries.pop(queue_id, None)
        known = self._unsaved.get(queue_id) or fresh
        if known is not None:
            return known
        try:
            return self._spool.load(queue_id)
        except KeyError:
            self.forget(queue_id)  # deleted meanwhile
        except CorruptEntry as e:
            self._log.warning("{queue_id}: unreadable queue entry: {e}", queue_id=str(queue_id),
                              e=str(e))
        return None

    async def _deliver(self, entry: QueueEntry, now: float) -> QueueEntry:
        """One attempt of the pending recipients; returns the entry after it, held in
        ``_unsaved`` until :meth:`_save` has written it."""
        queue_id = entry.queue_id

        def open_body() -> BinaryIO:
            return self._spool.open_body(queue_id)

        try:
            result = await self._attempt(entry, open_body)
        except Exception:
            # A crash inside delivery is a temporary failure: the message stays queued.
            self._log.failure("{queue_id}: delivery attempt failed", queue_id=str(queue_id))
            result = AttemptResult(())
        outcomes = list(result.outcomes)
        after, reports, expired = conclude(entry, outcomes, now, self._policy)
        if queue_id in self._held_in_flight:  # the operator held it during the attempt
            after = attrs.evolve(after, envelope=attrs.evolve(after.envelope, held=True))
        self._unsaved[queue_id] = after = owe(after, reports)  # saved together
        # Remembered from the start of this attempt, so this message's next attempt (one
        # retry interval later at the earliest) finds the hold over and tries the host again.
        for failure in result.unreachable:
            self._hosts.failed(failure, since=now)
        for outcome in outcomes:
            self._log.attempt(queue_id, outcome)
            self._observe(entry, outcome)
        for s in expired:
            self._log.attempt(
                queue_id,
                Outcome(s.recipient, BOUNCED, f"lifetime expired; last: {s.last_reply}",
                        s.remote, EXPIRED_STATUS),
            )
        return after

    async def _save(self, entry: QueueEntry, now: float) -> bool:
        """Write what memory knows: the entry while anything is pending or owed, else the
        removal. False when the run stops here: the message was deleted, or the write failed
        and the message runs again after the next retry interval."""
        queue_id = entry.queue_id
        try:
            if entry.pending or entry.owed_reports:
                if queue_id in self._unsaved:
                    await self._spool.update(entry)
            else:
                self._due.pop(queue_id, None)
                await self._spool.remove(queue_id)
                self._log.removed(queue_id, "done")
        except KeyError:
            self.forget(queue_id)  # deleted by the operator while we were delivering
            return False
        except Exception as e:
            delay = self._policy.delay(entry.attempts)
            qid, error = str(queue_id), str(e) or repr(e)
            text = ("{queue_id}: delivery results not saved ({error}); kept in memory and "
                    "saved at the next try in {delay:g} s, nobody is delivered to again")
            if isinstance(e, OSError):  # a full or failing disk: the error says it all
                self._log.error(text, queue_id=qid, error=error, delay=delay)
            else:
                self._log.failure(text, queue_id=qid, error=error, delay=delay)
            self._later(entry, now + delay)
            return False
        self._unsaved.pop(queue_id, None)
        return True

    def _later(self, entry: QueueEntry, when: float) -> None:
        self._note_destination(entry)
        self._wait(entry.queue_id, when)
