"""``TLS-Required: No`` (RFC 8689 5) through the courier, real routing (the test DNS server on
loopback) and the real SMTP agent: where the domain's enforce policy names none of its MX
hosts, the message without the field is deferred 4.7.5 and the one with it is delivered to
that MX (opportunistic TLS), the field kept."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase

from dnsserver import start
from mxpeer import MXPeer
from smarthost.core.envelope import DEFERRED, DELIVERED, Envelope, QueueEntry, QueueId, Recipient
from smarthost.delivery.courier import Courier, LocalAgent
from smarthost.delivery.dns import make_resolver
from smarthost.delivery.hostcache import HostCache
from smarthost.delivery.mtasts import ENFORCE, Policy
from smarthost.delivery.routing import NextHopResolver
from smarthost.delivery.smtpagent import SMTPDelivery, Timeouts

FAST = Timeouts(connect=5, greeting=5, command=5, mail=5, rcpt=5, data_init=5,
                data_block=10, data_end=20, quit=2)
BOB = Recipient("bob@remote.test")
MESSAGE = b"From: a@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


class EnforceElsewhere:
    """remote.test's policy: enforce, naming a host that is not its MX."""

    def policy(self, domain: str) -> Deferred[Policy | None]:
        return succeed(Policy(ENFORCE, ("mx.elsewhere.test",), 86400))


def no_maildir(root: Path) -> LocalAgent:
    raise AssertionError("no local delivery here")


class TLSRequiredNoTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.mx = MXPeer("127.0.0.1", starttls=True)
        self.mx.start()
        self.addCleanup(self.mx.stop)
        dns = start(reactor, {"remote.test": {"MX": ["10 mx.remote.test"]},
                              "mx.remote.test": {"A": ["127.0.0.1"]}})
        self.addCleanup(dns.stop)
        hosts = HostCache(reactor, first_retry=60)
        routing = NextHopResolver(make_resolver([dns.nameserver], reactor), hosts=hosts,
                                  port=self.mx.port, mta_sts=EnforceElsewhere())  # type: ignore[arg-type]
        delivery = SMTPDelivery(reactor, "client.test", timeouts=FAST, reuse=None)
        self.courier = Courier(routing.resolve, delivery, no_maildir, hosts)

    async def send(self, data: bytes) -> tuple[str, str]:
        envelope = Envelope("a@example.test", (BOB,))
        entry = QueueEntry.new(QueueId.new(reactor.seconds()), envelope, len(data))
        body: Callable[[], BinaryIO] = lambda: io.BytesIO(data)  # noqa: E731
        [outcome] = (await self.courier.attempt(entry, body)).outcomes
        return outcome.result, outcome.status

    async def test_enforce_defers_and_tls_required_no_delivers(self) -> None:
        assert await self.send(MESSAGE) == (DEFERRED, "4.7.5")
        assert self.mx.messages == []
        waived = b"TLS-Required: No\r\n" + MESSAGE
        result, _status = await self.send(waived)
        assert result == DELIVERED
        [message] = await self.mx.wait_for_messages(1)
        assert message.data == waived  # RFC 8689 5: the field stays in the message
        assert message.tls  # still opportunistic TLS where offered
