"""One delivery attempt over real loopback TCP: aiosmtpd as the MX, raw servers for attacks."""

from __future__ import annotations

import io
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import (
    IAddress,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import ServerFactory
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.protocols.basic import LineOnlyReceiver
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from mxpeer import MXPeer
from smarthost.app.tlscert import issue
from smarthost.core.envelope import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    Envelope,
    Outcome,
    QueueEntry,
    QueueId,
    Recipient,
)
from smarthost.delivery.courier import Courier, LocalAgent
from smarthost.delivery.hostcache import HostCache
from smarthost.delivery.routing import SMTP, Credentials, Host, Route
from smarthost.delivery.smtpagent import HopResult, SMTPDelivery, Timeouts
from smarthost.delivery.smtpclient import CHUNK, ClientConnection, DotStuffer, xtext

FAST = Timeouts(
    connect=5, greeting=5, command=5, mail=5, rcpt=5, data_init=5, data_block=10,
    data_end=20, quit=2,
)
BODY = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"
ALICE, BOB, CAROL = (Recipient(f"{n}@example.test") for n in ("alice", "bob", "carol"))


def free_port() -> int:
    """A loopback port with nothing listening (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DeliveryTestCase(TestCase):
    timeout = 60

    def peer(self, **options: Any) -> MXPeer:
        peer = MXPeer(**options)
        peer.start()
        self.addCleanup(peer.stop)
        return peer

    def deliver(
        self, hosts: Sequence[Host], recipients: Sequence[Recipient] = (ALICE,), **options: Any
    ) -> Deferred[list[Outcome]]:
        """The outcomes of :meth:`hop`."""
        return self.hop(hosts, recipients, **options).addCallback(
            lambda result: list(result.outcomes)
        )

    def hop(
        self,
        hosts: Sequence[Host],
        recipients: Sequence[Recipient] = (ALICE,),
        *,
        body: bytes | Callable[[], BinaryIO] = BODY,
        timeouts: Timeouts = FAST,
        trust_root: Any = None,
        envelope: Envelope | None = None,
        size: int | None = None,
        delivery: SMTPDelivery | None = None,
        **route: Any,
    ) -> Deferred[HopResult]:
        """One delivery; by ``delivery`` when given, else by a new one that keeps no
        connection (reuse has its own tests in test_outbound_reuse.py)."""
        delivery = delivery or SMTPDelivery(
            reactor, "client.test", timeouts=timeouts, trust_root=trust_root,
            transcript=True, reuse=None,
        )
        envelope = envelope or Envelope("sender@example.test", tuple(recipients))
        open_body = body if callable(body) else (lambda: io.BytesIO(body))
        size = size if size is not None else (len(body) if isinstance(body, bytes) else 0)
        return Deferred.fromCoroutine(
            delivery.deliver(
                Route(SMTP, hosts=tuple(hosts), **route), envelope, recipients, open_body, size
            )
        )

    async def scripted(self, protocol: type[Scripted]) -> ScriptedServer:
        server = ScriptedServer(protocol)
        await server.listen()
        self.addCleanup(server.stop)
        return server

    def assertResults(self, outcomes: list[Outcome], *expected: str) -> None:
        self.assertEqual([o.result for o in outcomes], list(expected), outcomes)


class BasicDeliveryTests(DeliveryTestCase):
    async def test_delivered_to_one_mx(self) -> None:
        peer = self.peer()
        [outcome] = await self.deliver([peer.host])
        self.assertEqual(outcome.result, DELIVERED)
        self.assertTrue(outcome.reply.startswith("250 "))
        self.assertEqual(outcome.status, "2.0.0")
        self.assertEqual(outcome.remote, "mx.test[127.0.0.1]")
        [message] = await peer.wait_for_messages(1)
        self.assertEqual(message.data, BODY)
        self.assertEqual(message.mail_from, "sender@example.test")
        self.assertEqual(message.rcpt_tos, ("alice@example.test",))
        self.assertIn(f"SIZE={len(BODY)}", message.mail_options)
        self.assertEqual(message.ehlo, "client.test")
        self.assertFalse(message.tls)

    async def test_null_sender(self) -> None:
        peer = self.peer()
        outcomes = await self.deliver([peer.host], envelope=Envelope("", (ALICE,)))
        self.assertResults(outcomes, DELIVERED)
        [message] = await peer.wait_for_messages(1)
        self.assertEqual(message.mail_from, "<>")

    async def _one_transaction_one_rejected(self, pipelining: bool) -> None:
        peer = self.peer(reject={"bob@example.test"}, pipelining=pipelining)
        outcomes = await self.deliver([peer.host], [ALICE, BOB, CAROL])
        self.assertResults(outcomes, DELIVERED, BOUNCED, DELIVERED)
        self.assertEqual(outcomes[1].status, "5.1.1")
        self.assertTrue(outcomes[1].reply.startswith("550 5.1.1"))
        self.assertEqual(peer.transactions, 1)
        [message] = await peer.wait_for_messages(1)
        self.assertEqual(message.rcpt_tos, ("alice@example.test", "carol@example.test"))

    async def test_several_recipients_one_rejected_pipelining(self) -> None:
        await self._one_transaction_one_rejected(pipelining=True)

    async def test_several_recipients_one_rejected_one_at_a_time(self) -> None:
        await self._one_transaction_one_rejected(pipelining=False)

    async def test_every_recipient_rejected_sends_no_data(self) -> None:
        for pipelining in (True, False):
            peer = self.peer(reject={"alice@example.test", "bob@example.test"},
                             pipelining=pipelining)
            outcomes = await self.deliver([peer.host], [ALICE, BOB])
            self.assertResults(outcomes, BOUNCED, BOUNCED)
            self.assertEqual(peer.transactions, 0)

    async def test_451_after_data_defers(self) -> None:
        peer = self.peer(tempfail_first=1)
        [outcome] = await self.deliver([peer.host])
        self.assertEqual((outcome.result, outcome.status), (DEFERRED, "4.3.0"))
        self.assertTrue(outcome.reply.startswith("451 "))
        [outcome] = await self.deliver([peer.host])
        self.assertEqual(outcome.result, DELIVERED)


class HostChoiceTests(DeliveryTestCase):
    async def test_refused_host_then_next(self) -> None:
        peer = self.peer()
        down = Host("down.test", "127.0.0.1", free_port())
        [outcome] = await self.deliver([down, peer.host])
        self.assertEqual(outcome.result, DELIVERED)
        self.assertEqual(outcome.remote, "mx.test[127.0.0.1]")

    async def test_hosts_that_refuse_connections_are_reported_unreachable(self) -> None:
        peer = self.peer()
        down = Host("down.test", "127.0.0.1", free_port())
        result = await self.hop([down, peer.host])
        reported = [failure.host for failure in result.unreachable]
        self.assertEqual(reported, [down])  # the host that answered is not
        self.assertEqual(result.unreachable[0].reason, f"connection refused by {down}")

    async def test_all_hosts_down_defers_with_last_error(self) -> None:
        first = Host("a.test", "127.0.0.1", free_port())
        second = Host("b.test", "127.0.0.1", free_port())
        outcomes = await self.deliver([first, second], [ALICE, BOB])
        self.assertResults(outcomes, DEFERRED, DEFERRED)
        self.assertEqual(outcomes[0].reply, f"connection refused by {second}")
        self.assertEqual(outcomes[0].status, "4.4.1")

    async def test_greeting_hang_times_out_and_tries_next(self) -> None:
        hung = self.peer(hang_at="greeting")
        good = self.peer(name="mx2.test")
        outcomes = await self.deliver(
            [hung.host, good.host], timeouts=attr_evolve(FAST, greeting=0.3)
        )
        self.assertResults(outcomes, DELIVERED)
        self.assertEqual(hung.connections, 1)

    async def test_hang_after_data_defers(self) -> None:
        peer = self.peer(hang_at="data_end")
        [outcome] = await self.deliver([peer.host], timeouts=attr_evolve(FAST, data_end=0.3))
        self.assertEqual(outcome.result, DEFERRED)
        self.assertIn("timeout", outcome.reply)

    async def test_hang_at_rcpt_defers(self) -> None:
        peer = self.peer(hang_at="RCPT")
        [outcome] = await self.deliver([peer.host], timeouts=attr_evolve(FAST, rcpt=0.3))
        self.assertEqual(outcome.result, DEFERRED)
        self.assertIn("RCPT", outcome.reply)

    async def test_server_closes_mid_data_defers(self) -> None:
        peer = self.peer(drop_in_data=True)
        body = b"x" * 998 + b"\r\n"
        outcomes = await self.deliver([peer.host], [ALICE, BOB], body=body * 4096)
        self.assertResults(outcomes, DEFERRED, DEFERRED)
        self.assertEqual(peer.messages, [])


def attr_evolve(timeouts: Timeouts, **changes: float) -> Timeouts:
    import attrs

    return attrs.evolve(timeouts, **changes)


@implementer(IReactorTCP, IReactorTime)
class LaterReactor:
    """The real reactor, with a clock that can be moved forward (no waiting in tests)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def seconds(self) -> float:
        return float(reactor.seconds()) + self.ahead

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


