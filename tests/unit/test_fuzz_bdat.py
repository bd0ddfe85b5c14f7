"""Fuzzing CHUNKING against a model: a hypothesis state machine sends MAIL, RCPT, BDAT chunks
(random content, sizes, LAST or not), DATA, RSET and malformed BDAT commands to one session,
every step's bytes cut into random packets, and checks each reply code against a small model
of RFC 3030 and our content rules, and that exactly the messages answered "queued" are in the
spool, byte for byte.

The model judges a chunk by the message's octets so far, written the plain way (regexes over
the whole prefix), not the way the server does it (counts over each feed, two numbers kept
between feeds): a fault is reported by the first chunk whose octets reveal it.

CI runs a bounded number of examples; ``SMARTHOST_FUZZ_EXAMPLES=5000`` runs a long fuzz.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fakes import SessionHarness
from smarthost.smtpd.limits import LimitSettings
from smtpwire import bdat, without_trace

EXAMPLES = int(os.environ.get("SMARTHOST_FUZZ_EXAMPLES", "0"))
MAX_SIZE = 600
QUEUED = re.compile(r"250 2\.0\.0 Ok: queued as [0-9A-F]+\Z")

ATOMS = st.sampled_from([
    b"\r\n", b"\r", b"\n", b"\0", b".", b"..", b"a", b"x" * 300, b"\xff\xfe", b"\r\n.\r\n",
    b"QUIT\r\n", b"BDAT 1 LAST\r\n", b"Subject: fuzz\r\n", b"\r\n\r\n",
])
CHUNKS = st.lists(ATOMS, max_size=6).map(b"".join)


def fault(octets: bytes, *, ended: bool) -> int | None:
    """The reply code for a message whose octets so far are ``octets``: None while nothing
    is wrong yet. A CR as the very last octet is only bare once the message has ended."""
    if len(octets) > MAX_SIZE:
        return 552
    body = octets if ended else octets.removesuffix(b"\r")
    if re.search(rb"\r(?!\n)|(?<!\r)\n", body):
        return 550
    if any(len(line) > 998 for line in body.split(b"\r\n")):
        return 550
    if b"\0" in body:
        return 554
    return None


class ChunkingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="fuzz-bdat-"))
        self.h: SessionHarness | None = None
        self.expected: list[bytes] = []  # bodies that must be in the spool
        self.sender = self.recipient = False
        self.chunked: bytes | None = None  # octets of the BDAT message so far
        self.announced = 0
        self.failed: int | None = None

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    @initialize()
    def start(self) -> None:
        # No error limits in the way: the model does not count errors.
        self.h = SessionHarness(self.tmp, role="smtp", max_size=MAX_SIZE,
                                limits=LimitSettings(soft_errors=10_000, hard_errors=10_000))
        assert self.h.send("EHLO client.test")[-1] == "250 CHUNKING"

    def _talk(self, data: bytes, cuts: list[int]) -> list[str]:
        assert self.h is not None
        replies: list[str] = []
        points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
        for start, end in itertools.pairwise(points):
            replies += self.h.feed(data[start:end])
        return replies

    def _end_transaction(self) -> None:
        self.sender = self.recipient = False
        self.chunked, self.announced, self.failed = None, 0, None

    # -- the client ------------------------------------------------------------------------

    @rule(cuts=st.lists(st.integers(0, 60), max_size=2))
    def mail(self, cuts: list[int]) -> None:
        replies = self._talk(b"MAIL FROM:<a@remote.test>\r\n", cuts)
        assert [r[:3] for r in replies] == ["503" if self.sender else "250"]
        self.sender = True

    @rule(cuts=st.lists(st.integers(0, 60), max_size=2))
    def rcpt(self, cuts: list[int]) -> None:
        replies = self._talk(b"RCPT TO:<b@example.test>\r\n", cuts)
        ok = self.sender and self.chunked is None
        assert [r[:3] for r in replies] == ["250" if ok else "503"], replies
        self.recipient = self.recipient or ok

    @rule(octets=CHUNKS, last=st.booleans(), cuts=st.lists(st.integers(0, 2000), max_size=4))
    def chunk(self, octets: bytes, last: bool, cuts: list[int]) -> None:
        [reply] = self._talk(bdat(octets, last=last), cuts)
        if self.chunked is None and not (self.sender and self.recipient):
            assert reply[:3] == "503", reply  # no transaction: nothing changes
            return
        self.chunked = (self.chunked or b"") + octets
        self.announced += len(octets)
        if self.failed is None:
            self.failed = 552 if self.announced > MAX_SIZE else fault(self.chunked, ended=last)
        if self.failed is not None:
            assert reply[:3] == str(self.failed), (reply, self.chunked)
        elif last:
            assert QUEUED.match(reply), reply
            self.expected.append(self.chunked)
        else:
            assert reply == f"250 2.0.0 {len(octets)} octets received", reply
        if last:
            self._end_transaction()

    @rule(cuts=st.lists(st.integers(0, 30), max_size=2))
    def data(self, cuts: list[int]) -> None:
        if self.chunked is not None or not self.sender:
            assert [r[:3] for r in self._talk(b"DATA\r\n", cuts)] == ["503"]
        elif not self.recipient:
            assert [r[:3] for r in self._talk(b"DATA\r\n", cuts)] == ["554"]
        else:
            replies = self._talk(b"DATA\r\nSubject: by DATA\r\n\r\n..dot\r\n.\r\n", cuts)
            assert replies[0][:3] == "354" and QUEUED.match(replies[1]), replies
            self.expected.append(b"Subject: by DATA\r\n\r\n.dot\r\n")
            self._end_transaction()

    @rule(line=st.sampled_from([b"RSET", b"BDAT", b"BDAT x", b"BDAT 1 FIRST", b"NOOP"]))
    def other(self, line: bytes) -> None:
        [reply] = self._talk(line + b"\r\n", [])
        if line == b"RSET":
            self._end_transaction()
        assert reply[:3] == ("501" if line.startswith(b"BDAT") else "250"), reply

    # -- the spool -------------------------------------------------------------------------

    @invariant()
    def spool_holds_exactly_the_queued_messages(self) -> None:
        if self.h is not None:
            stored = sorted(without_trace(body) for body in self.h.committed())
            assert stored == sorted(self.expected)


ChunkingMachine.TestCase.settings = settings(
    max_examples=EXAMPLES or 100,
    stateful_step_count=60 if EXAMPLES else 30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestChunkingFuzz = ChunkingMachine.TestCase
