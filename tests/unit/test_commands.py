"""The SMTP commands alone, against a fake channel instead of the transport: what each command
answers, and which state it keeps or clears (per connection vs per transaction)."""

from __future__ import annotations

import base64
from collections.abc import Callable, Coroutine
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from fakes import HASH, run_now
from smarthost.auth import sasl
from smarthost.auth.cred import PortalLogin, build_portal
from smarthost.auth.users import UsersFile
from smarthost.core import replies as reply
from smarthost.core.enums import Role
from smarthost.core.envelope import QueueEntry
from smarthost.core.maillog import MailLog
from smarthost.core.replies import Reply
from smarthost.queue.spool import Spool
from smarthost.smtpd.channel import DataSink
from smarthost.smtpd.commands import Commands, SessionSettings
from smarthost.smtpd.dotreader import DataResult
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits, LimitSettings
from smarthost.smtpd.policy import RelayPolicy

PLAIN = base64.b64encode(b"\0alice@example.test\0secret").decode()


@attrs.define
class FakeChannel:
    """Records what the commands ask of the transport; answers later ones at once."""

    peer_address: str = "192.0.2.7"
    encrypted: bool = False
    tls_configured: bool = True
    sent: list[Reply] = attrs.Factory(list)
    closed: bool = False
    tls_started: bool = False
    data: tuple[DataSink, Callable[[DataResult], None]] | None = None

    def can_start_tls(self) -> bool:
        return self.tls_configured and not self.encrypted

    def tls_details(self) -> tuple[str, str] | None:
        return ("TLSv1.3", "TLS_AES_128_GCM_SHA256") if self.encrypted else None

    def send(self, r: Reply) -> None:
        assert not self.closed
        self.sent.append(r)

    def answer_later(self, work: Coroutine[Any, Any, Reply | None]) -> None:
        def answer(r: Reply | None) -> None:
            if r is not None:
                self.send(r)

        Deferred.fromCoroutine(work).addCallback(answer)

    def close(self, r: Reply | None = None) -> None:
        if r is not None:
            self.send(r)
        self.closed = True

    def start_tls(self) -> None:
        self.encrypted = self.tls_started = True

    def read_data(self, sink: DataSink, done: Callable[[DataResult], None]) -> None:
        self.data = (sink, done)

    def take(self) -> list[Reply]:
        sent, self.sent = self.sent, []
        return sent


@attrs.define
class Rig:
    commands: Commands
    channel: FakeChannel
    spool: Spool
    accepted: list[QueueEntry]

    def line(self, text: str) -> list[Reply]:
        self.commands.line_received(text.encode())
        return self.channel.take()

    def codes(self, *lines: str) -> list[int]:
        return [r.code for line in lines for r in self.line(line)]


def rig(tmp: Path, *, role: str = "submission", channel: FakeChannel | None = None,
        connections_per_ip: int = 50, limits: Limits | None = None,
        trusted: tuple[str, ...] = ()) -> Rig:
    clock = Clock()
    clock.advance(1_700_000_000)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "users").write_text(f"alice@example.test:{HASH}\n")
    portal = build_portal(UsersFile(tmp / "users"), run_now)
    spool, _ = Spool.open(tmp / "spool", clock=clock, run_blocking=run_now)
    settings = SessionSettings(
        role=Role(role), hostname="mx.test", max_size=1000, max_recipients=2,
        mechanisms=() if role == "smtp" else sasl.build_mechanisms(["PLAIN"]),
    )
    accepted: list[QueueEntry] = []
    channel = channel or FakeChannel()
    commands = Commands(
        channel, settings,
        RelayPolicy(frozenset({"example.test"}), tuple(map(ip_network, trusted)), {}),
        PortalLogin(portal), spool, MailLog(clock), clock,
        limits or Limits(clock, LimitSettings(connections_per_ip=connections_per_ip)),
        Hooks((), clock),
        accepted.append,
    )
    commands.connected()
    return Rig(commands, channel, spool, accepted)


def test_greeting_names_the_host(tmp_path: Path) -> None:
    r = rig(tmp_path)
    assert r.channel.take() == [reply.greeting("mx.test")]
    assert not r.channel.closed


def test_over_the_connection_limit_is_421_and_close(tmp_path: Path) -> None:
    r = rig(tmp_path, connections_per_ip=0)
    assert [x.code for x in r.channel.take()] == [421]
    assert r.channel.closed


