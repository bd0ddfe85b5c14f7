"""Listener strings: the listen backlog every TCP listener gets unless its string names one,
and the PROXY wrapper passing the end of a TLS handshake on to the session."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy._v2parser import V2Parser
from zope.interface import implementer

from smarthost.smtpd.listen import LISTEN_BACKLOG, ProxyFactory, with_backlog


@pytest.mark.parametrize(("description", "expected"), [
    ("tcp:587", f"tcp:587:backlog={LISTEN_BACKLOG}"),
    ("tcp:0:interface=127.0.0.1", f"tcp:0:interface=127.0.0.1:backlog={LISTEN_BACKLOG}"),
    ("tcp6:25:interface=\\:\\:1", f"tcp6:25:interface=\\:\\:1:backlog={LISTEN_BACKLOG}"),
    ("ssl:465:privateKey=k.pem", f"ssl:465:privateKey=k.pem:backlog={LISTEN_BACKLOG}"),
    ("tcp:587:backlog=10", "tcp:587:backlog=10"),  # the operator's choice stands
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ("unix:/run/smarthost.sock", "unix:/run/smarthost.sock"),
])
def test_with_backlog(description: str, expected: str) -> None:
    assert with_backlog(description) == expected


@implementer(IHandshakeListener)
class Listening(Protocol):
    completed = 0

    def handshakeCompleted(self) -> None:
        self.completed += 1


def test_the_proxy_wrapper_passes_the_handshake_on() -> None:
    """Under haproxy:, STARTTLS's TLS layer reports to the wrapper; the session's handshake
    deadline must hear of it."""
    factory = ProxyFactory(Factory.forProtocol(Protocol), Clock())
    inner = Listening()
    wrapper = factory.protocol(factory, inner)
    assert IHandshakeListener.providedBy(wrapper)
    wrapper.handshakeCompleted()
    assert inner.completed == 1
    factory.protocol(factory, Protocol()).handshakeCompleted()  # a plain protocol: ignored


def test_a_proxy_v2_ipv6_client_reads_as_rfc_5952() -> None:
    """Twisted's v2 parser spells IPv6 in full; the session must see the short form a direct
    connection or PROXY v1 gives, or one client has two names in the log."""
    factory = ProxyFactory(Factory.forProtocol(Protocol), Clock())
    wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert wrapper is not None
    wrapper.makeConnection(StringTransport())
    addresses = ipaddress.IPv6Address("2001:db8::5").packed + ipaddress.IPv6Address("::1").packed
    wrapper.dataReceived(
        V2Parser.PREFIX + b"\x21\x21" + struct.pack("!H", 36) + addresses
        + struct.pack("!HH", 40001, 587)
    )
    assert wrapper.getPeer() == IPv6Address("TCP", "2001:db8::5", 40001)
    assert wrapper.getHost() == IPv6Address("TCP", "::1", 587)
