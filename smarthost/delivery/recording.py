"""What one attempt does to a queue entry, and when the next one is due.

Pure functions of the entry, the outcomes and the clock reading, with no spool, timer or
network, so the retry schedule, lifetime expiry and the delay warning are tested as plain
values; the scheduler (:mod:`smarthost.delivery.scheduler`) applies them and saves the result.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from smarthost.core.envelope import (
    BOUNCED,
    DELIVERED,
    PENDING,
    Outcome,
    QueueEntry,
    RecipientState,
)
from smarthost.delivery.dsn import ReportedRecipient
from smarthost.delivery.reporting import DueReport, attempt_reports, due

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


def record(
    entry: QueueEntry, outcomes: Iterable[Outcome], *, next_attempt: float | None = None
) -> QueueEntry:
    """The entry after one attempt: each recipient's status and last reply, the attempt count
    and the last error (what `queue list` shows); with ``next_attempt`` when that is known
    (one copy of the entry instead of two)."""
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
    if next_attempt is None:
        next_attempt = entry.next_attempt
    return attrs.evolve(
        entry, recipients=tuple(states), attempts=entry.attempts + 1, last_error=last_error,
        next_attempt=next_attempt,
    )


def expire(entry: QueueEntry) -> tuple[QueueEntry, list[RecipientState]]:
    """Bounce every recipient still pending once the lifetime is over."""
    expired = list(entry.pending)
    states = tuple(
        attrs.evolve(s, status=BOUNCED) if s.status == PENDING else s for s in entry.recipients
    )
    return attrs.evolve(entry, recipients=states), expired


def conclude(
    entry: QueueEntry, outcomes: list[Outcome], now: float, policy: RetryPolicy
) -> tuple[QueueEntry, list[DueReport], list[RecipientState]]:
    """Everything one attempt decides: the entry to save (results recorded, lifetime expiry,
    the delay warning, the next attempt), the reports due to the sender, and the recipients
    that expired now."""
    # Neither expiry nor the delay warning changes the attempt count the next attempt's
    # delay depends on: it is known now, and set with the results.
    after = record(entry, outcomes, next_attempt=now + policy.delay(entry.attempts + 1))
    if not outcomes:
        after = attrs.evolve(after, last_error="internal error during delivery")
    reports = attempt_reports(after, outcomes, now)
    expired: list[RecipientState] = []
    if after.pending and policy.expired(after, now):
        after, expired = expire(after)
        reports += due("failure", after, (
            attrs.evolve(ReportedRecipient.from_state(s, now), status=EXPIRED_STATUS,
                         diagnostic=s.last_reply or "delivery time expired")
            for s in expired
        ))
    elif after.pending and policy.should_warn(after, now):
        reports += due("delay", after,
                       (ReportedRecipient.from_state(s, now) for s in after.pending),
                       retry_until=after.queued_at + policy.lifetime)
        after = attrs.evolve(after, delay_warned=True)
    # With nothing pending next_attempt is when an owed report is tried again.
    return after, reports, expired
