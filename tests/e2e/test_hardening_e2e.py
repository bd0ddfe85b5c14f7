"""Hardening II (issue 18), receiving side, against a real ``twistd`` over real sockets: no
anonymous client may stall, flood or confuse the server. One daemon serves every test but the
full-disk one; each test uses client addresses of its own (127.0.0.x, and IPv6 addresses
carried in PROXY headers on the ``smtp`` listener), so the per-address limits of one test never
touch another. The first test fills the whole-server connection limit, so it runs first.

Every wait is bounded: a socket timeout, ``select`` on the socket with a deadline, or the
daemon's own log lines.
"""

from __future__ import annotations

import os
import select
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import Daemon, client_tls

CONFIG = """\
hostname = "mx.smarthost.test"
[listen]
submission = ["tcp:0:interface=127.0.0.1"]
submissions = ["tcp:0:interface=127.0.0.1"]
smtp = ["haproxy:tcp:0:interface=127.0.0.1"]
[http]
listen = ["tcp:0:interface=127.0.0.1"]
[relay]
local_domains = ["example.test"]
[delivery]
nameservers = ["127.0.0.1:9"]
[limits]
connections = 6
connections_per_ip = 3
command_timeout = 2
tls_handshake_timeout = 3
messages_per_ip_per_hour = 2
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("hardening"))
    d.config_path.write_text(CONFIG)  # our own [listen]: smtp behind the PROXY protocol
    d.start()
    yield d
    d.stop()


# -- helpers ---------------------------------------------------------------------------------


def connect(port: int, source: str, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))


def reply(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """One whole reply (the last line has a space after the code)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] == b" ":
            return data


def command(sock: socket.socket | ssl.SSLSocket, line: bytes) -> bytes:
    sock.sendall(line + b"\r\n")
    return reply(sock)


def wait_closed(sock: socket.socket, deadline: float) -> bytes:
    """Read until the server closes (EOF or reset) and return what it sent; fail at the
    deadline (time.monotonic())."""
    received = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"still open; received {received[-200:]!r}"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return received
        except TimeoutError:
            continue
        if not chunk:
            return received
        received += chunk


def proxied(port: int, source: str) -> socket.socket:
    """A connection to the smtp listener, as HAProxy would make it for ``source``."""
    sock = connect(port, "127.0.0.1")
    family = "TCP6" if ":" in source else "TCP4"
    destination = "::1" if family == "TCP6" else "127.0.0.1"
    sock.sendall(f"PROXY {family} {source} {destination} 40000 25\r\n".encode())
    return sock