def no_maildir(root: Path) -> LocalAgent:
    raise AssertionError("these routes are all SMTP")


class SuspensionTests(DeliveryTestCase):
    """Postfix's dead destinations: a next hop that took no connection is not hammered. The
    courier and the failed-host memory decide; the real agent connects (or not)."""

    def setUp(self) -> None:
        self.reactor = LaterReactor()
        self.tried: list[Host] = []  # the hosts attempts found unreachable
        self.hosts = HostCache(self.reactor, first_retry=60)
        self.delivery = SMTPDelivery(self.reactor, "client.test", timeouts=FAST, reuse=None)

    async def through_courier(
        self, hosts: Sequence[Host], recipients: Sequence[Recipient] = (ALICE,)
    ) -> list[Outcome]:
        """One attempt of a message whose recipients all route to ``hosts``; its unreachable
        hosts recorded as the scheduler records them."""
        started = self.reactor.seconds()
        route = Route(SMTP, hosts=tuple(hosts))
        courier = Courier(lambda domain, *, mta_sts=True: succeed(route), self.delivery,
                          no_maildir, self.hosts)
        envelope = Envelope("sender@example.test", tuple(recipients))
        entry = QueueEntry.new(QueueId.new(started), envelope, len(BODY))
        result = await courier.attempt(entry, lambda: io.BytesIO(BODY))
        for failure in result.unreachable:
            self.tried.append(failure.host)
            self.hosts.failed(failure, since=started)
        return list(result.outcomes)

    async def test_a_route_no_host_took_is_deferred_without_connecting(self) -> None:
        down = [Host("a.test", "127.0.0.1", free_port()), Host("b.test", "127.0.0.1", free_port())]
        first = await self.through_courier(down, [ALICE])
        self.assertEqual(self.tried, down)
        self.assertEqual(first[0].reply, f"connection refused by {down[1]}")
        second = await self.through_courier(down, [ALICE, BOB])
        self.assertEqual(self.tried, down)  # not one more connection
        self.assertResults(second, DEFERRED, DEFERRED)
        self.assertEqual(second[0].reply,
                         f"delivery temporarily suspended: connection refused by {down[1]}")
        self.assertEqual((second[0].status, second[0].remote), ("4.4.1", first[0].remote))
        self.reactor.ahead = 61  # the suspension is over: one more real try
        await self.through_courier(down, [ALICE])
        self.assertEqual(self.tried, down + down)

    async def test_the_suspension_lasts_only_the_first_retry_interval(self) -> None:
        self.hosts = HostCache(self.reactor, first_retry=1)  # [queue] retry = [1, 1, 2]
        down = Host("a.test", "127.0.0.1", free_port())
        await self.through_courier([down])
        [outcome] = await self.through_courier([down])
        self.assertTrue(outcome.reply.startswith("delivery temporarily suspended: "))
        self.reactor.ahead = 1  # the message's second attempt really tries the host
        await self.through_courier([down])
        self.assertEqual(self.tried, [down, down])

    async def test_the_same_hosts_in_another_order_stay_suspended(self) -> None:
        # Routing lists recently failed hosts last, so the next route may be reordered.
        down = [Host("a.test", "127.0.0.1", free_port()), Host("b.test", "127.0.0.1", free_port())]
        await self.through_courier(down)
        [outcome] = await self.through_courier(down[::-1])
        self.assertTrue(outcome.reply.startswith("delivery temporarily suspended: "))
        self.assertEqual(self.tried, down)

    async def test_flush_forgets_suspensions(self) -> None:
        down = Host("a.test", "127.0.0.1", free_port())
        await self.through_courier([down])
        self.hosts.forget_all()
        await self.through_courier([down])
        self.assertEqual(self.tried, [down, down])

    async def test_a_route_with_one_live_host_is_never_suspended(self) -> None:
        peer = self.peer()
        down = Host("down.test", "127.0.0.1", free_port())
        for _ in range(2):
            [outcome] = await self.through_courier([down, peer.host])
            self.assertEqual(outcome.result, DELIVERED)
        self.assertEqual(self.tried, [down, down])

    async def test_other_routes_are_not_suspended(self) -> None:
        peer = self.peer()
        down = Host("down.test", "127.0.0.1", free_port())
        await self.through_courier([down])
        [outcome] = await self.through_courier([peer.host])
        self.assertEqual(outcome.result, DELIVERED)


