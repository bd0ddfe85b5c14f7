"""The transport alone, driving a scripted handler instead of the SMTP commands: reply order
under pipelining, the STARTTLS buffer discard, line limits, the DATA byte stream, error stalls,
deadlines (per line, DATA rate, TLS handshake), closing, and output flow control."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import alsoProvides

from smarthost.core import replies as reply
from smarthost.core.maillog import MailLog
from smarthost.core.replies import Reply
from smarthost.smtpd.channel import Channel, Handler
from smarthost.smtpd.dotreader import DataResult
from smarthost.smtpd.transport import (
    CLOSE_FLUSH,
    LINES_PER_TURN,
    SMTPTransport,
    TransportSettings,
)

ANSWER = Reply(250, "2.0.0", "answer")
REFUSED = Reply(550, "5.0.0", "no")
TLS_OPTIONS = object()


class TLSStringTransport(StringTransport):
    """A StringTransport that records the switch to TLS (and says it can, through
    ``alsoProvides``: declaring ITLSTransport on the class would promise all of ITCPTransport)."""

    tls: object = None

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.tls = contextFactory


class Script:
    """A handler that answers each line as the test tells it: ``WAIT`` answers later (when
    the test fires the Deferred), ``BAD`` is an error, ``TLS`` starts TLS, ``DATA`` reads
    bytes into :class:`Sink`, ``BYE`` closes; anything else is answered at once."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.lines: list[bytes] = []
        self.waiting: list[Deferred[Reply | None]] = []
        self.sink = Sink()
        self.ended: list[DataResult] = []
        self.lost = False

    def connected(self) -> None:
        self.channel.send(reply.greeting("mx.test"))

    def line_received(self, line: bytes) -> None:
        self.lines.append(line)
        if line == b"WAIT":
            d = Deferred[Reply | None]()
            self.waiting.append(d)
            self.channel.answer_later(_wait(d))
        elif line == b"BAD":
            self.channel.send(REFUSED)
        elif line == b"TLS":
            self.channel.send(reply.READY_TLS)
            self.channel.start_tls()
        elif line == b"DATA":
            self.channel.read_data(self.sink, self.ended.append)
            self.channel.send(reply.START_DATA)
        elif line == b"BYE":
            self.channel.close(reply.BYE)
        else:
            self.channel.send(ANSWER)

    def connection_lost(self) -> None:
        self.lost = True


async def _wait(d: Deferred[Reply | None]) -> Reply | None:
    return await d


@attrs.define
class Sink:
    """Takes bytes up to and including ``END``; the rest is leftover."""

    received: bytes = b""
    aborted: bool = False

    def feed(self, data: bytes) -> DataResult | None:
        self.received += data
        end = self.received.find(b"END")
        if end < 0:
            return None
        leftover = self.received[end + 3 :]
        self.received = self.received[:end]
        return DataResult(error=None, fatal=False, leftover=leftover, size=end)

    def abort(self) -> None:
        self.aborted = True


@attrs.define
class Rig:
    protocol: SMTPTransport
    script: Script
    transport: TLSStringTransport
    clock: Clock

    def feed(self, data: bytes) -> list[str]:
        self.protocol.dataReceived(data)
        return self.replies()

    def replies(self) -> list[str]:
        out = self.transport.value().decode()
        self.transport.clear()
        return out.split("\r\n")[:-1] if out else []


def rig(**settings: Any) -> Rig:
    clock = Clock()
    scripts: list[Script] = []

    def handler(channel: Channel) -> Handler:
        scripts.append(Script(channel))
        return scripts[-1]

    options = {"command_timeout": 300, "soft_errors": 10, "hard_errors": 20, "tls": TLS_OPTIONS}
    protocol = SMTPTransport(
        TransportSettings(**{**options, **settings}), clock, MailLog(clock), handler
    )
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 1234))
    alsoProvides(transport, ITLSTransport)
    protocol.makeConnection(transport)
    r = Rig(protocol, scripts[0], transport, clock)
    assert r.replies() == ["220 mx.test ESMTP smarthost"]
    return r