def client_hello() -> bytes:
    """The first flight of a real TLS client."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_tls().wrap_bio(incoming, outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def rss(daemon: Daemon) -> int:
    """The daemon's resident memory in bytes, from /proc."""
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def anonymous_mail(port: int, source: str, rcpt_options: tuple[str, ...] = ()) -> tuple[int, int]:
    """One message to a local domain without AUTH: (MAIL code, RCPT code or 0)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        code, _ = s.mail("someone@remote.test")
        if code != 250:
            return code, 0
        rcpt, _ = s.rcpt("postmaster@example.test", rcpt_options)
        if rcpt == 250:
            code, _ = s.data(b"Subject: hi\r\n\r\nhello\r\n")
        return code, rcpt


# -- 1. stalled TLS handshakes are aborted ------------------------------------------------------


def test_stalled_tls_handshakes_are_aborted_and_free_the_server(daemon: Daemon) -> None:
    """Finding 1: six clients (the whole server's limit) that stall a TLS handshake, after
    STARTTLS or on port 465 with no or half a ClientHello, hold every connection slot only until
    tls_handshake_timeout (3 s); then a new client is greeted again."""
    start = time.monotonic()
    stalled = []
    for source in ("127.0.0.11", "127.0.0.12"):
        s = connect(daemon.ports["submission"], source)
        assert reply(s).startswith(b"220")
        assert command(s, b"EHLO x").startswith(b"250")
        assert command(s, b"STARTTLS").startswith(b"220")
        stalled.append(s)  # and then nothing: no ClientHello
    for source in ("127.0.0.11", "127.0.0.12"):
        stalled.append(connect(daemon.ports["submissions"], source))  # silent
    hello = client_hello()
    for source in ("127.0.0.13", "127.0.0.13"):
        s = connect(daemon.ports["submissions"], source)
        s.sendall(hello[: len(hello) // 2])  # half a ClientHello
        stalled.append(s)
    try:
        fresh = connect(daemon.ports["submission"], "127.0.0.14")
        assert reply(fresh).startswith(b"421 4.7.0")  # every slot is taken, for now
        fresh.close()
        for s in stalled:
            wait_closed(s, start + 12)
    finally:
        for s in stalled:
            s.close()
    with connect(daemon.ports["submission"], "127.0.0.14") as fresh:
        assert reply(fresh).startswith(b"220")


# -- 2. a connection refused by a limit is closed at once ---------------------------------------


def test_refused_connections_are_closed_at_once_on_every_listener(daemon: Daemon) -> None:
    """Finding 2: beyond connections_per_ip, a client gets its 421 (or, on port 465 before
    any handshake, just the close) at once, so one address cannot pile up silent sockets."""
    port = daemon.ports["submissions"]
    held = [client_tls().wrap_socket(connect(port, "127.0.0.20")) for _ in range(3)]
    try:
        assert all(reply(s).startswith(b"220") for s in held)
        refused: list[socket.socket] = []
        deadline = time.monotonic() + 1.5  # well before every timeout (2 s and 3 s)
        try:
            for _ in range(40):  # silent, never reading
                try:
                    refused.append(connect(port, "127.0.0.20"))
                except ConnectionResetError:
                    pass  # aborted before connect() even returned
            for s in refused:
                assert wait_closed(s, deadline) == b""  # no 421 without a handshake
        finally:
            for s in refused:
                s.close()
    finally:
        for s in held:
            s.close()
    plain = [connect(daemon.ports["submission"], "127.0.0.21") for _ in range(4)]
    try:
        assert [reply(s)[:3] for s in plain] == [b"220", b"220", b"220", b"421"]
        assert wait_closed(plain[3], time.monotonic() + 1.5) == b""
    finally:
        for s in plain:
            s.close()


# -- 3. a client that does not read cannot make the server buffer without bound -----------------


def test_a_pipelining_client_that_never_reads_is_paused(daemon: Daemon) -> None:
    """Finding 3: 20 MB of pipelined HELP (about 260 MB of replies) from a client that reads
    nothing: the server stops reading once its output for the client is full."""
    before = rss(daemon)
    sock = proxied(daemon.ports["smtp"], "127.0.0.30")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    flood, sent = b"HELP\r\n" * 50_000, 0
    deadline = time.monotonic() + 1.5  # within command_timeout (2 s): the server still reads
    try:
        while sent < 20_000_000 and time.monotonic() < deadline:
            _, writable, _ = select.select([], [sock], [], max(0.0, deadline - time.monotonic()))
            if writable:
                sent += sock.send(flood)
        grown = rss(daemon) - before
    finally:
        sock.close()
    assert sent < 20_000_000, "the server read everything"
    assert grown < 8_000_000, f"RSS grew by {grown} bytes after {sent} bytes of HELP"


# -- 7 and 13. anonymous mail per address per hour, IPv6 per /64 --------------------------------


def test_anonymous_mail_is_limited_per_address_and_hour(daemon: Daemon) -> None:
    """Finding 7: messages_per_ip_per_hour = 2 for clients without AUTH or trust."""
    port = daemon.ports["submission"]
    assert anonymous_mail(port, "127.0.0.40") == (250, 250)
    assert anonymous_mail(port, "127.0.0.40") == (250, 250)
    assert anonymous_mail(port, "127.0.0.40")[0] == 451
    assert anonymous_mail(port, "127.0.0.41") == (250, 250)  # another address is not braked


def test_ipv6_clients_are_counted_per_64(daemon: Daemon) -> None:
    """Finding 13: three connections from one /64 fill connections_per_ip; a fourth address
    of the same /64 is refused, another /64 is not."""
    port = daemon.ports["smtp"]
    held = [proxied(port, f"2001:db8:0:13::{n}") for n in (1, 2, 3)]
    try:
        assert [reply(s)[:3] for s in held] == [b"220"] * 3
        same = proxied(port, "2001:db8:0:13::4")
        assert reply(same).startswith(b"421 4.7.0")
        same.close()
        with proxied(port, "2001:db8:0:14::1") as other:
            assert reply(other).startswith(b"220")
    finally:
        for s in held:
            s.close()


# -- 8. slow drip -----------------------------------------------------------------------------


def drip(sock: socket.socket, data: bytes, give_up: float) -> tuple[bytes, float]:
    """Send ``data`` one byte per half second until the server closes; (what it sent back,
    seconds until it closed)."""
    start, received, i = time.monotonic(), b"", 0
    while time.monotonic() - start < give_up:
        readable, _, _ = select.select([sock], [], [], 0.5)
        if readable:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return received, time.monotonic() - start
            received += chunk
        else:
            sock.sendall(data[i % len(data) : i % len(data) + 1])
            i += 1
    raise AssertionError(f"still open after {give_up} s of drip; received {received!r}")


@pytest.mark.parametrize("phase", ["command", "data"])
def test_a_slow_drip_cannot_hold_a_connection(daemon: Daemon, phase: str) -> None:
    """Finding 8: one byte every half second, with command_timeout = 2: a command line has 2 s
    however it trickles; DATA has its first 2 s, then must keep up 500 bytes/s."""
    source = "127.0.0.50" if phase == "command" else "127.0.0.51"
    with connect(daemon.ports["submission"], source) as sock:
        assert reply(sock).startswith(b"220")
        if phase == "data":
            for line in (b"EHLO x", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<b@example.test>"):
                assert command(sock, line).startswith(b"250")
            assert command(sock, b"DATA").startswith(b"354")
        received, seconds = drip(sock, b"NOOP NOOP NOOP NOOP", give_up=10)
    assert received.startswith(b"421 4.4.2"), received
    assert seconds < 4


# -- 10. ORCPT --------------------------------------------------------------------------------


def test_orcpt_is_validated(daemon: Daemon) -> None:
    """Finding 10: RFC 3461 4.2 ORCPT: an atom, ";", xtext, 500 octets at most."""
    with smtplib.SMTP("127.0.0.1", daemon.ports["submission"], timeout=10,
                      source_address=("127.0.0.60", 0)) as s:
        s.ehlo("client.test")
        assert s.mail("a@remote.test")[0] == 250
        for bad in ("ORCPT=rfc\x01822;a+40b.test", "ORCPT=rfc822;" + "a" * 15000,
                    "ORCPT=rfc822;a+00b", "ORCPT=rfc 822;x"):
            code, message = s.rcpt("b@example.test", [bad])
            assert (code, message[:5]) == (501, b"5.5.4"), bad
        assert s.rcpt("b@example.test", ["ORCPT=rfc822;b+40example.test"])[0] == 250


# -- 11. a long EHLO name -----------------------------------------------------------------------


def test_a_long_ehlo_name_keeps_the_received_line_short(daemon: Daemon) -> None:
    """Finding 11: a 5,000-character EHLO name; the delivered message's lines all fit in 998
    octets, and the name is shortened, not dropped."""
    with smtplib.SMTP("127.0.0.1", daemon.ports["submission"], timeout=10,
                      source_address=("127.0.0.70", 0)) as s:
        assert s.ehlo("h" * 4990 + ".test")[0] == 250
        s.sendmail("a@remote.test", ["longehlo@example.test"], b"Subject: x\r\n\r\nbody\r\n")
    daemon.wait_for("<longehlo@example.test> relay=maildir result=delivered", timeout=30)
    new = daemon.directory / "var" / "maildir" / "example.test" / "longehlo" / "new"
    [message] = [p.read_bytes() for p in new.iterdir()]  # a maildir file has LF line ends
    assert max(len(line) for line in message.splitlines()) <= 998
    assert b"\nReceived: from hhhh" in message


# -- 14. NUL in DATA ----------------------------------------------------------------------------


def test_nul_in_data_is_refused_and_nothing_is_queued(daemon: Daemon) -> None:
    """Finding 14: 554 5.6.0 at the end of data; the session goes on; only the clean message
    after it is accepted."""
    with connect(daemon.ports["submission"], "127.0.0.80") as sock:
        assert reply(sock).startswith(b"220")
        for line in (b"EHLO x", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<nul@example.test>"):
            assert command(sock, line).startswith(b"250")
        assert command(sock, b"DATA").startswith(b"354")
        assert command(sock, b"Subject: a\r\n\r\nnul\x00here\r\n.").startswith(b"554 5.6.0")
        for line in (b"MAIL FROM:<a@remote.test>", b"RCPT TO:<nul@example.test>"):
            assert command(sock, line).startswith(b"250")
        assert command(sock, b"DATA").startswith(b"354")
        assert command(sock, b"Subject: b\r\n\r\nclean\r\n.").startswith(b"250")
    daemon.wait_for("<nul@example.test> relay=maildir result=delivered", timeout=30)
    assert sum("accepted from 127.0.0.80" in line for line in daemon.log) == 1


# -- 12. a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs for the spool: the only way to get a real ENOSPC from a real disk."""
    mount = tmp_path / "spool"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk needs a small filesystem: mounting tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, timeout=30)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` up to the last byte; return the filler file."""
    filler = directory / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_answers_452_with_one_log_line(tmp_path: Path, small_disk: Path) -> None:
    """Finding 12 (the session's part): a commit that meets ENOSPC answers 452 4.3.1, logs one
    line and no traceback, and once there is room again mail is taken."""
    d = Daemon(tmp_path, f'[queue]\ndirectory = "{small_disk}"\n'
                         '[relay]\nlocal_domains = ["example.test"]\n')
    d.start()
    try:
        filler = fill(small_disk)
        with smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=10) as s:
            s.ehlo("client.test")
            s.mail("a@example.test")
            s.rcpt("postmaster@example.test")
            code, message = s.data(b"Subject: full\r\n\r\nbody\r\n")
        assert (code, message[:5]) == (452, b"4.3.1"), message
        d.wait_for("the spool is full")
        assert not any("session error" in line for line in d.log), d.text()
        filler.unlink()
        with smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=10) as s:
            s.sendmail("a@example.test", ["postmaster@example.test"], b"Subject: ok\r\n\r\nx\r\n")
    finally:
        d.stop()
