"""CHUNKING/BDAT (RFC 3030) in the session, in virtual time on a StringTransport: the command
syntax, the content rules across every way of cutting a message into chunks (hypothesis,
against a plain reference), the same end-of-message path as DATA (From: ownership, plugins,
the hold brake), and DATA's protections (deadlines, the data rate, bounded buffering) for
chunk octets."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface import implementer

from fakes import SessionHarness, codes
from smarthost.api import IDataCheck, MessageView
from smarthost.core.envelope import Client
from smarthost.core.maillog import EventFile
from smarthost.core.replies import Reply
from smarthost.smtpd.bdat import ChunkedBody, parse_bdat
from smarthost.smtpd.limits import LimitSettings
from smarthost.smtpd.transport import MAX_BUFFER


def bdat(*chunks: bytes, last: bool = True) -> bytes:
    out = b""
    for i, chunk in enumerate(chunks):
        marker = b" LAST" if last and i == len(chunks) - 1 else b""
        out += b"BDAT %d%s\r\n" % (len(chunk), marker) + chunk
    return out


def trusted(tmp: Path, command_timeout: float = 300,
            limits: LimitSettings | None = None) -> SessionHarness:
    """A trusted office server relaying (no AUTH), EHLO done."""
    h = SessionHarness(tmp, role="smtp", trusted=["192.0.2.0/24"],
                       command_timeout=command_timeout, limits=limits)
    assert h.send("EHLO client.test")[-1] == "250 CHUNKING"
    return h


ENVELOPE = b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<b@example.test>\r\n"


def stored(h: SessionHarness) -> list[bytes]:
    """Every committed body without our Received: header."""
    out = []
    for body in h.committed():
        out.append(re.sub(rb"\AReceived: .*?\r\n(\t.*?\r\n)*", b"", body, flags=re.S))
    return out


# -- the command ---------------------------------------------------------------------------

@pytest.mark.parametrize(("arg", "parsed"), [
    ("0", (0, False)), ("0 LAST", (0, True)), ("10 last", (10, True)), ("007", (7, False)),
    ("9" * 18, (10**18 - 1, False)), ("9" * 19, None), ("", None), ("x", None), ("-1", None),
    ("+1", None), ("1 LAST x", None), ("1 NOTLAST", None), ("1  LAST", None), (" 1", None),
    ("\u0663", None), ("1.0", None), ("0x10", None),
])
def test_parse_bdat(arg: str, parsed: tuple[int, bool] | None) -> None:
    assert parse_bdat(arg) == parsed


# -- the content rules, however the message is cut -----------------------------------------

def reference(message: bytes, max_size: int) -> str | None:
    """What is wrong with a whole message, judged the plain way; None: acceptable."""
    if len(message) > max_size:
        return "552"
    lines = message.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        return "550"
    if any(len(line) > 998 for line in lines):
        return "550"
    if b"\0" in message:
        return "554"
    return None


ATOMS = st.sampled_from([b"\r\n", b"\r", b"\n", b"\0", b".", b"a", b"x" * 400, b"\xff",
                         b"\r\n.\r\n", b"QUIT\r\n"])


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(ATOMS, max_size=12), cuts=st.lists(st.integers(0, 3000), max_size=5),
       max_size=st.sampled_from([10_000, 1200]))
def test_verdict_matches_the_reference_however_cut(
    parts: list[bytes], cuts: list[int], max_size: int
) -> None:
    """The body's checks see one chunk in arbitrary packets (a CRLF or a long line split
    anywhere): the verdict never depends on the cuts and is the reference's (the worst
    fault), an accepted message is written whole and unchanged."""
    message = b"".join(parts)
    written: list[bytes] = []
    body = ChunkedBody(written.append, max_size)
    points = sorted({0, len(message), *(c for c in cuts if c < len(message))})
    for start, end in itertools.pairwise(points):
        body.announce(end - start)
        body.feed(message[start:end])
    if not message:
        body.announce(0)
    verdict = body.finish()
    expected = reference(message, max_size)
    if expected is None:
        assert verdict is None and b"".join(written) == message
    else:
        assert verdict is not None and str(verdict.code) == expected
        # Nothing bad was written (but a last CR, refused at the end: its LF could follow).
        assert reference(b"".join(written).removesuffix(b"\r"), max_size) is None


def test_a_chunk_over_the_size_limit_is_never_written() -> None:
    written: list[bytes] = []
    body = ChunkedBody(written.append, 100)
    body.announce(60)
    body.feed(b"x" * 58 + b"\r\n")
    body.announce(60)
    body.feed(b"y" * 58 + b"\r\n")
    assert body.finish() is not None and body.finish().code == 552  # type: ignore[union-attr]
    assert written == [b"x" * 58 + b"\r\n"]


# -- the session -------------------------------------------------------------------------------

def test_pipelined_transaction_and_its_replies_in_order(tmp_path: Path) -> None:
    h = trusted(tmp_path)
    chunks = (b"Subject: a\r\n\r\n.\r", b"\n..\r\nQUIT\r\n", b"")
    replies = h.feed(ENVELOPE + bdat(*chunks) + b"NOOP\r\n")
    assert codes(replies) == [250] * 6
    assert replies[2] == "250 2.0.0 16 octets received"
    assert replies[4].startswith("250 2.0.0 Ok: queued as ")
    assert stored(h) == [b"".join(chunks)]


def test_a_message_without_a_final_crlf_is_stored_as_sent(tmp_path: Path) -> None:
    """Delivery completes an open last line (DotStuffer.end / send_chunks)."""
    h = trusted(tmp_path)
    assert codes(h.feed(ENVELOPE + bdat(b"Subject: x\r\n\r\nno newline"))) == [250] * 3
    assert stored(h) == [b"Subject: x\r\n\r\nno newline"]


def test_one_octet_at_a_time(tmp_path: Path) -> None:
    h = trusted(tmp_path)
    data = ENVELOPE + bdat(b"Subject: slow\r\n", b"body\r\n") + b"QUIT\r\n"
    replies = []
    for i in range(len(data)):
        replies += h.feed(data[i : i + 1])
    assert codes(replies) == [250, 250, 250, 250, 221]
    assert stored(h) == [b"Subject: slow\r\nbody\r\n"]


def test_after_a_refused_chunk_every_chunk_is_read_and_refused_until_last(
    tmp_path: Path,
) -> None:
    h = trusted(tmp_path)
    replies = h.feed(ENVELOPE + bdat(b"ok\r\n", b"bare\n", b"MAIL FROM:<x@y.test>\r\n",
                                     b"RSET\r\n") + b"MAIL FROM:<a@remote.test>\r\n")
    assert [r[:9] for r in replies] == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "550 5.6.0",
                                        "550 5.6.0", "550 5.6.0", "250 2.1.0"]
    assert h.committed() == []


def test_bdat_after_last_needs_a_new_transaction(tmp_path: Path) -> None:
    """RFC 3030 2: a BDAT after BDAT LAST is a bad sequence (its octets still read)."""
    h = trusted(tmp_path)
    replies = h.feed(ENVELOPE + bdat(b"one\r\n") + bdat(b"MAIL\r\n", b"two\r\n"))
    assert [r[:9] for r in replies][2:] == ["250 2.0.0", "503 5.5.1", "503 5.5.1"]
    assert stored(h) == [b"one\r\n"]


def test_the_from_check_applies_to_bdat(tmp_path: Path) -> None:
    events = EventFile(str(tmp_path / "events.jsonl"))
    h = SessionHarness(tmp_path, events=events)
    h.login()
    replies = h.feed(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
                     + bdat(b"From: CEO <ceo@example.test>\r\n", b"\r\npay now\r\n"))
    assert replies[-1].startswith("550 5.7.1")
    replies = h.feed(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
                     + bdat(b"From: Alice <alice@example.test>\r\n", b"\r\nhi\r\n"))
    assert replies[-1].startswith("250 2.0.0 Ok: queued as")
    assert len(h.committed()) == 1
    events.close()
    logged = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in logged if e["event"] == "refused"] == ["BDAT"]  # not "DATA"


@implementer(IDataCheck)
class Inspector:
    def __init__(self) -> None:
        self.seen: list[MessageView] = []
        self.read: list[bytes] = []

    async def check_data(self, client: Client, message: MessageView) -> Reply | None:
        self.seen.append(message)
        self.read.append(message.read())
        if b"Subject: spam" in message.headers:
            return Reply(554, "5.7.1", "looks like spam")
        return None


def test_plugins_see_a_bdat_message_as_they_see_data(tmp_path: Path) -> None:
    inspector = Inspector()
    h = SessionHarness(tmp_path, [("inspector", inspector)], role="smtp",
                       trusted=["192.0.2.0/24"])
    h.send("EHLO client.test")
    replies = h.feed(ENVELOPE + bdat(b"Subject: sp", b"am\r\n\r\nbuy\r\n"))
    assert replies[-1].startswith("554 5.7.1")
    replies = h.feed(ENVELOPE + bdat(b"Subject: fine\r\n\r\nhello\r\n"))
    assert replies[-1].startswith("250 2.0.0 Ok: queued as")
    seen = inspector.seen[-1]
    assert seen.headers == b"Subject: fine\r\n" and seen.size == 24
    assert inspector.read[-1].endswith(b"\r\nSubject: fine\r\n\r\nhello\r\n")  # Received: on top


def test_the_hold_brake_counts_bdat_messages(tmp_path: Path) -> None:
    h = SessionHarness(tmp_path, limits=LimitSettings(hold_user_after_per_hour=1))
    h.login()
    for _ in range(2):
        h.feed(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
               + bdat(b"Subject: hi\r\n\r\nhi\r\n"))
    assert sorted(e.envelope.held for e in h.spool.entries()) == [False, True]


def test_rset_ehlo_and_a_lost_connection_drop_a_half_sent_message(tmp_path: Path) -> None:
    h = trusted(tmp_path)
    spill = tmp_path / "spool"
    before = sorted(p.name for p in spill.rglob("*"))
    for reset in (b"RSET\r\n", b"EHLO again.test\r\n"):
        replies = h.feed(ENVELOPE + bdat(b"x" * 100 + b"\r\n", last=False) + reset)
        assert replies[-1].startswith("250")
    h.feed(ENVELOPE + b"BDAT 50000 LAST\r\n" + b"y" * 20_000)  # mid-chunk
    h.session.connectionLost()
    assert h.committed() == []
    assert sorted(p.name for p in spill.rglob("*")) == before  # no spill file left


def test_a_chunk_trickled_below_the_data_rate_times_out(tmp_path: Path) -> None:
    """A chunk has DATA's credit: command_timeout, then 1/min_data_rate s per octet."""
    h = trusted(tmp_path, command_timeout=10, limits=LimitSettings(min_data_rate=100))
    h.feed(ENVELOPE + b"BDAT 100000 LAST\r\n")
    for _ in range(18):  # 50 octets/s: half the rate; runs out at 10 + 0.5 * 18 s
        assert h.feed(b"x" * 50) == []
        h.clock.advance(1)
    h.feed(b"x" * 50)
    h.clock.advance(1)
    assert h.replies()[-1].startswith("421 4.4.2") and h.transport.disconnecting
    assert h.committed() == []


