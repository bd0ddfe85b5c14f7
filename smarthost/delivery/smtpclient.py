"""The client side of one SMTP connection: replies, pipelining, STARTTLS, the DATA stream.

Kept apart from :mod:`smarthost.delivery.smtpagent` (which decides hosts, TLS policy, AUTH and what
each reply means for each recipient) so the wire rules can be read, and tested, on their own:
every wait is bounded and ends in :class:`HostError`, bytes that arrive after ``220`` to
STARTTLS and before the handshake are discarded, and dot-stuffing tracks the start of a line
across chunk boundaries.
"""

from __future__ import annotations

import re
from collections import deque
from typing import TYPE_CHECKING, Any, BinaryIO

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
    ITLSTransport,
    ITransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smarthost.core.enums import Result
from smarthost.core.envelope import BOUNCED, DEFERRED, DELIVERED
from smarthost.core.writethrough import write_through

if TYPE_CHECKING:
    pass


CHUNK = 64 * 1024  # body bytes read and written at a time
_MAX_LINE = 4096  # a reply line longer than this is a broken or hostile server
_MAX_REPLY_LINES = 200
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@attrs.frozen
class ServerReply:
    code: int
    lines: tuple[str, ...]  # the text after "250-" / "250 ", control characters replaced

    @property
    def text(self) -> str:
        """As the operator and the bounce show it: code, then every line's text."""
        return " ".join((str(self.code), *self.lines)).rstrip()

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    def status(self, result: Result) -> str:
        """The RFC 3463 code: the server's own when it gave one, else derived (X.0.0).

        The class follows our result, so a 535 that defers the message reads 4.7.8.
        """
        klass = {DELIVERED: "2", DEFERRED: "4", BOUNCED: "5"}[result]
        found = _ENHANCED.match(self.lines[0]) if self.lines else None
        if found and found.group(1) == str(self.code)[0]:
            return f"{klass}.{found.group(2)}.{found.group(3)}"
        return f"{klass}.0.0"