class TLSTests(DeliveryTestCase):
    async def test_opportunistic_uses_starttls_when_offered(self) -> None:
        peer = self.peer(starttls=True)
        [outcome] = await self.deliver([peer.host])
        self.assertEqual(outcome.result, DELIVERED)
        [message] = await peer.wait_for_messages(1)
        self.assertTrue(message.tls)

    async def test_opportunistic_plaintext_when_not_offered(self) -> None:
        peer = self.peer()
        [outcome] = await self.deliver([peer.host])
        self.assertEqual(outcome.result, DELIVERED)
        self.assertFalse(peer.messages[0].tls)

    async def test_required_without_starttls_defers(self) -> None:
        peer = self.peer()
        [outcome] = await self.deliver([peer.host], tls="required")
        self.assertEqual((outcome.result, outcome.status), (DEFERRED, "4.7.4"))
        self.assertEqual(peer.transactions, 0)

    async def test_required_with_self_signed_certificate_delivers(self) -> None:
        peer = self.peer(starttls=True)
        [outcome] = await self.deliver([peer.host], tls="required")
        self.assertEqual(outcome.result, DELIVERED)

    async def test_verify_right_name_delivers_wrong_name_defers(self) -> None:
        ca = issue(("Test CA",), is_ca=True)
        peer = self.peer(starttls=True, certificate=issue(("mx.test",), ca=ca))
        root = Certificate.loadPEM(ca.cert_pem)
        [outcome] = await self.deliver([peer.host], tls="verify", trust_root=root)
        self.assertEqual(outcome.result, DELIVERED)
        wrong = Host("other.test", peer.host.address, peer.host.port)
        [outcome] = await self.deliver([wrong], tls="verify", trust_root=root)
        self.assertEqual((outcome.result, outcome.status), (DEFERRED, "4.7.5"))
        self.assertEqual(len(peer.messages), 1)

    async def test_verify_untrusted_certificate_defers(self) -> None:
        ca = issue(("Test CA",), is_ca=True)
        peer = self.peer(starttls=True)  # self-signed for mx.test
        root = Certificate.loadPEM(ca.cert_pem)
        [outcome] = await self.deliver([peer.host], tls="verify", trust_root=root)
        self.assertEqual((outcome.result, outcome.status), (DEFERRED, "4.7.5"))
        self.assertEqual(peer.transactions, 0)

    async def test_implicit_tls(self) -> None:
        ca = issue(("Test CA",), is_ca=True)
        peer = self.peer(implicit_tls=True, certificate=issue(("mx.test",), ca=ca))
        root = Certificate.loadPEM(ca.cert_pem)
        [outcome] = await self.deliver(
            [peer.host], implicit_tls=True, tls="verify", trust_root=root
        )
        self.assertEqual(outcome.result, DELIVERED)
        self.assertTrue(peer.messages[0].tls)

    async def test_implicit_tls_against_plaintext_server_defers(self) -> None:
        peer = self.peer()
        [outcome] = await self.deliver([peer.host], implicit_tls=True)
        self.assertEqual(outcome.result, DEFERRED)
        self.assertEqual(peer.transactions, 0)


