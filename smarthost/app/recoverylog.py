"""The operator's account of what spool recovery found at start-up (``QueueService`` calls it;
``scripts/bitflip_matrix.py`` counts on the same lines): one notice with the counts; for damage
to synced data a warning per damaged place and one per message it held, naming the queue id
and what became of it; a notice per message of the unfinished last write, which was never
acknowledged."""

from __future__ import annotations

from smarthost.core.maillog import MailLog
from smarthost.queue.recovery import Affected, Damage, Fate, RecoveryReport

_PLACE = "its {kind} record in {segment} bytes {start}-{end}"
_FATES = {
    Fate.LOST: "{queue_id}: LOST: " + _PLACE + " is damaged (copied to {moved_to}); "
    "`smarthost queue salvage` puts it back when one flipped bit explains the damage",
    Fate.DONE: "{queue_id}: " + _PLACE + " is damaged; the message was removed after it was "
    "written: nothing is lost",
    Fate.KEPT: "{queue_id}: " + _PLACE + " is damaged; another copy of the message is "
    "queued: nothing is lost",
    Fate.SUPERSEDED: "{queue_id}: " + _PLACE + " is damaged; a later record replaces it: "
    "nothing is lost",
    Fate.HELD: "{queue_id}: HELD: " + _PLACE + " is damaged and held a newer state; sent on "
    "with the older one it could reach recipients twice: check it, then release or delete it "
    "with `smarthost queue`",
    Fate.REMOVED: "{queue_id}: removed: " + _PLACE + " is damaged and was its removal; "
    "written again",
    Fate.STALE: "{queue_id}: " + _PLACE + " is damaged (old segment format) and may have held "
    "a newer state: recipients it reached may get it again",
    Fate.UNFINISHED: "{queue_id}: " + _PLACE + " was the unfinished last write (never "
    "acknowledged): dropped",
}


def log_recovery(log: MailLog, directory: str, report: RecoveryReport) -> None:
    log.notice(
        "spool {directory}: {queued} queued, {tmp} unfinished receptions removed, "
        "{torn} unfinished writes dropped, {corrupt} damaged places copied to corrupt/, "
        "{lost} messages lost",
        directory=directory,
        queued=report.queued,
        tmp=len(report.removed_tmp),
        torn=len(report.torn),
        corrupt=len(report.corrupt),
        lost=len(report.lost),
    )
    for damage in (*report.torn, *report.corrupt):
        if damage.moved_to is not None:
            log.warning("spool: {segment} bytes {start}-{end} copied to {moved_to}: {reason}",
                        segment=damage.segment, start=damage.start, end=damage.end,
                        moved_to=damage.moved_to, reason=damage.reason)
        for affected in damage.affected:
            _affected(log, damage, affected)


def _affected(log: MailLog, damage: Damage, affected: Affected) -> None:
    emit = log.notice if affected.fate == Fate.UNFINISHED else log.warning
    emit(_FATES[affected.fate], queue_id=str(affected.queue_id), kind=affected.kind,
         segment=damage.segment, start=damage.start, end=damage.end,
         moved_to=damage.moved_to or "")
