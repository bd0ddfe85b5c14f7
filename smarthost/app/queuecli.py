"""``smarthost queue``: list, show, delete, hold, release, flush and salvage.

A running daemon makes each change itself, through the control socket in its spool directory
(:mod:`smarthost.app.control`), so nothing races a delivery in flight; with none running the
spool is changed directly under its lock (:mod:`smarthost.app.queueadmin` says who does what).
Listing and showing only read the spool.

With ``[server] workers`` > 1 each worker has a spool of its own (``worker-<i>``, see
:mod:`smarthost.app.workerspools`): every command works on all of them at once (list merges
them; an id is looked up in each; each change goes to the worker whose spool holds the
message, or to that spool directly when the worker is not running; flush asks every worker).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import heapq
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred

from smarthost.app import cli, control, queueadmin, salvaging, workerspools
from smarthost.app.cli import CLIError
from smarthost.app.config import Config
from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.queue.spool import Spool


class _WallClock:
    """The admin tool never receives messages; Spool only needs ``seconds()`` for ids."""

    def seconds(self) -> float:
        return time.time()


def _run_now(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args, **kwargs)


def _wait(d: Deferred[Any]) -> Any:
    """The spool's Deferreds fire synchronously with ``_run_now``; surface their errors."""
    results: list[Any] = []
    d.addBoth(results.append)
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


class Spools:
    """Every spool of the configuration (one per worker, :mod:`smarthost.app.workerspools`),
    opened for reading: what ``smarthost queue`` shows and changes is their union. A spool
    that does not exist yet (a worker that never ran) is left out."""

    def __init__(self, spools: Sequence[Spool]) -> None:
        self.all = list(spools)

    @classmethod
    def open(cls, config: Config) -> Spools:
        found = [d for d in workerspools.spool_directories(config) if (d / "log").is_dir()]
        if not found:
            raise CLIError(f"no spool at {config.queue.directory} "
                           "(has the daemon ever run with this config?)")
        # No recovery here: the daemon may be receiving into tmp/ right now.
        return cls([Spool(d, clock=_WallClock(), run_blocking=_run_now)  # type: ignore[arg-type]
                    for d in found])

    def close(self) -> None:
        """Each one's lock, if a change took it."""
        for spool in self.all:
            spool.close()

    def entries(self) -> list[tuple[Spool, QueueEntry]]:
        """Every message with its spool, in arrival order (ids begin with the time)."""
        merged = heapq.merge(*([(s, e) for e in s.entries()] for s in self.all),
                             key=lambda pair: pair[1].queue_id.value)
        return list(merged)

    def find(self, text: str) -> tuple[Spool, QueueEntry]:
        """The spool holding queue id ``text``, and its entry."""
        queue_id = _queue_id(text)
        found = []
        for spool in self.all:
            try:
                found.append((spool, spool.load(queue_id)))
            except KeyError:
                continue
        if not found:
            raise CLIError(f"no message {text} in the queue")
        if len(found) > 1:
            where = ", ".join(s.directory for s, _ in found)
            raise CLIError(f"{text} is queued in more than one spool ({where}); "
                           "nothing was changed")
        return found[0]


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


_status = queueadmin.status


def _iso(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="seconds")


def _entry_json(entry: QueueEntry) -> dict[str, Any]:
    return {
        "id": str(entry.queue_id),
        "queued_at": _iso(entry.queued_at),
        "size": entry.size,
        "sender": entry.envelope.sender,
        "user": entry.envelope.user,
        "status": _status(entry),
        "held": entry.envelope.held,
        "requiretls": entry.envelope.requiretls,
        "recipients": [
            {
                "address": r.recipient.address,
                "status": r.status,
                "attempts": r.attempts,
                "last_reply": r.last_reply,
                "remote": r.remote,
            }
            for r in entry.recipients
        ],
        "attempts": entry.attempts,
        "next_attempt": _iso(entry.next_attempt) if entry.next_attempt else None,
        "last_error": entry.last_error,
        "owed_reports": len(entry.owed_reports),  # reports to the sender not queued yet
    }


