"""Write-through on real loopback TCP: :class:`SMTPTransport` on the reactor, with a scripted
handler (each line answered with a reply naming it, so order shows), and raw blocking clients
in threads. The replies must arrive byte for byte and in order whether the kernel took them at
once, took part (a client that does not read), or they went through TLS; the replies to one
pipelined batch must leave in one TCP segment; and a peer that reset the connection must end
it as Twisted would. The same for our client's commands and message bodies
(:class:`~smarthost.delivery.smtpclient.ClientConnection`) against a raw listening socket."""

from __future__ import annotations

import io
import shutil
import socket
import ssl
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from smarthost.app import tlscert
from smarthost.core import replies as reply
from smarthost.core.maillog import MailLog
from smarthost.core.replies import Reply
from smarthost.core.writethrough import can_write_through
from smarthost.delivery.smtpclient import CHUNK, ClientConnection, QuietFactory
from smarthost.smtpd.channel import Channel, Handler
from smarthost.smtpd.listen import server_tls_options
from smarthost.smtpd.transport import SMTPTransport, TransportSettings
from smtpwire import TIMEOUT

T = TypeVar("T")
PAD = "x" * 100  # long replies: the output outgrows the socket buffers quickly


def answer(line: bytes) -> Reply:
    return Reply(250, "2.0.0", f"{line.decode()} {PAD}")


class Echo:
    """Answers each line with a reply naming it; ``WAIT`` is answered on the reactor's next
    turn (an asynchronous answer), ``TLS`` starts TLS."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.lost: Deferred[None] = Deferred()

    def connected(self) -> None:
        self.channel.send(reply.greeting("mx.test"))

    def line_received(self, line: bytes) -> None:
        if line == b"TLS":
            self.channel.send(reply.READY_TLS)
            self.channel.start_tls()
        elif line == b"WAIT":
            self.channel.answer_later(self._later(line))
        else:
            self.channel.send(answer(line))

    async def _later(self, line: bytes) -> Reply:
        d: Deferred[None] = Deferred()
        reactor.callLater(0, d.callback, None)
        await d
        return answer(line)

    def connection_lost(self) -> None:
        self.lost.callback(None)


class Observed(SMTPTransport):
    """Tells the test when the transport's buffer filled (it paused us)."""

    full: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        if self.full is not None:
            full, self.full = self.full, None
            full.callback(None)
        super().pauseProducing()


class Servers(ServerFactory):
    def __init__(self, tls: Any) -> None:
        self.tls = tls
        self.built: list[tuple[Observed, Echo]] = []
        self.connected: Deferred[None] = Deferred()

    def buildProtocol(self, addr: Any) -> Observed:
        handlers: list[Echo] = []

        def handler(channel: Channel) -> Handler:
            handlers.append(Echo(channel))
            return handlers[-1]

        settings = TransportSettings(command_timeout=60, soft_errors=100, hard_errors=200,
                                     tls=self.tls)
        protocol = Observed(settings, reactor, MailLog(reactor), handler)
        self.built.append((protocol, handlers[0]))
        return protocol


def expected(lines: list[bytes]) -> bytes:
    return b"".join(answer(line).to_bytes() for line in lines)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        assert chunk, f"connection ended after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


GREETING = reply.greeting("mx.test").to_bytes()


def data_segments_out(connection: tcp.Connection) -> int:
    """Linux's count of data segments the socket sent (tcp_info.tcpi_data_segs_out)."""
    info = connection.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < 160:
        raise SkipTest("this kernel's tcp_info has no tcpi_data_segs_out (Linux 4.6+)")
    return int(struct.unpack_from("I", info, 156)[0])


class WriteThroughTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="smarthost-writethrough-"))
        self.addCleanup(shutil.rmtree, directory, True)
        pair = tlscert.issue(("mx.test",))
        tlscert.write_pair(pair, directory / "cert.pem", directory / "key.pem")
        self.factory = Servers(server_tls_options(directory / "cert.pem", directory / "key.pem"))
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = port.getHost().port  # type: ignore[attr-defined]
        self.addCleanup(self._stop, port)

    async def _stop(self, port: Any) -> None:
        await port.stopListening()
        for protocol, _ in self.factory.built:
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]

    def connect(self, **options: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        for name, value in options.items():
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, name), value)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", self.port))
        return sock

    async def in_thread(self, work: Callable[[], T]) -> T:
        return await deferToThread(work)

    def server(self) -> tuple[Observed, Echo, tcp.Connection]:
        protocol, handler = self.factory.built[-1]
        assert isinstance(protocol.transport, tcp.Connection)
        return protocol, handler, protocol.transport

    async def test_replies_to_a_pipelined_batch_leave_in_one_segment(self) -> None:
        sock = self.connect()
        assert await self.in_thread(lambda: read_exactly(sock, len(GREETING))) == GREETING
        _, _, connection = self.server()
        connection.setTcpNoDelay(True)  # so that separate sends would be separate segments
        before = data_segments_out(connection)
        lines = [b"ONE", b"WAIT", b"TWO", b"THREE"]  # an asynchronous answer in the middle
        sock.sendall(b"".join(line + b"\r\n" for line in lines))
        want = expected(lines)
        assert await self.in_thread(lambda: read_exactly(sock, len(want))) == want
        # ONE is answered in the batch of input that WAIT ends; WAIT's answer, TWO's and
        # THREE's in the batch that WAIT's answer resumes.
        assert data_segments_out(connection) - before == 2

    async def test_a_client_that_does_not_read_gets_every_reply_in_order(self) -> None:
        """The kernel takes part of a batch, the transport queues the rest and pauses us;
        once the client reads, everything arrives, in order."""
        sock = self.connect(SO_RCVBUF=4096)
        assert await self.in_thread(lambda: read_exactly(sock, len(GREETING))) == GREETING
        protocol, _, connection = self.server()
        connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        full: Deferred[None] = Deferred()
        protocol.full = full
        lines = [b"L%05d" % i for i in range(3000)]  # about 400 KB of replies
        sock.sendall(b"".join(line + b"\r\n" for line in lines))
        await full  # the transport's buffer is full: the direct path is off now
        assert not can_write_through(connection)
        want = expected(lines)
        got = await self.in_thread(lambda: read_exactly(sock, len(want)))
        assert got == want
        assert can_write_through(connection)  # drained: direct again

    async def test_starttls_replies_go_through_tls(self) -> None:
        sock = self.connect()

        def talk() -> bytes:
            assert read_exactly(sock, len(GREETING)) == GREETING
            sock.sendall(b"TLS\r\n")
            ready = reply.READY_TLS.to_bytes()
            assert read_exactly(sock, len(ready)) == ready
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            secure = context.wrap_socket(sock, server_hostname="mx.test")
            secure.sendall(b"ONE\r\nWAIT\r\nTWO\r\n")
            return read_exactly(secure, len(expected([b"ONE", b"WAIT", b"TWO"])))

        assert await self.in_thread(talk) == expected([b"ONE", b"WAIT", b"TWO"])
        _, _, connection = self.server()
        assert connection.TLS and not can_write_through(connection)

    async def test_a_reset_peer_ends_the_connection_without_an_error_in_the_session(
        self,
    ) -> None:
        sock = self.connect()
        assert await self.in_thread(lambda: read_exactly(sock, len(GREETING))) == GREETING
        protocol, handler, connection = self.server()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, which loopback delivers before close() returns
        assert can_write_through(connection)  # the reactor has not noticed yet
        protocol.send(answer(b"AFTER"))  # the direct send fails; nothing may be raised here
        await handler.lost
        assert not connection.connected


class Connected(ClientConnection):
    """Tells the test when the connection is up."""

    def __init__(self) -> None:
        super().__init__(reactor, "127.0.0.1")
        self.up: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        super().connectionMade()
        self.up.callback(None)


def stuffed(body: bytes) -> bytes:
    """RFC 5321 4.5.2 on the whole body at once, and the terminator (the body ends in CRLF)."""
    return (b"\n" + body).replace(b"\n.", b"\n..")[1:] + b".\r\n"


def read_until_end(sock: socket.socket, size: int) -> bytes:
    data = read_exactly(sock, size)
    sock.settimeout(0.0)
    try:
        extra = sock.recv(1)
    except BlockingIOError:
        extra = b""
    assert extra == b"", "more bytes than expected"
    return data


class ClientWriteThroughTests(TestCase):
    timeout = 60

    async def dial(self, small_buffers: bool = False) -> tuple[Connected, socket.socket]:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        if small_buffers:  # before listen(): the accepted socket's window is small from the start
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(TIMEOUT)
        client = Connected()
        connector = reactor.connectTCP(
            "127.0.0.1", listener.getsockname()[1], QuietFactory(client)
        )
        self.addCleanup(connector.disconnect)
        peer, _ = await self.in_thread(listener.accept)
        self.addCleanup(peer.close)
        peer.settimeout(TIMEOUT)
        await client.up
        if small_buffers:
            assert isinstance(client.transport, tcp.Connection)
            client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return client, peer

    async def in_thread(self, work: Callable[[], T]) -> T:
        return await deferToThread(work)

    async def test_commands_and_a_small_body_go_out_in_one_send_each(self) -> None:
        client, peer = await self.dial()
        connection = client.transport
        assert isinstance(connection, tcp.Connection)
        connection.setTcpNoDelay(True)  # so that separate sends would be separate segments
        before = data_segments_out(connection)
        client.send("MAIL FROM:<a@example.test>", "RCPT TO:<b@example.test>", "DATA")
        commands = b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
        assert await self.in_thread(lambda: read_exactly(peer, len(commands))) == commands
        assert data_segments_out(connection) - before == 1
        body = b"Subject: small\r\n\r\n.a line with a dot\r\n" * 50
        await Deferred.fromCoroutine(client.send_body(io.BytesIO(body), 10.0))
        want = stuffed(body)
        assert await self.in_thread(lambda: read_until_end(peer, len(want))) == want
        assert data_segments_out(connection) - before == 2  # body and terminator together

    async def test_a_big_body_to_a_slow_reader_arrives_whole_and_in_order(self) -> None:
        """Chunks the kernel takes only in part; dots at a chunk boundary; the peer reads
        only after the client has filled every buffer."""
        client, peer = await self.dial(small_buffers=True)
        line = b"%06d .dotted after the number, then a line that starts with one:\r\n.x\r\n"
        body = b"".join(line % i for i in range(40_000))  # about 2.8 MB: many chunks
        body = body[:CHUNK - 2] + b"\r\n.at a chunk boundary\r\n" + body[CHUNK - 2:]
        sending = Deferred.fromCoroutine(client.send_body(io.BytesIO(body), 10.0))
        want = stuffed(body)
        assert not sending.called  # the kernel's buffers are full: the client waits
        got = await self.in_thread(lambda: read_until_end(peer, len(want)))
        await sending
        assert got == want
