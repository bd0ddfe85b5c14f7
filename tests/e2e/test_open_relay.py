"""Never a spam cannon: classic open-relay tricks, end to end, on every listener.

One real daemon (``twistd -n smarthost``) with ``local_domains = ["example.test"]`` and no
trusted network, a real DNS server (a subprocess) that gives every domain used here an MX on
127.0.0.2, and an aiosmtpd MX there recording everything it receives. Each trick is sent
unauthenticated on submission (after STARTTLS), submissions and smtp; then the queue is
flushed, the daemon is waited on until it is idle, and the MX must have received nothing:
mail for a local domain goes to the maildir, and nothing else may leave (no relayed mail, and
no backscatter either: the tricks use a remote envelope sender, so a bounce or a delivery
report of a trick would arrive at the MX too).

``pytest -s tests/test_open_relay.py`` prints the table of tricks, listeners and replies.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from daemon import Daemon
from mxpeer import MXPeer

TESTS = Path(__file__).parent.parent
LOCAL = "example.test"
# Every remote domain a trick names (in DNS form); each has an MX pointing at the test MX.
REMOTE_DOMAINS = [
    "remote.test", "x.test", "example.test.remote.test", "remote-example.test",
    "xn--rmote-bsa.test", "localhost.test", "remote.test.example.test.test",
]
SPAMMER = b"MAIL FROM:<spammer@remote.test>"
BODY = b"From: spammer@remote.test\r\nSubject: relay test\r\n\r\nbuy now\r\n.\r\n"


@attrs.frozen
class Trick:
    name: str
    rcpts: tuple[bytes, ...]  # whole RCPT lines (or any command), sent one by one
    mail: bytes = SPAMMER
    before: tuple[bytes, ...] = ()  # commands between EHLO and MAIL


def rcpt(*paths: str) -> tuple[bytes, ...]:
    return tuple(f"RCPT TO:{p}".encode() for p in paths)


TRICKS = [
    Trick("percent hack", rcpt("<victim%remote.test@example.test>")),
    Trick("double percent hack", rcpt("<victim%remote.test%x.test@example.test>")),
    Trick("bang path in local part", rcpt("<remote.test!victim@example.test>")),
    Trick("bang path after domain", rcpt("<victim@remote.test!x>")),
    Trick("bare bang path", rcpt("<remote.test!victim>")),
    Trick("source route", rcpt("<@example.test:victim@remote.test>")),
    Trick("source route, two hops", rcpt("<@example.test,@x.test:victim@remote.test>")),
    Trick("source route via remote to local", rcpt("<@remote.test:victim@example.test>")),
    Trick("quoted local part with @", rcpt('<"victim@remote.test"@example.test>')),
    Trick("quoted local part with %", rcpt('<"victim%remote.test"@example.test>')),
    Trick("IPv4 literal", rcpt("<victim@[127.0.0.2]>")),
    Trick("IPv6 literal", rcpt("<victim@[IPv6:::1]>")),
    Trick("IPv4-mapped IPv6 literal", rcpt("<victim@[IPv6:::ffff:127.0.0.2]>")),
    Trick("IPv6 literal with zone id", rcpt("<victim@[IPv6:fe80::1%remote.test]>")),
    Trick("trailing dot, remote", rcpt("<victim@remote.test.>")),
    Trick("trailing dot, local", rcpt("<victim@example.test.>")),
    Trick("upper case remote", rcpt("<victim@REMOTE.TEST>")),
    Trick("mixed case local", rcpt("<victim@Example.Test>")),
    Trick("IDNA A-label", rcpt("<victim@xn--rmote-bsa.test>")),
    Trick("unicode domain without SMTPUTF8", rcpt("<victim@r\u00e9mote.test>")),
    Trick("unicode domain with SMTPUTF8", rcpt("<victim@r\u00e9mote.test>"),
          mail=SPAMMER + b" SMTPUTF8"),
    Trick("look-alike local domain (Cyrillic e)", rcpt("<victim@exampl\u0435.test>"),
          mail=SPAMMER + b" SMTPUTF8"),
    Trick("ideographic full stop", rcpt("<victim@remote\u3002test.example.test>"),
          mail=SPAMMER + b" SMTPUTF8"),
    Trick("fullwidth full stop", rcpt("<victim@example.test\uff0eremote.test>"),
          mail=SPAMMER + b" SMTPUTF8"),
    Trick("missing domain", rcpt("<victim>")),
    Trick("empty domain", rcpt("<victim@>")),
    Trick("bare postmaster", rcpt("<postmaster>")),
    Trick("null sender to remote", rcpt("<victim@remote.test>"), mail=b"MAIL FROM:<>"),
    Trick("local domain as prefix", rcpt("<victim@example.test.remote.test>")),
    Trick("local domain as suffix", rcpt("<victim@remote-example.test>")),
    Trick("local domain as a middle label",
          rcpt("<victim@remote.test.example.test.test>")),
    Trick("multiple @", rcpt("<victim@remote.test@example.test>")),
    Trick("percent-encoded @", rcpt("<victim%40remote.test@example.test>")),
    Trick("backslash-escaped @", rcpt("<victim\\@remote.test@example.test>")),
    Trick("space after colon", rcpt(" <victim@remote.test>")),
    Trick("space inside brackets", rcpt("<victim@remote.test >", "< victim@remote.test>")),
    Trick("space in local part",
          rcpt("<victim @remote.test>", "<victim remote.test@example.test>")),
    Trick("address after the brackets", rcpt("<victim@remote.test>@example.test")),
    Trick("second path as parameter", rcpt("<victim@remote.test> <x@example.test>")),
    Trick("nested angle brackets",
          rcpt("<<victim@remote.test>>", "<<victim@remote.test>@example.test>")),
    Trick("no angle brackets", rcpt("victim@remote.test")),
    Trick("very long local part", rcpt(f"<{'v' * 64}@remote.test>", f"<{'v' * 300}@example.test>")),
    Trick("very long domain", rcpt(f"<victim@{'a' * 63}.{'b' * 63}.{'c' * 63}.remote.test>")),
    Trick("very long line", (b"RCPT TO:<victim@remote.test>" + b" " * 20000,)),
    Trick("NUL before the local domain", (b"RCPT TO:<victim@remote.test\x00@example.test>",)),
    Trick("NUL in the local part", (b"RCPT TO:<victim\x00@remote.test>",)),
    Trick("CR before the local domain", (b"RCPT TO:<victim@remote.test\r@example.test>",)),
    Trick("bare LF between commands",
          (b"RCPT TO:<x@example.test>\nRCPT TO:<victim@remote.test>",)),
    Trick("forged local sender", rcpt("<victim@remote.test>"),
          mail=b"MAIL FROM:<postmaster@example.test>"),
    Trick("AUTH= parameter claiming a user", rcpt("<victim@remote.test>"),
          mail=SPAMMER + b" AUTH=alice@example.test"),
    Trick("XCLIENT and XFORWARD", rcpt("<victim@remote.test>"),
          before=(b"XCLIENT ADDR=127.0.0.1 LOGIN=alice", b"XFORWARD ADDR=127.0.0.1")),
    Trick("HELO as ourselves", rcpt("<victim@remote.test>"),
          before=(b"EHLO mx.smarthost.test", b"HELO localhost")),
    Trick("localhost domain", rcpt("<victim@localhost>", "<victim@localhost.test>")),
    Trick("local then remote recipient", rcpt("<x@example.test>", "<victim@remote.test>")),
    Trick("empty quoted local part", rcpt('<""@example.test>')),
    Trick("source route with junk", rcpt("<@:victim@remote.test>", "<@x y:victim@remote.test>")),
]
LISTENERS = ("submission", "submissions", "smtp")
# Reflection through a delivery report: an anonymous client names its victim as the envelope
# sender and asks for a success DSN with the full message (RET=FULL) for a local recipient.
DSN_BACKSCATTER = Trick(
    "DSN success report to a forged sender",
    (b"RCPT TO:<x@example.test> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;victim@remote.test",),
    mail=b"MAIL FROM:<victim@remote.test> RET=FULL ENVID=spam",
)


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Client:
    """A raw SMTP client: sends exactly the bytes it is given, reads one reply per line."""

    def __init__(self, port: int, role: str) -> None:
        sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=15)
        if role == "submissions":
            sock = tls_context().wrap_socket(sock)
        self.sock, self.buffer, self.closed = sock, b"", False
        assert self.read() == 220
        assert self.command(b"EHLO attacker.test") == 250
        if role == "submission":
            assert self.command(b"STARTTLS") == 220
            self.sock = tls_context().wrap_socket(self.sock)
            assert self.command(b"EHLO attacker.test") == 250

    def read(self) -> int:
        """The code of the next reply; 0 once the server has closed the connection."""
        while True:
            while b"\r\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\r\n", 1)
                if line[3:4] != b"-":
                    return int(line[:3])
            if self.closed:
                return 0
            chunk = self.sock.recv(65536)
            if not chunk:
                self.closed = True
            self.buffer += chunk

    def command(self, line: bytes, replies: int = 0) -> int:
        """Send ``line`` + CRLF; the code of its (last) reply. A bare LF inside makes it two
        commands, and two replies, unless ``replies`` says how many to read."""
        if self.closed:
            return 0
        try:
            self.sock.sendall(line + b"\r\n")
        except OSError:
            self.closed = True
            return 0
        code = 0
        for _ in range(replies or line.count(b"\n") + 1):
            code = self.read()
        return code

    def close(self) -> None:
        self.command(b"QUIT")
        self.sock.close()


@attrs.define
class Result:
    trick: str
    listener: str
    replies: list[str] = attrs.Factory(list)
    queued: bool = False


def run_trick(trick: Trick, role: str, port: int) -> Result:
    result = Result(trick.name, role)
    client = Client(port, role)
    try:
        for line in trick.before:
            result.replies.append(f"{line.split()[0].decode()}={client.command(line)}")
        result.replies.append(f"MAIL={client.command(trick.mail.decode().encode('utf-8'))}")
        codes = [client.command(line) for line in trick.rcpts]
        result.replies.append("RCPT=" + ",".join(map(str, codes)))
        if 250 in codes:
            data = client.command(b"DATA")
            end = client.command(BODY[:-5] + b"\r\n.", replies=1) if data == 354 else data
            result.replies.append(f"DATA={data}/{end}")
            result.queued = end == 250
    finally:
        client.close()
    return result


@attrs.define
class World:
    daemon: Daemon
    peers: list[MXPeer]
    dns: subprocess.Popen[bytes]


def start_dns(zone: Path) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "dnsserver.py"), "--zone", str(zone), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(20):
            proc.kill()
            raise TimeoutError("the DNS server did not print its port")
    return proc, int(proc.stdout.readline())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("relay")
    peer = MXPeer("127.0.0.2", name="mx.peer.test")
    peer.start()
    peers = [peer]
    try:
        # IPv6 literals ([IPv6:::1]) would be delivered to ::1 on the same port: listen there.
        peer6 = MXPeer("::1", peer.port, name="mx6.peer.test")
        peer6.start()
        peers.append(peer6)
    except OSError:
        pass
    zone = tmp / "zone.txt"
    zone.write_text(
        "mx.peer.test A 127.0.0.2\n"
        + "".join(f"{d} MX 10 mx.peer.test\n" for d in [LOCAL, *REMOTE_DOMAINS])
    )
    dns, dns_port = start_dns(zone)
    daemon = Daemon(tmp, f"""