def codes(lines: list[str]) -> list[str]:
    return [line[:3] for line in lines]


def test_one_command_at_a_time_and_replies_in_order() -> None:
    r = rig()
    assert codes(r.feed(b"ONE\r\nWAIT\r\nTWO\r\nWAIT\r\nTHREE\r\n")) == ["250"]
    assert r.script.lines == [b"ONE", b"WAIT"]  # TWO waits for the answer to WAIT
    r.script.waiting[0].callback(Reply(251, "2.1.5", "later"))
    assert codes(r.replies()) == ["251", "250"]
    assert r.script.lines == [b"ONE", b"WAIT", b"TWO", b"WAIT"]
    r.script.waiting[1].callback(None)  # an answer of None sends nothing, and goes on
    assert codes(r.replies()) == ["250"]
    assert r.script.lines[-1] == b"THREE"


def test_a_crash_while_answering_is_451_and_the_session_goes_on() -> None:
    r = rig()
    r.feed(b"WAIT\r\nNEXT\r\n")
    r.script.waiting[0].errback(RuntimeError("bug"))
    assert codes(r.replies()) == ["451", "250"]


def test_bytes_pipelined_behind_starttls_are_discarded() -> None:
    """CVE-2011-0411: a command in the same packet as STARTTLS is never executed."""
    r = rig()
    assert not r.protocol.encrypted and r.protocol.can_start_tls()
    assert codes(r.feed(b"TLS\r\nINJECTED\r\n")) == ["220"]
    assert r.transport.tls is TLS_OPTIONS
    assert r.script.lines == [b"TLS"]
    assert r.protocol.encrypted and not r.protocol.can_start_tls()
    assert codes(r.feed(b"AFTER\r\n")) == ["250"]
    assert r.script.lines == [b"TLS", b"AFTER"]


def test_no_starttls_without_a_certificate_or_when_already_encrypted() -> None:
    assert not rig(tls=None).protocol.can_start_tls()
    implicit = rig(implicit_tls=True).protocol
    assert implicit.encrypted and not implicit.can_start_tls()


def test_line_ends_and_the_line_limit() -> None:
    r = rig(max_line=10)
    assert codes(r.feed(b"A\nB\r\n" + b"X" * 11 + b"\r\n")) == ["250", "250", "500"]
    assert r.script.lines == [b"A", b"B"]
    # A line over the limit that has not ended yet: answered once, skipped up to its end.
    assert codes(r.feed(b"Y" * 20)) == ["500"]
    assert r.feed(b"Y" * 20) == []
    assert codes(r.feed(b"YY\r\nC\r\n")) == ["250"]
    assert r.script.lines == [b"A", b"B", b"C"]


def test_data_bytes_go_to_the_sink_and_what_follows_is_commands() -> None:
    r = rig()
    assert codes(r.feed(b"DATA\r\nNOT A\r\nCOMMAND")) == ["354"]
    assert r.feed(b" ENDAFTER\r\n") == ["250 2.0.0 answer"]
    assert r.script.sink.received == b"NOT A\r\nCOMMAND "
    assert [e.size for e in r.script.ended] == [15]
    assert r.script.lines == [b"DATA", b"AFTER"]


@pytest.mark.parametrize("how", ["close", "lost"])
def test_a_half_received_message_is_aborted(how: str) -> None:
    r = rig()
    r.feed(b"DATA\r\nhalf")
    if how == "close":
        r.clock.advance(300)  # the command timeout closes the connection
        assert codes(r.replies()) == ["421"] and r.transport.disconnecting
    else:
        r.protocol.connectionLost()
        assert r.script.lost
    assert r.script.sink.aborted