class AuthTests(DeliveryTestCase):
    PASSWORD = "pa55-w0rd-do-not-show"

    async def test_auth_plain_over_starttls(self) -> None:
        peer = self.peer(starttls=True, users={"office": self.PASSWORD})
        [outcome] = await self.deliver(
            [peer.host], credentials=Credentials("office", self.PASSWORD)
        )
        self.assertEqual(outcome.result, DELIVERED)
        self.assertEqual(peer.messages[0].user, "office")

    async def test_auth_login_fallback(self) -> None:
        peer = self.peer(starttls=True, users={"office": self.PASSWORD},
                         auth_mechanisms=("LOGIN",))
        [outcome] = await self.deliver(
            [peer.host], credentials=Credentials("office", self.PASSWORD)
        )
        self.assertEqual(outcome.result, DELIVERED)
        self.assertEqual(peer.messages[0].user, "office")

    async def test_wrong_password_defers_and_never_shows_it(self) -> None:
        peer = self.peer(starttls=True, users={"office": "the-right-one"})
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)  # any callable of one event is one
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        outcomes = await self.deliver(
            [peer.host], [ALICE, BOB], credentials=Credentials("office", self.PASSWORD)
        )
        self.assertNotIn(self.PASSWORD, repr(events))
        self.assertTrue(any("(credentials)" in repr(e) for e in events))
        self.assertResults(outcomes, DEFERRED, DEFERRED)
        self.assertEqual(outcomes[0].status, "4.7.8")
        self.assertIn("535", outcomes[0].reply)
        for outcome in outcomes:
            self.assertNotIn(self.PASSWORD, repr(outcome))
        self.assertEqual(peer.transactions, 0)

    async def test_credentials_never_sent_in_clear(self) -> None:
        # The server offers AUTH without TLS; opportunistic + credentials must still refuse.
        server = await self.scripted(Scripted)
        [outcome] = await self.deliver(
            [server.host], credentials=Credentials("office", self.PASSWORD)
        )
        self.assertEqual((outcome.result, outcome.status), (DEFERRED, "4.7.4"))
        await server.closed()
        self.assertFalse([line for line in server.lines if line.upper().startswith(b"AUTH")])
        self.assertNotIn(self.PASSWORD.encode(), b"".join(server.lines))



