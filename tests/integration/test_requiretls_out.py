"""REQUIRETLS (RFC 8689) on the way out, to chunkmx's asyncio MX with a test CA: a message whose
envelope carries the flag goes only over verified TLS to a next hop offering REQUIRETLS (and
says REQUIRETLS on MAIL); otherwise it bounces with 5.7.30."""

from __future__ import annotations

import io
import ssl
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate
from twisted.trial.unittest import TestCase

from chunkmx import ChunkMX
from smarthost.app.tlscert import KeyPair, issue
from smarthost.core.enums import TLSPolicy
from smarthost.core.envelope import BOUNCED, DELIVERED, Envelope, Recipient
from smarthost.delivery.routing import SMTP, Host, Route
from smarthost.delivery.smtpagent import HopResult, SMTPDelivery, Timeouts

FAST = Timeouts(connect=5, greeting=5, command=5, mail=5, rcpt=5, data_init=5,
                data_block=10, data_end=20, quit=2)
ALICE = Recipient("alice@example.test")
BODY = b"Subject: secret\r\n\r\nfor your eyes only\r\n"


def server_context(pair: KeyPair) -> ssl.SSLContext:
    directory = Path(tempfile.mkdtemp(prefix="requiretls-"))
    (directory / "cert.pem").write_bytes(pair.cert_pem)
    (directory / "key.pem").write_bytes(pair.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


class RequireTLSTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.ca = issue(("Test CA",), is_ca=True)
        self.root = Certificate.loadPEM(self.ca.cert_pem)

    def mx(self, *, requiretls: bool) -> ChunkMX:
        pair = issue(("mx.test",), ca=self.ca)
        mx = ChunkMX(tls=server_context(pair), requiretls=requiretls)
        mx.start()
        self.addCleanup(mx.stop)
        return mx

    def send(self, mx: ChunkMX, tls: str) -> Deferred[HopResult]:
        delivery = SMTPDelivery(reactor, "client.test", timeouts=FAST, reuse=None,
                                trust_root=self.root)
        route = Route(SMTP, hosts=(Host("mx.test", "127.0.0.1", mx.port),), tls=TLSPolicy(tls))
        envelope = Envelope("sender@example.test", (ALICE,), requiretls=True)
        return Deferred.fromCoroutine(delivery.deliver(
            route, envelope, [ALICE], lambda: io.BytesIO(BODY), len(BODY)))

    async def test_verified_tls_and_requiretls_offered_delivers(self) -> None:
        mx = self.mx(requiretls=True)
        [outcome] = (await self.send(mx, "verify")).outcomes
        self.assertEqual(outcome.result, DELIVERED)
        [message] = await mx.wait_for_messages(1)
        self.assertTrue(message.tls)
        self.assertTrue(message.mail_from.endswith(" REQUIRETLS"), message.mail_from)

    async def test_next_hop_without_requiretls_bounces_5_7_30(self) -> None:
        mx = self.mx(requiretls=False)
        [outcome] = (await self.send(mx, "verify")).outcomes
        self.assertEqual((outcome.result, outcome.status), (BOUNCED, "5.7.30"))
        self.assertEqual(mx.messages, [])

    async def test_unverified_route_bounces_without_connecting(self) -> None:
        mx = self.mx(requiretls=True)
        for tls in ("opportunistic", "required"):
            [outcome] = (await self.send(mx, tls)).outcomes
            self.assertEqual((outcome.result, outcome.status), (BOUNCED, "5.7.30"))
        self.assertEqual(mx.commands, [])


def test_the_flag_round_trips_and_older_spools_read_false() -> None:
    envelope = Envelope("a@example.test", (ALICE,), requiretls=True)
    assert Envelope.from_json(envelope.to_json()).requiretls
    old = envelope.to_json()
    del old["requiretls"]
    assert not Envelope.from_json(old).requiretls
