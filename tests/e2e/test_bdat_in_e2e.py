"""CHUNKING and REQUIRETLS on the way in, end to end: ``twistd -n smarthost`` takes messages sent
with pipelined ``BDAT`` chunks over a raw socket (tests/smtpwire.py) and delivers them, byte
for byte, to tests/chunkmx.py's MX, once by BDAT and once by DATA (dot-stuffed on the way and
unstuffed there); a message sent with REQUIRETLS after STARTTLS is stored with the flag,
survives a restart of the daemon, and goes out only over verified TLS saying REQUIRETLS.

The REQUIRETLS daemon holds every message after the first of the hour from the client
(``hold_user_after_per_hour = 1``): the second waits in the spool across the restart until
``smarthost queue release``, so what is delivered then was read back from the disk.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkmx import ChunkMX, Message
from daemon import Daemon, dns_server
from smarthost.app.tlscert import issue
from smtpwire import Wire, bdat, without_trace

# Octets that mean something to DATA or to a command parser, a line of only a dot, 8-bit text:
# all of it is content in a chunk, and must come out the other end unchanged.
BODY = (b"From: office@example.test\r\nTo: bob@chunk.test\r\nSubject: chunks\r\n\r\n"
        b"first line\r\n.\r\nQUIT\r\nMAIL FROM:<evil@example.test>\r\n"
        b"..two dots\r\n.\r\n\xc3\xa9t\xc3\xa9 8-bit \xe2\x82\xac\r\n")


class World:
    """The MX peers (CHUNKING, DATA only, and a verified-TLS one offering REQUIRETLS), a test
    CA, and a DNS server naming the TLS one's host."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = issue(("smarthost BDAT test CA",), is_ca=True)
        (directory / "ca.pem").write_bytes(self.ca.cert_pem)
        pair = issue(("mx.secure.test",), ca=self.ca)
        (directory / "mx.pem").write_bytes(pair.cert_pem)
        (directory / "mx.key").write_bytes(pair.key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(directory / "mx.pem", directory / "mx.key")
        self.chunking = ChunkMX()
        self.data_only = ChunkMX(extensions=("PIPELINING", "8BITMIME"))
        self.secure = ChunkMX(tls=context, requiretls=True)
        self.peers = (self.chunking, self.data_only, self.secure)
        for peer in self.peers:
            peer.start()

    def stop(self) -> None:
        for peer in self.peers:
            peer.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("bdat-world"))
    try:
        yield w
    finally:
        w.stop()


def started(directory: Path, world: World, hold_after: int) -> Iterator[Daemon]:
    with dns_server("mx.secure.test A 127.0.0.1\n", directory) as dns:
        config = f"""
[tls]
ca_file = "{world.directory / 'ca.pem'}"
[relay]
local_domains = ["example.test"]
trusted_networks = ["127.0.0.1/32"]
[limits]
hold_user_after_per_hour = {hold_after}
[queue]
retry = [3600]
lifetime = 86400
delay_warning = 0
[delivery]
nameservers = ["127.0.0.1:{dns}"]
[delivery.routes]
"chunk.test" = "smtp:127.0.0.1:{world.chunking.port}"
"data.test" = "smtp:127.0.0.1:{world.data_only.port}"
"secure.test" = "smtp:mx.secure.test:{world.secure.port}"
[delivery.tls_policy]
"secure.test" = "verify"
"""
        d = Daemon(directory, config)
        d.start()
        try:
            yield d
        finally:
            d.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Daemon]:
    yield from started(tmp_path_factory.mktemp("bdat-in"), world, 5000)


@pytest.fixture(scope="module")
def holding(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Daemon]:
    yield from started(tmp_path_factory.mktemp("requiretls-in"), world, 1)


def send(daemon: Daemon, data: bytes, replies: int, *, starttls: bool = False) -> list[bytes]:
    """``data`` pipelined in one write after EHLO (and STARTTLS): the last lines of the
    ``replies`` replies it gets."""
    wire = Wire(daemon.ports["submission"])  # trusted networks relay on submission
    try:
        assert wire.reply()[0].startswith(b"220 ")
        ehlo = wire.command(b"EHLO client.test")
        assert b"250-CHUNKING" in ehlo or b"250 CHUNKING" in ehlo, ehlo
        if starttls:
            wire.starttls()
            assert b"250 REQUIRETLS" in wire.command(b"EHLO client.test")
        wire.send(data)
        got = wire.replies(replies)
        assert wire.command(b"QUIT")[-1].startswith(b"221")
        return got
    finally:
        wire.close()