class EnvelopeParameterTests(DeliveryTestCase):
    async def test_smtputf8_needed_but_not_offered_bounces(self) -> None:
        peer = self.peer(smtputf8=False)
        envelope = Envelope("sender@example.test", (Recipient("jörg@example.test"),),
                            smtputf8=True)
        outcomes = await self.deliver([peer.host], envelope.recipients, envelope=envelope)
        self.assertResults(outcomes, BOUNCED)
        self.assertEqual(outcomes[0].status, "5.6.7")
        self.assertEqual(peer.transactions, 0)

    async def test_smtputf8_offered_is_used(self) -> None:
        peer = self.peer()
        rcpt = Recipient("jörg@example.test")
        envelope = Envelope("sender@example.test", (rcpt,), smtputf8=True)
        outcomes = await self.deliver([peer.host], [rcpt], envelope=envelope)
        self.assertResults(outcomes, DELIVERED)
        self.assertIn("SMTPUTF8", peer.messages[0].mail_options)
        self.assertEqual(peer.messages[0].rcpt_tos, ("jörg@example.test",))

    def dsn_envelope(self) -> Envelope:
        recipients = (
            Recipient("alice@example.test", notify=("SUCCESS", "FAILURE"),
                      orcpt="rfc822;a+b=c@example.test"),
            Recipient("bob@example.test", notify=("NEVER",)),
        )
        return Envelope("sender@example.test", recipients, ret="HDRS", envid="Q1 +x=y",
                        body="8BITMIME")

    async def test_dsn_parameters_passed_when_offered(self) -> None:
        peer = self.peer(dsn=True)
        envelope = self.dsn_envelope()
        outcomes = await self.deliver([peer.host], envelope.recipients, envelope=envelope)
        self.assertResults(outcomes, DELIVERED, DELIVERED)
        [message] = await peer.wait_for_messages(1)
        self.assertIn("RET=HDRS", message.mail_options)
        self.assertIn("ENVID=Q1+20+2Bx+3Dy", message.mail_options)
        self.assertIn("BODY=8BITMIME", message.mail_options)
        self.assertEqual(
            message.rcpt_options,
            (("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a+2Bb+3Dc@example.test"),
             ("NOTIFY=NEVER",)),
        )

    async def test_dsn_parameters_omitted_when_not_offered(self) -> None:
        peer = self.peer(dsn=False)  # would answer 555 to any of them
        envelope = self.dsn_envelope()
        outcomes = await self.deliver([peer.host], envelope.recipients, envelope=envelope)
        self.assertResults(outcomes, DELIVERED, DELIVERED)
        [message] = await peer.wait_for_messages(1)
        self.assertFalse([o for o in message.mail_options if o.startswith(("RET", "ENVID"))])
        self.assertEqual(message.rcpt_options, ((), ()))