[relay]
local_domains = ["{LOCAL}"]
trusted_networks = []
[delivery]
port = {peer.port}
nameservers = ["127.0.0.1:{dns_port}"]
[log]
events = "var/events.jsonl"
""")
    try:
        daemon.start()
        yield World(daemon, peers, dns)
    finally:
        daemon.stop()
        dns.terminate()
        dns.wait(10)
        for p in peers:
            p.stop()


def queue_list(daemon: Daemon) -> list[dict[str, object]]:
    result = daemon.admin("queue", "--config", str(daemon.config_path), "list", "--json")
    assert result.returncode == 0, result.stderr
    entries: list[dict[str, object]] = json.loads(result.stdout)
    return entries


RESULT = re.compile(r"result=(delivered|deferred|bounced)")
ACCEPTED = re.compile(r": accepted from .* recipients=(\d+)")


def wait_idle(daemon: Daemon, deadline: float = 60.0) -> None:
    """Until every delivery attempt the accepted messages need has logged its result and
    the queue is empty (reports a delivery created are queued, and waited for, too)."""
    end = time.monotonic() + deadline
    wanted = 0
    for line in daemon.log:
        accepted = ACCEPTED.search(line)
        if accepted:
            wanted += int(accepted.group(1))
    if wanted:
        daemon.wait_for(RESULT, timeout=deadline, count=wanted)
    flush = daemon.admin("queue", "--config", str(daemon.config_path), "flush")
    assert flush.returncode == 0, flush.stdout + flush.stderr
    daemon.wait_for("queue flush requested")
    while entries := queue_list(daemon):
        if time.monotonic() > end:
            raise TimeoutError(f"queue not empty: {entries}")
        # Something is still queued (a report, a deferred message): wait for its next
        # delivery result rather than polling on a timer.
        seen = sum(1 for line in daemon.log if RESULT.search(line))
        daemon.wait_for(RESULT, timeout=max(1.0, end - time.monotonic()), count=seen + 1)


def print_table(results: list[Result], received: int) -> None:
    width = max(len(r.trick) for r in results)
    print(f"\n{'trick':<{width}}  {'listener':<11}  replies")
    for r in results:
        print(f"{r.trick:<{width}}  {r.listener:<11}  {' '.join(r.replies)}"
              + ("  -> maildir" if r.queued else ""))
    print(f"cases tried: {len(results)}; messages accepted (local domain only): "
          f"{sum(r.queued for r in results)}; messages that reached the MX: {received}")


def test_no_trick_relays_on_any_listener(world: World) -> None:
    daemon = world.daemon
    results = [run_trick(trick, role, daemon.ports[role])
               for trick in TRICKS for role in LISTENERS]
    wait_idle(daemon)
    received = [m for peer in world.peers for m in peer.messages]
    print_table(results, len(received))

    assert len(TRICKS) >= 20
    assert len(results) >= 20 * len(LISTENERS)
    # Nothing left for a remote domain: not relayed mail, not a bounce, not a DSN.
    assert received == [], [(m.mail_from, m.rcpt_tos, m.data[:300]) for m in received]
    assert all(peer.connections == 0 for peer in world.peers)
    # Whatever was accepted went to local mailboxes, under the local domain only.
    maildir = daemon.directory / "var/maildir"
    if maildir.exists():
        assert sorted(os.listdir(maildir)) == [LOCAL]
    events = [json.loads(line)
              for line in (daemon.directory / "var/events.jsonl").read_text().splitlines()]
    deliveries = [e for e in events if e["event"] == "delivery"]
    assert deliveries and all(e["relay"] == "maildir" for e in deliveries), deliveries
    assert not [e for e in events if e["event"] == "report"]
    # Every accepted message had only local recipients.
    for e in events:
        if e["event"] == "accepted":
            assert e["user"] == "anonymous", e


def test_no_delivery_report_reflects_anonymous_mail_to_a_remote_sender(world: World) -> None:
    daemon = world.daemon
    before = sum(len(peer.messages) for peer in world.peers)
    results = [run_trick(DSN_BACKSCATTER, role, daemon.ports[role]) for role in LISTENERS]
    wait_idle(daemon)
    received = [m for peer in world.peers for m in peer.messages][before:]
    print_table(results, len(received))
    assert received == [], [(m.mail_from, m.rcpt_tos, m.data[-200:]) for m in received]


def test_remote_recipients_are_refused_with_554(world: World) -> None:
    """The plain case, for the record: 554 5.7.1 at RCPT on every listener."""
    for role in LISTENERS:
        result = run_trick(Trick("plain", rcpt("<victim@remote.test>")), role,
                           world.daemon.ports[role])
        assert result.replies == ["MAIL=250", "RCPT=554"], result
