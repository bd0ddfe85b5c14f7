"""What a message owes its sender after an attempt, and getting each report queued.

An attempt's outcomes decide which reports are due (failure for a bounce, success where NOTIFY
asks and the next hop did not take DSN, failure at lifetime expiry, one delay warning); the
scheduler saves the outcomes first and only then hands the due reports to :class:`OwedReports`.
A report that cannot be built or queued (a full spool, a bug) is logged and kept there, to be
tried again at the message's next run: it never makes anyone receive the message again, and it
is given up (logged as an error) once it has failed for a whole message lifetime.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime

from smarthost.api import ISpool
from smarthost.core.envelope import BOUNCED, DELIVERED, Outcome, QueueEntry, QueueId
from smarthost.core.maillog import MailLog
from smarthost.delivery.bounce import Kind, build_report, report_envelope, wanted
from smarthost.delivery.dsn import ReportedRecipient


@attrs.frozen
class DueReport:
    """One report the sender is owed, with the facts it tells; ``failing_since`` is when it
    first failed to be queued (None while it never has)."""

    kind: Kind
    recipients: tuple[ReportedRecipient, ...]
    retry_until: float | None = None
    failing_since: float | None = None


def due(
    kind: Kind,
    entry: QueueEntry,
    recipients: Iterable[ReportedRecipient],
    retry_until: float | None = None,
) -> list[DueReport]:
    """The report of ``kind`` about ``recipients``, or nothing when nobody is to be told (the
    null sender, NOTIFY)."""
    told = wanted(kind, entry.envelope, list(recipients))
    return [DueReport(kind, tuple(told), retry_until)] if told else []


def attempt_reports(entry: QueueEntry, outcomes: Sequence[Outcome], now: float) -> list[DueReport]:
    """Failure reports for this attempt's bounces, success reports where NOTIFY asks."""
    bounced = [ReportedRecipient.from_outcome(o, now) for o in outcomes if o.result == BOUNCED]
    delivered = [
        ReportedRecipient.from_outcome(o, now, relayed=o.remote != "maildir")
        for o in outcomes
        if o.result == DELIVERED and o.recipient.wants("SUCCESS") and not o.dsn_passed
    ]
    return due("failure", entry, bounced) + due("success", entry, delivered)


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


class OwedReports:
    """The reports each message still owes its sender, held until each one is queued.

    Only memory: the outcomes they tell about are on disk already, so a restart in between
    loses the report, never the delivery state (see :class:`~.scheduler.Scheduler`).
    """

    def __init__(
        self, reporter: Reporter, clock: IReactorTime, maillog: MailLog, give_up_after: float
    ) -> None:
        self._reporter = reporter
        self._clock = clock
        self._log = maillog
        self._give_up_after = give_up_after
        self._owed: dict[QueueId, list[DueReport]] = {}

    def owe(self, queue_id: QueueId, reports: Iterable[DueReport]) -> None:
        added = list(reports)
        if added:
            self._owed.setdefault(queue_id, []).extend(added)

    def owes(self, queue_id: QueueId) -> bool:
        return bool(self._owed.get(queue_id))

    def forget(self, queue_id: QueueId) -> None:
        """The message was deleted: nothing is owed for it any more."""
        self._owed.pop(queue_id, None)

    async def send(self, entry: QueueEntry) -> list[QueueEntry]:
        """Queue every report ``entry`` owes; returns the queued reports (to be scheduled).
        One that fails stays owed, and is dropped with an error once it has failed for
        ``give_up_after`` seconds."""
        owed = self._owed.get(entry.queue_id, [])
        queued = []
        for report in list(owed):
            try:
                sent = await self._reporter.send(
                    report.kind, entry, report.recipients, report.retry_until
                )
            except Exception as e:
                _replace(owed, report, self._failed(entry.queue_id, report, e))
                continue
            _replace(owed, report, None)
            if sent is not None:
                queued.append(sent)
        if not owed and self._owed.get(entry.queue_id) is owed:
            del self._owed[entry.queue_id]
        return queued

    def _failed(self, queue_id: QueueId, report: DueReport, e: Exception) -> DueReport | None:
        """Log the failure; the report to keep, or None when it is given up."""
        now = self._clock.seconds()
        since = report.failing_since if report.failing_since is not None else now
        qid, kind, error = str(queue_id), report.kind, str(e) or repr(e)
        if now - since >= self._give_up_after:
            self._log.error("{queue_id}: {kind} report to sender given up, it could not be "
                            "queued for the whole message lifetime: {error}",
                            queue_id=qid, kind=kind, error=error)
            return None
        text = "{queue_id}: {kind} report to sender not queued ({error}); it is tried again " \
               "on its own, nobody is delivered to again"
        if isinstance(e, OSError):  # a full or failing disk: the error says it all
            self._log.error(text, queue_id=qid, kind=kind, error=error)
        else:
            self._log.failure(text, queue_id=qid, kind=kind, error=error)
        return attrs.evolve(report, failing_since=since)


def _replace(owed: list[DueReport], report: DueReport, by: DueReport | None) -> None:
    """Put ``by`` in ``report``'s place (None: remove it), unless the message was forgotten
    (deleted) meanwhile and ``owed`` no longer holds it."""
    if report in owed:
        index = owed.index(report)
        if by is None:
            del owed[index]
        else:
            owed[index] = by
