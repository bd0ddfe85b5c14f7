"""The ``smarthost`` admin command: passwd, check-config, queue.

It talks to a running daemon only through the spool directory (and the control socket the
daemon keeps there), the way Postfix's postqueue and postsuper work on the queue files.
Errors are one line on stderr naming the problem; exit status 2 for bad input.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from smarthost.api import Context
from smarthost.app.config import Config, ConfigError, load_config
from smarthost.app.pluginload import PluginError, build_plugins
from smarthost.auth import oauth, sasl
from smarthost.auth.users import PasswordError, UserNameError, delete_user, set_password
from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.queue.spool import Spool, release_held

CONTROL_SOCKET = "control.sock"


class CLIError(Exception):
    """A problem the user can fix; printed without a traceback."""


class _WallClock:
    """The admin tool never receives messages; Spool only needs ``seconds()`` for ids."""

    def seconds(self) -> float:
        return time.time()


class _NoLookups:
    """check-config builds plugins but never runs them: no DNS query may leave."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("no DNS lookups while checking a configuration")


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
    # Plugins validate their own settings when built; nothing is started.
    context = Context(Clock(), config.hostname, _NoLookups(), _run_now, config.base_dir)
    try:
        plugins = build_plugins(config.plugins.enabled, config.plugins.settings, context)
        oauth.require_verifier(config.auth.mechanisms, plugins)
    except (PluginError, ConfigError) as e:
        raise CLIError(f"configuration error: {e}") from None
    print(f"{args.config or 'embedded default'}: OK (hostname {config.hostname})")
    return 0


# -- queue -------------------------------------------------------------------------------


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _status(entry: QueueEntry) -> str:
    if entry.envelope.held:
        return "held"
    return "deferred" if entry.attempts else "active"


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
    entries = list(spool.entries())
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
    if not args.json:
        print(f"-- {len(entries)} message{'s' if len(entries) != 1 else ''} in queue")
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


def cmd_queue_delete(args: argparse.Namespace, spool: Spool) -> int:
    entries = [_entry(spool, text) for text in dict.fromkeys(args.ids)]  # each id once
    ids = " ".join(str(e.queue_id) for e in entries)
    if _daemon_did(spool, f"delete {ids}"):
        return 0
    for entry in entries:
        try:
            _wait(spool.remove(entry.queue_id))
        except KeyError:
            print(f"{entry.queue_id} was no longer queued")
            continue
        print(f"deleted {entry.queue_id}")
    return 0


def _daemon_did(spool: Spool, command: str) -> bool:
    """A running daemon holds the schedule: changes go through it, so no delivery in flight
    races us. False when no daemon runs (the caller then changes the files itself)."""
    answer = _notify(spool, command)
    if answer is None:
        return False
    if answer.startswith("error"):
        raise CLIError(f"daemon: {answer}")
    print(answer)
    return True


def cmd_queue_release(args: argparse.Namespace, spool: Spool) -> int:
    if _daemon_did(spool, f"release {args.user}"):
        return 0
    released = _wait(Deferred.fromCoroutine(release_held(spool, args.user)))
    print(f"released {len(released)} (delivered when the daemon next starts)")
    return 0


def cmd_queue_flush(args: argparse.Namespace, spool: Spool) -> int:
    answer = _notify(spool, "flush")
    if answer is None:
        print("no daemon is running on this spool; messages are retried when it starts")
        return 1
    print(answer)
    return 0


def _notify(spool: Spool, command: str) -> str | None:
    """Tell a running daemon through its control socket; None when none listens."""
    path = str(Path(spool.directory) / CONTROL_SOCKET)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        try:
            s.connect(path)
        except OSError:
            return None
        s.sendall(command.encode() + b"\n")
        return s.recv(4096).decode("utf-8", "replace").strip()


# -- wiring ------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smarthost", description="smarthost admin tool")
    sub = p.add_subparsers(dest="command", required=True)

    pw = sub.add_parser("passwd", help="set or delete a user's password")
    pw.add_argument("--users", required=True, help="the users file")
    pw.add_argument("--delete", action="store_true", help="remove the user")
    pw.add_argument("name")
    pw.set_defaults(func=cmd_passwd)

    cc = sub.add_parser("check-config", help="validate a configuration file")
    cc.add_argument("--config", required=True)
    cc.set_defaults(func=cmd_check_config)

    q = sub.add_parser("queue", help="inspect and manage the mail queue")
    q.add_argument("--config", help="the configuration (default: the embedded one)")
    qsub = q.add_subparsers(dest="queue_command", required=True)
    ql = qsub.add_parser("list", help="one line per queued message")
    ql.add_argument("--json", action="store_true", help="a JSON array instead")
    ql.set_defaults(queue_func=cmd_queue_list)
    qs = qsub.add_parser("show", help="envelope, status and headers of one message")
    qs.add_argument("id")
    qs.set_defaults(queue_func=cmd_queue_show)
    qd = qsub.add_parser("delete", help="remove messages from the queue")
    qd.add_argument("ids", nargs="+", metavar="id")
    qd.set_defaults(queue_func=cmd_queue_delete)
    qr = qsub.add_parser("release", help="deliver the mail held for a user (the brake)")
    qr.add_argument("--user", required=True, help="user name (or trusted client address)")
    qr.set_defaults(queue_func=cmd_queue_release)
    qf = qsub.add_parser("flush", help="retry every deferred message now")
    qf.set_defaults(queue_func=cmd_queue_flush)
    q.set_defaults(func=_queue)
    return p


def _queue(args: argparse.Namespace) -> int:
    spool = _spool(_load(args.config))
    try:
        result: int = args.queue_func(args, spool)
    except BrokenPipeError:
        raise
    except OSError as e:  # e.g. the lock of a daemon whose control socket did not answer
        raise CLIError(f"spool {spool.directory}: {e}") from None
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
