"""One delivery attempt of one message to one SMTP route; returns per-recipient outcomes.

Our own small ESMTP client rather than ``twisted.mail``'s ``ESMTPSender``, whose measured
defects (dot-stuffing per 16 KiB chunk, plaintext replies injected after ``220`` to STARTTLS
read as TLS replies, a result Deferred that never fires when the server hangs up, no
timeouts) all sit in the parts that matter here. What this module guarantees instead:

- every wait is bounded (RFC 5321 4.5.3.2 timeouts, see :class:`Timeouts`) and a dropped
  connection always ends the attempt, so :meth:`SMTPDelivery.deliver` always returns;
- bytes that arrive after the ``220`` to STARTTLS and before the handshake are discarded;
- dot-stuffing tracks the start of line across chunk boundaries;
- credentials are only sent over TLS and never appear in an outcome, log or exception.

Host choice: the route's hosts are tried in order; anything that goes wrong before the host
accepts ``MAIL FROM`` (no connection, timeout, bad greeting, EHLO refused, TLS failure, AUTH
refused) moves on to the next host. Once ``MAIL`` is accepted the host's replies are final for
this attempt. Under "opportunistic" TLS a failed STARTTLS *handshake* is also a host failure
(next host, else deferred) and never falls back to plaintext: SPEC allows plaintext only when
STARTTLS is not offered, and retrying in the clear would let anyone who can break handshakes
read the mail.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IConsumer,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
    ITLSTransport,
    ITransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smarthost.envelope import BOUNCED, DEFERRED, DELIVERED, Envelope, Outcome, Recipient
from smarthost.nexthop import Credentials, Host, Route

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot

CHUNK = 64 * 1024  # body bytes read and written at a time
_MAX_LINE = 4096  # a reply line longer than this is a broken or hostile server
_MAX_REPLY_LINES = 200
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@attrs.frozen
class Timeouts:
    """Seconds to wait for each reply; RFC 5321 4.5.3.2 values, shortened by tests.

    RFC 5321 names no timeout for EHLO, STARTTLS, the TLS handshake or AUTH; ``command``
    (5 minutes, like MAIL) covers them. ``quit`` bounds the polite goodbye, after which the
    connection is simply closed.
    """

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    quit: float = 30.0


@attrs.frozen
class _Reply:
    code: int
    lines: tuple[str, ...]  # the text after "250-" / "250 ", control characters replaced

    @property
    def text(self) -> str:
        """As the operator and the bounce show it: code, then every line's text."""
        return " ".join((str(self.code), *self.lines)).rstrip()

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    def status(self, result: str) -> str:
        """The RFC 3463 code: the server's own when it gave one, else derived (X.0.0).

        The class follows our result, so a 535 that defers the message reads 4.7.8.
        """
        klass = {DELIVERED: "2", DEFERRED: "4", BOUNCED: "5"}[result]
        found = _ENHANCED.match(self.lines[0]) if self.lines else None
        if found and found.group(1) == str(self.code)[0]:
            return f"{klass}.{found.group(2)}.{found.group(3)}"
        return f"{klass}.0.0"


