"""Write-through on a real ``tcp.Connection`` over a Unix socket pair (no network; Twisted's
TCP code does not care about the address family), with a ``MemoryReactorClock`` recording
whether the connection asked to be written later. Also pins the Twisted private attributes that
:mod:`smarthost.core.writethrough` reads: if an upgrade renames or repurposes one of them, the
first tests here fail, rather than write-through going quietly wrong."""

from __future__ import annotations

import inspect
import socket
from collections.abc import Iterator
from typing import cast

import pytest
from twisted.internet import abstract, main, ssl, tcp
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPullProducer, IPushProducer, ITransport
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from smarthost.app.meters import _Counted
from smarthost.core.writethrough import can_write_through, write_through
from smarthost.smtpd.listen import ProxyFactory, _ProxiedConnection


class Pair:
    """A connected ``tcp.Connection`` (our side) and the raw socket of its peer."""

    def __init__(self) -> None:
        ours, self.peer = socket.socketpair()
        ours.setblocking(False)
        self.peer.settimeout(5.0)
        self.reactor = MemoryReactorClock()
        self.protocol = Protocol()
        self.conn = tcp.Connection(ours, self.protocol, self.reactor)
        self.conn.connected = 1
        self.protocol.makeConnection(self.conn)

    @property
    def armed(self) -> bool:
        """Whether the connection asked the reactor for a doWrite."""
        return self.conn in self.reactor.getWriters()

    def drain(self, expected: int) -> bytes:
        """Read ``expected`` bytes from the peer, running the connection's doWrite whenever
        it has bytes buffered (what the reactor would do)."""
        got = bytearray()
        while len(got) < expected:
            if self.armed:
                assert self.conn.doWrite() is None
            got += self.peer.recv(1 << 20)
        return bytes(got)

    def close(self) -> None:
        self.conn.socket.close()
        self.peer.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


# -- the Twisted internals relied on --------------------------------------------------------


def test_the_twisted_attributes_write_through_reads_are_still_there(pair: Pair) -> None:
    fd = abstract.FileDescriptor
    assert (fd.dataBuffer, fd.offset, fd.disconnecting, fd.connected) == (b"", 0, 0, 0)
    assert (fd._writeDisconnecting, fd._writeDisconnected) == (False, False)
    assert (tcp.Connection.TLS, tcp.Connection._aborting) == (False, False)
    conn = pair.conn
    assert (conn._tempDataBuffer, conn._tempDataLen) == ([], 0)
    assert (conn.producer, conn.streamingProducer, conn.producerPaused) == (None, False, False)
    # write() queues in _tempDataBuffer/_tempDataLen and arms the descriptor; doWrite moves
    # it through dataBuffer/offset and leaves both empty once the kernel took it all.
    conn.write(b"abc")
    assert (conn._tempDataLen, conn.dataBuffer, pair.armed) == (3, b"", True)
    assert conn.doWrite() is None
    assert (conn._tempDataLen, conn.dataBuffer, conn.offset, pair.armed) == (0, b"", 0, False)
    assert pair.peer.recv(10) == b"abc"
    doWrite = inspect.getsource(abstract.FileDescriptor.doWrite)
    for name in ("self._tempDataLen", "self.dataBuffer", "self.offset", "self.producerPaused",
                 "self.streamingProducer", "self._writeDisconnecting", "self.disconnecting"):
        assert name in doWrite, name


def test_a_send_error_is_reported_as_twisted_reports_it(pair: Pair) -> None:
    """writeSomeData returns what the kernel took, 0 when it takes nothing, and an exception
    (not raised) when the connection is gone: write_through relies on all three."""
    assert pair.conn.writeSomeData(b"xy") == 2
    pair.peer.close()
    assert isinstance(pair.conn.writeSomeData(b"z"), ConnectionLost)


def test_state_flags_are_set_where_write_through_looks(pair: Pair) -> None:
    pair.conn.loseWriteConnection()
    assert pair.conn._writeDisconnecting
    other = Pair()
    try:
        other.conn.abortConnection()
        assert other.conn._aborting
    finally:
        other.close()


def test_protocol_wrapper_passes_writes_on_unchanged() -> None:
    assert "self.transport.write(data)" in inspect.getsource(ProtocolWrapper.write)
    assert TLSMemoryBIOProtocol.write is not ProtocolWrapper.write  # it encrypts
    assert _Counted.write is ProtocolWrapper.write
    assert _ProxiedConnection.write is ProtocolWrapper.write


# -- the direct path --------------------------------------------------------------------------


def test_an_empty_connection_sends_at_once_without_arming(pair: Pair) -> None:
    assert can_write_through(pair.conn)
    write_through(pair.conn, b"250 ok\r\n")
    assert not pair.armed
    assert pair.conn._tempDataLen == 0
    assert pair.peer.recv(100) == b"250 ok\r\n"