def test_errors_stall_then_close() -> None:
    r = rig(soft_errors=1, hard_errors=3)
    assert codes(r.feed(b"BAD\r\nBAD\r\nBAD\r\nNEXT\r\n")) == ["550", "550"]
    assert r.script.lines == [b"BAD", b"BAD"]  # stalled for one second after the second
    r.clock.advance(1)
    assert codes(r.replies()) == ["550", "421"]
    assert r.transport.disconnecting
    assert r.script.lines == [b"BAD", b"BAD", b"BAD"]


def test_timeout_waits_while_we_are_the_slow_one() -> None:
    r = rig(command_timeout=10)
    r.feed(b"WAIT\r\n")
    r.clock.advance(25)
    assert not r.transport.disconnecting  # a pending answer is not the client's silence
    r.script.waiting[0].callback(None)
    r.clock.advance(10)
    assert codes(r.replies()) == ["421"] and r.transport.disconnecting


def test_nothing_is_read_or_written_after_close() -> None:
    r = rig()
    assert codes(r.feed(b"BYE\r\nMORE\r\n")) == ["221"]
    assert r.transport.disconnecting
    r.protocol.send(ANSWER)
    assert r.feed(b"MORE\r\n") == []
    assert r.script.lines == [b"BYE"]
    r.protocol.connectionLost()
    assert r.script.lost


def test_a_421_closes() -> None:
    r = rig()
    r.protocol.send(reply.SHUTTING_DOWN)
    assert codes(r.replies()) == ["421"] and r.transport.disconnecting


def test_tls_clienthello_on_a_plaintext_port() -> None:
    r = rig()
    assert codes(r.feed(b"\x16\x03\x01\x00")) == ["500"]
    assert r.transport.disconnecting and r.script.lines == []



# -- deadlines a trickle cannot reset (issue 18, finding 8) ---------------------------------------


def drip(r: Rig, data: bytes, every: float) -> list[str]:
    """One byte per ``every`` seconds of virtual time, until the connection closes or the
    bytes run out; every reply that came back."""
    out: list[str] = []
    for i in range(len(data)):
        if r.transport.disconnecting:
            break
        r.protocol.dataReceived(data[i : i + 1])
        r.clock.advance(every)
        out += r.replies()
    return out


def test_a_command_line_has_one_deadline_however_it_trickles() -> None:
    r = rig(command_timeout=10)
    assert codes(drip(r, b"NOOP NOOP NOOP NOOP\r\n", every=3)) == ["421"]
    assert r.clock.seconds() == 12  # closed at the 10 s mark, not pushed back by the bytes
    assert r.script.lines == []


def test_each_complete_line_starts_a_new_deadline() -> None:
    r = rig(command_timeout=10)
    for _ in range(5):
        r.clock.advance(9)
        assert codes(r.feed(b"NOOP\r\n")) == ["250"]
    r.clock.advance(9.5)
    assert not r.transport.disconnecting
    r.clock.advance(0.5)
    assert codes(r.replies()) == ["421"] and r.transport.disconnecting


def test_data_must_keep_up_the_minimum_rate_after_its_first_timeout() -> None:
    """Postfix's smtpd_min_data_rate: DATA starts with command_timeout seconds of credit;
    each byte adds 1/rate seconds, never more than command_timeout ahead."""
    r = rig(command_timeout=10, min_data_rate=100)
    r.feed(b"DATA\r\n")
    # 50 bytes/s, half the rate: each second earns 0.5 s (the first earns nothing, as the
    # credit is full), so it runs out at 10 + 0.5 * 18 = 19 s.
    for _ in range(18):
        r.protocol.dataReceived(b"x" * 50)
        r.clock.advance(1)
    assert not r.transport.disconnecting
    r.protocol.dataReceived(b"x" * 50)
    r.clock.advance(1)
    assert codes(r.replies()) == ["421"] and r.transport.disconnecting
    assert r.script.sink.aborted