class BodyTests(DeliveryTestCase):
    async def test_20_mib_body_arrives_byte_identical(self) -> None:
        lines = []
        for i in range(20 * 1024 * 1024 // 64):
            lead = b"." if i % 97 == 0 else b""  # dot-leading lines all through the body
            lines.append(lead + (b"%08d " % i) + b"y" * (62 - len(lead) - 9) + b"\r\n")
        body = b"".join(lines)
        self.assertEqual(len(body), 20 * 1024 * 1024)
        path = Path(tempfile.mkdtemp()) / "body"
        path.write_bytes(body)
        self.addCleanup(path.unlink)
        peer = self.peer()
        [outcome] = await self.deliver([peer.host], body=lambda: path.open("rb"), size=len(body))
        self.assertEqual(outcome.result, DELIVERED)
        [message] = await peer.wait_for_messages(1)
        self.assertEqual(len(message.data), len(body))
        self.assertTrue(message.data == body)

    async def test_dot_lines_on_chunk_boundaries(self) -> None:
        for boundary in (16 * 1024, CHUNK, 2 * CHUNK):
            head = b"Subject: dots\r\n\r\n"
            filler = head + b"a" * 70 + b"\r\n"
            while len(filler) < boundary - 72:
                filler += b"b" * 70 + b"\r\n"
            filler += b"c" * (boundary - len(filler) - 2) + b"\r\n"
            self.assertEqual(len(filler), boundary)
            body = filler + b".\r\n" + b"after the dot line\r\n..two\r\n.\r\nend\r\n"
            peer = self.peer()
            [outcome] = await self.deliver([peer.host], body=body)
            self.assertEqual(outcome.result, DELIVERED, boundary)
            self.assertEqual(peer.transactions, 1)
            self.assertTrue(peer.messages[0].data == body, boundary)

    async def test_large_body_over_starttls(self) -> None:
        body = b"".join(b".%07d over tls\r\n" % i for i in range(300_000))  # ~5 MiB
        peer = self.peer(starttls=True)
        [outcome] = await self.deliver([peer.host], body=body)
        self.assertEqual(outcome.result, DELIVERED)
        self.assertTrue(peer.messages[0].tls)
        self.assertTrue(peer.messages[0].data == body)

    async def test_body_without_final_line_break_is_completed(self) -> None:
        peer = self.peer()
        [outcome] = await self.deliver([peer.host], body=b"Subject: x\r\n\r\nno newline")
        self.assertEqual(outcome.result, DELIVERED)
        self.assertEqual(peer.messages[0].data, b"Subject: x\r\n\r\nno newline\r\n")


class DotStufferTests(SynchronousTestCase):
    @given(
        st.lists(st.sampled_from([b".", b"\r\n", b"a", b"..", b"\r\n.\r\n"]), max_size=40),
        st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=10),
    )
    def test_any_chunking_stuffs_like_the_whole(self, parts: list[bytes],
                                                 sizes: list[int]) -> None:
        body = b"".join(parts) + b"\r\n"
        whole = DotStuffer()
        expected = whole.feed(body) + whole.end()
        stuffer, out, pos, i = DotStuffer(), b"", 0, 0
        while pos < len(body):
            size = sizes[i % len(sizes)]
            out += stuffer.feed(body[pos : pos + size])
            pos, i = pos + size, i + 1
        self.assertEqual(out + stuffer.end(), expected)
        # And the receiver's view: no line is a lone dot before the terminator.
        lines = (out + stuffer.end()).split(b"\r\n")
        self.assertEqual(lines[-2:], [b".", b""])
        self.assertNotIn(b".", lines[:-2])

    def test_xtext(self) -> None:
        self.assertEqual(xtext("a+b=c d\u00e9"), "a+2Bb+3Dc+20d+C3+A9")