def test_what_the_kernel_does_not_take_is_queued_behind_in_order(pair: Pair) -> None:
    """The peer does not read: the first write fills the socket buffer, the rest of it and
    every later write queue in the transport, and all of it arrives in order."""
    pair.conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    chunks = [b"%07d " % i * 20_000 for i in range(20)]  # 160 KB each, numbered
    write_through(pair.conn, chunks[0])
    assert pair.armed and pair.conn._tempDataLen > 0  # partial: the rest is buffered
    assert not can_write_through(pair.conn)
    for chunk in chunks[1:]:
        write_through(pair.conn, chunk)
    expected = b"".join(chunks)
    assert pair.drain(len(expected)) == expected
    assert not pair.armed and can_write_through(pair.conn)


def test_a_closed_peer_ends_the_connection_as_twisted_would(pair: Pair) -> None:
    """The direct send fails (EPIPE): nothing is raised, the bytes go to the transport, and
    its doWrite meets the same error and reports the connection lost."""
    pair.peer.close()
    write_through(pair.conn, b"221 bye\r\n")
    assert pair.armed
    assert isinstance(pair.conn.doWrite(), ConnectionLost)


def test_an_empty_write_does_nothing(pair: Pair) -> None:
    write_through(pair.conn, b"")
    assert not pair.armed and pair.conn._tempDataLen == 0


# -- every case that falls back to transport.write --------------------------------------------


def test_buffered_output_goes_behind_the_buffer(pair: Pair) -> None:
    pair.conn.write(b"first ")
    write_through(pair.conn, b"second")
    assert pair.conn._tempDataLen == 12
    assert pair.drain(12) == b"first second"


def test_no_direct_send_while_tls_is_on(pair: Pair) -> None:
    pair.conn.TLS = True  # what STARTTLS sets (tests/integration: a real STARTTLS)
    assert not can_write_through(pair.conn)


@pytest.mark.parametrize("state", ["disconnecting", "aborting", "half-closed", "not connected"])
def test_no_direct_send_on_a_closing_connection(pair: Pair, state: str) -> None:
    if state == "disconnecting":
        pair.conn.loseConnection()
    elif state == "aborting":
        pair.conn.abortConnection()
    elif state == "half-closed":
        pair.conn.loseWriteConnection()
    else:
        pair.conn.connected = 0
    assert not can_write_through(pair.conn)


@implementer(IPushProducer)
class Push:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IPullProducer)
class Pull:
    def __init__(self) -> None:
        self.asked = 0

    def resumeProducing(self) -> None:
        self.asked += 1

    def stopProducing(self) -> None:
        pass


def test_a_push_producer_allows_it_until_the_transport_paused_it(pair: Pair) -> None:
    pair.conn.registerProducer(Push(), True)
    assert can_write_through(pair.conn)
    pair.conn.producerPaused = True
    assert not can_write_through(pair.conn)


def test_a_pull_producer_keeps_the_buffered_path(pair: Pair) -> None:
    """A pull producer is asked for more by doWrite: bypassing it would stall it."""
    pair.conn.registerProducer(Pull(), False)
    assert not can_write_through(pair.conn)


def test_plain_wrappers_are_looked_through(pair: Pair) -> None:
    counted = _Counted(WrappingFactory(None), Protocol())
    counted.makeConnection(pair.conn)
    wrapper = _ProxiedConnection(ProxyFactory(None, pair.reactor), Protocol())  # type: ignore[arg-type]
    wrapper.transport = cast(ITransport, counted)  # what makeConnection sets, without its timer
    proxied = cast(ITransport, wrapper)
    assert can_write_through(proxied)
    write_through(proxied, b"through two wrappers")
    assert not pair.armed
    assert pair.peer.recv(100) == b"through two wrappers"
    counted.disconnecting = 1
    assert not can_write_through(proxied)


def test_tls_wrappers_and_other_transports_are_not(pair: Pair) -> None:
    factory = TLSMemoryBIOFactory(ssl.CertificateOptions(), False, WrappingFactory(None))
    tls = TLSMemoryBIOProtocol(factory, Protocol())
    tls.transport = pair.conn
    assert not can_write_through(cast(ITransport, tls))
    assert not can_write_through(StringTransport())
    assert not can_write_through(None)
    other = StringTransport()
    write_through(other, b"kept")
    assert other.value() == b"kept"


def test_connection_done_is_what_a_finished_close_reports(pair: Pair) -> None:
    """loseConnection after a direct send: nothing is buffered, so doWrite ends it at once
    (what close() after a final reply relies on)."""
    write_through(pair.conn, b"221 bye\r\n")
    pair.conn.loseConnection()
    assert pair.conn.doWrite() is main.CONNECTION_DONE
    assert pair.peer.recv(100) == b"221 bye\r\n"