def test_data_at_the_rate_goes_on_and_then_has_command_timeout() -> None:
    r = rig(command_timeout=10, min_data_rate=100)
    r.feed(b"DATA\r\n")
    for _ in range(120):  # two minutes at twice the rate
        r.protocol.dataReceived(b"x" * 200)
        r.clock.advance(1)
    assert not r.transport.disconnecting
    r.clock.advance(8.9)  # the credit never grows beyond command_timeout
    assert not r.transport.disconnecting
    r.clock.advance(0.2)
    assert codes(r.replies()) == ["421"]


def test_the_deadline_restarts_after_data() -> None:
    r = rig(command_timeout=10, min_data_rate=100)
    r.feed(b"DATA\r\n")
    r.clock.advance(9)
    assert codes(r.feed(b"END")) == []  # the sink ended it; its answer is the handler's
    r.clock.advance(9)
    assert not r.transport.disconnecting
    r.clock.advance(1)
    assert r.transport.disconnecting


def test_a_stall_is_not_the_clients_time() -> None:
    r = rig(command_timeout=10, soft_errors=0, hard_errors=100)
    r.feed(b"BAD\r\n")  # one error: the next reply is held back for 1 s
    r.clock.advance(0.5)
    r.feed(b"NEXT\r\n")
    r.clock.advance(0.5)
    assert codes(r.replies()) == ["250"]
    r.clock.advance(9.9)
    assert not r.transport.disconnecting


# -- TLS handshakes are aborted, not waited for (finding 1) ---------------------------------------


def test_a_stalled_starttls_handshake_is_aborted() -> None:
    r = rig(command_timeout=300, tls_handshake_timeout=30)
    assert codes(r.feed(b"TLS\r\n")) == ["220"]
    r.clock.advance(29)
    assert not r.transport.disconnecting
    r.clock.advance(1)
    assert r.transport.disconnected  # abortConnection: no reply, no TLS close to wait for
    assert r.replies() == []


def test_a_completed_handshake_gives_way_to_the_command_deadline() -> None:
    r = rig(command_timeout=100, tls_handshake_timeout=30)
    r.feed(b"TLS\r\n")
    r.clock.advance(10)
    r.protocol.handshakeCompleted()
    r.clock.advance(99)
    assert not r.transport.disconnecting
    r.clock.advance(1)
    assert codes(r.replies()) == ["421"] and not r.transport.disconnected


def test_implicit_tls_handshake_deadline_and_data_as_proof_of_handshake() -> None:
    r = rig(implicit_tls=True, command_timeout=5, tls_handshake_timeout=30)
    r.clock.advance(29)  # the command deadline does not run during the handshake
    assert not r.transport.disconnecting
    assert codes(r.feed(b"NOOP\r\n")) == ["250"]  # decrypted data: the handshake is done
    r.clock.advance(30)
    assert codes(r.replies()) == ["421"] and not r.transport.disconnected

    silent = rig(implicit_tls=True, tls_handshake_timeout=30)
    silent.clock.advance(30)
    assert silent.transport.disconnected


def test_closing_during_a_handshake_aborts_at_once() -> None:
    """A client refused on port 465 cannot be sent its 421 before the handshake."""
    r = rig(implicit_tls=True)
    r.protocol.close(reply.TOO_MANY_CONNECTIONS)
    assert r.transport.disconnected and r.replies() == []
    r.protocol.connectionLost()
    assert r.script.lost


# -- closing is bounded (finding 2) --------------------------------------------------------------


def test_a_close_gives_the_last_reply_a_bounded_time() -> None:
    r = rig()
    assert codes(r.feed(b"BYE\r\n")) == ["221"]
    assert r.transport.disconnecting and not r.transport.disconnected
    assert r.transport.producer is None  # unregistered, or a TLS close would never start
    r.clock.advance(CLOSE_FLUSH)
    assert r.transport.disconnected  # the client did not take it: aborted


def test_a_close_that_completes_cancels_the_abort() -> None:
    r = rig()
    r.feed(b"BYE\r\n")
    r.protocol.connectionLost()
    r.clock.advance(CLOSE_FLUSH)
    assert not r.transport.disconnected
    assert r.clock.getDelayedCalls() == []