def test_ehlo_offers_starttls_before_tls_and_auth_only_after(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.channel.take()
    [hello] = r.line("EHLO client.test")
    assert hello.text == "mx.test"
    assert "STARTTLS" in hello.lines
    assert not any(line.startswith("AUTH") for line in hello.lines)
    assert r.line("STARTTLS") == [reply.READY_TLS]
    assert r.channel.tls_started
    [hello] = r.line("EHLO client.test")
    assert "STARTTLS" not in hello.lines
    assert "AUTH PLAIN" in hello.lines
    [helo] = r.line("HELO client.test")
    assert helo == reply.hello("mx.test")  # HELO: no extensions


def test_starttls_forgets_the_client_but_not_its_address(tmp_path: Path) -> None:
    r = rig(tmp_path, channel=FakeChannel(encrypted=False))
    r.channel.take()
    assert r.codes("EHLO c", "MAIL FROM:<a@example.test>", "STARTTLS") == [250, 250, 220]
    # RFC 3207 4.2: the transaction and the EHLO are gone; MAIL needs a new EHLO.
    assert r.line("MAIL FROM:<a@example.test>") == [reply.NEED_HELO]
    assert r.codes("EHLO c", "AUTH PLAIN " + PLAIN) == [250, 235]
    assert r.line("STARTTLS") == [reply.ALREADY_TLS]


def test_rset_clears_the_transaction_not_the_connection(tmp_path: Path) -> None:
    r = rig(tmp_path, channel=FakeChannel(encrypted=True))
    r.channel.take()
    assert r.codes("EHLO c", "AUTH PLAIN " + PLAIN, "MAIL FROM:<alice@example.test>") == [
        250, 235, 250]
    assert r.line("RSET") == [reply.RESET]
    assert r.line("RCPT TO:<b@example.test>") == [reply.NEED_MAIL]
    # Still greeted and still authenticated.
    assert r.line("MAIL FROM:<alice@example.test>") == [reply.SENDER_OK]
    assert r.line("AUTH PLAIN " + PLAIN) == [reply.ALREADY_AUTHENTICATED]


def test_data_hands_the_bytes_to_a_sink_and_answers_queued(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.channel.take()
    assert r.codes("HELO c", "MAIL FROM:<a@x.test>", "RCPT TO:<b@example.test>", "DATA") == [
        250, 250, 250, 354]
    assert r.channel.data is not None
    sink, done = r.channel.data
    result = sink.feed(b"Subject: hi\r\n\r\nbody\r\n.\r\nNOOP\r\n")
    assert result is not None and result.leftover == b"NOOP\r\n"
    done(result)
    [entry] = r.accepted
    assert r.channel.take() == [reply.queued(str(entry.queue_id))]
    with r.spool.open_body(entry.queue_id) as f:
        assert f.read().endswith(b"\r\nSubject: hi\r\n\r\nbody\r\n")
    # The transaction is over: a new one starts with MAIL.
    assert r.line("RCPT TO:<b@example.test>") == [reply.NEED_MAIL]


def test_a_fatal_data_error_closes_and_keeps_nothing(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.channel.take()
    r.codes("HELO c", "MAIL FROM:<a@x.test>", "RCPT TO:<b@example.test>", "DATA")
    assert r.channel.data is not None
    sink, done = r.channel.data
    result = sink.feed(b"bare\nline\r\n.\r\n")
    assert result is not None and result.fatal
    done(result)
    assert r.channel.take() == [reply.BARE_LINE_ENDING]
    assert r.channel.closed
    assert r.spool.queue_ids() == []


@pytest.mark.parametrize(("line", "expected"), [
    ("NOOP", reply.OK), ("VRFY alice", reply.VRFY), ("VRFY", reply.PARAM_SYNTAX),
    ("EXPN list", reply.NOT_ACCEPTED), ("HELP", reply.HELP), ("XYZZY", reply.SYNTAX),
    ("ehlo", reply.PARAM_SYNTAX), ("MAIL FROM:<a@x.test>", reply.NEED_HELO),
])
def test_simple_answers(tmp_path: Path, line: str, expected: Reply) -> None:
    r = rig(tmp_path)
    r.channel.take()
    assert r.line(line) == [expected]
    assert not r.channel.closed


@pytest.mark.parametrize(("line", "expected"), [
    ("QUIT", reply.BYE), ("GET / HTTP/1.1", reply.PROTOCOL_PROBE),
])
def test_answers_that_close(tmp_path: Path, line: str, expected: Reply) -> None:
    r = rig(tmp_path)
    r.channel.take()
    assert r.line(line) == [expected]
    assert r.channel.closed


def test_the_connection_slot_is_released_once(tmp_path: Path) -> None:
    limits = Limits(Clock(), LimitSettings(connections_per_ip=1))
    first = rig(tmp_path / "1", limits=limits)
    assert rig(tmp_path / "2", limits=limits).channel.closed  # one per address
    first.commands.connection_lost()
    first.commands.connection_lost()
    assert not rig(tmp_path / "3", limits=limits).channel.closed
    assert rig(tmp_path / "4", limits=limits).channel.closed


def send_message(r: Rig, sender: str = "a@x.test") -> list[Reply]:
    """MAIL, RCPT to a local domain, DATA and a short message; every reply (only MAIL's when
    it is refused)."""
    replies = r.line(f"MAIL FROM:<{sender}>")
    if replies != [reply.SENDER_OK]:
        return replies
    replies += [x for line in ("RCPT TO:<b@example.test>", "DATA") for x in r.line(line)]
    if r.channel.data is not None:
        sink, done = r.channel.data
        r.channel.data = None
        result = sink.feed(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        assert result is not None
        done(result)
    return replies + r.channel.take()


# -- anonymous mail per address and hour (issue 18, findings 7 and 13) ---------------------------


def test_anonymous_mail_is_limited_per_client_address(tmp_path: Path) -> None:
    limits = Limits(Clock(), LimitSettings(messages_per_ip_per_hour=2))
    first = rig(tmp_path / "1", role="smtp", limits=limits,
                channel=FakeChannel(peer_address="2001:db8:0:7::1"))
    first.channel.take()
    first.line("EHLO c")
    assert [x.code for x in send_message(first)][-1] == 250
    assert [x.code for x in send_message(first)][-1] == 250
    assert send_message(first) == [reply.RATE_LIMITED]  # at MAIL, nothing more
    # Another address of the same /64 is the same client; another /64 is not.
    same = rig(tmp_path / "2", role="smtp", limits=limits,
               channel=FakeChannel(peer_address="2001:db8:0:7::2"))
    same.channel.take()
    same.line("EHLO c")
    assert send_message(same) == [reply.RATE_LIMITED]
    other = rig(tmp_path / "3", role="smtp", limits=limits,
                channel=FakeChannel(peer_address="2001:db8:0:8::1"))
    other.channel.take()
    other.line("EHLO c")
    assert [x.code for x in send_message(other)][-1] == 250


def test_authenticated_and_trusted_mail_is_not_counted_as_anonymous(tmp_path: Path) -> None:
    limits = Limits(Clock(), LimitSettings(messages_per_ip_per_hour=1,
                                           messages_per_user_per_hour=2))
    r = rig(tmp_path / "1", limits=limits, channel=FakeChannel(encrypted=True))
    r.channel.take()
    assert r.codes("EHLO c", "AUTH PLAIN " + PLAIN) == [250, 235]
    for _ in range(2):
        assert [x.code for x in send_message(r, "alice@example.test")][-1] == 250
    assert send_message(r, "alice@example.test") == [reply.RATE_LIMITED]  # the user's rate
    # A trusted IPv6 client's hourly rate is counted per /64 too.
    for n in (1, 2, 3):
        t = rig(tmp_path / f"t{n}", limits=limits, trusted=("2001:db8::/32",),
                channel=FakeChannel(peer_address=f"2001:db8:0:9::{n}"))
        t.channel.take()
        t.line("EHLO c")
        codes = [x.code for x in send_message(t)]
        assert codes[-1] == (250 if n < 3 else 451), n


# -- ORCPT (finding 10) ----------------------------------------------------------------------------


@pytest.mark.parametrize("orcpt", [
    "rfc822;b+40example.test", "utf-8;b@example.test", "x-type;a", "rfc822;",
    "rfc822;" + "a" * 493,
])
def test_valid_orcpt_is_accepted(tmp_path: Path, orcpt: str) -> None:
    r = rig(tmp_path)
    r.channel.take()
    assert r.codes("EHLO c", "MAIL FROM:<a@x.test>", f"RCPT TO:<b@example.test> ORCPT={orcpt}"
                   ) == [250, 250, 250]


@pytest.mark.parametrize("orcpt", [
    "rfc\x01822;a", "rfc 822;a", "rfc822", ";a", "rfc822;a+00b", "rfc822;a+0Ab",
    "rfc822;a+zz", "rfc822;" + "a" * 494, "rfc822;" + "a" * 15000, "rfc(822);a",
    "rfc822;caf\u00e9", "r\u00e9c;a",
])
def test_invalid_orcpt_is_501(tmp_path: Path, orcpt: str) -> None:
    r = rig(tmp_path)
    r.channel.take()
    assert r.codes("EHLO c", "MAIL FROM:<a@x.test>") == [250, 250]
    assert r.line(f"RCPT TO:<b@example.test> ORCPT={orcpt}") == [reply.PARAM_SYNTAX]


def test_orcpt_is_stored_decoded(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.channel.take()
    r.line("EHLO c")
    r.line("MAIL FROM:<a@x.test>")
    assert r.line("RCPT TO:<b@example.test> ORCPT=rfc822;b+40example.test") == [
        reply.RECIPIENT_OK]
    assert r.codes("DATA") == [354]
    assert r.channel.data is not None
    sink, done = r.channel.data
    result = sink.feed(b"x\r\n.\r\n")
    assert result is not None
    done(result)
    [entry] = r.accepted
    assert entry.envelope.recipients[0].orcpt == "rfc822;b@example.test"


def test_envid_must_be_printable(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.channel.take()
    r.line("EHLO c")
    assert r.line("MAIL FROM:<a@x.test> ENVID=a+0Db") == [reply.PARAM_SYNTAX]
    assert r.line("MAIL FROM:<a@x.test> ENVID=a+20b") == [reply.SENDER_OK]
