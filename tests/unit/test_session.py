"""Session behaviour that transcripts cannot show: timeouts in virtual time, the JSON events
log, and flow control for clients that pipeline without reading."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from fakes import SessionHarness
from smarthost.api import IRcptCheck
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