def test_chunks_at_the_rate_go_on(tmp_path: Path) -> None:
    h = trusted(tmp_path, command_timeout=10, limits=LimitSettings(min_data_rate=100))
    h.feed(ENVELOPE + b"BDAT 24000 LAST\r\n")
    replies = []
    for _ in range(120):  # two minutes at twice the rate
        replies += h.feed(b"x" * 198 + b"\r\n")
        h.clock.advance(1)
    assert replies[-1].startswith("250 2.0.0 Ok: queued as")


def test_a_client_that_does_not_read_its_replies_is_held_to_a_bounded_buffer(
    tmp_path: Path,
) -> None:
    """Pipelined small chunks while the output is full (the transport paused us): their
    octets wait unread, reading stops past MAX_BUFFER, and all goes on once it drains."""
    h = trusted(tmp_path)
    h.session.pauseProducing()  # what a transport whose write buffer is full does
    stream = ENVELOPE + bdat(*([b"z" * 98 + b"\r\n"] * 900))
    fed = 0
    for i in range(0, len(stream), 65536):
        if h.transport.producerState != "producing":
            break
        h.session.dataReceived(stream[i : i + 65536])
        fed = i + 65536
    assert h.transport.producerState == "paused"
    assert fed <= 2 * 65536 and h.transport.value() == b""
    h.session.resumeProducing()
    h.session.dataReceived(stream[fed:])
    for _ in range(100):  # LINES_PER_TURN at a time, a reactor turn apart
        h.clock.advance(0)
    replies = h.replies()
    assert replies[-1].startswith("250 2.0.0 Ok: queued as"), replies[-3:]
    assert len(replies) == 2 + 900
    assert len(h.committed()) == 1
    assert MAX_BUFFER == 65536


def test_chunks_pipelined_behind_a_refusal_count_as_one_error(tmp_path: Path) -> None:
    """A client that pipelines a big message (our own delivery does, in 64 KiB chunks) gets
    the refusal for every chunk after the refused one, but the error limits (a stall from
    the 10th error, 421 at the 20th) count it once: the verdict stays the 5xx, not a 421."""
    h = trusted(tmp_path)
    chunks = [b"bare\n", *([b"x\r\n"] * 40)]
    replies = h.feed(ENVELOPE + bdat(*chunks) + b"NOOP\r\n")
    assert codes(replies) == [250, 250] + [550] * 41 + [250]
    assert not h.transport.disconnecting
    now = h.clock.seconds()  # no stall pending: only the command deadline
    assert all(call.getTime() - now == 300 for call in h.clock.getDelayedCalls())
    # The same when the RCPT was refused: no transaction for any of the chunks.
    replies = h.feed(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
                     + bdat(*([b"y\r\n"] * 40)) + b"RSET\r\n")
    assert codes(replies) == [250, 554] + [503] * 40 + [250]
    assert not h.transport.disconnecting
