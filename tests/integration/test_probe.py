"""``smarthost probe`` against servers started here on loopback: a deliberately open relay
(aiosmtpd accepting every recipient, with a self-signed certificate), a server that takes
AUTH PLAIN before TLS, a well-behaved one with a test CA, one that never greets, one that
answers garbage and one that hangs up; DNS through the test DNS server (with PTR records).
The matching checks FAIL, the exit status is 1, and nothing crashes; DATA is never sent."""
# trial's assertions carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.trial.unittest import TestCase

from dnsserver import start as start_dns
from mxpeer import MXPeer
from probepeers import PlaintextAuthServer, PTRZone
from smarthost.app import probe
from smarthost.app.probecheck import FAIL, PASS, WARN, ProbeOptions, Result
from smarthost.app.tlscert import issue

HOST = "mx.probe.test"


def scratch(test: Any) -> Path:
    """A temporary directory removed after ``test`` (trial's mktemp writes into the working
    directory under pytest)."""
    directory = Path(tempfile.mkdtemp(prefix="smarthost-watch-"))
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


class Silent(Protocol):
    """Accepts the connection and never says a word."""


class Garbage(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"\x16\x03\x01 this is not SMTP\r\n")  # type: ignore[union-attr]


class HangsUpAtEHLO(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"220 hangup.test ESMTP\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


class ProbeTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        zone = cast(PTRZone, PTRZone.from_dict({HOST: {"A": ["127.0.0.1"]},
                                                "other.probe.test": {"A": ["127.0.0.1"]}}))
        zone.pointer("127.0.0.1", HOST)
        zone.add("1.0.0.127.listed.test", "A", "127.0.0.2")
        zone.add("1.0.0.127.refusing.test", "A", "127.255.255.254")
        self.dns = start_dns(reactor, zone)
        self.addCleanup(self.dns.stop)

    def options(self, port: int, **changes: Any) -> ProbeOptions:
        settings: dict[str, Any] = {"timeout": 2.0, **changes}
        return ProbeOptions(host=HOST, port=port, nameserver=self.dns.nameserver,
                            helo="probe.test", **settings)

    def peer(self, **options: Any) -> MXPeer:
        peer = MXPeer(name=HOST, **options)
        peer.start()
        self.addCleanup(peer.stop)
        return peer

    def raw(self, protocol: type[Protocol]) -> int:
        factory: Any = ServerFactory.forProtocol(protocol)
        port: IListeningPort = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(getattr(port.getHost(), "port", 0))

    async def probe(self, options: ProbeOptions) -> dict[str, Result]:
        results = await probe.run(reactor, options)
        await _settle()
        found = {r.check: r for r in results}
        self.assertEqual(len(found), len(results), "every check reported once")
        return found

    def assertResults(self, found: dict[str, Result], result: str, *checks: str) -> None:
        for check in checks:
            self.assertIn(check, found, sorted(found))
            self.assertEqual(found[check].result, result, found[check])

    async def test_an_open_relay_fails(self) -> None:
        peer = self.peer(starttls=True)
        found = await self.probe(self.options(peer.port))
        self.assertResults(found, PASS, "dns-address", "dns-ptr", "connect", "banner", "ehlo",
                           "auth-offered-before-tls", "starttls", "tls-version")
        self.assertResults(found, FAIL, "open-relay", "relay-percent-hack")
        self.assertIn("accepted without AUTH: 250", found["open-relay"].detail)
        self.assertIn("RCPT TO:<relay-probe@example.net>", found["open-relay"].detail)
        # The self-signed certificate is reported, not refused: the probe went on.
        self.assertResults(found, FAIL, "certificate")
        self.assertIn("self-signed", found["certificate"].detail)
        self.assertEqual(probe.status(list(found.values())), 1)
        self.assertEqual(peer.transactions, 0)  # never DATA
        self.assertEqual(peer.messages, [])

    async def test_auth_plain_before_tls_fails(self) -> None:
        server = PlaintextAuthServer()
        server.start()
        self.addCleanup(server.stop)
        found = await self.probe(self.options(server.port))
        self.assertResults(found, FAIL, "auth-offered-before-tls", "auth-plain-before-tls",
                           "auth-login-before-tls", "starttls", "open-relay")
        self.assertIn("AUTH PLAIN before TLS logged in a made-up user: 235",
                      found["auth-plain-before-tls"].detail)
        self.assertIn("334", found["auth-login-before-tls"].detail)
        self.assertEqual(server.handler.data, 0)
        self.assertEqual(probe.status(list(found.values())), 1)

    async def test_a_well_run_server_passes_and_its_logins_are_tried(self) -> None:
        ca = issue(("Probe Test CA",), is_ca=True)
        cafile = scratch(self) / "ca.pem"
        cafile.write_bytes(ca.cert_pem)
        peer = self.peer(starttls=True, certificate=issue((HOST, "127.0.0.1"), ca=ca),
                         users={"alice": "secret"}, auth_mechanisms=("PLAIN", "LOGIN"))
        found = await self.probe(self.options(peer.port, cafile=cafile, user="alice",
                                            password="secret", dnsbl=("clean.test",)))
        self.assertResults(found, PASS, "dns-address", "dns-ptr", "dnsbl:clean.test", "connect",
                           "banner", "ehlo", "auth-offered-before-tls", "auth-plain-before-tls",
                           "auth-login-before-tls", "starttls", "tls-version", "certificate",
                           "certificate-expiry", "open-relay", "relay-percent-hack",
                           "relay-source-route", "relay-quoted-local-part", "auth:PLAIN",
                           "auth:LOGIN")
        self.assertIn("538", found["auth-plain-before-tls"].detail)
        # aiosmtpd lets a logged-in user send as anyone: that is the one failure.
        self.assertResults(found, FAIL, "sender-ownership")
        self.assertEqual(peer.transactions, 0)

    async def test_a_wrong_password_fails_each_login(self) -> None:
        peer = self.peer(starttls=True, users={"alice": "secret"})
        found = await self.probe(self.options(peer.port, user="alice", password="wrong"))
        self.assertResults(found, FAIL, "auth:PLAIN", "auth:LOGIN")
        self.assertIn("535", found["auth:PLAIN"].detail)
        self.assertResults(found, WARN, "sender-ownership")

    async def test_a_silent_server_times_out(self) -> None:
        found = await self.probe(self.options(self.raw(Silent), timeout=0.5))
        self.assertResults(found, PASS, "connect")
        self.assertResults(found, FAIL, "banner")
        self.assertIn("no reply greeting within 0.5 s", found["banner"].detail)
        self.assertNotIn("open-relay", found)  # nothing more is tried

    async def test_garbage_is_reported(self) -> None:
        found = await self.probe(self.options(self.raw(Garbage)))
        self.assertResults(found, FAIL, "banner")
        self.assertIn("not an SMTP reply", found["banner"].detail)
        self.assertIn("\\x16\\x03\\x01", found["banner"].detail)

    async def test_a_server_that_hangs_up_is_reported(self) -> None:
        found = await self.probe(self.options(self.raw(HangsUpAtEHLO)))
        self.assertResults(found, PASS, "banner")
        self.assertResults(found, FAIL, "ehlo")
        self.assertIn("closed the connection", found["ehlo"].detail)

    async def test_nothing_listening(self) -> None:
        found = await self.probe(self.options(_free_port()))
        self.assertResults(found, FAIL, "connect")

    async def test_dns_failures(self) -> None:
        found = await self.probe(ProbeOptions(host="nowhere.probe.test", port=9,
                                            nameserver=self.dns.nameserver))
        self.assertResults(found, FAIL, "dns-address")
        self.assertEqual(list(found), ["dns-address"])
        found = await self.probe(self.options(self.raw(Silent), timeout=0.2,
                                            dnsbl=("listed.test", "refusing.test")))
        self.assertResults(found, FAIL, "dnsbl:listed.test")
        self.assertIn("127.0.0.2", found["dnsbl:listed.test"].detail)
        self.assertResults(found, WARN, "dnsbl:refusing.test")
        other = await self.probe(ProbeOptions(host="other.probe.test", port=self.raw(Silent),
                                            nameserver=self.dns.nameserver, timeout=0.2))
        self.assertResults(other, FAIL, "dns-ptr")
        self.assertIn("not other.probe.test", other["dns-ptr"].detail)

    async def test_an_address_as_host_is_confirmed_through_its_ptr(self) -> None:
        found = await self.probe(ProbeOptions(host="127.0.0.1", port=self.raw(Silent),
                                            nameserver=self.dns.nameserver, timeout=0.2))
        self.assertNotIn("dns-address", found)
        self.assertResults(found, PASS, "dns-ptr")

    def test_text_and_json(self) -> None:
        results = [Result("banner", PASS, "220 mx ESMTP"), Result("open-relay", FAIL, "250 ok")]
        text = probe.render(results, as_json=False).splitlines()
        self.assertEqual(text, ["PASS  banner      220 mx ESMTP", "FAIL  open-relay  250 ok"])
        self.assertEqual(json.loads(probe.render(results, as_json=True)),
                         [{"check": "banner", "result": "PASS", "detail": "220 mx ESMTP"},
                          {"check": "open-relay", "result": "FAIL", "detail": "250 ok"}])
        self.assertEqual(probe.status(results[:1]), 0)
        self.assertEqual(probe.status(results), 1)


async def _settle() -> None:
    """A turn of the reactor for aborted connections to finish closing."""
    for _ in range(3):
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d


def _free_port() -> int:
    """A loopback port with nothing listening (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
