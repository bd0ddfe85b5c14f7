"""Listeners: endpoint strings per role, server TLS, and the PROXY protocol.

Every ``[listen]`` value is a Twisted server endpoint string. ``submissions`` listeners get
implicit TLS from our certificate (an explicit ``ssl:`` string is used as written).
``haproxy:`` is handled here rather than by Twisted's own wrapper, because that one starts the
SMTP session (banner, client address) before the PROXY header has arrived, so the session
would see HAProxy's address instead of the client's (Twisted #12501). A ``tcp:``/``ssl:``
string that names no ``backlog`` gets :data:`LISTEN_BACKLOG` rather than Twisted's 50.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from twisted.internet import ssl
from twisted.internet.address import IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IProtocol,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols import policies
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from smarthost.smtpd.tlsprofile import PROFILES, ProfileOptions

HAPROXY_PREFIX = "haproxy:"
PROXY_HEADER_TIMEOUT = 30.0
LISTEN_BACKLOG = 511  # as nginx and Redis; Linux caps it at net.core.somaxconn

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def server_tls_options(
    certificate: Path, key: Path, profile: str = "intermediate"
) -> ssl.CertificateOptions:
    """Server options for every TLS listener from PEM files (leaf first, then the chain),
    offering what the ``[tls] profile`` names (tlsprofile says what each offers)."""
    pem = certificate.read_bytes()
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise ValueError(f"{certificate}: no PEM certificate found")
    leaf = ssl.PrivateCertificate.loadPEM(blocks[0] + b"\n" + key.read_bytes())
    chain = [ssl.Certificate.loadPEM(block).original for block in blocks[1:]]
    options = ProfileOptions(
        PROFILES[profile],
        privateKey=leaf.privateKey.original,
        certificate=leaf.original,
        extraCertChain=chain,
    )
    # Built now, not at the first handshake: a certificate OpenSSL refuses (an RSA key too
    # short for its security level) must stop the start-up, not fail every client.
    options.getContext()
    return options


@implementer(IHandshakeListener)
class _ProxiedConnection(policies.ProtocolWrapper):
    """Reads the PROXY v1/v2 header, then starts the wrapped protocol with the proxied
    addresses already in place. A STARTTLS under it reports the end of the handshake to this
    wrapper, which passes it on (the session's handshake deadline waits for it)."""

    factory: ProxyFactory

    def __init__(self, factory: ProxyFactory, wrapped: IProtocol) -> None:
        super().__init__(factory, wrapped)  # type: ignore[arg-type]
        self._pending = b""
        self._parser: V1Parser | V2Parser | None = None
        self._info: ProxyInfo | None = None
        self._started = False
        self._deadline: IDelayedCall | None = None

    def makeConnection(self, transport: ITransport) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._deadline = self.factory.clock.callLater(
            PROXY_HEADER_TIMEOUT, self.loseConnection
        )

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            self._pending += data
            if self._pending.startswith(V2Parser.PREFIX):
                self._parser = V2Parser()
            elif self._pending.startswith(b"PROXY "):
                self._parser = V1Parser()
            elif V2Parser.PREFIX.startswith(self._pending) or b"PROXY ".startswith(
                self._pending
            ):
                return  # still ambiguous: wait for more bytes
            else:
                self.loseConnection()  # no PROXY header: not HAProxy talking
                return
            data, self._pending = self._pending, b""
        if isinstance(self._parser, V2Parser):
            # V2Parser.feed refuses fewer than 16 bytes; gather them first.
            self._pending += data
            if len(self._pending) < 16:
                return
            data, self._pending = self._pending, b""
        try:
            info, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self.loseConnection()
            return
        if info is None:
            return
        self._info = ProxyInfo(info.header, _rfc5952(info.source), _rfc5952(info.destination))
        self._started = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def handshakeCompleted(self) -> None:
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if self._started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)

    def getPeer(self) -> IAddress:
        if self._info is not None and self._info.source is not None:
            return self._info.source
        assert self.transport is not None
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self._info is not None and self._info.destination is not None:
            return self._info.destination
        assert self.transport is not None
        return self.transport.getHost()


def _rfc5952(addr: IAddress | None) -> IAddress | None:
    """An IPv6 address in its RFC 5952 form. Twisted's PROXY v2 parser writes every group out
    ("2001:db8:0:0:0:0:0:5"), while a direct connection and PROXY v1 give "2001:db8::5": the
    same client must read the same in the log, the Received: field and the status page."""
    if isinstance(addr, IPv6Address):
        return IPv6Address(addr.type, str(ipaddress.ip_address(addr.host)), addr.port)
    return addr


class ProxyFactory(policies.WrappingFactory):
    protocol = _ProxiedConnection

    def __init__(self, wrapped: Factory, clock: IReactorTime) -> None:
        super().__init__(wrapped)
        self.clock = clock


def wrap_factory(
    description: str,
    factory: Factory,
    *,
    implicit_tls: ssl.CertificateOptions | None,
    clock: IReactorTime,
) -> Factory:
    """Wrap the session factory as the listener string asks: TLS inside PROXY."""
    inner = description.removeprefix(HAPROXY_PREFIX)
    wrapped: Factory = factory
    if implicit_tls is not None and not inner.startswith("ssl:"):
        wrapped = TLSMemoryBIOFactory(implicit_tls, False, wrapped)  # type: ignore[assignment]
    if description.startswith(HAPROXY_PREFIX):
        wrapped = ProxyFactory(wrapped, clock)  # type: ignore[assignment]
    return wrapped


def with_backlog(description: str) -> str:
    """A TCP or TLS endpoint string with a listen backlog of LISTEN_BACKLOG unless it names
    one. Twisted's 50 overflows under a burst of connections (each refused one is accepted
    and closed at once, but the kernel drops SYNs while the queue is full), and a client whose
    SYN is dropped waits a second or more before it tries again."""
    kind = description.partition(":")[0]
    if kind not in ("tcp", "tcp6", "ssl") or "backlog=" in description:
        return description
    return f"{description}:backlog={LISTEN_BACKLOG}"


async def start_listener(
    reactor: object,
    description: str,
    factory: Factory,
    *,
    implicit_tls: ssl.CertificateOptions | None,
    clock: IReactorTime,
) -> IListeningPort:
    endpoint = serverFromString(reactor, with_backlog(description.removeprefix(HAPROXY_PREFIX)))
    wrapped = wrap_factory(description, factory, implicit_tls=implicit_tls, clock=clock)
    port: IListeningPort = await endpoint.listen(wrapped)
    return port

