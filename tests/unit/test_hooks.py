"""Plugin stages as the session runs them: refusals, failing closed, timeouts, headers."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred
from zope.interface import implementer

from fakes import SessionHarness
from smarthost.api import (
    IConnectCheck,
    IDataCheck,
    IHeaderAdder,
    IHeloCheck,
    IMailCheck,
    IRcptCheck,
    MessageView,
)
from smarthost.core.envelope import Client
from smarthost.core.replies import PLUGIN_FAILED, Reply

NO_BOB = Reply(550, "5.7.1", "bob does not want mail")


@implementer(IRcptCheck)
class RefuseBob:
    async def check_rcpt(self, client: Client, sender: str, recipient: str) -> Reply | None:
        return NO_BOB if recipient.startswith("bob@") else None


@implementer(IRcptCheck)
class Crashes:
    async def check_rcpt(self, client: Client, sender: str, recipient: str) -> Reply | None:
        raise RuntimeError("plugin bug")


@implementer(IRcptCheck)
class NeverAnswers:
    def check_rcpt(self, client: Client, sender: str, recipient: str) -> Deferred[None]:
        return Deferred()


@implementer(IRcptCheck)
class TriesToGrant:
    async def check_rcpt(self, client: Client, sender: str, recipient: str) -> Reply | None:
        return Reply(250, "2.1.5", "I say yes")


@implementer(IDataCheck, IHeaderAdder)
class Inspector:
    def __init__(self) -> None:
        self.seen: list[MessageView] = []

    async def check_data(self, client: Client, message: MessageView) -> Reply | None:
        self.seen.append(message)
        if b"Subject: spam" in message.headers:
            return Reply(554, "5.7.1", "looks like spam")
        return None

    async def add_headers(self, client: Client, message: MessageView) -> list[tuple[str, str]]:
        return [("X-Checked", f"size={message.size} whole={len(message.read())}")]


@implementer(IConnectCheck, IHeloCheck, IMailCheck)
class Gatekeeper:
    async def check_connect(self, client: Client) -> Reply | None:
        return Reply(554, "5.7.1", "go away") if client.address == "192.0.2.66" else None

    async def check_helo(self, client: Client, helo: str) -> Reply | None:
        return Reply(550, "5.7.1", "bad helo") if helo == "localhost" else None

    async def check_mail(self, client: Client, sender: str) -> Reply | None:
        return Reply(550, "5.7.1", "no") if sender.endswith("@spam.test") else None


def harness(tmp: Path, plugins: list[tuple[str, object]],
            client: str = "192.0.2.7") -> SessionHarness:
    return SessionHarness(tmp, plugins, hostname="mx.test", client=client, port=1234,
                          plugin_timeout=5)


def codes(lines: list[str]) -> list[str]:
    return [line[:3] for line in lines if line[3:4] == " "]


def test_rcpt_refused_by_a_plugin_after_the_relay_rule(tmp_path: Path) -> None:
    h = harness(tmp_path, [("nobob", RefuseBob())])
    h.replies()
    replies = h.feed(b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<bob@example.test>\r\n"
                     b"RCPT TO:<carol@example.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")
    # The relay rule still comes first: the plugin is never asked about a relay attempt.
    assert codes(replies) == ["250", "250", "550", "250", "554"]


def test_plugin_exception_fails_closed(tmp_path: Path) -> None:
    h = harness(tmp_path, [("crashes", Crashes())])
    h.replies()
    replies = h.feed(b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<carol@example.test>\r\n")
    assert replies[-1].startswith("451 4.3.0")


def test_plugin_timeout_fails_closed_and_keeps_reply_order(tmp_path: Path) -> None:
    h = harness(tmp_path, [("slow", NeverAnswers())])
    h.replies()
    replies = h.feed(b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<carol@example.test>\r\nNOOP\r\n")
    assert codes(replies) == ["250", "250"]  # NOOP waits behind the pending RCPT
    h.clock.advance(5)
    assert codes(h.replies()) == ["451", "250"]


def test_a_plugin_cannot_grant(tmp_path: Path) -> None:
    h = harness(tmp_path, [("grant", TriesToGrant())])
    h.replies()
    replies = h.feed(b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<carol@example.test>\r\n")
    assert replies[-1] == PLUGIN_FAILED.to_bytes().decode().strip()


def test_data_check_sees_headers_and_header_adder_prepends(tmp_path: Path) -> None:
    inspector = Inspector()
    h = harness(tmp_path, [("inspector", inspector)])
    h.replies()
    h.feed(b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<carol@example.test>\r\nDATA\r\n")
    replies = h.feed(b"Subject: hello\r\nFrom: a@x.test\r\n\r\nbody\r\n.\r\n")
    assert replies[-1].startswith("250 2.0.0")
    [view] = inspector.seen
    assert view.headers == b"Subject: hello\r\nFrom: a@x.test\r\n"
    [qid] = h.spool.queue_ids()
    with h.spool.open_body(qid) as f:
        stored = f.read()
    assert stored.startswith(b"X-Checked: size=")
    assert stored.endswith(b"Subject: hello\r\nFrom: a@x.test\r\n\r\nbody\r\n")
    assert h.spool.load(qid).size == len(stored)
    # A refusal at DATA queues nothing.
    h.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<carol@example.test>\r\nDATA\r\n")
    replies = h.feed(b"Subject: spam\r\n\r\nbuy\r\n.\r\n")
    assert replies[-1].startswith("554 5.7.1")
    assert len(h.spool.queue_ids()) == 1


def test_connect_helo_and_mail_checks(tmp_path: Path) -> None:
    refused = harness(tmp_path / "a", [("gate", Gatekeeper())], client="192.0.2.66")
    assert codes(refused.replies()) == ["554"]
    assert refused.transport.disconnecting
    h = harness(tmp_path / "b", [("gate", Gatekeeper())])
    assert codes(h.replies()) == ["220"]
    assert codes(h.feed(b"HELO localhost\r\n")) == ["550"]
    assert codes(h.feed(b"HELO c\r\nMAIL FROM:<x@spam.test>\r\nMAIL FROM:<x@ok.test>\r\n")) == [
        "250", "550", "250"]
