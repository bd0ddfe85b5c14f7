"""CHUNKING (RFC 3030) and REQUIRETLS (RFC 8689) on the way in, through real loopback sockets:
our :class:`Session` listening on the reactor with a real spool (fsync in a thread) and a real
TLS certificate, driven by Python's ``smtplib`` and by raw sockets (in threads, so the blocking
clients never stall the reactor that serves them; tests/smtpwire.py is the raw one).
"""

from __future__ import annotations

import ipaddress
import shutil
import smtplib
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from fakes import HASH, run_now
from smarthost.app import tlscert
from smarthost.auth.cred import PortalLogin, build_portal
from smarthost.auth.users import UsersFile
from smarthost.core.enums import Role
from smarthost.core.envelope import QueueEntry
from smarthost.core.maillog import MailLog
from smarthost.queue.spool import Spool
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits, LimitSettings
from smarthost.smtpd.listen import server_tls_options
from smarthost.smtpd.policy import RelayPolicy
from smarthost.smtpd.session import Session, SessionSettings
from smtpwire import TIMEOUT, Wire, bdat, without_trace

T = TypeVar("T")
MAX_SIZE = 10_000

# Octets that mean something in DATA or to a command parser, and 8-bit ones: in a chunk they
# are only content.
TRICKY = (b"From: alice@example.test\r\nSubject: chunks\r\n\r\n"
          b"line one\r\n.\r\nQUIT\r\nMAIL FROM:<evil@example.test>\r\n"
          b"..leading dots stay doubled\r\n\xc3\xa9t\xc3\xa9 \xff\xfe 8-bit\r\n")


def envelope_lines(sender: bytes = b"alice@example.test", extra: bytes = b"") -> bytes:
    return (b"MAIL FROM:<%s>%s\r\nRCPT TO:<bob@example.test>\r\n" % (sender, extra))


