"""The ``smarthost`` admin command: run, passwd, check-config, config, probe, queue (its own
module, :mod:`smarthost.app.queuecli`).

It talks to a running daemon only through the spool directory (and the control socket the
daemon keeps there), the way Postfix's postqueue and postsuper work on the queue files.
Errors are one line on stderr naming the problem; exit status 2 for bad input.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence
from pathlib import Path

from smarthost.app import checks, cli, configdump, probe, queuecli
from smarthost.app.cli import CLIError
from smarthost.auth.users import PasswordError, UserNameError, delete_user, set_password

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
    config = cli.load(args.config)
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
    config = cli.load(args.config)
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


# -- wiring ------------------------------------------------------------------------------


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
    run.add_argument("--config", "-c", metavar="PATH", help=cli.CONFIG_HELP)
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
    cc.add_argument("--config", "-c", metavar="PATH", help=cli.CONFIG_HELP)
    cc.set_defaults(func=cmd_check_config)

    cf = sub.add_parser(
        "config", help="print the configuration in effect, as TOML",
        description="Print the configuration in effect as TOML: every key, defaults filled "
        "in, paths absolute. The output loads back with the same effect. Secrets are never "
        "printed, only the files that hold them.",
    )
    cf.add_argument("--config", "-c", metavar="PATH", help=cli.CONFIG_HELP)
    cf.add_argument("--changed", action="store_true",
                    help="only what differs from the defaults (like postconf -n)")
    cf.set_defaults(func=cmd_config)

    pr = sub.add_parser("probe", help="test an SMTP server: TLS, AUTH, open relay, DNS",
                        description=probe.DESCRIPTION)
    probe.add_arguments(pr)
    pr.set_defaults(func=probe.main)

    queuecli.add_parser(sub)
    return p


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
