"""Connection reuse (issue 5): park after a clean transaction, take it next time."""

from __future__ import annotations

from typing import Any

from test_outbound import ALICE, BOB, FAST, DeliveryTestCase, Scripted, ScriptedServer
from twisted.internet import reactor
from twisted.internet.task import deferLater

from smarthost.core.envelope import BOUNCED, DELIVERED
from smarthost.delivery.conncache import Reuse
from smarthost.delivery.routing import Credentials
from smarthost.delivery.smtpagent import SMTPDelivery

POSTFIX_LIKE = Reuse()  # 2 s idle, 100 uses, 300 s


class Counted(ScriptedServer):
    """A scripted server that counts the connections it accepted."""

    @property
    def connections(self) -> int:
        return len(self._all)


class HangsUpAfterMessage(Scripted):
    """Answers the end of data, then closes the connection: drops idle clients at once."""

    def lineReceived(self, line: bytes) -> None:
        data = self.in_data
        super().lineReceived(line)
        if data and not self.in_data:
            self.wire.loseConnection()


class RefusesRecipients(Scripted):
    """Every RCPT refused: MAIL stays accepted, a transaction the client must RSET."""

    def reply(self, verb: bytes) -> bytes:
        if verb == b"RCPT":
            return b"550 5.1.1 no such user\r\n"
        if verb == b"DATA":
            return b"554 5.5.1 no valid recipients\r\n"
        return super().reply(verb)


class IdleTimeout421(Scripted):
    """Answers the second MAIL of a connection with 421 and hangs up (an idle timeout)."""

    mails = 0

    def lineReceived(self, line: bytes) -> None:
        if line.upper().startswith(b"MAIL"):
            self.mails += 1
            if self.mails == 2:
                self.server.lines.append(line)
                self.wire.write(b"421 4.4.2 idle too long\r\n")
                self.wire.loseConnection()
                return
        super().lineReceived(line)


class SecondMailRefused(Scripted):
    """A 5xx to MAIL on a reused connection is the server's answer, not a stale connection."""

    mails = 0

    def reply(self, verb: bytes) -> bytes:
        if verb == b"MAIL":
            self.mails += 1
            if self.mails == 2:
                return b"550 5.7.1 sender refused\r\n"
        if verb in (b"RCPT", b"DATA") and self.mails == 2:
            return b"503 5.5.1 need MAIL first\r\n"
        return super().reply(verb)


