"""The bytes side of an SMTP connection: everything below the commands.

It buffers input, splits it into command lines (with a length limit), and hands them to the
commands one at a time: while one command is being answered asynchronously (a policy check,
a password check, the spool commit), later pipelined commands wait in the buffer, so replies
always go out in command order. It also owns the STARTTLS switch (anything pipelined behind
STARTTLS is discarded: RFC 3207 4.2, CVE-2011-0411), the DATA phase's raw byte stream, the
command timeout, the stalls and the close after too many errors, pausing a client that
pipelines more than we hold, and closing with a final reply.

Written on ``Protocol`` rather than ``twisted.mail.smtp.ESMTP`` because that one executes
commands pipelined behind STARTTLS after the handshake, accepts bare LF/CR and over-long lines
in DATA, and offers AUTH before TLS (measured on Twisted 26.10).

Every deadline and every byte count of a connection lives here, so later limits have one
home: a TLS handshake deadline in :meth:`SMTPTransport.start_tls`, a per-line deadline and a
minimum DATA rate in :meth:`SMTPTransport.dataReceived` / :meth:`SMTPTransport._process`, and
output flow control in :meth:`SMTPTransport._write`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITLSTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from smarthost.core import replies as reply
from smarthost.core.maillog import MailLog
from smarthost.core.replies import Reply
from smarthost.smtpd.channel import Channel, DataSink, Handler
from smarthost.smtpd.dotreader import DataResult
from smarthost.smtpd.trace import tls_details

MAX_COMMAND_LINE = 16384  # RFC 5321 says 512; AUTH responses and long parameters need more
MAX_BUFFER = 1 << 20  # pipelined bytes held while a reply is pending, before we stop reading


@attrs.frozen
class TransportSettings:
    command_timeout: float  # seconds of client silence before 421 (RFC 5321 4.5.3.2)
    soft_errors: int  # from here, each error reply is delayed a little longer
    hard_errors: int  # then 421 and close
    tls: Any = None  # server TLS options for STARTTLS; None: STARTTLS is not offered
    implicit_tls: bool = False  # the listener wraps the connection in TLS already (port 465)
    max_line: int = MAX_COMMAND_LINE
    max_buffer: int = MAX_BUFFER


class SMTPTransport(Protocol):
    """One connection's bytes; implements :class:`~smarthost.smtpd.channel.Channel` for the
    handler that ``handler`` builds."""

    def __init__(
        self,
        settings: TransportSettings,
        clock: IReactorTime,
        log: MailLog,
        handler: Callable[[Channel], Handler],
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._log = log
        self._handler = handler(self)
        self._peer = ""
        self._encrypted = settings.implicit_tls
        self._buffer = b""
        self._first_data = True
        self._discarding = False  # skipping the rest of an over-long command line
        self._data: tuple[DataSink, Callable[[DataResult], None]] | None = None  # in DATA
        self._pending = False  # a reply is being worked out; later commands wait
        self._closed = False
        self._paused = False
        self._errors = 0
        self._timeout: IDelayedCall | None = None
        self._stalled: IDelayedCall | None = None

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        host = getattr(self.transport.getPeer(), "host", "")
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        self._peer = host
        self._reset_timeout()
        self._handler.connected()

    def connectionLost(self, reason: Failure = Protocol.connectionLost.__defaults__[0]) -> None:  # type: ignore[index]
        self._stop()
        self._handler.connection_lost()

    # -- Channel ---------------------------------------------------------------------------

    @property
    def peer_address(self) -> str:
        return self._peer

    @property
    def encrypted(self) -> bool:
        return self._encrypted

    def can_start_tls(self) -> bool:
        return (
            not self._encrypted
            and self._settings.tls is not None
            and ITLSTransport.providedBy(self.transport)
        )

    def tls_details(self) -> tuple[str, str] | None:
        return tls_details(self.transport) if self._encrypted else None

    def send(self, r: Reply) -> None:
        if self._closed:
            return
        self._write(r)
        if r.code == 421:  # RFC 5321 3.8: 421 means the server is closing the channel
            self.close()
        elif r.code >= 400:
            self._count_error()

    def answer_later(self, work: Coroutine[Any, Any, Reply | None]) -> None:
        self._pending = True
        outer = True  # still inside the _process loop that called us

        def done(result: Reply | None) -> None:
            self._pending = False
            if result is not None:
                self.send(result)
            if not outer:
                self._process()

        def failed(failure: Failure) -> None:
            self._log.failure("session error", failure=failure)
            done(reply.LOCAL_ERROR)

        Deferred.fromCoroutine(work).addCallbacks(done, failed)
        outer = False

    def close(self, r: Reply | None = None) -> None:
        if self._closed:
            return
        if r is not None:
            self._write(r)
        self._stop()
        if self.transport is not None:
            self.transport.loseConnection()

    def start_tls(self) -> None:
        # RFC 3207 4.2 and CVE-2011-0411: nothing sent before the handshake may be acted on.
        self._buffer = b""
        self._encrypted = True
        self.transport.startTLS(self._settings.tls)  # type: ignore[union-attr]

    def read_data(self, sink: DataSink, done: Callable[[DataResult], None]) -> None:
        self._data = (sink, done)

    # -- input -----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._first_data:
            self._first_data = False
            if data[:2] == b"\x16\x03":  # a TLS ClientHello on a plaintext port
                self.close(reply.PROTOCOL_PROBE)
                return
        self._reset_timeout()
        self._buffer += data
        self._process()

    def _ready(self) -> bool:
        """Whether the next command (or DATA bytes) may be handled now."""
        return not (self._pending or self._stalled is not None or self._closed)

    def _process(self) -> None:
        """Handle buffered input until it runs out or a reply is pending."""
        while self._ready() and self._buffer:
            if self._data is not None:
                self._feed_data(*self._data)
                continue
            line = self._next_line()
            if line is None:
                break
            self._handler.line_received(line)
        self._flow_control()

    def _next_line(self) -> bytes | None:
        """The next complete command line without its line end, or None until more input
        arrives. Over-long lines are answered ``500 5.5.6`` once and skipped."""
        limit = self._settings.max_line
        while self._ready():
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > limit:
                    self._buffer = b""
                    if not self._discarding:
                        self._discarding = True
                        self.send(reply.LINE_TOO_LONG)
                return None
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            if self._discarding:
                self._discarding = False
            elif len(line) > limit:
                self.send(reply.LINE_TOO_LONG)
            else:
                return line.removesuffix(b"\r")
        return None

    def _feed_data(self, sink: DataSink, done: Callable[[DataResult], None]) -> None:
        data, self._buffer = self._buffer, b""
        result = sink.feed(data)
        if result is not None:
            self._data = None
            self._buffer = result.leftover + self._buffer  # pipelined commands after DATA
            done(result)

    def _flow_control(self) -> None:
        """Stop reading from a client that pipelines more than we hold while busy."""
        if self.transport is None:
            return
        want_pause = not self._ready() and len(self._buffer) > self._settings.max_buffer
        if want_pause and not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        elif self._paused and not want_pause:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- output, errors, timers ------------------------------------------------------------

    def _write(self, r: Reply) -> None:
        if self.transport is not None:
            self.transport.write(r.to_bytes())

    def _count_error(self) -> None:
        """Postfix-like error limits: past the soft limit each reply is delayed a little
        longer; at the hard limit the connection is closed."""
        self._errors += 1
        if self._errors >= self._settings.hard_errors:
            self.close(reply.TOO_MANY_ERRORS)
        elif self._errors > self._settings.soft_errors:
            self._stall(float(self._errors - self._settings.soft_errors))

    def _stall(self, seconds: float) -> None:
        """Hold back further replies (and so the client) for a while."""

        def resume() -> None:
            self._stalled = None
            self._process()

        self._stalled = self._clock.callLater(seconds, resume)

    def _reset_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = self._clock.callLater(self._settings.command_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timeout = None
        if not self._ready():  # we are the slow one (spool, password check): not the client's
            self._reset_timeout()
            return
        self.close(reply.TIMEOUT)

    def _stop(self) -> None:
        """No more input, replies or timers; a half-received message is never kept."""
        self._closed = True
        self._buffer = b""
        for call in (self._timeout, self._stalled):
            if call is not None and call.active():
                call.cancel()
        self._timeout = self._stalled = None
        if self._data is not None:
            sink, self._data = self._data[0], None
            sink.abort()