def queued_as(reply: bytes) -> str:
    assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
    return reply.rsplit(b" ", 1)[1].decode()


def held(daemon: Daemon) -> list[str]:
    result = daemon.admin("queue", "--config", str(daemon.config_path), "list", "--json")
    assert result.returncode == 0, result.stderr
    return [e["id"] for e in json.loads(result.stdout) if e["held"]]


def release(daemon: Daemon, queue_id: str) -> None:
    result = daemon.admin("queue", "--config", str(daemon.config_path), "release", queue_id)
    assert result.returncode == 0, result.stderr


def wait_message(peer: ChunkMX, recipient: str, timeout: float = 30) -> Message:
    """The first message ``peer`` got for ``recipient``. chunkmx records from its own thread
    and signals nothing, so this is a bounded poll (a deadline, 50 ms apart)."""
    pause = threading.Event()
    for _ in range(int(timeout * 20)):
        for message in list(peer.messages):
            if any(recipient in rcpt for rcpt in message.rcpt_tos):
                return message
        pause.wait(0.05)
    raise AssertionError(f"no message for {recipient} at the MX after {timeout} s: "
                         f"{peer.commands}")


@pytest.mark.parametrize(("domain", "chunked"), [("chunk.test", True), ("data.test", False)])
def test_bdat_message_is_stored_and_delivered_byte_identical(
    world: World, daemon: Daemon, domain: str, chunked: bool
) -> None:
    """Three chunks, the cuts inside a CRLF and inside a UTF-8 sequence, all in one write."""
    cut1, cut2 = BODY.index(b"\r\n.\r\n") + 1, BODY.index(b"\xe2\x82") + 1
    envelope = b"MAIL FROM:<office@example.test>\r\nRCPT TO:<bob@%s>\r\n" % domain.encode()
    replies = send(daemon, envelope + bdat(BODY[:cut1], BODY[cut1:cut2], BODY[cut2:]), 5)
    assert [r[:9] for r in replies[:4]] == [b"250 2.1.0", b"250 2.1.5", b"250 2.0.0",
                                            b"250 2.0.0"], replies
    queue_id = queued_as(replies[4])
    peer = world.chunking if chunked else world.data_only
    message = wait_message(peer, f"bob@{domain}")
    assert message.chunked is chunked
    assert without_trace(message.data) == BODY
    assert f" id {queue_id}".encode() in message.data.split(b"\r\n\r\n")[0]


def requiretls_to(recipient: bytes) -> bytes:
    return (b"MAIL FROM:<office@example.test> REQUIRETLS\r\nRCPT TO:<%s>\r\n" % recipient
            + bdat(BODY))


def test_requiretls_after_starttls_is_stored_and_honoured_after_a_restart(
    world: World, holding: Daemon
) -> None:
    # Not on a plaintext session (RFC 8689: offered only after TLS): 530 5.7.10; RCPT and
    # the chunk (read all the same) then have no transaction.
    refused = send(holding, requiretls_to(b"nobody@secure.test"), 3)
    assert [r[:10] for r in refused] == [b"530 5.7.10", b"503 5.5.1 ", b"503 5.5.1 "], refused
    # After STARTTLS: the first goes out at once, over verified TLS, saying REQUIRETLS.
    first = queued_as(send(holding, requiretls_to(b"carol@secure.test"), 3, starttls=True)[2])
    message = wait_message(world.secure, "carol@secure.test")
    assert message.tls and message.mail_from.endswith(" REQUIRETLS"), message.mail_from
    assert without_trace(message.data) == BODY
    # The second is held: across a restart only the spool remembers its REQUIRETLS.
    second = queued_as(send(holding, requiretls_to(b"dave@secure.test"), 3, starttls=True)[2])
    assert held(holding) == [second] and first != second
    holding.stop()
    holding.start()
    release(holding, second)
    message = wait_message(world.secure, "dave@secure.test")
    assert message.tls and message.mail_from.endswith(" REQUIRETLS"), message.mail_from
    assert without_trace(message.data) == BODY