class _QuietFactory(ClientFactory):
    """Hands out one ready-made protocol. Not noisy: Twisted would otherwise log "Starting
    factory"/"Stopping factory" for every delivery, two lines per message in the operator's
    log (and measurable time on the reactor thread)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


CONNECT_FAILED = "4.4.1"  # RFC 3463: no answer from host


class _HostError(Exception):
    """This host cannot take the message now; ``str()`` is the reason shown to operators."""

    def __init__(self, reason: str, status: str = "4.4.2") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@implementer(IHandshakeListener, IPushProducer)
class _Connection(Protocol):
    """The wire side of one SMTP client connection: commands out, whole replies in.

    At most one thing is awaited at a time (a reply, the TLS handshake, or the transport
    asking for more body bytes); each wait is bounded and fails with :class:`_HostError`
    on timeout or connection loss, so no caller can hang.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, peer: str, transcript: bool = False) -> None:
        self._clock = clock
        self.peer = peer
        self._transcript = transcript  # log every line at debug level (credentials hidden)
        self._buffer = b""
        self._partial: list[str] = []
        self._replies: deque[_Reply] = deque()
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
        self._transport().write(b"".join(c.encode("utf-8") + b"\r\n" for c in commands))
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
        reply = _Reply(int(text[:3]), tuple(self._partial))
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
        self._fail(_HostError(f"protocol error from {self.peer}: {why}"))
        self.abort()

    def read_reply(self, timeout: float, what: str) -> Deferred[_Reply]:
        if self._replies:
            self.unanswered -= 1
            return succeed(self._replies.popleft())
        d: Deferred[_Reply] = self._wait(timeout, f"reply to {what}", "reply")
        d.addCallback(lambda _: self._take())
        return d

    def _take(self) -> _Reply:
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

        RFC 5321 4.5.3.2.5: each block must be taken within ``timeout``.
        """
        transport = IConsumer(self.transport)
        transport.registerProducer(self, True)
        try:
            stuffer = _DotStuffer()
            while chunk := body.read(CHUNK):
                if self._lost is not None:
                    raise self._lost_error("the transfer of message data")
                transport.write(stuffer.feed(chunk))
                if self._paused:
                    await self._wait(timeout, "the peer to take message data", "resume")
            transport.write(stuffer.end())
            self.unanswered += 1
            self.in_data = False
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

    def _fail(self, err: _HostError) -> None:
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(err)

    def _expire(self, d: Deferred[Any], timeout: float) -> None:
        if self._waiter is d:
            what = self._waiting_for
            why = f"timeout after {timeout:g}s waiting for {what} from {self.peer}"
            self._fail(_HostError(why))
        self.abort()

    def _lost_error(self, what: str) -> _HostError:
        assert self._lost is not None
        value = self._lost.value
        if isinstance(value, SSL.Error | VerificationError):
            return _HostError(f"TLS failure with {self.peer}: {self._lost.getErrorMessage()}",
                              "4.7.5")
        if isinstance(value, error.ConnectionDone):
            return _HostError(f"connection closed by {self.peer} while waiting for {what}")
        return _HostError(
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
                except (_HostError, ValueError):
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


class _DotStuffer:
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


def _extensions(reply: _Reply) -> dict[str, str]:
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


class SMTPDelivery:
    """Delivers one message to one route, trying the route's hosts in order.

    ``reactor`` must provide IReactorTCP and IReactorTime (any real reactor, or
    ``MemoryReactorClock`` in unit tests); ``hostname`` is our EHLO name; ``trust_root``
    checks certificates under "verify" (default: the platform's CAs).
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        hostname: str,
        *,
        timeouts: Timeouts = Timeouts(),
        trust_root: IOpenSSLTrustRoot | Certificate | None = None,
        unreachable: Callable[[Host], None] = lambda host: None,
        transcript: bool = False,
    ) -> None:
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._hostname = hostname
        self._timeouts = timeouts
        self._trust_root = trust_root
        # The SMTP dialog line by line at debug level: for debugging a peer, not by default
        # (twistd's log shows debug, and one delivery is a dozen lines).
        self._transcript = transcript
        # Told about hosts that could not be connected to, so routes try them last for a
        # while instead of paying a connect timeout on every message.
        self._unreachable = unreachable

    async def deliver(
        self,
        route: Route,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        open_body: Callable[[], BinaryIO],
        size: int,
    ) -> list[Outcome]:
        """One outcome per recipient, in order; network trouble never raises.

        Only a bug raises, and the caller then defers every recipient: a possible duplicate
        is better than a lost message. The connection is closed on every path.
        """
        if not recipients:
            return []
        last, remote = _HostError("no SMTP host to try", "4.4.4"), ""
        for host in route.hosts:
            try:
                return await self._attempt(host, route, envelope, recipients, open_body, size)
            except _HostError as e:
                last, remote = e, _remote(host)
                if e.status == CONNECT_FAILED:
                    self._unreachable(host)
        return [Outcome(r, DEFERRED, last.reason, remote, last.status) for r in recipients]

    async def _attempt(
        self,
        host: Host,
        route: Route,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        open_body: Callable[[], BinaryIO],
        size: int,
    ) -> list[Outcome]:
        conn = await self._connect(host, route)
        try:
            extensions = await self._open(conn, host, route)
            return await self._transaction(
                conn, host, envelope, recipients, open_body, size, extensions
            )
        finally:
            await conn.close(self._timeouts.quit)

    # -- connection and session -----------------------------------------------------------
    def _tls_options(
        self, route: Route, host: Host
    ) -> IOpenSSLClientConnectionCreator | CertificateOptions:
        if route.tls == "verify":
            return optionsForClientTLS(host.name, trustRoot=self._trust_root)
        # Opportunistic and "required" only want encryption: RFC 7435, most MX certificates
        # would fail verification, and failing closed on them would stop mail.
        return CertificateOptions(verify=False)

    async def _connect(self, host: Host, route: Route) -> _Connection:
        endpoint: IStreamClientEndpoint
        timeout = self._timeouts.connect
        try:
            family = ipaddress.ip_address(host.address).version
        except ValueError:
            family = 4  # a name: TCP4ClientEndpoint resolves it
        if family == 6:
            endpoint = TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                self._reactor, host.address, host.port, timeout
            )
        else:
            endpoint = TCP4ClientEndpoint(self._reactor, host.address, host.port, timeout)
        if route.implicit_tls:
            options: Any = self._tls_options(route, host)
            endpoint = wrapClientTLS(options, endpoint)
        conn = _Connection(self._clock, str(host), self._transcript)
        try:
            await endpoint.connect(_QuietFactory(conn))
        except error.ConnectionRefusedError:
            raise _HostError(f"connection refused by {host}", CONNECT_FAILED) from None
        except (error.TimeoutError, error.ConnectingCancelledError):
            raise _HostError(f"connection to {host} timed out", CONNECT_FAILED) from None
        except (error.ConnectError, OSError) as e:
            raise _HostError(f"cannot connect to {host}: {e}", CONNECT_FAILED) from None
        return conn

    async def _open(self, conn: _Connection, host: Host, route: Route) -> dict[str, str]:
        """Greeting, EHLO, TLS, AUTH: ready for MAIL, or a _HostError."""
        t = self._timeouts
        if route.implicit_tls:
            await conn.handshake(t.command)
        greeting = await conn.read_reply(t.greeting, "greeting")
        if greeting.code != 220:
            raise _HostError(f"{host} greeted with: {greeting.text}", greeting.status(DEFERRED))
        extensions = await self._hello(conn, host)
        must_encrypt = route.tls in ("required", "verify") or route.credentials is not None
        if not conn.tls:
            if "STARTTLS" in extensions:
                conn.send("STARTTLS")
                reply = await conn.read_reply(t.command, "STARTTLS")
                if reply.code == 220:
                    conn.start_tls(self._tls_options(route, host))
                    await conn.handshake(t.command)
                    extensions = await self._hello(conn, host)  # RFC 3207 4.2: forget it all
                elif must_encrypt:
                    raise _HostError(f"{host} refused STARTTLS: {reply.text}", "4.7.4")
            elif must_encrypt:
                why = "credentials are configured" if route.tls == "opportunistic" else (
                    f'delivery.tls is "{route.tls}"'
                )
                raise _HostError(f"{host} does not offer STARTTLS and {why}", "4.7.4")
        if route.credentials is not None:
            await self._authenticate(conn, host, route.credentials, extensions)
        return extensions

    async def _hello(self, conn: _Connection, host: Host) -> dict[str, str]:
        t = self._timeouts
        conn.send(f"EHLO {self._hostname}")
        reply = await conn.read_reply(t.command, "EHLO")
        if reply.positive:
            return _extensions(reply)
        if reply.code >= 500:  # RFC 5321 3.2: a pre-ESMTP server; HELO then, no extensions
            conn.send(f"HELO {self._hostname}")
            reply = await conn.read_reply(t.command, "HELO")
            if reply.positive:
                return {}
        raise _HostError(f"{host} refused EHLO/HELO: {reply.text}", reply.status(DEFERRED))

    async def _authenticate(
        self, conn: _Connection, host: Host, credentials: Credentials, extensions: dict[str, str]
    ) -> None:
        """AUTH PLAIN (RFC 4616) or LOGIN; a refusal defers, it never bounces (SPEC)."""
        if not conn.tls:  # _open should have stopped first; never send secrets in the clear
            raise _HostError(f"{host} is not encrypted, not sending credentials", "4.7.0")

        def b64(text: str) -> str:
            return base64.b64encode(text.encode("utf-8")).decode("ascii")

        t = self._timeouts
        mechanisms = extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            token = b64(f"\0{credentials.username}\0{credentials.password}")
            conn.send(f"AUTH PLAIN {token}", secret=True)
            reply = await conn.read_reply(t.command, "AUTH")
        elif "LOGIN" in mechanisms:
            conn.send("AUTH LOGIN")
            reply = await conn.read_reply(t.command, "AUTH")
            for secret in (credentials.username, credentials.password):
                if reply.code != 334:
                    break
                conn.send(b64(secret), secret=True)
                reply = await conn.read_reply(t.command, "AUTH")
        else:
            raise _HostError(f"{host} offers neither AUTH PLAIN nor AUTH LOGIN", "4.7.0")
        if reply.code == 334:  # a challenge we cannot answer: cancel (RFC 4954 4)
            conn.send("*")
            reply = await conn.read_reply(t.command, "AUTH")
        if reply.code != 235:
            raise _HostError(f"{host} refused authentication: {reply.text}", reply.status(DEFERRED))

    # -- the transaction ------------------------------------------------------------------
    def _mail(self, envelope: Envelope, size: int, extensions: dict[str, str]) -> str:
        words = [f"MAIL FROM:<{envelope.sender}>"]
        if "SIZE" in extensions:
            words.append(f"SIZE={size}")
        # An 8-bit body goes out even when 8BITMIME is not offered, as Postfix does: nearly
        # every server takes it, and RFC 6152 conversion to 7 bit would mean rewriting MIME.
        if envelope.body == "8BITMIME" and "8BITMIME" in extensions:
            words.append("BODY=8BITMIME")
        if envelope.smtputf8:
            words.append("SMTPUTF8")
        if "DSN" in extensions:
            if envelope.ret:
                words.append(f"RET={envelope.ret}")
            if envelope.envid:
                words.append(f"ENVID={xtext(envelope.envid)}")
        return " ".join(words)

    def _rcpt(self, recipient: Recipient, extensions: dict[str, str]) -> str:
        words = [f"RCPT TO:<{recipient.address}>"]
        if "DSN" in extensions:
            if recipient.notify:
                words.append(f"NOTIFY={','.join(recipient.notify)}")
            if recipient.orcpt:
                kind, sep, address = recipient.orcpt.partition(";")
                if not sep:
                    kind, address = "rfc822", recipient.orcpt
                words.append(f"ORCPT={kind};{xtext(address)}")
        return " ".join(words)

    async def _transaction(
        self,
        conn: _Connection,
        host: Host,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        open_body: Callable[[], BinaryIO],
        size: int,
        extensions: dict[str, str],
    ) -> list[Outcome]:
        t, remote = self._timeouts, _remote(host)

        def outcome(recipient: Recipient, reply: _Reply) -> Outcome:
            result = DELIVERED if reply.positive else DEFERRED if reply.code < 500 else BOUNCED
            return Outcome(
                recipient,
                result,
                reply.text,
                remote,
                reply.status(result),
                dsn_passed="DSN" in extensions,
            )

        if envelope.smtputf8 and "SMTPUTF8" not in extensions:
            # SPEC / RFC 6531 3.2: bounced, not mangled. Other hosts of one MX set are
            # configured alike, so trying them would only delay the bounce (Postfix agrees).
            why = f"{host} does not offer SMTPUTF8, which this message requires"
            return [Outcome(r, BOUNCED, why, remote, "5.6.7") for r in recipients]
        mail = self._mail(envelope, size, extensions)
        rcpts = [self._rcpt(r, extensions) for r in recipients]
        pipelining = "PIPELINING" in extensions
        if pipelining:  # RFC 2920 3.1: MAIL, RCPTs and DATA in one go, replies in order
            conn.send(mail, *rcpts, "DATA")
        else:
            conn.send(mail)
        reply = await conn.read_reply(t.mail, "MAIL FROM")
        if not reply.positive:
            return [outcome(r, reply) for r in recipients]  # close() reads pipelined replies

        decided: list[Outcome | None] = [None] * len(recipients)
        accepted: list[int] = []
        try:
            for i, (recipient, rcpt) in enumerate(zip(recipients, rcpts, strict=True)):
                if not pipelining:
                    conn.send(rcpt)
                reply = await conn.read_reply(t.rcpt, "RCPT TO")
                if reply.positive:
                    accepted.append(i)
                else:
                    decided[i] = outcome(recipient, reply)
            if not accepted and not pipelining:
                return _done(decided)
            if not pipelining:
                conn.send("DATA")
            reply = await conn.read_reply(t.data_init, "DATA")
            if reply.code != 354:
                if accepted:
                    if reply.positive:  # a 2xx to DATA is nonsense; do not call it delivered
                        raise _HostError(f"{host} answered DATA with {reply.text}")
                    for i in accepted:
                        decided[i] = outcome(recipients[i], reply)
                return _done(decided)
            conn.in_data = True
            if not accepted:
                # RFC 2920 3.1: DATA was accepted although every RCPT failed; end it empty.
                conn.in_data = False
                conn.send(".")
                return _done(decided)
            try:
                with open_body() as body:
                    await conn.send_body(body, t.data_block)
            except OSError as e:
                conn.abort()  # never end a message we could not read in full
                raise _HostError(f"cannot read the queued message: {e}", "4.3.0") from None
            reply = await conn.read_reply(t.data_end, "end of data")
            for i in accepted:
                decided[i] = outcome(recipients[i], reply)
        except _HostError as e:
            for i, recipient in enumerate(recipients):
                if decided[i] is None:
                    decided[i] = Outcome(recipient, DEFERRED, e.reason, remote, e.status)
        return _done(decided)


def _done(decided: list[Outcome | None]) -> list[Outcome]:
    done = [d for d in decided if d is not None]
    assert len(done) == len(decided), "a recipient without an outcome"
    return done


def _remote(host: Host) -> str:
    return f"{host.name}[{host.address}]"
