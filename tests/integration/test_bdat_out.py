"""BDAT to a next hop that offers CHUNKING (RFC 3030), over loopback to chunkmx's asyncio MX,
which records the raw commands: chunks and LAST, pipelined or one at a time, no dot-stuffing,
a '.'-led line and 8-bit data byte-identical, DATA kept for servers without CHUNKING."""

from __future__ import annotations

import io
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from chunkmx import ChunkMX
from smarthost.core.envelope import DELIVERED, Envelope, Recipient
from smarthost.delivery.routing import SMTP, Host, Route
from smarthost.delivery.smtpagent import HopResult, SMTPDelivery, Timeouts
from smarthost.delivery.smtpclient import CHUNK

FAST = Timeouts(connect=5, greeting=5, command=5, mail=5, rcpt=5, data_init=5,
                data_block=10, data_end=20, quit=2)
ALICE = Recipient("alice@example.test")
TRICKY = (b"From: a@example.test\r\nSubject: caf\xc3\xa9\r\n\r\n.a dot-led line\r\n"
          b"..two dots\r\n.\r\n\xff\xfe 8-bit \x80\r\nno final line break")


class BDATTests(TestCase):
    timeout = 60

    def mx(self, **options: Any) -> ChunkMX:
        mx = ChunkMX(**options)
        mx.start()
        self.addCleanup(mx.stop)
        return mx

    def send(self, mx: ChunkMX, body: bytes) -> Deferred[HopResult]:
        delivery = SMTPDelivery(reactor, "client.test", timeouts=FAST, reuse=None,
                                transcript=True)
        route = Route(SMTP, hosts=(Host("mx.test", "127.0.0.1", mx.port),))
        envelope = Envelope("sender@example.test", (ALICE,), body="8BITMIME")
        return Deferred.fromCoroutine(delivery.deliver(
            route, envelope, [ALICE], lambda: io.BytesIO(body), len(body)))

    async def test_pipelined_chunks_arrive_byte_identical(self) -> None:
        mx = self.mx()
        body = TRICKY + b"\r\n" + b"x" * (CHUNK * 2 + 17)
        result = await self.send(mx, body)
        self.assertEqual([o.result for o in result.outcomes], [DELIVERED])
        [message] = await mx.wait_for_messages(1)
        self.assertTrue(message.chunked)
        self.assertEqual(message.data, body + b"\r\n")  # the open last line completed
        bdat = [c for c in mx.commands if c.startswith("BDAT")]
        last = len(body) - 2 * CHUNK + 2
        self.assertEqual(bdat, [f"BDAT {CHUNK}", f"BDAT {CHUNK}", f"BDAT {last} LAST"])
        self.assertNotIn("DATA", mx.commands)
        self.assertIn("BODY=8BITMIME", message.mail_from)

    async def test_one_chunk_at_a_time_without_pipelining(self) -> None:
        mx = self.mx(extensions=("CHUNKING",))
        body = b"Subject: s\r\n\r\n" + b".\r\n" * (CHUNK // 3 + 5)
        result = await self.send(mx, body)
        self.assertEqual([o.result for o in result.outcomes], [DELIVERED])
        [message] = await mx.wait_for_messages(1)
        self.assertEqual(message.data, body)
        self.assertEqual([c for c in mx.commands if c.startswith("BDAT")],
                         [f"BDAT {CHUNK}", f"BDAT {len(body) - CHUNK} LAST"])

    async def test_empty_body_is_bdat_0_last(self) -> None:
        mx = self.mx()
        await self.send(mx, b"")
        [message] = await mx.wait_for_messages(1)
        self.assertEqual(message.data, b"")
        self.assertIn("BDAT 0 LAST", mx.commands)

    async def test_data_without_chunking(self) -> None:
        mx = self.mx(extensions=("PIPELINING", "8BITMIME"))
        body = TRICKY + b"\r\n"
        result = await self.send(mx, body)
        self.assertEqual([o.result for o in result.outcomes], [DELIVERED])
        [message] = await mx.wait_for_messages(1)
        self.assertFalse(message.chunked)
        self.assertEqual(message.data, body)
        self.assertIn("DATA", mx.commands)
