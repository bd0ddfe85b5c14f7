"""The ``smarthost`` admin command: run, passwd, check-config, config, queue.

It talks to a running daemon only through the spool directory (and the control socket the
daemon keeps there), the way Postfix's postqueue and postsuper work on the queue files.
Errors are one line on stderr naming the problem; exit status 2 for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred

from smarthost.app import checks, configdump, control, probe, queueadmin, salvaging
from smarthost.app.config import Config, ConfigError, load_config
from smarthost.auth import sasl
from smarthost.auth.users import PasswordError, UserNameError, delete_user, set_password
from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.queue.spool import Spool


class CLIError(Exception):
    """A problem the user can fix; printed without a traceback."""


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


def _load(path: str | None) -> Config:
    try:
        return load_config(Path(path) if path else None, validate_mechanism=_mechanism)
    except ConfigError as e:
        raise CLIError(f"configuration error: {e}") from None


def _mechanism(name: str) -> None:
    sasl.build_mechanisms([name])


def _spool(config: Config) -> Spool:
    directory = config.queue.directory
    if not (directory / "log").is_dir():
        raise CLIError(f"no spool at {directory} (has the daemon ever run with this config?)")
    # No recovery here: the daemon may be receiving into tmp/ right now.
    return Spool(directory, clock=_WallClock(), run_blocking=_run_now)  # type: ignore[arg-type]


# -- passwd ------------------------------------------------------------------------------


def cmd_passwd(args: argparse.Namespace) -> int:
    users = Path(args.users)
    if args.delete:
        if not delete_user(users, args.name):
            raise CLIError(f"no user {args.name!r} in {users}")
        print(f"deleted {args.name}")
        return 0
    password = _read_password()
    try:
        set_password(users, args.name, password)
    except (UserNameError, PasswordError) as e:
        raise CLIError(str(e)) from None
    print(f"password set for {args.name} in {users}")
    return 0


def _read_password() -> str:
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CLIError("passwords do not match")
    if not password:
        raise CLIError("empty password")
    return password


# -- check-config --------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    findings = checks.check_config(config, checks.Environment.current())
    for warning in findings.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if findings.errors:
        for error in findings.errors[:-1]:
            print(f"smarthost: configuration error: {error}", file=sys.stderr)
        raise CLIError(f"configuration error: {findings.errors[-1]}")
    print(f"{args.config or 'embedded default'}: OK (hostname {config.hostname})")
    return 0


# -- config --------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    source = args.config or "the embedded default"
    sys.stdout.write(configdump.dump(config, changed_only=args.changed, source=source))
    return 0


# -- run -----------------------------------------------------------------------------------


def twistd_argv(config: str | None, twistd_options: Sequence[str]) -> list[str]:
    """``twistd -n [options] smarthost [--config PATH]``: twistd's own options go before the
    plugin name, ours after it."""
    return ["twistd", "-n", *twistd_options, "smarthost", *(["--config", config] if config
                                                             else [])]


def cmd_run(args: argparse.Namespace) -> int:
    from twisted.scripts.twistd import run

    sys.argv = twistd_argv(args.config, args.twistd_options)
    run()  # type: ignore[no-untyped-call]  # returns when the daemon stops
    return 0


# -- queue -------------------------------------------------------------------------------


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
    }


def cmd_queue_list(args: argparse.Namespace, spool: Spool) -> int:
    selection = queueadmin.Selection(sender=args.sender, recipient=args.recipient,
                                     status=args.status)
    entries = list(spool.entries())
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


def _entry(spool: Spool, text: str) -> QueueEntry:
    try:
        return spool.load(_queue_id(text))
    except KeyError:
        raise CLIError(f"no message {text} in the queue") from None


def cmd_queue_show(args: argparse.Namespace, spool: Spool) -> int:
    entry = _entry(spool, args.id)
    env = entry.envelope
    print(f"id: {entry.queue_id}")
    print(f"queued: {_iso(entry.queued_at)}  size: {entry.size}  status: {_status(entry)}")
    print(f"client: {env.client_address} ({env.client_name})  user: {env.user or '-'}")
    print(f"sender: <{env.sender}>" + (f"  ret={env.ret}" if env.ret else ""))
    for r in entry.recipients:
        line = f"recipient: <{r.recipient.address}> {r.status} attempts={r.attempts}"
        if r.last_reply:
            line += f" last={json.dumps(r.last_reply)}"
        print(line)
    print(f"attempts: {entry.attempts}  next: {_iso(entry.next_attempt)}")
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
    """Through the running daemon when there is one (it holds the schedule, so no delivery in
    flight races us), else on the spool itself."""
    try:
        daemon = control.ControlClient.connect(spool.directory)
        try:
            yield queueadmin.QueueChanges(spool, daemon, _wait)
        finally:
            if daemon is not None:
                daemon.close()
    except control.ControlError as e:
        raise CLIError(f"daemon: {e}") from None


def _named(spool: Spool, texts: Sequence[str]) -> list[QueueId]:
    """The ids given, each once, every one of them queued now (else nothing is changed)."""
    return [_entry(spool, text).queue_id for text in dict.fromkeys(texts)]


def _report(
    changes: queueadmin.QueueChanges, answer: dict[str, list[str]], done: str, unchanged: str
) -> None:
    """What became of each id. The daemon's part is counted (``deleted 200``: its log names
    each one), a change made here is named id by id; exceptions are always named."""
    if changes.through_daemon:
        print(f"{done} {len(answer[control.DONE])}")
    else:
        for queue_id in answer[control.DONE]:
            print(f"{done} {queue_id}")
    for queue_id in answer[control.UNCHANGED]:
        print(f"{queue_id} {unchanged}")
    for queue_id in answer[control.MISSING]:
        print(f"{queue_id} was no longer queued")


def cmd_queue_delete(args: argparse.Namespace, spool: Spool) -> int:
    chosen = [args.sender is not None, args.user is not None, args.all]
    if bool(args.ids) == any(chosen) or (args.all and sum(chosen) > 1):
        raise CLIError("queue delete: give queue ids, or --sender and/or --user, or --all")
    if args.ids:
        ids = _named(spool, args.ids)
    else:
        selection = queueadmin.Selection(sender=args.sender, user=args.user)
        ids = [e.queue_id for e in queueadmin.select(spool.entries(), selection)]
    with _changes(spool) as changes:
        _report(changes, changes.delete(ids), "deleted", "was not deleted")
    if not ids:
        print("no message matches")
    return 0


def cmd_queue_hold(args: argparse.Namespace, spool: Spool) -> int:
    ids = _named(spool, args.ids)
    with _changes(spool) as changes:
        _report(changes, changes.hold(ids), "held", "was held already")
    return 0


def cmd_queue_release(args: argparse.Namespace, spool: Spool) -> int:
    if bool(args.ids) == (args.user is not None):
        raise CLIError("queue release: give queue ids, or --user NAME")
    with _changes(spool) as changes:
        if args.ids:
            answer = changes.release(_named(spool, args.ids))
            _report(changes, answer, "released", "was not held")
            return 0
        count = changes.release_user(args.user)
        later = "" if changes.through_daemon else " (delivered when the daemon next starts)"
    print(f"released {count} message{'s' if count != 1 else ''} held for {args.user}{later}")
    return 0


def cmd_queue_salvage(args: argparse.Namespace, spool: Spool) -> int:
    with _changes(spool) as changes:
        for line in changes.salvage(_run_now):
            print(line)
    return 0


def cmd_queue_flush(args: argparse.Namespace, spool: Spool) -> int:
    with _changes(spool) as changes:
        count = changes.flush()
    if count is None:
        print("no daemon is running on this spool; messages are retried when it starts")
        return 1
    print(f"flushed: {count} messages will be retried now")
    return 0


# -- wiring ------------------------------------------------------------------------------


CONFIG_HELP = "the configuration file (default: the embedded default, relative to ./)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smarthost",
        description="Run and look after a smarthost mail server: its users, its configuration "
        "and its mail queue. Each command has its own --help.",
        epilog="Exit status: 0 done; 1 nothing done (queue flush with no daemon running); 2 a "
        "problem, named on stderr.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the mail server in the foreground (twistd -n smarthost)",
        usage="smarthost run [--config PATH] [twistd options]",
        description="Run the mail server in the foreground, exactly as `twistd -n smarthost` "
        "does, for installs (pipx) that do not put twistd on the PATH. Every other option "
        "goes to twistd, e.g. --pidfile=, --logfile=-, --uid=smarthost --gid=smarthost.",
    )
    run.add_argument("--config", "-c", metavar="PATH", help=CONFIG_HELP)
    run.set_defaults(func=cmd_run, twistd_options=[])

    pw = sub.add_parser(
        "passwd", help="set or delete a user's password",
        description="Set NAME's password in the users file (read from stdin when it is not a "
        "terminal, else asked twice), stored as a bcrypt hash with the CRAM-MD5 and SCRAM "
        "secrets derived from it, never the password itself.",
    )
    pw.add_argument("--users", required=True, metavar="FILE",
                    help="the users file: the [auth] users path of the configuration")
    pw.add_argument("--delete", action="store_true", help="remove the user instead")
    pw.add_argument("name", help="the login name, e.g. alice or alice@example.org")
    pw.set_defaults(func=cmd_passwd)

    cc = sub.add_parser(
        "check-config", help="check a configuration as start-up would, without opening ports",
        description="Check a configuration the way the daemon's start-up does, short of "
        "opening ports: every key, the listen endpoint strings, the certificate and key "
        "(readable, matching, not about to expire), the users file, [delivery.upstream] "
        "password_file and the other files it must read, plugin settings. Exit 0 when the "
        "daemon would start (risky settings get a `warning: KEY: ...` line on stderr); exit 2 "
        "naming the key to fix otherwise.",
    )
    cc.add_argument("--config", "-c", metavar="PATH", help=CONFIG_HELP)
    cc.set_defaults(func=cmd_check_config)

    cf = sub.add_parser(
        "config", help="print the configuration in effect, as TOML",
        description="Print the configuration in effect as TOML: every key, defaults filled "
        "in, paths absolute. The output loads back with the same effect. Secrets are never "
        "printed, only the files that hold them.",
    )
    cf.add_argument("--config", "-c", metavar="PATH", help=CONFIG_HELP)
    cf.add_argument("--changed", action="store_true",
                    help="only what differs from the defaults (like postconf -n)")
    cf.set_defaults(func=cmd_config)

    pr = sub.add_parser("probe", help="test an SMTP server: TLS, AUTH, open relay, DNS",
                        description=probe.DESCRIPTION)
    probe.add_arguments(pr)
    pr.set_defaults(func=probe.main)

    q = sub.add_parser(
        "queue", help="inspect and manage the mail queue",
        description="Look at and change the mail queue. While the daemon runs, it makes each "
        "change itself (through the control socket in its spool directory), so nothing races "
        "a delivery in progress; with no daemon running, the spool is changed directly.",
    )
    q.add_argument("--config", "-c", metavar="PATH", help=CONFIG_HELP)
    qsub = q.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    _queue_parsers(qsub)
    q.set_defaults(func=_queue)
    return p


def _queue_parsers(qsub: Any) -> None:
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


def _queue(args: argparse.Namespace) -> int:
    spool = _spool(_load(args.config))
    try:
        result: int = args.queue_func(args, spool)
    except BrokenPipeError:
        raise
    except OSError as e:  # e.g. the lock of a daemon whose control socket did not answer
        raise CLIError(f"spool {spool.directory}: {e}") from None
    finally:
        spool.close()  # the lock, if a change took it
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown and args.command != "run":
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "run":
        args.twistd_options = unknown  # everything that is not ours goes to twistd
    try:
        result: int = args.func(args)
    except CLIError as e:
        print(f"smarthost: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())
