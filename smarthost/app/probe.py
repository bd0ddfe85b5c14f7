"""``smarthost probe HOST``: is this SMTP server safe? (SPEC "Probing a server")

The test an admin does by hand with telnet (banner, EHLO, AUTH before and after STARTTLS,
MAIL FROM and RCPT TO with made-up outside addresses), plus TLS, the certificate and DNS,
against any SMTP server, ours or not. One line per check, ``PASS``/``WARN``/``FAIL`` and the
reply that proved it; ``--json`` prints an array of ``{check, result, detail}``. Exit status
0 when nothing failed, 1 otherwise, 2 for a usage problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from smarthost.app import probedns
from smarthost.app.probecheck import (
    FAIL,
    Checklist,
    ProbeOptions,
    Result,
    dns_checks,
    first_session,
)
from smarthost.app.proberelay import credential_sessions, relay_session
from smarthost.delivery.dns import parse_nameserver

DESCRIPTION = (
    "Test an SMTP server the way an admin would by hand: banner and EHLO; STARTTLS, the TLS "
    "version and the certificate; no AUTH before TLS; not an open relay (MAIL FROM and RCPT "
    "TO outside addresses, and the classic address tricks; DATA is never sent); with "
    "--user, AUTH with every mechanism offered and a sender the user does not own refused; "
    "the PTR of the server's address; DNSBL listings. Port 465 is implicit TLS; port 25 an "
    "MX, where AUTH is not expected; any other port a STARTTLS submission port."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("host", metavar="HOST", help="the server's name (or address)")
    parser.add_argument("--port", type=int, default=587, metavar="N",
                        help="465: implicit TLS; 25: an MX; other: submission (default 587)")
    parser.add_argument("--user", metavar="NAME", help="log in as NAME (after TLS only)")
    parser.add_argument("--password-file", metavar="F", type=Path,
                        help="NAME's password, on the first line of F")
    parser.add_argument("--from", dest="sender", metavar="ADDR",
                        default="relay-probe@example.org",
                        help="an outside sender, not one --user owns (default %(default)s)")
    parser.add_argument("--to", dest="recipient", metavar="ADDR",
                        default="relay-probe@example.net",
                        help="an outside recipient (default %(default)s)")
    parser.add_argument("--nameserver", metavar="HOST:PORT",
                        help="ask only this DNS server (default: the system's resolver)")
    parser.add_argument("--dnsbl", metavar="ZONE", action="append", default=[],
                        help="a DNSBL zone to look the address up in (repeatable)")
    parser.add_argument("--cafile", metavar="PEM", type=Path,
                        help="trust these CAs for the certificate (default: the system's)")
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=15.0,
                        help="for each reply and the TLS handshake (default %(default)g)")
    parser.add_argument("--json", action="store_true",
                        help="a JSON array of {check, result, detail} instead")


async def run(reactor: Any, options: ProbeOptions) -> list[Result]:
    """Every check, in order; never raises for anything the server does."""
    checks = Checklist()
    resolver = probedns.resolver(options.nameserver, reactor)
    address = await dns_checks(resolver, options, checks)
    if address is None:
        return checks.results
    first = await first_session(reactor, address, options, checks)
    if first is None:
        return checks.results
    await relay_session(reactor, address, options, checks, first.tls)
    if options.user is not None and options.password is not None:
        await credential_sessions(reactor, address, options, checks, first)
    return checks.results


def options_from(args: argparse.Namespace) -> ProbeOptions:
    """Raises ValueError with a message for the user."""
    if (args.user is None) != (args.password_file is None):
        raise ValueError("--user and --password-file go together")
    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text(encoding="utf-8").splitlines()[0]
        except (OSError, UnicodeDecodeError, IndexError) as e:
            raise ValueError(f"cannot read a password from {args.password_file}: {e}") from None
    if args.nameserver is not None:
        parse_nameserver(args.nameserver)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: not a TCP port")
    for address in (args.sender, args.recipient):
        if "@" not in address:
            raise ValueError(f"{address!r} is not a mail address")
    if args.cafile is not None and not args.cafile.is_file():
        raise ValueError(f"--cafile {args.cafile}: no such file")
    return ProbeOptions(
        host=args.host, port=args.port, user=args.user, password=password, sender=args.sender,
        recipient=args.recipient, nameserver=args.nameserver, dnsbl=tuple(args.dnsbl),
        cafile=args.cafile, timeout=args.timeout,
    )


def render(results: list[Result], as_json: bool) -> str:
    if as_json:
        return json.dumps([{"check": r.check, "result": r.result, "detail": r.detail}
                           for r in results], indent=2)
    width = max((len(r.check) for r in results), default=0)
    return "\n".join(f"{r.result:<4}  {r.check:<{width}}  {r.detail}" for r in results)


def main(args: argparse.Namespace) -> int:
    try:
        options = options_from(args)
    except ValueError as e:
        print(f"smarthost: probe: {e}", file=sys.stderr)
        return 2
    from twisted.internet import task

    results: list[Result] = []

    def probe(reactor: Any) -> Deferred[None]:
        async def go() -> None:
            results.extend(await run(reactor, options))

        return Deferred.fromCoroutine(go())

    try:
        task.react(probe)
    except SystemExit as e:
        if e.code not in (0, None):
            return 1  # react printed the traceback of what crashed
    print(render(results, args.json))
    return status(results)


def status(results: list[Result]) -> int:
    """0 when nothing failed (and something was checked), 1 otherwise."""
    return 1 if any(r.result == FAIL for r in results) or not results else 0