class ReuseTests(DeliveryTestCase):
    def reusing(self, reuse: Reuse | None = POSTFIX_LIKE, **kwargs: Any) -> SMTPDelivery:
        delivery = SMTPDelivery(
            reactor, "client.test", timeouts=FAST, transcript=True, reuse=reuse, **kwargs
        )
        self.addCleanup(delivery.close_all)  # before the servers stop (cleanups run LIFO)
        return delivery

    async def counted(self, protocol: type[Scripted]) -> Counted:
        server = Counted(protocol)
        await server.listen()
        self.addCleanup(server.stop)
        return server

    async def test_two_deliveries_one_connection(self) -> None:
        peer = self.peer()
        delivery = self.reusing()
        first = await self.deliver([peer.host], [ALICE], delivery=delivery)
        second = await self.deliver([peer.host], [BOB], delivery=delivery)
        self.assertResults(first + second, DELIVERED, DELIVERED)
        messages = await peer.wait_for_messages(2)
        self.assertEqual([m.rcpt_tos for m in messages],
                         [("alice@example.test",), ("bob@example.test",)])
        self.assertEqual(peer.connections, 1)

    async def test_parked_without_rset_then_quit_when_idle_time_ends(self) -> None:
        server = await self.counted(Scripted)
        delivery = self.reusing(Reuse(idle=0.1))
        self.assertResults(await self.deliver([server.host], delivery=delivery), DELIVERED)
        self.assertEqual(server.lines[-1], b".")  # parked: no RSET after a message, no QUIT
        await server.closed()  # the idle timer says QUIT
        self.assertEqual(server.lines[-1], b"QUIT")
        self.assertResults(await self.deliver([server.host], delivery=delivery), DELIVERED)
        self.assertEqual(server.connections, 2)

    async def test_server_closed_parked_connection(self) -> None:
        server = await self.counted(HangsUpAfterMessage)
        delivery = self.reusing()
        for _ in range(3):
            self.assertResults(await self.deliver([server.host], delivery=delivery), DELIVERED)
        self.assertEqual(server.connections, 3)

    async def test_stale_connection_found_at_mail_falls_back(self) -> None:
        server = await self.counted(IdleTimeout421)
        delivery = self.reusing()
        outcomes = await self.deliver([server.host], [ALICE], delivery=delivery)
        outcomes += await self.deliver([server.host], [BOB], delivery=delivery)
        self.assertResults(outcomes, DELIVERED, DELIVERED)  # never a deferral of its own
        self.assertEqual(server.connections, 2)
        rcpts = [line for line in server.lines if line.startswith(b"RCPT")]
        self.assertEqual(rcpts, [b"RCPT TO:<alice@example.test>", b"RCPT TO:<bob@example.test>"])

    async def test_5xx_to_mail_on_reused_connection_is_final(self) -> None:
        server = await self.counted(SecondMailRefused)
        delivery = self.reusing()
        outcomes = await self.deliver([server.host], [ALICE], delivery=delivery)
        outcomes += await self.deliver([server.host], [BOB], delivery=delivery)
        self.assertResults(outcomes, DELIVERED, BOUNCED)
        self.assertEqual(server.connections, 1)

    async def test_a_transaction_left_open_is_reset_before_parking(self) -> None:
        server = await self.counted(RefusesRecipients)
        delivery = self.reusing()
        for _ in range(2):
            self.assertResults(await self.deliver([server.host], delivery=delivery), BOUNCED)
        self.assertEqual(server.lines.count(b"RSET"), 2)
        self.assertEqual(server.connections, 1)

    async def test_reuse_count_limit(self) -> None:
        server = await self.counted(Scripted)
        delivery = self.reusing(Reuse(uses=2))
        for _ in range(5):
            self.assertResults(await self.deliver([server.host], delivery=delivery), DELIVERED)
        self.assertEqual(server.connections, 3)  # 2 + 2 + 1 messages
        self.assertEqual(server.lines.count(b"QUIT"), 2)

    async def test_never_shared_across_credentials(self) -> None:
        peer = self.peer(starttls=True, users={"ann": "pw-a", "ben": "pw-b"})
        delivery = self.reusing()
        ann, ben = Credentials("ann", "pw-a"), Credentials("ben", "pw-b")
        for credentials in (ann, ben, ann, ben):
            outcomes = await self.deliver([peer.host], delivery=delivery, credentials=credentials)
            self.assertResults(outcomes, DELIVERED)
        messages = await peer.wait_for_messages(4)
        self.assertEqual([m.user for m in messages], ["ann", "ben", "ann", "ben"])
        self.assertTrue(all(m.tls for m in messages))
        self.assertEqual(peer.connections, 2)

    async def test_never_shared_across_tls_policies(self) -> None:
        peer = self.peer(starttls=True)
        delivery = self.reusing()
        for tls in ("opportunistic", "required", "opportunistic", "required"):
            self.assertResults(await self.deliver([peer.host], delivery=delivery, tls=tls),
                               DELIVERED)
        await peer.wait_for_messages(4)
        self.assertEqual(peer.connections, 2)

    async def test_plaintext_connection_not_used_for_required_tls(self) -> None:
        server = await self.counted(Scripted)  # offers no STARTTLS
        delivery = self.reusing()
        self.assertResults(await self.deliver([server.host], delivery=delivery), DELIVERED)
        [outcome] = await self.deliver([server.host], delivery=delivery, tls="required")
        self.assertEqual(outcome.status, "4.7.4")  # a fresh connection, refused as before
        self.assertEqual(server.connections, 2)

    async def test_concurrent_deliveries_use_separate_connections(self) -> None:
        peer = self.peer()
        delivery = self.reusing()
        both = [self.deliver([peer.host], [r], delivery=delivery) for r in (ALICE, BOB)]
        for d in both:
            self.assertResults(await d, DELIVERED)
        self.assertResults(await self.deliver([peer.host], delivery=delivery), DELIVERED)
        await peer.wait_for_messages(3)
        self.assertEqual(peer.connections, 2)

    async def test_close_all_quits_and_parks_no_more(self) -> None:
        server = await self.counted(Scripted)
        delivery = self.reusing()
        self.assertResults(await self.deliver([server.host], delivery=delivery), DELIVERED)
        await delivery.close_all()
        await server.closed()
        self.assertEqual(server.lines[-2:], [b".", b"QUIT"])
        self.assertResults(await self.deliver([server.host], delivery=delivery), DELIVERED)
        await server.closed()  # closed right after the delivery, not parked
        self.assertEqual(server.lines[-1], b"QUIT")
        self.assertEqual(server.connections, 2)

    async def test_no_reuse_when_disabled(self) -> None:
        peer = self.peer()
        delivery = self.reusing(None)
        for _ in range(2):
            self.assertResults(await self.deliver([peer.host], delivery=delivery), DELIVERED)
        self.assertEqual(peer.connections, 2)

    async def test_parked_connection_survives_a_short_pause(self) -> None:
        peer = self.peer()
        delivery = self.reusing(Reuse(idle=5))
        self.assertResults(await self.deliver([peer.host], delivery=delivery), DELIVERED)
        await deferLater(reactor, 0.2)
        self.assertResults(await self.deliver([peer.host], delivery=delivery), DELIVERED)
        self.assertEqual(peer.connections, 1)
