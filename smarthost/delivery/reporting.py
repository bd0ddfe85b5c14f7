"""What a message owes its sender after an attempt, and getting each report queued.

An attempt's outcomes decide which reports are due (failure for a bounce, success where NOTIFY
asks and the next hop did not take DSN, failure at lifetime expiry, one delay warning). They
are owed in the message's own entry (:func:`owe`, ``QueueEntry.owed_reports``), which the
scheduler saves with the outcomes in one write before :class:`OwedReports` queues any of them:
a restart or crash in between finds them on disk and queues them then. A report that cannot be
built or queued (a full spool, a bug) is logged and stays owed, to be tried again at the
message's next run: it never makes anyone receive the message again, and it is given up
(logged as an error) once it has failed for a whole message lifetime.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, get_args

import attrs
from twisted.internet.interfaces import IReactorTime

from smarthost.api import ISpool
from smarthost.core.envelope import BOUNCED, DELIVERED, Outcome, QueueEntry, QueueId, Recipient
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


def encode(report: DueReport) -> dict[str, Any]:
    """``report`` as the JSON data ``QueueEntry.owed_reports`` holds (:func:`decode` reads
    it back equal)."""
    return {
        "kind": report.kind,
        "recipients": [
            {
                "address": r.recipient.address,
                "notify": list(r.recipient.notify),
                "orcpt": r.recipient.orcpt,
                "status": r.status,
                "remote_mta": r.remote_mta,
                "diagnostic": r.diagnostic,
                "last_attempt": r.last_attempt,
                "relayed": r.relayed,
            }
            for r in report.recipients
        ],
        "retry_until": report.retry_until,
        "failing_since": report.failing_since,
    }


def decode(data: Mapping[str, Any]) -> DueReport:
    """The report :func:`encode` wrote; KeyError, TypeError or ValueError when ``data`` is
    not one."""
    kind = data["kind"]
    if kind not in get_args(Kind):
        raise ValueError(f"unknown report kind {kind!r}")
    recipients = tuple(
        ReportedRecipient(
            recipient=Recipient(r["address"], tuple(r["notify"]), r["orcpt"]),
            status=r["status"],
            remote_mta=r["remote_mta"],
            diagnostic=r["diagnostic"],
            last_attempt=_time(r["last_attempt"]),
            relayed=bool(r["relayed"]),
        )
        for r in data["recipients"]
    )
    return DueReport(kind, recipients, _time(data["retry_until"]), _time(data["failing_since"]))


def _time(value: Any) -> float | None:
    return None if value is None else float(value)


def owe(entry: QueueEntry, reports: Iterable[DueReport]) -> QueueEntry:
    """``entry`` owing ``reports`` too: saving it makes them durable."""
    added = tuple(map(encode, reports))
    return attrs.evolve(entry, owed_reports=entry.owed_reports + added) if added else entry


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
    """Queues the reports a message owes its sender; what is owed lives in the message's
    entry (``QueueEntry.owed_reports``), so it is on disk as soon as the outcomes are.

    The scheduler saves the entry with its owed reports in the write that saves the outcomes
    making them due, queues them here, and saves the entry without the ones queued. A crash
    between the report's commit and that second write sends the report again after the
    restart (at least once, as delivery itself); none is ever lost.
    """

    def __init__(
        self, reporter: Reporter, clock: IReactorTime, maillog: MailLog, give_up_after: float
    ) -> None:
        self._reporter = reporter
        self._clock = clock
        self._log = maillog
        self._give_up_after = give_up_after

    async def send(self, entry: QueueEntry) -> tuple[QueueEntry, list[QueueEntry]]:
        """Queue every report ``entry`` owes: the entry still owing those that failed, and
        the queued reports (to be scheduled). One that fails stays owed, and is dropped with
        an error once it has failed for ``give_up_after`` seconds."""
        kept: list[DueReport] = []
        queued = []
        for report in self._read(entry):
            try:
                sent = await self._reporter.send(
                    report.kind, entry, report.recipients, report.retry_until
                )
            except Exception as e:
                failed = self._failed(entry.queue_id, report, e)
                kept.extend([failed] if failed is not None else [])
                continue
            if sent is not None:
                queued.append(sent)
        return attrs.evolve(entry, owed_reports=tuple(map(encode, kept))), queued

    def _read(self, entry: QueueEntry) -> list[DueReport]:
        """The reports ``entry`` owes; one that cannot be read (a damaged or hand-made
        entry) is logged and dropped, since no retry could ever send it."""
        reports = []
        for data in entry.owed_reports:
            try:
                reports.append(decode(data))
            except (KeyError, TypeError, ValueError) as e:
                self._log.error("{queue_id}: an owed report to sender is unreadable and "
                                "dropped: {error}", queue_id=str(entry.queue_id),
                                error=f"{type(e).__name__}: {e}")
        return reports

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
