"""One SMTP connection the probe drives by hand, the way an admin does with telnet.

Every wait is bounded; a server that says nothing, drops the connection or answers something
that is not an SMTP reply raises :class:`ProbeError` with what happened, so the check in
progress can report it. TLS is negotiated without checking the certificate (the probe
reports on the certificate instead of refusing it): :func:`tls_facts` then says what was
negotiated and :mod:`smarthost.app.probecheck` judges it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import attrs
from cryptography import x509
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

MAX_LINE = 4096  # RFC 5321 4.5.3.1.5 allows 512 octets; anything far past it is not SMTP
MAX_LINES = 100  # lines in one multi-line reply
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)(.*)", re.S)


class ProbeError(Exception):
    """The dialog cannot go on: timeout, connection closed, garbage, TLS failure."""


@attrs.frozen
class Reply:
    code: int
    lines: tuple[str, ...]

    def __str__(self) -> str:
        text = " / ".join(self.lines)
        return f"{self.code} {text}".rstrip()

    @property
    def first(self) -> str:
        return f"{self.code} {self.lines[0]}".rstrip() if self.lines else str(self.code)


def shown(data: bytes | str, limit: int = 200) -> str:
    """Bytes from the server as one printable line (controls and non-ASCII escaped)."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    out = "".join(c if 32 <= ord(c) < 127 else f"\\x{ord(c):02x}" for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


@implementer(IOpenSSLClientConnectionCreator)
class _AnyCertificate:
    """TLS 1.2 or newer, the server's certificate accepted whatever it is (it is judged
    afterwards), SNI set to the host name the probe was given."""

    def __init__(self, server_name: str) -> None:
        self._name = server_name

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        connection = SSL.Connection(context, None)
        try:
            ipaddress.ip_address(self._name)
        except ValueError:
            connection.set_tlsext_host_name(self._name.encode("idna"))
        connection.set_connect_state()
        return connection


@attrs.frozen
class TLSFacts:
    version: str  # "TLSv1.3"
    cipher: str
    chain: tuple[x509.Certificate, ...]  # as the server sent it, leaf first