# -- raw servers for what a well-behaved aiosmtpd cannot do -------------------------------
TLS_PAIR = issue(("evil.test", "127.0.0.1"))


class Scripted(LineOnlyReceiver):
    """A minimal SMTP server: answers from ``reply()``, records every line it receives."""

    server: ScriptedServer  # the factory that built it, with its full type
    delimiter = b"\r\n"
    in_data = False

    @property
    def wire(self) -> ITCPTransport:
        """The connection (a TCP transport, able to start TLS) while connected."""
        return ITCPTransport(self.transport)

    def connectionMade(self) -> None:
        self.server.connected(self)
        self.wire.write(b"220 scripted ESMTP\r\n")

    def lineReceived(self, line: bytes) -> None:
        self.server.lines.append(line)
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.wire.write(b"250 2.0.0 queued\r\n")
            return
        verb = line.split(b" ", 1)[0].upper()
        reply = self.reply(verb)
        self.wire.write(reply)
        if verb == b"DATA" and reply.startswith(b"354"):
            self.in_data = True
        elif verb == b"QUIT":
            self.wire.loseConnection()

    def reply(self, verb: bytes) -> bytes:
        if verb == b"EHLO":
            return b"250-scripted\r\n250-AUTH PLAIN LOGIN\r\n250 PIPELINING\r\n"
        return {b"DATA": b"354 go\r\n", b"QUIT": b"221 bye\r\n"}.get(verb, b"250 ok\r\n")

    def connectionLost(self, reason: Any = None) -> None:
        self.server.disconnected(self)


class ScriptedServer(ServerFactory):
    def __init__(self, protocol: type[Scripted]) -> None:
        self._protocol = protocol
        self.lines: list[bytes] = []
        self._open: dict[Scripted, Deferred[None]] = {}
        self._all: list[Deferred[None]] = []

    def buildProtocol(self, addr: IAddress | None) -> Scripted:
        protocol = self._protocol()
        protocol.factory = protocol.server = self
        return protocol

    async def listen(self) -> None:
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        self.host = Host("evil.test", "127.0.0.1", address.port)

    def connected(self, proto: Scripted) -> None:
        d: Deferred[None] = Deferred()
        self._open[proto] = d
        self._all.append(d)

    def disconnected(self, proto: Scripted) -> None:
        self._open.pop(proto).callback(None)

    def closed(self) -> Deferred[Any]:
        """Fires once every server-side connection is gone (no dirty reactor)."""
        return DeferredList(list(self._all))

    async def stop(self) -> None:
        for proto in list(self._open):
            proto.wire.abortConnection()
        await self.closed()
        stopped = self.port.stopListening()
        if stopped is not None:
            await stopped


class StartTLSInjection(Scripted):
    """Answers STARTTLS with ``220`` plus a forged reply in the same packet (CVE-2011-0411)."""

    tls = False

    def reply(self, verb: bytes) -> bytes:
        if verb == b"EHLO" and not self.tls:
            return b"250-evil\r\n250 STARTTLS\r\n"
        if verb == b"EHLO":
            return b"250-evil-after-tls\r\n250 SIZE 100000\r\n"
        if verb == b"STARTTLS":
            return b"220 go\r\n250 injected\r\n"
        return super().reply(verb)

    def lineReceived(self, line: bytes) -> None:
        super().lineReceived(line)
        if line.upper() == b"STARTTLS":
            self.tls = True
            pem = TLS_PAIR.cert_pem + TLS_PAIR.key_pem
            ITLSTransport(self.transport).startTLS(PrivateCertificate.loadPEM(pem).options())