def cmd_queue_list(args: argparse.Namespace, spools: Spools) -> int:
    selection = queueadmin.Selection(sender=args.sender, recipient=args.recipient,
                                     status=args.status)
    entries = [entry for _, entry in spools.entries()]
    total = len(entries)
    if selection != queueadmin.Selection():
        entries = queueadmin.select(entries, selection)
    if args.json:
        print(json.dumps([_entry_json(e) for e in entries], indent=2))
        return 0
    now = time.time()
    for e in entries:
        pending = [r.recipient.address for r in e.pending]
        error = (" " + json.dumps(e.last_error)) if e.last_error else ""
        print(
            f"{e.queue_id} {_age(now - e.queued_at):>4} {e.size:>9} <{e.envelope.sender}> "
            f"{','.join(pending) or '-'} {_status(e)} attempts={e.attempts}{error}"
        )
    if len(entries) != total:
        print(f"-- {len(entries)} of {total} messages match")
    else:
        print(f"-- {total} message{'s' if total != 1 else ''} in queue")
    return 0


def _queue_id(text: str) -> QueueId:
    try:
        return QueueId(text)
    except ValueError:
        raise CLIError(f"not a queue id: {text!r}") from None


def cmd_queue_show(args: argparse.Namespace, spools: Spools) -> int:
    spool, entry = spools.find(args.id)
    env = entry.envelope
    print(f"id: {entry.queue_id}")
    print(f"queued: {_iso(entry.queued_at)}  size: {entry.size}  status: {_status(entry)}")
    print(f"client: {env.client_address} ({env.client_name})  user: {env.user or '-'}")
    print(f"sender: <{env.sender}>" + (f"  ret={env.ret}" if env.ret else "")
          + ("  REQUIRETLS" if env.requiretls else ""))
    for r in entry.recipients:
        line = f"recipient: <{r.recipient.address}> {r.status} attempts={r.attempts}"
        if r.last_reply:
            line += f" last={json.dumps(r.last_reply)}"
        print(line)
    print(f"attempts: {entry.attempts}  next: {_iso(entry.next_attempt)}")
    if entry.owed_reports:
        print(f"reports owed to the sender: {len(entry.owed_reports)}")
    if entry.last_error:
        print(f"last error: {entry.last_error}")
    print()
    with spool.open_body(entry.queue_id) as body:
        for raw in body:
            if raw in (b"\r\n", b"\n"):
                break
            sys.stdout.write(raw.decode("utf-8", "replace").rstrip("\r\n") + "\n")
    return 0


@contextlib.contextmanager
def _changes(spool: Spool) -> Iterator[queueadmin.QueueChanges]:
    """Through the daemon (the worker) running on ``spool`` when there is one (it holds the
    schedule, so no delivery in flight races us), else on the spool itself."""
    try:
        daemon = control.ControlClient.connect(spool.directory)
        try:
            yield queueadmin.QueueChanges(spool, daemon, _wait)
        finally:
            if daemon is not None:
                daemon.close()
    except control.ControlError as e:
        raise CLIError(f"daemon: {e}") from None
    except BrokenPipeError:
        raise
    except OSError as e:  # e.g. the lock of a daemon whose control socket did not answer
        raise CLIError(f"spool {spool.directory}: {e}") from None


_Groups = list[tuple[Spool, list[QueueId]]]


def _grouped(pairs: Iterable[tuple[Spool, QueueId]]) -> _Groups:
    """The ids by the spool that holds them, spools in their configured order."""
    groups: dict[int, tuple[Spool, list[QueueId]]] = {}
    for spool, queue_id in pairs:
        groups.setdefault(id(spool), (spool, []))[1].append(queue_id)
    return list(groups.values())


