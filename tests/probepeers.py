"""Servers for the probe's tests, all on loopback: a server that takes AUTH PLAIN before TLS
(aiosmtpd, permissive), and a DNS zone with PTR records (the test DNS server of dnsserver.py
answers the types it knows; PTR is added here).

As a subprocess (end-to-end tests)::

    python tests/probepeers.py --zone zone.txt --ptr 127.0.0.1=mx.smarthost.test

prints the DNS server's port, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import threading
from typing import Any, cast

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import AuthResult, Envelope, Session
from twisted.names import dns

from dnsserver import TTL, Zone, start


class PTRZone(Zone):
    """A :class:`dnsserver.Zone` that also answers PTR queries."""

    def pointer(self, address: str, name: str) -> PTRZone:
        reverse = ipaddress.ip_address(address).reverse_pointer
        # The zone's table of records: (type, payload) pairs by lower-case owner name.
        self._records.setdefault(reverse, []).append(
            (dns.PTR, dns.Record_PTR(name.encode("ascii"), ttl=TTL)))
        return self


class Permissive:
    """Accepts every sender and recipient; counts what reached DATA (the probe must never
    send DATA)."""

    def __init__(self) -> None:
        self.data = 0
        self.recipients: list[str] = []
        self._lock = threading.Lock()

    async def handle_RCPT(self, server: AioSMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        with self._lock:
            self.recipients.append(address)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        with self._lock:
            self.data += 1
        return "250 2.0.0 queued"


class _Controller(Controller):
    def _trigger_server(self) -> None:
        # Port 0: learn the chosen port before aiosmtpd's readiness probe connects to it.
        server = cast(asyncio.Server, self.server)
        self.port = server.sockets[0].getsockname()[1]
        super()._trigger_server()


def accept_anyone(server: Any, session: Any, envelope: Any, mechanism: str, data: Any
                  ) -> AuthResult:
    return AuthResult(success=True)


class PlaintextAuthServer:
    """Offers AUTH PLAIN and LOGIN before any TLS (there is none) and logs anyone in."""

    def __init__(self) -> None:
        self.handler = Permissive()
        self._controller = _Controller(
            self.handler, hostname="127.0.0.1", port=0, auth_require_tls=False,
            authenticator=accept_anyone, server_hostname="plain.test",
        )

    @property
    def port(self) -> int:
        return int(self._controller.port)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The test DNS server, with PTR records.")
    parser.add_argument("--zone", required=True, help="zone file (dnsserver.py's text form)")
    parser.add_argument("--ptr", action="append", default=[], metavar="ADDRESS=NAME")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    with open(args.zone, encoding="utf-8") as f:
        zone = cast(PTRZone, PTRZone.parse(f.read()))  # parse builds a cls()
    for item in args.ptr:
        address, _, name = item.partition("=")
        zone.pointer(address, name)
    running = start(reactor, zone)
    print(running.port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
