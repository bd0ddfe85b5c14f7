"""The transport alone, driving a scripted handler instead of the SMTP commands: reply order
under pipelining, the STARTTLS buffer discard, line limits, the DATA byte stream, error stalls,
timeouts and closing."""

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
from smarthost.smtpd.transport import SMTPTransport, TransportSettings

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