class Sessions(ServerFactory):
    """One :class:`Session` per connection, from ``build``."""

    def __init__(self, build: Callable[[], Session]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> Session:
        return self._build()


class InboundChunkingTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="smarthost-bdat-in-"))
        self.addCleanup(shutil.rmtree, directory, True)
        self.spool, _ = Spool.open(directory / "spool", clock=reactor, run_blocking=deferToThread)
        self.addCleanup(self.spool.close)
        pair = tlscert.issue(("mx.smarthost.test",))
        tlscert.write_pair(pair, directory / "cert.pem", directory / "key.pem")
        (directory / "users").write_text(f"alice@example.test:{HASH}\n")
        settings = SessionSettings(
            role=Role.SMTP, hostname="mx.smarthost.test", max_size=MAX_SIZE,
            tls=server_tls_options(directory / "cert.pem", directory / "key.pem"),
        )
        # The client on 127.0.0.1 is a trusted network: it may relay, like an office server.
        policy = RelayPolicy(
            local_domains=frozenset({"example.test"}),
            trusted_networks=(ipaddress.ip_network("127.0.0.0/8"),),
            senders={},
        )
        login = PortalLogin(build_portal(UsersFile(directory / "users"), run_now))
        maillog, limits = MailLog(reactor), Limits(reactor, LimitSettings())
        hooks = Hooks((), reactor)
        self.sessions: list[Session] = []

        def build() -> Session:
            session = Session(settings, policy, login, self.spool, maillog, reactor, limits,
                              hooks)
            self.sessions.append(session)
            return session

        port = reactor.listenTCP(0, Sessions(build), interface="127.0.0.1")
        self.addCleanup(self._stop, port)
        self.port = port.getHost().port  # type: ignore[attr-defined]

    async def _stop(self, port: IListeningPort) -> None:
        stopped = port.stopListening()
        if stopped is not None:
            await stopped
        for session in self.sessions:  # a test that failed may have left one open
            if session.transport is not None:
                session.transport.abortConnection()  # type: ignore[attr-defined]

    async def client(self, work: Callable[[Wire], T]) -> T:
        """Run ``work`` on a fresh connection (EHLO sent) in a thread; close it after."""

        def run() -> T:
            wire = Wire(self.port)
            try:
                assert wire.reply()[0].startswith(b"220 ")
                assert wire.command(b"EHLO client.test")[-1].startswith(b"250 ")
                return work(wire)
            finally:
                wire.close()

        return await deferToThread(run)

    def queued(self) -> list[QueueEntry]:
        return list(self.spool.entries())

    def body(self, entry: QueueEntry) -> bytes:
        with self.spool.open_body(entry.queue_id) as f:
            return f.read()

    # -- EHLO ------------------------------------------------------------------------------

    async def test_chunking_offered_and_requiretls_only_after_starttls(self) -> None:
        def talk() -> tuple[bytes, bytes]:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as s:
                before = s.ehlo()[1]
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                s.starttls(context=context)
                return before, s.ehlo()[1]

        before, after = await deferToThread(talk)
        assert b"\nCHUNKING" in before and b"REQUIRETLS" not in before
        assert b"\nCHUNKING" in after and b"\nREQUIRETLS" in after
        assert b"BINARYMIME" not in before + after  # not implemented, so not offered

    # -- BDAT ------------------------------------------------------------------------------

    async def test_pipelined_chunks_arrive_byte_identical(self) -> None:
        """Two chunks and their octets in one write, the first holding <CRLF>.<CRLF> and
        QUIT, split inside a CRLF and inside a UTF-8 sequence; nothing is unstuffed."""
        cut = TRICKY.index(b"\r\n.\r\n") + 1  # between CR and LF
        chunks = (TRICKY[:cut], TRICKY[cut:-20], TRICKY[-20:])

        def talk(wire: Wire) -> list[bytes]:
            wire.send(envelope_lines() + bdat(*chunks) + b"NOOP\r\n")
            return wire.replies(6)

        replies = await self.client(talk)
        assert replies[:2] == [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK"]
        assert [r[:10] for r in replies[2:4]] == [b"250 2.0.0 "] * 2, replies
        assert replies[4].startswith(b"250 2.0.0 Ok: queued as "), replies
        assert replies[5] == b"250 2.0.0 OK"
        [entry] = self.queued()
        assert without_trace(self.body(entry)) == TRICKY
        assert entry.size == len(self.body(entry))
        assert replies[4].endswith(str(entry.queue_id).encode())

    async def test_smtplib_low_level_bdat_and_bdat_0_last(self) -> None:
        def talk() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as s:
                s.ehlo("client.test")
                assert s.has_extn("chunking")
                s.mail("alice@example.test")
                s.rcpt("bob@example.test")
                s.putcmd("BDAT", str(len(TRICKY)))
                s.send(TRICKY)
                first = s.getreply()
                s.putcmd("BDAT", "0 LAST")  # RFC 3030 2: a last chunk may be empty
                return first, s.getreply()

        first, last = await deferToThread(talk)
        assert first[0] == 250 and first[1].startswith(b"2.0.0")
        assert last[0] == 250 and last[1].startswith(b"2.0.0 Ok: queued as")
        [entry] = self.queued()
        assert without_trace(self.body(entry)) == TRICKY

    async def test_size_limit_counts_every_chunk_and_the_rest_is_discarded(self) -> None:
        """The second chunk passes SIZE: 552, and it and the third are still read in full
        (their octets, commands among them, never executed), then the session goes on."""
        half = b"x" * 70 + b"\r\n"
        body = half * (MAX_SIZE // 2 // len(half) + 1)  # a little over half the limit
        poison = b"RSET\r\n" + b"y" * 50 + b"\r\n"

        def talk(wire: Wire) -> list[bytes]:
            wire.send(envelope_lines() + bdat(body, body, poison))
            replies = wire.replies(5)
            replies.append(wire.command(b"MAIL FROM:<alice@example.test>")[-1])
            replies.append(wire.command(b"RSET")[-1])
            return replies

        replies = await self.client(talk)
        assert replies[2].startswith(b"250 2.0.0"), replies
        assert replies[3].startswith(b"552 5.3.4"), replies
        assert replies[4].startswith(b"552 5.3.4"), replies  # the LAST chunk: same verdict
        assert replies[5].startswith(b"250 2.1.0"), replies  # the transaction had ended
        assert replies[6].startswith(b"250 2.0.0"), replies
        assert self.queued() == []

    async def test_data_after_bdat_and_rcpt_after_bdat_are_bad_sequence(self) -> None:
        def talk(wire: Wire) -> list[bytes]:
            wire.send(envelope_lines() + bdat(b"Subject: x\r\n", last=False)
                      + b"DATA\r\nRCPT TO:<carol@example.test>\r\nRSET\r\n")
            return wire.replies(6)

        replies = await self.client(talk)
        assert [r[:9] for r in replies[2:]] == [b"250 2.0.0", b"503 5.5.1", b"503 5.5.1",
                                                b"250 2.0.0"], replies
        assert self.queued() == []

    async def test_bdat_without_mail_or_rcpt_is_read_and_refused(self) -> None:
        """The octets of a refused chunk are read by its size all the same: the MAIL inside
        it is never executed."""
        inside = b"MAIL FROM:<evil@example.test>\r\n"

        def talk(wire: Wire) -> list[bytes]:
            wire.send(bdat(inside) + b"MAIL FROM:<alice@example.test>\r\n" + bdat(inside)
                      + b"RCPT TO:<bob@example.test>\r\n" + bdat(b"Subject: ok\r\n"))
            return wire.replies(5)

        replies = await self.client(talk)
        assert replies[0].startswith(b"503 5.5.1"), replies  # no MAIL
        assert replies[1].startswith(b"250 2.1.0"), replies
        assert replies[2].startswith(b"503 5.5.1"), replies  # no RCPT; the transaction stays
        assert replies[3].startswith(b"250 2.1.5"), replies
        assert replies[4].startswith(b"250 2.0.0 Ok: queued as"), replies
        [entry] = self.queued()
        assert entry.envelope.sender == "alice@example.test"

    async def test_bad_size_argument(self) -> None:
        def talk(wire: Wire) -> list[bytes]:
            wire.send(envelope_lines())
            wire.replies(2)
            return [wire.command(arg)[-1] for arg in (
                b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT 1 NOTLAST", b"BDAT 1 LAST x",
                b"BDAT \xd9\xa3", b"BDAT " + b"9" * 19, b"NOOP",
            )]

        replies = await self.client(talk)
        assert [r[:9] for r in replies] == [b"501 5.5.4"] * 7 + [b"250 2.0.0"], replies

    async def test_bare_line_endings_refused_and_the_session_goes_on(self) -> None:
        """A bare LF (or CR), even split across chunks, would let a DATA-only next hop see a
        different message end: refused, and as the chunk framing is intact the session
        stays usable."""

        def talk(wire: Wire) -> list[bytes]:
            replies = []
            for chunks in ((b"a\n.\r\nb\r\n",), (b"a\r", b".\r\n"), (b"a\r\n", b"\nx\r\n"),
                           (b"ends in CR\r",), (b"a\x00b\r\n",), (b"x" * 999 + b"\r\n",)):
                wire.send(envelope_lines() + bdat(*chunks))
                replies += wire.replies(2 + len(chunks))[-1:]
            replies.append(wire.command(b"NOOP")[-1])
            return replies

        replies = await self.client(talk)
        assert [r[:9] for r in replies] == [b"550 5.6.0"] * 4 + [b"554 5.6.0", b"550 5.6.0",
                                                                  b"250 2.0.0"], replies
        assert self.queued() == []

    async def test_quit_in_the_middle_queues_nothing(self) -> None:
        def talk(wire: Wire) -> list[bytes]:
            wire.send(envelope_lines() + bdat(b"Subject: half\r\n", last=False) + b"QUIT\r\n")
            replies = wire.replies(4)
            assert wire.closed()
            return replies

        replies = await self.client(talk)
        assert replies[3].startswith(b"221"), replies
        assert self.queued() == []

    async def test_rset_between_chunks_then_a_new_transaction(self) -> None:
        def talk(wire: Wire) -> list[bytes]:
            wire.send(envelope_lines() + bdat(b"Subject: dropped\r\n", last=False)
                      + b"RSET\r\n" + envelope_lines() + bdat(b"Subject: kept\r\n")
                      + envelope_lines() + b"DATA\r\n")
            replies = wire.replies(10)
            wire.send(b"Subject: by DATA\r\n.\r\n")
            replies.append(wire.reply()[-1])
            return replies

        replies = await self.client(talk)
        assert replies[3].startswith(b"250 2.0.0 Reset"), replies
        assert replies[6].startswith(b"250 2.0.0 Ok: queued as"), replies
        assert replies[9].startswith(b"354"), replies  # BDAT and DATA in one session
        assert replies[10].startswith(b"250 2.0.0 Ok: queued as"), replies
        bodies = sorted(without_trace(self.body(e)) for e in self.queued())
        assert bodies == [b"Subject: by DATA\r\n", b"Subject: kept\r\n"]

    # -- REQUIRETLS ------------------------------------------------------------------------

    async def test_requiretls_refused_in_plaintext_accepted_and_stored_after_starttls(
        self,
    ) -> None:
        def talk(wire: Wire) -> list[bytes]:
            replies = [wire.command(b"MAIL FROM:<alice@example.test> REQUIRETLS")[-1]]
            wire.starttls()
            ehlo = wire.command(b"EHLO client.test")
            assert b"250-REQUIRETLS" in ehlo or b"250 REQUIRETLS" in ehlo, ehlo
            replies.append(wire.command(b"MAIL FROM:<alice@example.test> REQUIRETLS=YES")[-1])
            wire.send(envelope_lines(extra=b" REQUIRETLS") + bdat(TRICKY))
            return replies + wire.replies(3)

        replies = await self.client(talk)
        assert replies[0].startswith(b"530 5.7.10"), replies
        assert replies[1].startswith(b"501 5.5.4"), replies  # a keyword without a value
        assert replies[4].startswith(b"250 2.0.0 Ok: queued as"), replies
        [entry] = self.queued()
        assert entry.envelope.requiretls
        # What delivery will read back from the disk, not only the object in memory.
        assert self.spool.load(entry.queue_id).envelope.requiretls
        assert without_trace(self.body(entry)) == TRICKY

    async def test_no_requiretls_without_the_parameter(self) -> None:
        def talk(wire: Wire) -> list[bytes]:
            wire.starttls()
            wire.command(b"EHLO client.test")
            wire.send(envelope_lines() + bdat(b"Subject: plain\r\n"))
            return wire.replies(3)

        replies = await self.client(talk)
        assert replies[2].startswith(b"250 2.0.0 Ok: queued as"), replies
        [entry] = self.queued()
        assert not entry.envelope.requiretls
        assert entry.envelope.tls_required_no is False  # read at intake: no such field

    async def test_tls_required_no_is_read_at_intake_and_stored(self) -> None:
        def talk(wire: Wire) -> list[bytes]:
            wire.send(envelope_lines() + bdat(b"Subject: x\r\n", last=False)
                      + bdat(b"Tls-Required:\r\n  NO\r\n\r\nbody\r\n"))
            return wire.replies(4)

        replies = await self.client(talk)
        assert replies[3].startswith(b"250 2.0.0 Ok: queued as"), replies
        [entry] = self.queued()
        # A folded field, split across two chunks: delivery will not read the body for it.
        assert self.spool.load(entry.queue_id).envelope.tls_required_no is True