def _named(spools: Spools, texts: Sequence[str]) -> _Groups:
    """The ids given, each once, every one of them queued now (else nothing is changed)."""
    found = [spools.find(text) for text in dict.fromkeys(texts)]
    return _grouped((spool, entry.queue_id) for spool, entry in found)


Change = Callable[[queueadmin.QueueChanges, list[QueueId]], dict[str, list[str]]]


def _each_spool(groups: _Groups, change: Change, done: str, unchanged: str) -> None:
    """``change`` on each spool's ids, then what became of each id. A daemon's part is counted
    (``deleted 200``: its log names each one), a change made here is named id by id;
    exceptions are always named."""
    counted: int | None = None
    named: list[str] = []
    others: list[str] = []
    for spool, ids in groups:
        with _changes(spool) as changes:
            answer = change(changes, ids)
        if changes.through_daemon:
            counted = (counted or 0) + len(answer[control.DONE])
        else:
            named += [f"{done} {queue_id}" for queue_id in answer[control.DONE]]
        others += [f"{queue_id} {unchanged}" for queue_id in answer[control.UNCHANGED]]
        others += [f"{queue_id} was no longer queued" for queue_id in answer[control.MISSING]]
    if counted is not None:
        print(f"{done} {counted}")
    for line in named + others:
        print(line)


def cmd_queue_delete(args: argparse.Namespace, spools: Spools) -> int:
    chosen = [args.sender is not None, args.user is not None, args.all]
    if bool(args.ids) == any(chosen) or (args.all and sum(chosen) > 1):
        raise CLIError("queue delete: give queue ids, or --sender and/or --user, or --all")
    if args.ids:
        groups = _named(spools, args.ids)
    else:
        selection = queueadmin.Selection(sender=args.sender, user=args.user)
        groups = _grouped((spool, entry.queue_id) for spool, entry in spools.entries()
                          if selection(entry))
    if not groups:
        print("no message matches")
        return 0
    _each_spool(groups, lambda changes, ids: changes.delete(ids), "deleted", "was not deleted")
    return 0


def cmd_queue_hold(args: argparse.Namespace, spools: Spools) -> int:
    _each_spool(_named(spools, args.ids), lambda changes, ids: changes.hold(ids), "held",
                "was held already")
    return 0


def cmd_queue_release(args: argparse.Namespace, spools: Spools) -> int:
    if bool(args.ids) == (args.user is not None):
        raise CLIError("queue release: give queue ids, or --user NAME")
    if args.ids:
        _each_spool(_named(spools, args.ids), lambda changes, ids: changes.release(ids),
                    "released", "was not held")
        return 0
    count, later = 0, ""
    for spool in spools.all:
        with _changes(spool) as changes:
            released = changes.release_user(args.user)
        count += released
        if released and not changes.through_daemon:
            later = " (delivered when the daemon next starts)"
    print(f"released {count} message{'s' if count != 1 else ''} held for {args.user}{later}")
    return 0


def cmd_queue_salvage(args: argparse.Namespace, spools: Spools) -> int:
    for spool in spools.all:
        with _changes(spool) as changes:
            lines = changes.salvage(_run_now)
        for line in lines:
            print(line if len(spools.all) == 1 else f"{spool.directory}: {line}")
    return 0


def cmd_queue_flush(args: argparse.Namespace, spools: Spools) -> int:
    count: int | None = None
    idle: list[str] = []
    for spool in spools.all:
        with _changes(spool) as changes:
            flushed = changes.flush()
        if flushed is None:
            idle.append(spool.directory)
        else:
            count = (count or 0) + flushed
    if count is None:
        print("no daemon is running on this spool; messages are retried when it starts")
        return 1
    print(f"flushed: {count} messages will be retried now")
    for directory in idle:
        print(f"no daemon is running on {directory}; its messages are retried when it starts")
    return 0