class MailFromRejected(Scripted):
    code = b"550 5.7.1 sender refused"

    def reply(self, verb: bytes) -> bytes:
        if verb == b"MAIL":
            return self.code + b"\r\n"
        if verb in (b"RCPT", b"DATA"):
            return b"503 5.5.1 need MAIL first\r\n"  # the pipelined commands that follow
        return super().reply(verb)


class MailFromTempFailed(MailFromRejected):
    code = b"452 4.3.1 insufficient system storage"


class NoEHLO(Scripted):
    def reply(self, verb: bytes) -> bytes:
        if verb == b"EHLO":
            return b"502 5.5.1 what is EHLO\r\n"
        if verb == b"HELO":
            return b"250 old server\r\n"
        return super().reply(verb)


class TransactionTests(DeliveryTestCase):
    async def test_5xx_to_mail_bounces_everyone(self) -> None:
        server = await self.scripted(MailFromRejected)
        outcomes = await self.deliver([server.host], [ALICE, BOB])
        await server.closed()
        self.assertResults(outcomes, BOUNCED, BOUNCED)
        self.assertEqual(outcomes[0].reply, "550 5.7.1 sender refused")
        self.assertEqual(outcomes[0].status, "5.7.1")
        self.assertEqual(server.lines[-1], b"QUIT")  # pipelined replies drained, then QUIT

    async def test_4xx_to_mail_defers_everyone(self) -> None:
        server = await self.scripted(MailFromTempFailed)
        outcomes = await self.deliver([server.host], [ALICE, BOB])
        await server.closed()
        self.assertResults(outcomes, DEFERRED, DEFERRED)
        self.assertEqual(outcomes[0].status, "4.3.1")

    async def test_helo_when_ehlo_refused(self) -> None:
        server = await self.scripted(NoEHLO)
        outcomes = await self.deliver([server.host])
        await server.closed()
        self.assertResults(outcomes, DELIVERED)
        mail = [line for line in server.lines if line.startswith(b"MAIL")]
        self.assertEqual(mail, [b"MAIL FROM:<sender@example.test>"])  # no extensions used

    async def test_ipv6_loopback(self) -> None:
        try:
            peer = self.peer(address="::1")
        except OSError as e:
            raise SkipTest(f"no IPv6 loopback: {e}") from None
        outcomes = await self.deliver([peer.host])
        self.assertResults(outcomes, DELIVERED)
        self.assertEqual(outcomes[0].remote, "mx.test[::1]")


class InjectionUnitTests(SynchronousTestCase):
    def test_bytes_after_220_to_starttls_are_never_replies(self) -> None:
        clock = Clock()
        conn = ClientConnection(clock, "evil.test[127.0.0.1]:25")
        conn.makeConnection(StringTransport())
        conn.dataReceived(b"220 hello\r\n")
        self.successResultOf(conn.read_reply(5, "greeting"))
        conn.send("STARTTLS")
        conn.dataReceived(b"220 go\r\n250 injected\r\n")
        conn.dataReceived(b"250 more injected\r\n")  # before our handshake began
        self.assertEqual(self.successResultOf(conn.read_reply(5, "STARTTLS")).code, 220)
        waiting = conn.read_reply(5, "EHLO")
        self.assertNoResult(waiting)
        clock.advance(5)
        self.failureResultOf(waiting)


class SecurityTests(DeliveryTestCase):
    async def test_starttls_injection_is_discarded(self) -> None:
        server = await self.scripted(StartTLSInjection)
        [outcome] = await self.deliver([server.host])
        await server.closed()
        self.assertEqual(outcome.result, DELIVERED, outcome)
        self.assertEqual(outcome.reply, "250 2.0.0 queued")
        after_tls = server.lines[server.lines.index(b"STARTTLS") + 1 :]
        self.assertTrue(after_tls[0].startswith(b"EHLO "), server.lines)
        # With SIZE learnt from the post-TLS EHLO, MAIL carries it: the forged reply was not
        # taken as the EHLO answer.
        self.assertTrue(after_tls[1].startswith(b"MAIL FROM:<sender@example.test> SIZE="))