class QuietFactory(ClientFactory):
    """Hands out one ready-made protocol. Not noisy: Twisted would otherwise log "Starting
    factory"/"Stopping factory" for every delivery, two lines per message in the operator's
    log (and measurable time on the reactor thread)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


CONNECT_FAILED = "4.4.1"  # RFC 3463: no answer from host


class HostError(Exception):
    """This host cannot take the message now; ``str()`` is the reason shown to operators."""

    def __init__(self, reason: str, status: str = "4.4.2") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@implementer(IHandshakeListener, IPushProducer)
class ClientConnection(Protocol):
    """The wire side of one SMTP client connection: commands out, whole replies in.

    At most one thing is awaited at a time (a reply, the TLS handshake, or the transport
    asking for more body bytes); each wait is bounded and fails with :class:`HostError`
    on timeout or connection loss, so no caller can hang.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, peer: str, transcript: bool = False) -> None:
        self._clock = clock
        self.peer = peer
        self._transcript = transcript  # log every line at debug level (credentials hidden)
        self._buffer = b""
        self._partial: list[str] = []
        self._replies: deque[ServerReply] = deque()
        self.unanswered = 1  # the greeting is the reply to connecting
        self._waiter: Deferred[Any] | None = None
        self._waiting_for = ""
        self._kind = ""
        self._aborting = False
        self._lost: Failure | None = None
        self._closed: list[Deferred[None]] = []
        self._starttls_sent = False
        self._discarding = False
        self._handshake_done = False
        self._paused = False
        self.tls = False
        self.in_data = False  # after 354: anything we send now is message text
        # No transaction open: before the first MAIL, or after the reply to the end of data
        # (RFC 5321 4.1.1.4: that reply ends the transaction, whatever its code).
        self.between_transactions = True
        self.reusable = True  # cleared when the peer misbehaved in a way worth not repeating

    # -- the transport, typed -------------------------------------------------------------
    def _transport(self) -> ITransport:
        assert self.transport is not None
        return self.transport

    def abort(self) -> None:
        if self._lost is None and not self._aborting and self.transport is not None:
            self._aborting = True
            tcp = ITCPTransport(self.transport, None)
            if tcp is not None:
                tcp.abortConnection()
            else:  # test transports
                self.transport.loseConnection()

    @property
    def idle(self) -> bool:
        """Open, between transactions and quiet: every reply read, nothing unsolicited
        buffered, nothing awaited. Only such a connection may be kept for another message."""
        return (
            self.reusable
            and self._lost is None
            and not self._aborting
            and not self.in_data
            and not self._discarding
            and not self._starttls_sent
            and self.unanswered == 0
            and not self._replies
            and not self._partial
            and not self._buffer
            and self._waiter is None
        )

    # -- commands out ---------------------------------------------------------------------
    def send(self, *commands: str, secret: bool = False) -> None:
        """Write commands (several at once when pipelining); each expects one reply."""
        for command in commands:
            if "\r" in command or "\n" in command:
                raise ValueError("line break inside an SMTP command")  # never smuggle commands
            if self._transcript:
                self._log.debug(
                    "{peer} C: {line}", peer=self.peer,
                    line="(credentials)" if secret else command,
                )
        self.unanswered += len(commands)
        # One write for a pipelined group, straight to the socket when it can take it.
        write_through(self._transport(), b"".join(c.encode("utf-8") + b"\r\n" for c in commands))
        if commands[-1].upper() == "STARTTLS":
            self._starttls_sent = True

    # -- replies in -----------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        self._buffer += data
        while not self._discarding:
            line, found, rest = self._buffer.partition(b"\n")
            if not found:
                if len(self._buffer) > _MAX_LINE:
                    self._broken("reply line too long")
                return
            self._buffer = rest
            if not self._line(line.rstrip(b"\r")):
                return

    def _line(self, raw: bytes) -> bool:
        text = _CONTROL.sub("?", raw.decode("utf-8", "replace"))
        if len(raw) > _MAX_LINE or len(text) < 3 or not text[:3].isdigit() or (
            len(text) > 3 and text[3] not in " -"
        ):
            self._broken(f"malformed reply line {text[:80]!r}")
            return False
        self._partial.append(text[4:])
        if len(self._partial) > _MAX_REPLY_LINES:
            self._broken("reply too long")
            return False
        if text[3:4] == "-":
            return True
        reply = ServerReply(int(text[:3]), tuple(self._partial))
        self._partial = []
        if self._transcript:
            self._log.debug("{peer} S: {reply}", peer=self.peer, reply=reply.text)
        if self._starttls_sent:
            self._starttls_sent = False
            if reply.code == 220:
                # Anything after "220" and before the handshake is an injection attempt
                # (CVE-2011-0411 pattern, client side): drop it, never read it as a reply.
                self._discarding, self._buffer = True, b""
        self._replies.append(reply)
        self._wake("reply")
        return True

    def _broken(self, why: str) -> None:
        self._fail(HostError(f"protocol error from {self.peer}: {why}"))
        self.abort()

    def read_reply(self, timeout: float, what: str) -> Deferred[ServerReply]:
        if self._replies:
            self.unanswered -= 1
            return succeed(self._replies.popleft())
        d: Deferred[ServerReply] = self._wait(timeout, f"reply to {what}", "reply")
        d.addCallback(lambda _: self._take())
        return d

    def _take(self) -> ServerReply:
        self.unanswered -= 1
        return self._replies.popleft()

    # -- TLS ------------------------------------------------------------------------------
    def start_tls(self, options: IOpenSSLClientConnectionCreator | CertificateOptions) -> None:
        self._discarding, self._buffer, self.tls = False, b"", True
        ITLSTransport(self.transport).startTLS(options)

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        self.tls = True
        self._wake("handshake")

    def handshake(self, timeout: float) -> Deferred[None]:
        if self._handshake_done:
            return succeed(None)
        return self._wait(timeout, "TLS handshake", "handshake")

    # -- body -----------------------------------------------------------------------------
    async def send_body(self, body: BinaryIO, timeout: float) -> None:
        """Stream the message with dot-stuffing, pausing while the transport is full.

        RFC 5321 4.5.3.2.5: each block must be taken within ``timeout``. The last block and
        the terminator go out in one write (one send for a message under :data:`CHUNK`).
        """
        transport = IConsumer(self.transport)
        transport.registerProducer(self, True)
        try:
            stuffer = DotStuffer()
            chunk = body.read(CHUNK)
            while True:
                if self._lost is not None:
                    raise self._lost_error("the transfer of message data")
                following = body.read(CHUNK) if chunk else b""
                data = stuffer.feed(chunk) if chunk else b""
                if not following:
                    write_through(self._transport(), data + stuffer.end())
                    break
                write_through(self._transport(), data)
                if self._paused:
                    await self._wait(timeout, "the peer to take message data", "resume")
                chunk = following
            self.unanswered += 1
            self.in_data = False
        finally:
            if self._lost is None:
                transport.unregisterProducer()

    async def send_chunks(
        self, body: BinaryIO, timeout: float, last_timeout: float, *, pipelining: bool
    ) -> ServerReply:
        """RFC 3030: the message as ``BDAT n`` chunks, the final one ``BDAT n LAST``, with no
        dot-stuffing; the reply that decides the message: the first refusal, else LAST's.

        With PIPELINING every chunk goes out without waiting (RFC 3030 4.2), otherwise each
        waits for its reply and a refusal stops the rest (RFC 3030 2: no more segments after
        a 4xx/5xx). A final line the body left open is completed, as for DATA.
        """
        transport = IConsumer(self.transport)
        transport.registerProducer(self, True)
        self.in_data = True
        due = 0  # replies to chunks sent and not read yet
        try:
            chunk = body.read(CHUNK)
            while True:
                following = body.read(CHUNK) if chunk else b""
                last = not following
                if last:
                    chunk += {b"": b"", b"\n": b"", b"\r": b"\n"}.get(chunk[-1:], b"\r\n")
                if self._lost is not None:
                    raise self._lost_error("the transfer of message data")
                command = f"BDAT {len(chunk)}{' LAST' if last else ''}"
                if self._transcript:
                    self._log.debug("{peer} C: {line}", peer=self.peer, line=command)
                self.unanswered += 1
                due += 1
                write_through(self._transport(), command.encode("ascii") + b"\r\n" + chunk)
                if self._paused:
                    await self._wait(timeout, "the peer to take message data", "resume")
                if last:
                    break
                if not pipelining:
                    due -= 1
                    reply = await self.read_reply(timeout, "BDAT")
                    if not reply.positive:
                        self.in_data = False
                        return reply
                chunk = following
            self.in_data = False
            decision: ServerReply | None = None
            for n in range(due, 0, -1):
                reply = await self.read_reply(last_timeout if n == 1 else timeout, "BDAT")
                if decision is None and (not reply.positive or n == 1):
                    decision = reply
            assert decision is not None
            return decision
        finally:
            if self._lost is None:
                transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._wake("resume")

    def stopProducing(self) -> None:
        pass  # connectionLost follows and fails the waiter

    # -- waiting, bounded -----------------------------------------------------------------
    def _wait(self, timeout: float, what: str, kind: str) -> Deferred[Any]:
        if self._lost is not None:
            return fail(self._lost_error(what))
        d: Deferred[Any] = Deferred()
        self._waiter, self._waiting_for, self._kind = d, what, kind
        call = self._clock.callLater(timeout, self._expire, d, timeout)

        def stop_timer(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        d.addBoth(stop_timer)
        return d

    def _wake(self, kind: str) -> None:
        if self._waiter is not None and self._kind == kind:
            waiter, self._waiter = self._waiter, None
            waiter.callback(None)

    def _fail(self, err: HostError) -> None:
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(err)

    def _expire(self, d: Deferred[Any], timeout: float) -> None:
        if self._waiter is d:
            what = self._waiting_for
            why = f"timeout after {timeout:g}s waiting for {what} from {self.peer}"
            self._fail(HostError(why))
        self.abort()

    def _lost_error(self, what: str) -> HostError:
        assert self._lost is not None
        value = self._lost.value
        if isinstance(value, SSL.Error | VerificationError):
            return HostError(f"TLS failure with {self.peer}: {self._lost.getErrorMessage()}",
                              "4.7.5")
        if isinstance(value, error.ConnectionDone):
            return HostError(f"connection closed by {self.peer} while waiting for {what}")
        return HostError(
            f"connection to {self.peer} lost while waiting for {what}: "
            f"{self._lost.getErrorMessage()}"
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = reason
        if self._waiter is not None:
            self._fail(self._lost_error(self._waiting_for))
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    async def close(self, timeout: float) -> None:
        """Say QUIT when the dialog allows it, then make sure the connection is gone."""
        if self._lost is None and not self._aborting:
            if self.in_data or self._discarding or self._starttls_sent:
                self.abort()  # mid-message or mid-STARTTLS: QUIT would be misread
            else:
                try:
                    self.send("QUIT")
                    while self.unanswered > 0:  # pipelined replies still due, then QUIT's
                        await self.read_reply(timeout, "QUIT")
                except (HostError, ValueError):
                    pass
                if self._lost is None and not self._aborting:
                    self._transport().loseConnection()
        if self._lost is None:
            # A TLS peer that never answers close_notify must not keep us waiting.
            done: Deferred[None] = Deferred()
            self._closed.append(done)
            call = self._clock.callLater(timeout, self.abort)
            await done
            if call.active():
                call.cancel()


class DotStuffer:
    """RFC 5321 4.5.2 transparency, correct across chunk boundaries."""

    def __init__(self) -> None:
        self._at_line_start = True
        self._last = b""

    def feed(self, chunk: bytes) -> bytes:
        out = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out  # a line that begins exactly at a chunk boundary
        self._at_line_start = chunk.endswith(b"\n")
        self._last = chunk[-1:]
        return out

    def end(self) -> bytes:
        """The terminator, completing a final line the body left open."""
        tail = {b"": b"", b"\n": b"", b"\r": b"\n"}.get(self._last, b"\r\n")
        return tail + b".\r\n"


def xtext(value: str) -> str:
    """RFC 3461 4: printable ASCII except "+" and "=" as is, everything else as +XX."""
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in value.encode("utf-8")
    )


def extensions_of(reply: ServerReply) -> dict[str, str]:
    """EHLO keywords (upper case) to their parameters; ``AUTH=`` is the pre-RFC 4954 form."""
    found: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            keyword, params = "AUTH", f"{keyword[5:]} {params}"
        if keyword == "AUTH" and "AUTH" in found:
            params = f"{found['AUTH']} {params}"
        found[keyword] = params.strip()
    return found


