"""Session behaviour that transcripts cannot show: timeouts in virtual time, the JSON events
log, flow control and the memory a client that pipelines without reading can cost us, and a
full disk."""

from __future__ import annotations

import errno
import json
import os
import tracemalloc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import implementer

from fakes import SessionHarness
from smarthost.api import IIncomingMessage, IRcptCheck
from smarthost.core.envelope import Client
from smarthost.core.maillog import EventFile
from smarthost.smtpd.session import Session


def harness(tmp: Path, events: EventFile | None = None,
            plugins: Sequence[tuple[str, object]] = ()) -> SessionHarness:
    return SessionHarness(tmp, plugins, role="smtp", hostname="mx.test", port=1234,
                          events=events)


def make(tmp: Path, events: EventFile | None = None) -> tuple[Session, StringTransport, Clock]:
    h = harness(tmp, events)
    return h.session, h.transport, h.clock


def test_idle_client_gets_421_after_command_timeout(tmp_path: Path) -> None:
    session, transport, clock = make(tmp_path)
    clock.advance(299)
    session.dataReceived(b"NOOP\r\n")  # activity resets the timer
    clock.advance(299)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.value().endswith(b"421 4.4.2 Timeout exceeded, closing connection\r\n")
    assert transport.disconnecting


def test_timeout_also_applies_in_data(tmp_path: Path) -> None:
    session, transport, clock = make(tmp_path)
    session.dataReceived(b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.test>\r\n"
                         b"DATA\r\nSubject: half\r\n")
    clock.advance(300)
    assert transport.disconnecting
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []  # the partial message is gone


