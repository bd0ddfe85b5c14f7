"""``smarthost queue salvage``: put back into the queue what can be read back from ``corrupt/``
(:mod:`smarthost.queue.salvage` says what and why it is safe to run any number of times).

A running daemon does it itself (:func:`in_daemon`, behind the control channel), so what comes
back is scheduled at once and nothing races a delivery; with no daemon the admin tool does it
on the spool under its lock (:func:`in_admin`), and the daemon delivers it when it starts.
Both answer with the lines the admin tool prints.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from smarthost.core.envelope import QueueEntry
from smarthost.core.maillog import MailLog
from smarthost.core.types import RunBlocking
from smarthost.queue.salvage import SalvageReport, salvage
from smarthost.queue.spool import Spool

MAX_LINES = 200  # one control-channel answer; the daemon's log has every id


class Schedules(Protocol):
    def enqueue(self, entry: QueueEntry) -> None: ...


def add_parser(qsub: Any) -> argparse.ArgumentParser:
    """The ``queue salvage`` subcommand (the caller sets its handler)."""
    parser: argparse.ArgumentParser = qsub.add_parser(
        "salvage",
        help="put back what can be read from corrupt/ (safe to repeat)",
        description="Read back the messages recovery copied to corrupt/ (undoing one flipped "
        "bit per record where its CRC shows which), and queue again each one that is not "
        "queued, was not delivered or deleted after the damage, and was not restored before. "
        "Through the running daemon when there is one.",
    )
    return parser


async def in_daemon(spool: Spool, scheduler: Schedules, maillog: MailLog,
                    run_blocking: RunBlocking) -> list[str]:
    """The control channel's side: restore, log, and schedule each message that came back."""
    report = await salvage(spool, run_blocking)
    for find in report.restored:
        maillog.notice("{queue_id}: restored from {copy} by the operator{how}",
                       queue_id=str(find.entry.queue_id), copy=find.copy,
                       how=f" ({find.repair})" if find.repair else "")
        scheduler.enqueue(find.entry)
    maillog.notice("salvage: {restored} restored, {skipped} not",
                   restored=len(report.restored), skipped=len(report.skipped))
    return describe(report)


def in_admin(spool: Spool, run_blocking: RunBlocking,
             wait: Callable[[Deferred[Any]], Any]) -> list[str]:
    """No daemon runs: the admin tool restores under the spool's lock."""
    report: SalvageReport = wait(Deferred.fromCoroutine(salvage(spool, run_blocking)))
    lines = describe(report)
    if report.restored:
        lines.append("(delivered when the daemon next starts)")
    return lines


def describe(report: SalvageReport) -> list[str]:
    lines = [f"restored {find.entry.queue_id} from {find.copy}"
             + (f" ({find.repair})" if find.repair else "") for find in report.restored]
    lines += [f"not restored: {what}: {why}" for what, why in report.skipped]
    if len(lines) > MAX_LINES:
        lines[MAX_LINES:] = [f"... and {len(lines) - MAX_LINES} more"]
    lines.append(f"salvage: {len(report.restored)} restored, {len(report.skipped)} not")
    return lines
