"""The bytes side of an SMTP connection: everything below the commands.

It buffers input, splits it into command lines (with a length limit), and hands them to the
commands one at a time: while one command is being answered asynchronously (a policy check,
a password check, the spool commit), later pipelined commands wait in the buffer, so replies
always go out in command order. It also owns the STARTTLS switch (anything pipelined behind
STARTTLS is discarded: RFC 3207 4.2, CVE-2011-0411), the raw byte stream of DATA and BDAT, the
deadlines, the stalls and the close after too many errors, flow control in both directions,
and closing with a final reply.

Written on ``Protocol`` rather than ``twisted.mail.smtp.ESMTP`` because that one executes
commands pipelined behind STARTTLS after the handshake, accepts bare LF/CR and over-long lines
in DATA, and offers AUTH before TLS (measured on Twisted 26.10).

Deadlines, none of which a client can push back by trickling bytes:

* a TLS handshake (STARTTLS or implicit TLS) gets ``tls_handshake_timeout`` seconds, then the
  connection is *aborted*: mid-handshake ``loseConnection`` waits for the peer forever, and a
  reply could not reach it anyway;
* each command line gets ``command_timeout`` seconds from the moment we wait for it (RFC 5321
  4.5.3.2; Postfix's ``smtpd_per_record_deadline``); bytes of an unfinished line do not count;
* DATA (and each BDAT chunk) starts with ``command_timeout`` seconds of credit, and every
  byte received earns ``1/min_data_rate`` seconds more, never beyond ``command_timeout``
  ahead (Postfix's ``smtpd_min_data_rate``): a client slower than the rate runs out.

Time we spend answering (a plugin, a password check, the spool commit, an error stall) is never
counted against the client. A client that does not read its replies is: once the transport's
write buffer is full we stop handling its commands (we are the transport's push producer), and
once :data:`MAX_BUFFER` of its input waits we stop reading, so it can make us hold only a
bounded amount (about MAX_BUFFER plus the transport's 64 KiB of output), and its deadline runs
on.

Every close sends the last reply and then gives the client :data:`CLOSE_FLUSH` seconds to take
it before the connection is aborted, so no closing connection holds a file descriptor longer.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from smarthost.core import replies as reply
from smarthost.core.maillog import MailLog
from smarthost.core.replies import Reply
from smarthost.core.writethrough import can_write_through, write_through
from smarthost.smtpd.channel import Channel, DataSink, Handler
from smarthost.smtpd.dotreader import DataResult
from smarthost.smtpd.trace import tls_details

MAX_COMMAND_LINE = 16384  # RFC 5321 says 512; AUTH responses and long parameters need more
MAX_BUFFER = 1 << 16  # input held while commands wait (answer pending, output full)
CLOSE_FLUSH = 5.0  # seconds a closing connection has to take its last reply, then abort
LINES_PER_TURN = 100  # pipelined command lines handled before other connections get a turn


@attrs.frozen
class TransportSettings:
    command_timeout: float  # seconds for one command line (RFC 5321 4.5.3.2)
    soft_errors: int  # from here, each error reply is delayed a little longer
    hard_errors: int  # then 421 and close
    tls: Any = None  # server TLS options for STARTTLS; None: STARTTLS is not offered
    implicit_tls: bool = False  # the listener wraps the connection in TLS already (port 465)
    tls_handshake_timeout: float = 30.0  # seconds for a TLS handshake; then abort
    min_data_rate: float = 500.0  # bytes/s in DATA once its first command_timeout is used
    max_line: int = MAX_COMMAND_LINE
    max_buffer: int = MAX_BUFFER


@implementer(IPushProducer, IHandshakeListener)
class SMTPTransport(Protocol):
    """One connection's bytes; implements :class:`~smarthost.smtpd.channel.Channel` for the
    handler that ``handler`` builds.

    It registers itself with its transport as a streaming producer: the transport calls
    :meth:`pauseProducing` when its write buffer (for TLS: the TLS layer's too) is full and
    :meth:`resumeProducing` when it has drained.
    """

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
        self._buffer = bytearray()  # deleting from the front is cheap for a bytearray
        self._first_data = True
        self._discarding = False  # skipping the rest of an over-long command line
        self._data: tuple[DataSink, Callable[[DataResult], None]] | None = None  # in DATA
        self._pending = False  # a reply is being worked out; later commands wait
        self._processing = False  # inside _process (it is not re-entered)
        self._holding = False  # an answer's reply waits for the replies _process adds to it
        self._out: list[bytes] = []  # replies of the current batch, written at its end
        self._closed = False
        self._producer = False  # registered with the transport as its producer
        self._output_full = False  # the transport asked us to pause: the client is not reading
        self._reading_paused = False
        self._handshaking = False
        self._errors = 0
        self._deadline_at = 0.0  # when the client's time for the current line/DATA runs out
        self._deadline: IDelayedCall | None = None  # fires at or before _deadline_at
        self._handshake: IDelayedCall | None = None
        self._stalled: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        host = getattr(self.transport.getPeer(), "host", "")
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        self._peer = host
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._producer = True
        if self._settings.implicit_tls:
            self._begin_handshake()
        else:
            self._restart_deadline()
        self._handler.connected()

    def connectionLost(self, reason: Failure = Protocol.connectionLost.__defaults__[0]) -> None:  # type: ignore[index]
        self._stop()
        self._producer = False
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self._handler.connection_lost()

    # -- IHandshakeListener, IPushProducer (what the transport tells us) --------------------

    def handshakeCompleted(self) -> None:
        """TLS is up: the handshake deadline gives way to the command deadline."""
        if not self._handshaking:
            return
        self._handshaking = False
        if self._handshake is not None and self._handshake.active():
            self._handshake.cancel()
        self._handshake = None
        if not self._closed:
            self._restart_deadline()

    def pauseProducing(self) -> None:
        """The write buffer is full: the client is not reading. Stop handling its commands,
        which would only add replies, until it drains. Reading goes on until the input
        buffer is full too (:meth:`_flow_control`): a TLS layer must read to write (it pauses
        us during its handshake, which needs the client's next flight)."""
        self._output_full = True
        self._flow_control()

    def resumeProducing(self) -> None:
        self._output_full = False
        self._process()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost follows and cleans up."""

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
        elif r.code >= 400 and not r.repeated:
            self._count_error()

    def answer_later(self, work: Coroutine[Any, Any, Reply | None]) -> None:
        self._pending = True

        def done(result: Reply | None) -> None:
            self._pending = False
            self._holding = True  # one write with the replies to what was pipelined behind
            try:
                if result is not None:
                    self.send(result)
                self._restart_deadline()  # the time we took was ours, not the client's
            finally:
                self._holding = False
            self._process()

        def failed(failure: Failure) -> None:
            self._log.failure("session error", failure=failure)
            done(reply.LOCAL_ERROR)

        Deferred.fromCoroutine(work).addCallbacks(done, failed)

    def close(self, r: Reply | None = None) -> None:
        if self._closed:
            return
        if self._handshaking:
            # Nothing reaches the client before its TLS handshake, and a TLS close would wait
            # for that handshake: abort (a refused client on port 465 sees the connection
            # reset, which it retries like the 421 it cannot be sent).
            self._abort()
            return
        if r is not None:
            self._write(r)
        self._flush()
        self._stop()
        if self.transport is None:
            return
        if self._producer:
            # A TLS layer with a producer registered never starts its close.
            self._producer = False
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
        self.transport.loseConnection()
        # A client that does not read could hold the connection open for ever.
        self._abort_call = self._clock.callLater(CLOSE_FLUSH, self._abort_now)

    def start_tls(self) -> None:
        # RFC 3207 4.2 and CVE-2011-0411: nothing sent before the handshake may be acted on.
        self._buffer.clear()
        self._flush()  # the 220 goes out in the clear, before the handshake
        self._encrypted = True
        self._begin_handshake()
        self.transport.startTLS(self._settings.tls)  # type: ignore[union-attr]

    def read_data(self, sink: DataSink, done: Callable[[DataResult], None]) -> None:
        self._data = (sink, done)
        self._restart_deadline()  # the first command_timeout of DATA is free of the rate

    # -- input -----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._handshaking:
            # Decrypted data comes only after the handshake, even through a wrapper (PROXY)
            # that does not pass handshakeCompleted on.
            self.handshakeCompleted()
        if self._first_data:
            self._first_data = False
            if data[:2] == b"\x16\x03":  # a TLS ClientHello on a plaintext port
                self.close(reply.PROTOCOL_PROBE)
                return
        if self._data is not None:
            self._earn(len(data))
        self._buffer += data
        self._process()

    def _ready(self) -> bool:
        """Whether the next command (or DATA bytes) may be handled now."""
        return not (self._busy() or self._closed or self._output_full)

    def _busy(self) -> bool:
        """We are working out a reply or holding the client back: its clock stops."""
        return self._pending or self._stalled is not None

    def _process(self) -> None:
        """Handle buffered input until it runs out, a reply is pending or the client stops
        reading, at most LINES_PER_TURN lines at a time: then the rest waits for the reactor's
        next turn, so one client pipelining without end cannot keep every other connection
        (and a fresh client's greeting) waiting. Never re-entered: a call from inside (a reply
        that drained the write buffer at once) leaves the work to the loop already running.

        The batch's replies are held and written together at its end (:meth:`_flush`), so a
        pipelining client (RFC 2920) gets them in one segment."""
        if self._processing:
            return
        self._processing = True
        try:
            handled = 0
            while self._ready() and self._buffer:
                if self._data is not None:
                    self._feed_data(*self._data)
                    continue
                if handled == LINES_PER_TURN:
                    self._stall(0)
                    break
                line = self._next_line()
                if line is None:
                    break
                handled += 1
                self._restart_deadline()  # the next line's time starts now
                self._handler.line_received(line)
        finally:
            self._processing = False
        self._flush()
        self._flow_control()

    def _next_line(self) -> bytes | None:
        """The next complete command line without its line end, or None until more input
        arrives. Over-long lines are answered ``500 5.5.6`` once and skipped."""
        limit = self._settings.max_line
        while self._ready():
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > limit:
                    self._buffer.clear()
                    if not self._discarding:
                        self._discarding = True
                        self.send(reply.LINE_TOO_LONG)
                return None
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._discarding:
                self._discarding = False
            elif len(line) > limit:
                self.send(reply.LINE_TOO_LONG)
            else:
                return line.removesuffix(b"\r")
        return None

    def _feed_data(self, sink: DataSink, done: Callable[[DataResult], None]) -> None:
        remaining: int | None = getattr(sink, "remaining", None)  # see DataSink
        if remaining is None or remaining >= len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(self._buffer[:remaining])
            del self._buffer[:remaining]  # cheap from the front of a bytearray
        result = sink.feed(data)
        if result is not None:
            self._data = None
            self._buffer[:0] = result.leftover  # pipelined commands after DATA
            self._restart_deadline()
            done(result)

    def _flow_control(self) -> None:
        """Stop reading from a client that pipelines more than we hold while its commands
        wait (for our answer, or for it to read the replies it has); read again once they
        can go on."""
        if self.transport is None or self._closed:
            return
        want_pause = not self._ready() and len(self._buffer) > self._settings.max_buffer
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        elif self._reading_paused and not want_pause:
            self._reading_paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- output, errors --------------------------------------------------------------------

    def _write(self, r: Reply) -> None:
        """Inside a batch (:meth:`_process`, or an answer and the batch it resumes) the reply
        waits for the batch's end while the socket's buffer is empty (then the batch goes out
        in one send). Otherwise it is written now, as every reply used to be: once the
        transport holds output (a client that does not read), each reply counts against its
        buffer at once, and we are paused at the same reply as before."""
        self._out.append(r.to_bytes())
        if not (self._processing or self._holding) or not (
            len(self._out) > 1 or can_write_through(self.transport)
        ):
            self._flush()

    def _flush(self) -> None:
        """Write the held replies in one go, straight to the socket when its buffer is empty
        (:mod:`smarthost.core.writethrough`)."""
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        if self.transport is not None:
            write_through(self.transport, data)

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
            self._restart_deadline()
            self._process()

        self._stalled = self._clock.callLater(seconds, resume)

    # -- deadlines -------------------------------------------------------------------------

    def _restart_deadline(self) -> None:
        """The client has ``command_timeout`` seconds from now (for its next line, or the
        first part of DATA)."""
        if self._closed or self._handshaking:
            return
        timeout = self._settings.command_timeout
        self._deadline_at = self._clock.seconds() + timeout
        if self._deadline is None or not self._deadline.active():
            self._deadline = self._clock.callLater(timeout, self._check_deadline)

    def _earn(self, size: int) -> None:
        """DATA bytes arrived: ``size / min_data_rate`` more seconds, at most
        ``command_timeout`` ahead of now. Without a rate, any byte restarts the time."""
        limit = self._clock.seconds() + self._settings.command_timeout
        rate = self._settings.min_data_rate
        if rate > 0:
            self._deadline_at = min(limit, self._deadline_at + size / rate)
        else:
            self._deadline_at = limit

    def _check_deadline(self) -> None:
        """The timer is only ever early (the deadline moves later without moving it)."""
        self._deadline = None
        if self._closed or self._handshaking:
            return
        if self._busy():  # we are the slow one; the answer restarts the client's time
            self._restart_deadline()
            return
        remaining = self._deadline_at - self._clock.seconds()
        if remaining > 0:
            self._deadline = self._clock.callLater(remaining, self._check_deadline)
            return
        self.close(reply.TIMEOUT)

    def _begin_handshake(self) -> None:
        self._handshaking = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._handshake = self._clock.callLater(
            self._settings.tls_handshake_timeout, self._abort
        )

    # -- the end ---------------------------------------------------------------------------

    def _abort(self) -> None:
        """Drop the connection now, without a reply or a TLS close."""
        self._stop()
        self._abort_now()

    def _abort_now(self) -> None:
        self._abort_call = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _stop(self) -> None:
        """No more input, replies or timers; a half-received message is never kept."""
        self._closed = True
        self._handshaking = False
        self._buffer.clear()
        for call in (self._deadline, self._stalled, self._handshake):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._stalled = self._handshake = None
        if self._data is not None:
            sink, self._data = self._data[0], None
            sink.abort()
