"""``TLS-Required: No`` (RFC 8689 5): the decision table (header field x REQUIRETLS), the
header reader's edges, and the courier asking routing to leave MTA-STS out."""

from __future__ import annotations

import io
from typing import BinaryIO

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smarthost.core.envelope import DELIVERED, Envelope, Outcome, QueueEntry, QueueId, Recipient
from smarthost.core.tlswaiver import MAX_HEADER_BYTES, header_says_no, says_no
from smarthost.delivery.courier import AttemptResult, Courier
from smarthost.delivery.hostcache import HostCache
from smarthost.delivery.routing import SMTP, Host, Route
from smarthost.delivery.smtpagent import HopResult
from smarthost.delivery.tlsrequired import policies_apply

BODY = b"Subject: hi\r\n\r\nTLS-Required: No\r\n"  # in the body: not a header field


def opener(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


@pytest.mark.parametrize(
    ("header", "requiretls", "apply"),
    [
        (b"", False, True),  # no field: policies apply
        (b"TLS-Required: No\r\n", False, False),  # the sender waives them
        (b"TLS-Required: No\r\n", True, True),  # RFC 8689 4.1: REQUIRETLS wins
        (b"", True, True),
        (b"tls-required:   NO  \r\n", False, False),  # names and ABNF strings: any case
        (b"TLS-Required:\r\n No\r\n", False, False),  # folded
        (b"TLS-Required: Yes\r\n", False, True),  # only "No" means anything
        (b"TLS-Required: No thanks\r\n", False, True),
        (b"X-TLS-Required: No\r\n", False, True),
    ],
)
def test_decision_table(header: bytes, requiretls: bool, apply: bool) -> None:
    envelope = Envelope("a@example.test", (Recipient("b@remote.test"),), requiretls=requiretls)
    assert policies_apply(envelope, lambda: opener(header + BODY)) is apply


def test_requiretls_never_opens_the_body() -> None:
    def unreadable() -> BinaryIO:
        raise AssertionError("opened")

    envelope = Envelope("a@example.test", (Recipient("b@remote.test"),), requiretls=True)
    assert policies_apply(envelope, unreadable)


@pytest.mark.parametrize("waived", [True, False])
def test_a_waiver_read_at_intake_spares_the_body(waived: bool) -> None:
    def unreadable() -> BinaryIO:
        raise AssertionError("opened")

    envelope = Envelope("a@example.test", (Recipient("b@remote.test"),),
                        tls_required_no=waived)
    assert policies_apply(envelope, unreadable) is not waived
    required = Envelope("a@example.test", (Recipient("b@remote.test"),), requiretls=True,
                        tls_required_no=True)
    assert policies_apply(required, unreadable)  # RFC 8689 4.1 still: REQUIRETLS wins


@pytest.mark.parametrize(
    ("header", "waived"),
    [
        (b"Subject: hi\r\n\r\n", False),
        (b"Subject: tls-required: no\r\n\r\n", False),  # the name inside another field
        (b"TLS-REQUIRED: no\r\n\r\n", True),
        (b"Subject: hi\r\nTLS-Required:\r\n\tNo\r\n\r\n", True),
        (b"TLS-Required: No\r\n", True),  # a header section without its empty line
    ],
)
def test_header_says_no(header: bytes, waived: bool) -> None:
    assert header_says_no(header) is waived
    assert says_no(opener(header)) is waived  # the same answer as reading the body


def test_only_the_header_section_is_read() -> None:
    assert not says_no(opener(BODY))
    assert says_no(opener(b"Subject: x\nTLS-Required: No\n\nbody\n"))  # bare LF spools too
    body = opener(b"Subject: x\r\n\r\n" + b"x" * 100_000)
    says_no(body)
    assert body.tell() == len(b"Subject: x\r\n\r\n")
    huge = b"X-Pad: " + b"y" * MAX_HEADER_BYTES + b"\r\nTLS-Required: No\r\n\r\n"
    assert not says_no(opener(huge))  # past the limit: not searched, policies apply


class Resolver:
    def __init__(self) -> None:
        self.asked: list[tuple[str, bool]] = []

    def __call__(self, domain: str, *, mta_sts: bool = True) -> Deferred[Route]:
        self.asked.append((domain, mta_sts))
        return succeed(Route(SMTP, hosts=(Host("mx.remote.test", "192.0.2.1", 25),)))


class Delivered:
    async def deliver(self, route: Route, envelope: Envelope, recipients: object,
                      open_body: object, size: int) -> HopResult:
        assert isinstance(recipients, list)
        return HopResult(tuple(Outcome(r, DELIVERED, "250 ok", "mx", "2.0.0")
                               for r in recipients))


class CourierTests(SynchronousTestCase):
    def attempt(self, data: bytes) -> list[tuple[str, bool]]:
        resolver = Resolver()
        courier = Courier(resolver, Delivered(), lambda root: None,  # type: ignore[arg-type,return-value]
                          HostCache(Clock(), 60))
        envelope = Envelope("a@example.test", (Recipient("b@remote.test"),))
        entry = QueueEntry.new(QueueId.new(0), envelope, len(data))
        result: AttemptResult = self.successResultOf(
            Deferred.fromCoroutine(courier.attempt(entry, lambda: opener(data))))
        assert [o.result for o in result.outcomes] == [DELIVERED]
        return resolver.asked

    def test_tls_required_no_leaves_mta_sts_out(self) -> None:
        assert self.attempt(b"TLS-Required: No\r\n" + BODY) == [("remote.test", False)]

    def test_without_the_field_mta_sts_applies(self) -> None:
        assert self.attempt(BODY) == [("remote.test", True)]