# -- output flow control (finding 3) ---------------------------------------------------------------


class BoundedTransport(TLSStringTransport):
    """Like a TCP transport: pauses its producer while more than ``limit`` bytes are unsent
    (``value()``); :meth:`drain` sends them and resumes it."""

    limit = 65536

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.limit and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        sent: bytes = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return sent


def bounded_rig(**settings: Any) -> tuple[SMTPTransport, BoundedTransport, Clock]:
    clock = Clock()
    options = {"command_timeout": 300, "soft_errors": 10, "hard_errors": 20}
    protocol = SMTPTransport(
        TransportSettings(**{**options, **settings}), clock, MailLog(clock), Script
    )
    transport = BoundedTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 1234))
    protocol.makeConnection(transport)
    return protocol, transport, clock


def flood(protocol: SMTPTransport, transport: BoundedTransport, clock: Clock, total: int) -> int:
    """Feed pipelined commands in 64 KiB reads, as a reactor would: only while the transport
    is reading, with the reactor's turns in between. Returns the bytes the client got in."""
    chunk, fed = b"HELP\r\n" * 10922, 0
    for _ in range(10_000):
        if fed >= total:
            break
        if transport.producerState == "producing":
            protocol.dataReceived(chunk)
            fed += len(chunk)
        elif not clock.getDelayedCalls() or all(c.getTime() > clock.seconds()
                                                 for c in clock.getDelayedCalls()):
            break  # paused, and nothing left to do this turn: the client is stuck
        clock.advance(0)
    return fed


def test_a_client_that_does_not_read_makes_us_hold_a_bounded_amount() -> None:
    """Ten megabytes of pipelined commands, replies never read: the output stops at the
    transport's bound, the input at max_buffer; draining lets it all go on in order."""
    protocol, transport, clock = bounded_rig()
    fed = flood(protocol, transport, clock, 10_000_000)
    assert fed < 200_000  # we stopped reading
    assert transport.producerState == "paused"
    assert 65536 < len(transport.value()) < 65536 + 200
    handled = len(protocol._handler.lines)  # type: ignore[attr-defined]
    assert handled * len(ANSWER.to_bytes()) < 65536 + 200  # the rest wait for their replies
    sent = transport.drain()
    clock.advance(0)
    sent += transport.drain()
    assert len(protocol._handler.lines) > handled  # type: ignore[attr-defined]
    assert sent.count(b"\r\n") == len(sent) // len(ANSWER.to_bytes())


def test_a_long_pipeline_is_handled_a_batch_per_reactor_turn() -> None:
    """Fairness: one client's thousand pipelined commands do not hold the reactor; the rest
    of the batch waits for the next turn, in order."""
    r = rig()
    assert len(r.feed(b"NOOP\r\n" * 1000)) == LINES_PER_TURN
    assert r.clock.getDelayedCalls()[0].getTime() == r.clock.seconds()  # the next turn
    r.clock.advance(0)  # (a Clock runs every turn due at once; a reactor polls in between)
    assert len(r.replies()) == 1000 - LINES_PER_TURN
    assert len(r.script.lines) == 1000


def test_output_full_stops_the_commands_and_the_deadline_still_runs() -> None:
    protocol, transport, clock = bounded_rig(command_timeout=10)
    transport.clear()
    transport.producer.pauseProducing()  # type: ignore[union-attr]
    protocol.dataReceived(b"ONE\r\nTWO\r\n")
    assert protocol._handler.lines == []  # type: ignore[attr-defined]
    assert transport.producerState == "producing"  # small input: still reading (TLS needs it)
    clock.advance(10)  # not reading its replies is the client's time
    assert transport.value().startswith(b"421 4.4.2")
    clock.advance(CLOSE_FLUSH)
    assert transport.disconnected


def test_the_session_registers_as_a_streaming_producer() -> None:
    protocol, transport, _ = bounded_rig()
    assert transport.producer is protocol and transport.streaming