# -- the command line ---------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """The ``queue`` command and its actions, under the admin tool's subcommands ``sub``."""
    q = sub.add_parser(
        "queue", help="inspect and manage the mail queue",
        description="Look at and change the mail queue. While the daemon runs, it makes each "
        "change itself (through the control socket in its spool directory), so nothing races "
        "a delivery in progress; with no daemon running, the spool is changed directly.",
    )
    q.add_argument("--config", "-c", metavar="PATH", help=cli.CONFIG_HELP)
    qsub = q.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    q.set_defaults(func=run)
    _actions(qsub)


def _actions(qsub: Any) -> None:
    ql = qsub.add_parser(
        "list", help="one line per queued message (like mailq)",
        description="One line per message: id, age, size, sender, recipients still to "
        "deliver, status (queued: not tried yet; deferred: tried, waiting for a retry; held: "
        "kept until released), attempts, last error. Filters combine.",
    )
    ql.add_argument("--sender", metavar="ADDR", help="only mail from ADDR (<> for bounces)")
    ql.add_argument("--recipient", metavar="ADDR", help="only mail with ADDR among recipients")
    ql.add_argument("--status", choices=queueadmin.STATUSES, help="only messages in this state")
    ql.add_argument("--json", action="store_true", help="a JSON array of objects instead")
    ql.set_defaults(queue_func=cmd_queue_list)

    qs = qsub.add_parser("show", help="envelope, status and headers of one message")
    qs.add_argument("id", help="a queue id, as queue list shows it")
    qs.set_defaults(queue_func=cmd_queue_show)

    qd = qsub.add_parser(
        "delete", help="remove messages from the queue, without bounces",
        usage="smarthost queue delete (ID... | [--sender ADDR] [--user NAME] | --all)",
        description="Remove messages for good; nobody is told. Name them by id, or choose "
        "them with --sender and/or --user, or take --all.",
    )
    qd.add_argument("ids", nargs="*", metavar="ID", help="queue ids")
    qd.add_argument("--sender", metavar="ADDR", help="every message from ADDR (<> for bounces)")
    qd.add_argument("--user", metavar="NAME",
                    help="every message sent by user NAME (or trusted client address NAME)")
    qd.add_argument("--all", action="store_true", help="every message in the queue")
    qd.set_defaults(queue_func=cmd_queue_delete)

    qh = qsub.add_parser(
        "hold", help="keep messages queued but undelivered until released",
        description="Hold messages: they stay queued, and are neither delivered nor expired "
        "(bounced for age) until `smarthost queue release ID`.",
    )
    qh.add_argument("ids", nargs="+", metavar="ID", help="queue ids")
    qh.set_defaults(queue_func=cmd_queue_hold)

    qr = qsub.add_parser(
        "release", help="deliver held messages (by id, or all of one user's)",
        usage="smarthost queue release (ID... | --user NAME)",
        description="Release held messages: by id, or with --user every message the "
        "compromised-account brake ([limits] hold_user_after_per_hour) held for that user. "
        "A running daemon tries them at once.",
    )
    qr.add_argument("ids", nargs="*", metavar="ID", help="queue ids")
    qr.add_argument("--user", metavar="NAME", help="user name (or trusted client address)")
    qr.set_defaults(queue_func=cmd_queue_release)

    qf = qsub.add_parser(
        "flush", help="retry every deferred message now",
        description="Ask the running daemon to retry every waiting message now, failed next "
        "hops included (like postqueue -f). Exit 1 when no daemon is running.",
    )
    qf.set_defaults(queue_func=cmd_queue_flush)
    salvaging.add_parser(qsub).set_defaults(queue_func=cmd_queue_salvage)


def run(args: argparse.Namespace) -> int:
    """Run the ``queue`` action ``args`` names on every spool of ``args.config``."""
    spools = Spools.open(cli.load(args.config))
    try:
        result: int = args.queue_func(args, spools)
    except BrokenPipeError:
        raise
    except OSError as e:  # reading: a spool's segment vanished or is unreadable
        raise CLIError(f"spool: {e}") from None
    finally:
        spools.close()
    return result
