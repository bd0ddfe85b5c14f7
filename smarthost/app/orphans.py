"""Spools that hold mail no process of the running configuration owns, and who delivers it.

Lowering ``[server] workers`` (``worker-3`` holds mail, N is now 2), or going from one
process to several (mail in the root spool) or back (mail in ``worker-K``), leaves mail in a
spool nobody serves. Nothing may wait there forever: worker 1 (or the single daemon) serves
each such spool too, delivery only (no listener writes to it), with its own control socket so
that ``smarthost queue`` acts on it as on any other. At the next start, a spool left empty is
no longer taken on. The spool's lock keeps two processes from ever serving one spool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smarthost.app import workerspools
from smarthost.app.config import Config
from smarthost.core.maillog import MailLog
from smarthost.queue.spool import Spool


def unserved(config: Config, count: int, clock: Any, maillog: MailLog) -> list[Path]:
    """The spools under ``[queue] directory`` that hold messages and are none of the ``count``
    spools of this configuration; each is logged with its number of messages."""
    served = {workerspools.worker_spool(config, i) for i in range(1, count + 1)}
    found = []
    for directory in workerspools.spool_directories(config):
        if directory in served or not workerspools.holds_spool_files(directory):
            continue
        try:
            queued = len(Spool(directory, clock=clock, run_blocking=_unused).queue_ids())
        except Exception as e:  # damage is recovery's business: it runs when served
            maillog.warning("spool {path} could not be read: {error}; serving it to recover it",
                            path=str(directory), error=str(e))
            found.append(directory)
            continue
        if queued:
            maillog.warning(
                "spool {path} holds {count} messages no process of [server] workers = "
                "{workers} owns; {server} delivers them", path=str(directory), count=queued,
                workers=count, server="worker-1" if count > 1 else "this daemon",
            )
            found.append(directory)
    return found


def _unused(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("reading a spool's index runs nothing in a thread")