def test_events_file_gets_one_json_object_per_event(tmp_path: Path) -> None:
    events = EventFile(str(tmp_path / "log" / "events.jsonl"))
    session, _, _ = make(tmp_path, events)
    session.dataReceived(b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@elsewhere.test>\r\n"
                         b"RCPT TO:<b@example.test>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    events.close()
    lines = [json.loads(line) for line in (tmp_path / "log" / "events.jsonl").read_text()
             .splitlines()]
    kinds = [e["event"] for e in lines]
    assert kinds == ["refused", "accepted"]
    accepted = lines[1]
    assert accepted["client"] == "192.0.2.7" and accepted["recipients"] == 1
    assert accepted["sender"] == "a@x.test" and accepted["user"] == "anonymous"


@implementer(IRcptCheck)
class Slow:
    def __init__(self) -> None:
        self.pending = Deferred[None]()

    async def check_rcpt(self, client: Client, sender: str, recipient: str) -> None:
        await self.pending


def test_a_client_that_pipelines_without_reading_is_paused(tmp_path: Path) -> None:
    slow = Slow()  # a pending RCPT check holds replies
    h = harness(tmp_path, plugins=[("slow", slow)])
    session, transport, pending = h.session, h.transport, slow.pending
    session.dataReceived(b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.test>\r\n")
    session.dataReceived(b"X" * 1_200_000)  # 1.2 MB pipelined while a reply is pending
    assert transport.producerState == "paused"
    pending.callback(None)
    assert transport.producerState == "producing"


def test_anonymous_dsn_requests_are_limited_to_failure_with_headers(tmp_path: Path) -> None:
    """Success and delay reports to an unverified sender would make us a reflector."""
    h = harness(tmp_path)
    session, transport = h.session, h.transport
    session.dataReceived(
        b"EHLO c\r\nMAIL FROM:<victim@remote.test> RET=FULL\r\n"
        b"RCPT TO:<a@example.test> NOTIFY=SUCCESS,DELAY\r\n"
        b"RCPT TO:<b@example.test> NOTIFY=SUCCESS,FAILURE\r\n"
        b"RCPT TO:<c@example.test> NOTIFY=NEVER\r\nRCPT TO:<d@example.test>\r\n"
        b"DATA\r\nSubject: x\r\n\r\n.\r\n"
    )
    assert b"queued as" in transport.value()
    [entry] = h.spool.entries()
    notify = [r.notify for r in entry.envelope.recipients]
    assert notify == [("NEVER",), ("FAILURE",), ("NEVER",), ("FAILURE",)]
    assert entry.envelope.ret == "HDRS"


# -- a full disk (issue 18, finding 12) -------------------------------------------------------


class FullDisk:
    """Wraps a spool's incoming message: ``write`` (after ``writes`` of them) or ``commit``
    fails as a full disk does (SpoolFull is an OSError with errno ENOSPC)."""

    def __init__(self, incoming: Any, *, writes: int | None = None, errno_: int = errno.ENOSPC):
        self._incoming, self._writes, self._errno = incoming, writes, errno_
        self.queue_id = incoming.queue_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._incoming, name)

    def write(self, data: bytes) -> None:
        if self._writes is not None:
            self._writes -= 1
            if self._writes < 0:
                raise OSError(self._errno, os.strerror(self._errno))
        self._incoming.write(data)

    def commit(self, envelope: Any) -> Deferred[Any]:
        self._incoming.abort()
        return fail(OSError(self._errno, os.strerror(self._errno)))


def full_disk_session(tmp: Path, **full: Any) -> SessionHarness:
    h = harness(tmp)
    receive = h.spool.receive
    h.spool.receive = lambda: cast(IIncomingMessage, FullDisk(receive(), **full))  # type: ignore[method-assign]
    assert h.send("HELO c")[-1].startswith("250")
    return h


@contextmanager
def logged() -> Iterator[list[dict[str, Any]]]:
    """Every log event while inside."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


@pytest.mark.parametrize(("where", "code"), [
    ("commit", errno.ENOSPC), ("commit", errno.EDQUOT), ("body", errno.ENOSPC),
    ("trace header", errno.ENOSPC),
])
def test_a_full_disk_answers_452_with_one_line_and_no_traceback(
    tmp_path: Path, where: str, code: int
) -> None:
    writes = {"commit": None, "body": 1, "trace header": 0}[where]
    h = full_disk_session(tmp_path, writes=writes, errno_=code)
    with logged() as events:
        if where == "trace header":  # at DATA, before the 354
            replies = h.send("MAIL FROM:<a@x.test>", "RCPT TO:<b@example.test>", "DATA")
        else:
            replies = h.message("a@x.test", ["b@example.test"], "Subject: x\n\nbody")
    assert replies[-1].startswith("452 4.3.1"), replies
    assert h.spool.queue_ids() == []
    failures = [e for e in events if "log_failure" in e]
    full = [e for e in events if "spool is full" in str(e.get("log_format", ""))]
    assert failures == [] and len(full) == 1, events
    assert h.send("NOOP") == ["250 2.0.0 OK"]  # the session goes on


def test_another_commit_error_is_still_a_local_error(tmp_path: Path) -> None:
    h = full_disk_session(tmp_path, errno_=errno.EIO)
    with logged() as events:
        replies = h.message("a@x.test", ["b@example.test"], "Subject: x\n\nbody")
    assert replies[-1].startswith("451 4.3.0")
    assert any("log_failure" in e for e in events)


# -- memory per connection, measured (finding 3) ----------------------------------------------


class TCPLikeTransport(StringTransport):
    """Pauses its producer while more than 64 KiB are unsent, as Twisted's TCP transport does
    (FileDescriptor.bufferSize); nothing is ever sent: the client does not read."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > 65536 and self.producer is not None:
            self.producer.pauseProducing()


def test_a_client_that_never_reads_costs_a_bounded_amount_of_memory(tmp_path: Path) -> None:
    """60 MB of pipelined HELP (the issue's attack) from a client that reads nothing: measured
    with tracemalloc, the session holds about 250 KB (measured: 258 KB), whatever the client
    sends."""
    h = harness(tmp_path)
    session = h.session
    transport = TCPLikeTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 1234))
    chunk, fed = b"HELP\r\n" * 10922, 0  # 64 KiB reads, as the reactor makes them
    tracemalloc.start()
    try:
        session.makeConnection(transport)
        while fed < 60_000_000 and transport.producerState == "producing":
            session.dataReceived(chunk)
            fed += len(chunk)
            for _ in range(1000):  # the reactor's turns, until the commands wait for output
                if len(transport.value()) > 65536:
                    break
                h.clock.advance(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert transport.producerState == "paused"
    assert len(transport.value()) > 65536  # the replies stopped at the transport's bound
    assert fed < 300_000
    assert peak < 400_000, peak  # replies (64 KiB) + pipelined input (64 KiB) + a read


def test_a_full_events_disk_still_gets_the_message_its_250(tmp_path: Path) -> None:
    """The audit log cannot be written (/dev/full: ENOSPC): the message is still queued and
    answered 250, as without the events file."""
    h = harness(tmp_path, EventFile("/dev/full"))
    h.session.dataReceived(b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.test>\r\n"
                           b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert b"250 2.0.0 Ok: queued as" in h.transport.value()
    assert len(h.committed()) == 1
