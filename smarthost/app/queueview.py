"""The queue as /metrics and the status page show it: counts by status, the oldest message,
and the destinations that have deferred mail.

The entries are on disk; the spool keeps only where each one is. A scan reads the ids on the
reactor thread (the index changes there) and the entries in a worker thread (``run_blocking``:
each is one small read, and a big backlog must not stall the reactor), the same entries
``smarthost queue list`` shows. A scan serves every request of the next ``max_age`` seconds,
and requests arriving while one runs share it, so a busy Prometheus costs one scan per
interval whatever its scrape rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.core.errors import CorruptEntry
from smarthost.core.types import RunBlocking

MAX_AGE = 5.0


class QueueReader(Protocol):
    """The slice of :class:`~smarthost.queue.spool.Spool` a scan uses."""

    def queue_ids(self) -> list[QueueId]: ...

    def load(self, queue_id: QueueId) -> QueueEntry: ...


@attrs.frozen
class Backlog:
    """Deferred mail for one recipient domain."""

    domain: str
    messages: int
    recipients: int
    last_reply: str  # the newest reply on record for one of its pending recipients
    remote: str


@attrs.frozen
class QueueSnapshot:
    taken_at: float
    counts: Mapping[str, int]  # queued, deferred, held
    oldest: float | None  # queued_at of the oldest message that is not held
    backlog: Sequence[Backlog]  # the most messages first

    @property
    def oldest_age(self) -> float:
        return 0.0 if self.oldest is None else max(0.0, self.taken_at - self.oldest)


def status(entry: QueueEntry) -> str:
    """As ``smarthost queue list`` says it: held (by the operator or the brake), deferred
    (tried before), or queued (not yet)."""
    if entry.envelope.held:
        return "held"
    return "deferred" if entry.attempts else "queued"


def summarize(entries: Iterable[QueueEntry], now: float) -> QueueSnapshot:
    counts = {"queued": 0, "deferred": 0, "held": 0}
    oldest: float | None = None
    domains: dict[str, tuple[set[QueueId], int, float, str, str]] = {}
    for entry in entries:
        kind = status(entry)
        counts[kind] += 1
        if kind == "held":
            continue
        oldest = entry.queued_at if oldest is None else min(oldest, entry.queued_at)
        if kind != "deferred":
            continue
        for pending in entry.pending:
            domain = pending.recipient.domain
            ids, recipients, newest, reply, remote = domains.get(
                domain, (set(), 0, -1.0, "", ""))
            ids.add(entry.queue_id)
            # The entry tried most recently has the freshest reply: its next attempt is the
            # latest, as every retry interval is at least as long as the one before.
            if entry.next_attempt >= newest and pending.last_reply:
                newest, reply, remote = entry.next_attempt, pending.last_reply, pending.remote
            domains[domain] = (ids, recipients + 1, newest, reply, remote)
    backlog = sorted(
        (Backlog(domain, len(ids), recipients, reply, remote)
         for domain, (ids, recipients, _, reply, remote) in domains.items()),
        key=lambda b: (-b.messages, b.domain),
    )
    return QueueSnapshot(now, counts, oldest, tuple(backlog))


def _scan(spool: QueueReader, ids: Sequence[QueueId], now: float) -> QueueSnapshot:
    """In a worker thread: read each entry and sum them up."""
    return summarize(_read(spool, ids), now)


def _read(spool: QueueReader, ids: Sequence[QueueId]) -> Iterator[QueueEntry]:
    for queue_id in ids:
        try:
            yield spool.load(queue_id)
        except (KeyError, CorruptEntry, OSError):
            continue  # delivered meanwhile, or damaged (queue show says what is wrong)


class QueueView:
    def __init__(
        self,
        spool: QueueReader,
        clock: IReactorTime,
        run_blocking: RunBlocking,
        max_age: float = MAX_AGE,
    ) -> None:
        self._spool = spool
        self._clock = clock
        self._run_blocking = run_blocking
        self._max_age = max_age
        self._last: QueueSnapshot | None = None
        self._waiting: list[Deferred[QueueSnapshot]] | None = None  # a scan is running

    def snapshot(self) -> Deferred[QueueSnapshot]:
        """On the reactor thread."""
        last = self._last
        if last is not None and self._clock.seconds() - last.taken_at < self._max_age:
            return succeed(last)
        waiter: Deferred[QueueSnapshot] = Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
            return waiter
        self._waiting = [waiter]
        scan = self._run_blocking(_scan, self._spool, self._spool.queue_ids(),
                                  self._clock.seconds())
        scan.addBoth(self._done)
        return waiter

    def _done(self, result: QueueSnapshot | Failure) -> None:
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            # A failed scan (a bug: reading errors are skipped) fails this round's requests.
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        if not isinstance(result, Failure):
            self._last = result