@implementer(IHandshakeListener)
class SMTPDialog(Protocol):
    """Reads replies; sends commands; switches to TLS."""

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._buffer = b""
        self._lines: list[tuple[int, str]] = []
        self._replies: list[Reply | ProbeError] = []
        self._waiting: Deferred[Any] | None = None
        self._deadline: IDelayedCall | None = None
        self._handshake: Deferred[None] | None = None
        self._handshaken = False
        self._closed: ProbeError | None = None
        self.connected_to = ""

    # -- the wire ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.connected_to = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self._line(line.rstrip(b"\r"))
        if len(self._buffer) > MAX_LINE:
            self._garbage(self._buffer)

    def _line(self, line: bytes) -> None:
        if self._replies and isinstance(self._replies[-1], ProbeError):
            return  # already broken: ignore the rest
        match = _REPLY_LINE.match(line)
        if match is None or len(line) > MAX_LINE or len(self._lines) >= MAX_LINES:
            self._garbage(line)
            return
        code, more, text = int(match.group(1)), match.group(2) == b"-", match.group(3)
        if self._lines and self._lines[0][0] != code:
            self._garbage(line)
            return
        self._lines.append((code, shown(text)))
        if not more:
            lines, self._lines = self._lines, []
            self._deliver(Reply(code, tuple(text for _, text in lines)))

    def _garbage(self, line: bytes) -> None:
        self._buffer, self._lines = b"", []
        self._deliver(ProbeError(f'not an SMTP reply: "{shown(line, 80)}"'))
        if self.transport is not None:
            self.transport.loseConnection()

    def _deliver(self, item: Reply | ProbeError) -> None:
        self._replies.append(item)
        self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if waiting is not None:
            waiting.callback(None)

    def connectionLost(self, reason: Failure = Protocol.connectionLost.__defaults__[0]) -> None:  # type: ignore[index]
        detail = reason.getErrorMessage() if reason is not None else "closed"
        if "closed cleanly" in detail or "Connection was closed" in detail:
            detail = "closed"
        self._closed = ProbeError(f"the server closed the connection ({shown(detail, 120)})")
        self._wake()
        if self._handshake is not None and not self._handshake.called:
            handshake, self._handshake = self._handshake, None
            handshake.errback(ProbeError(f"TLS handshake failed: {shown(detail, 160)}"))

    def handshakeCompleted(self) -> None:
        self._handshaken = True
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.callback(None)

    # -- the dialog ----------------------------------------------------------------------

    async def reply(self, what: str) -> Reply:
        """The next reply; ``what`` names it for the timeout message."""
        while not self._replies:
            if self._closed is not None:
                raise self._closed
            self._waiting = Deferred()
            self._deadline = self._clock.callLater(self._timeout, self._expire, what)
            await self._waiting
        item = self._replies.pop(0)
        if isinstance(item, ProbeError):
            raise item
        return item

    def _expire(self, what: str) -> None:
        self._deadline = None
        self._deliver(ProbeError(f"no reply {what} within {self._timeout:g} s"))

    async def command(self, line: str) -> Reply:
        if self._closed is not None:
            raise self._closed
        self.transport.write(line.encode("utf-8") + b"\r\n")  # type: ignore[union-attr]
        verb = line.split(" ", 1)[0].upper()
        return await self.reply(f"to {verb}")

    async def starttls(self, server_name: str) -> None:
        """Start TLS on this connection (after a 220 to STARTTLS)."""
        self._handshake = Deferred()
        deadline = self._clock.callLater(self._timeout, self._handshake_expired)
        self.transport.startTLS(_AnyCertificate(server_name))  # type: ignore[union-attr]
        try:
            await self.handshake_done()
        finally:
            if deadline.active():
                deadline.cancel()

    async def handshake_done(self) -> None:
        """Wait for the TLS handshake (implicit TLS: started by the connection itself)."""
        if self._handshaken:
            return
        if self._closed is not None:
            raise ProbeError(f"TLS handshake failed: {self._closed}")
        if self._handshake is None:
            self._handshake = Deferred()
            deadline: IDelayedCall | None = self._clock.callLater(
                self._timeout, self._handshake_expired)
        else:
            deadline = None
        try:
            await self._handshake
        finally:
            if deadline is not None and deadline.active():
                deadline.cancel()

    def _handshake_expired(self) -> None:
        if self._handshake is not None and not self._handshake.called:
            handshake, self._handshake = self._handshake, None
            handshake.errback(ProbeError(f"no TLS handshake within {self._timeout:g} s"))

    def tls_facts(self) -> TLSFacts:
        connection: SSL.Connection = self.transport.getHandle()  # type: ignore[union-attr]
        chain = connection.get_peer_cert_chain() or []
        return TLSFacts(
            version=connection.get_protocol_version_name(),
            cipher=connection.get_cipher_name() or "?",
            chain=tuple(c.to_cryptography() for c in chain),
        )

    def close(self) -> None:
        if self.transport is not None and self._closed is None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


async def connect(
    reactor: Any, address: str, port: int, *, implicit_tls: bool, server_name: str,
    timeout: float,
) -> SMTPDialog:
    """A TCP (or implicit TLS) connection to ``address``: the dialog, not yet greeted."""
    kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
    endpoint: Any = kind(reactor, address, port, timeout=timeout)
    if implicit_tls:
        endpoint = wrapClientTLS(_AnyCertificate(server_name), endpoint)
    dialog = SMTPDialog(reactor, timeout)
    try:
        await endpoint.connect(Factory.forProtocol(lambda: dialog))
    except Exception as e:
        raise ProbeError(f"cannot connect to {address} port {port}: {e}") from None
    if implicit_tls:
        await dialog.handshake_done()
    return dialog
