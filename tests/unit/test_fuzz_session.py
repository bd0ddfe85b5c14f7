"""Fuzzing the ESMTP session: a hypothesis state machine drives one :class:`Session` with
random commands, parameters, bytes, split points and message bodies, and checks after every
step that the server never crashes, only ever writes well-formed replies, and queues exactly
the messages it answered ``250`` for, each one a complete message that ended with
``<CRLF>.<CRLF>``.

CI runs a bounded number of examples; ``SMARTHOST_FUZZ_EXAMPLES=5000 pytest
tests/test_fuzz_session.py`` runs a long fuzz (the step count grows with it a little).
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from test_dialogs import Dialog
from twisted.internet.error import ConnectionDone
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from smarthost.core.envelope import QueueId

EXAMPLES = int(os.environ.get("SMARTHOST_FUZZ_EXAMPLES", "0"))
HOSTNAME = b"mx.smarthost.test"  # what Dialog configures; the EHLO/HELO reply's first text

REPLY_LINE = re.compile(rb"(\d{3})([ -])(.*)\Z", re.S)
ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3} ")
QUEUED = re.compile(rb"250 2\.0\.0 .*\b([0-9A-F]{12,32})\Z")
# Replies RFC 2034 3 exempts from enhanced codes: the greeting and the EHLO/HELO response;
# 334 (a SASL challenge is base64 only) and 354 (not a completion reply) carry none either.
EXEMPT = {b"220", b"221", b"334", b"354"}

# -- strategies ---------------------------------------------------------------------------

DOMAINS = st.sampled_from([
    "example.test", "EXAMPLE.TEST", "remote.test", "bob.test", "[127.0.0.1]",
    "[IPv6:::1]", "r\u00e9mote.test", "example.test.", "", "x", "a..b",
])
LOCALS = st.sampled_from([
    "alice", "bob", "a%b", "\"q@x\"", "a!b", "post.master", "\u00fcser", "", ".a", "x" * 70,
])
PATHS = st.one_of(
    st.builds(lambda local, domain: f"<{local}@{domain}>", LOCALS, DOMAINS),
    st.sampled_from(["<>", "<", ">", "<<a@example.test>>", "<@x.test:a@example.test>",
                     "a@example.test", "<a@example.test", "<a@example.test> x"]),
    st.text(max_size=30),
)
MAIL_PARAMS = st.sampled_from([
    "SIZE=100", "SIZE=99999999", "SIZE=", "SIZE=x", "BODY=8BITMIME", "BODY=7BIT", "BODY=X",
    "SMTPUTF8", "SMTPUTF8=1", "RET=FULL", "RET=HDRS", "RET=", "ENVID=abc+2B", "ENVID=+zz",
    "ENVID=" + "e" * 120, "AUTH=<>", "AUTH=alice@example.test", "FOO=bar", "=", "X-Y",
    "SIZE=1 SIZE=2", "\u00e9=1",
])
RCPT_PARAMS = st.sampled_from([
    "NOTIFY=NEVER", "NOTIFY=SUCCESS,DELAY", "NOTIFY=FAILURE", "NOTIFY=NEVER,SUCCESS",
    "NOTIFY=", "NOTIFY=bogus", "ORCPT=rfc822;a@example.test", "ORCPT=rfc822;a+40b",
    "ORCPT=;x", "ORCPT=rfc822", "ORCPT=x;+zz", "FOO=1", "SMTPUTF8",
])
PLAIN_GOOD = base64.b64encode(b"\0alice@example.test\0secret").decode()
PLAIN_BAD = base64.b64encode(b"\0alice@example.test\0wrong").decode()
AUTH_LINES = st.sampled_from([
    f"AUTH PLAIN {PLAIN_GOOD}", f"AUTH PLAIN {PLAIN_BAD}", "AUTH PLAIN", "AUTH PLAIN =",
    "AUTH PLAIN !!!", "AUTH LOGIN", "AUTH LOGIN YWxpY2VAZXhhbXBsZS50ZXN0", "AUTH CRAM-MD5",
    "AUTH", "AUTH XOAUTH2 abc", "*", PLAIN_GOOD, PLAIN_BAD, "c2VjcmV0", "=", "====",
    base64.b64encode(b"\0bob\0secret").decode(),
])


def _mail(path: str, params: list[str]) -> str:
    return " ".join([f"MAIL FROM:{path}", *params])


def _rcpt(path: str, params: list[str]) -> str:
    return " ".join([f"RCPT TO:{path}", *params])


COMMANDS = st.one_of(
    st.builds(lambda v, a: f"{v} {a}".rstrip(), st.sampled_from(["EHLO", "HELO", "ehlo"]),
              st.sampled_from(["client.test", "", "[127.0.0.1]", "x y", "\u00e9", "a\tb"])),
    st.builds(_mail, PATHS, st.lists(MAIL_PARAMS, max_size=3)),
    st.builds(_rcpt, PATHS, st.lists(RCPT_PARAMS, max_size=3)),
    st.sampled_from([
        "DATA", "DATA x", "RSET", "RSET x", "NOOP", "NOOP hi", "QUIT", "VRFY alice", "VRFY",
        "EXPN list", "HELP", "STARTTLS", "STARTTLS x", "", " ", "MAIL", "RCPT", "MAIL FROM",
        "RCPT TO", "mail from:<a@example.test>", "XCLIENT ADDR=127.0.0.1", "GET / HTTP/1.0",
        # A well-formed BDAT would read the next octets as a chunk and queue messages this
        # machine cannot model: test_fuzz_bdat.py fuzzes CHUNKING against its own model.
        "TURN", "BDAT 10 LAST x", "123", "EHLO\x00x", "MAIL FROM:<a@example.test>\x00",
    ]),
    AUTH_LINES,
    st.text(max_size=40),
)
ENDINGS = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n", b""])


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """Several command lines in one stream, and the points to cut it into packets."""
    lines = draw(st.lists(COMMANDS, min_size=1, max_size=6))
    data = b"".join(line.encode("utf-8", "surrogatepass") + draw(ENDINGS) for line in lines)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return data, cuts


BODY_LINES = st.one_of(
    st.sampled_from([b"Subject: fuzz", b"", b".", b"..", b".x", b"From: a@example.test",
                     b"\x00", b"a\rb", b"a\nb", b".\r", b"\r.", b"\n.\n", b"x" * 998,
                     b"y" * 999, b"\xff\xfe", b"MAIL FROM:<x@example.test>", b"QUIT"]),
    st.binary(max_size=60),
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(BODY_LINES, max_size=8))
    end = draw(st.sampled_from([b"\r\n.\r\n"] * 4 + [b"\n.\n", b"\r\n.\n", b"\n.\r\n",
                                                      b"\r.\r", b"", b"\r\n"]))
    return b"\r\n".join(lines) + end


def _as_sent(body: bytes) -> re.Pattern[bytes]:
    """What the client must have sent for the server to store ``body``, ended by
    <CRLF>.<CRLF>: RFC 5321 4.5.2 removes the first "." of any line that starts with one, so
    a stored line starting with "." was sent with two, and any other non-empty line was sent
    with or without an extra leading dot."""
    parts = [rb"\r\n"]
    for line in body.split(b"\r\n")[:-1]:
        if line.startswith(b"."):
            parts.append(rb"\." + re.escape(line))
        elif line:
            parts.append(rb"\.?" + re.escape(line))
        parts.append(rb"\r\n")
    parts.append(rb"\.\r\n")
    return re.compile(b"".join(parts))


def _without_trace(data: bytes) -> bytes:
    """The body as the client sent it: our Received header (one line and its tab-indented
    continuations) removed."""
    lines = data.splitlines(keepends=True)
    assert lines and lines[0].startswith(b"Received: "), data[:200]
    i = 1
    while i < len(lines) and lines[i].startswith(b"\t"):
        i += 1
    return b"".join(lines[i:])


@implementer(ILogObserver)
class FailureObserver:
    """Collects logged failures: a session error answered 451 is still a crash to report."""

    def __init__(self, into: list[dict[str, Any]]) -> None:
        self._into = into

    def __call__(self, event: dict[str, Any]) -> None:
        if "log_failure" in event:
            self._into.append(event)


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="fuzz-session-"))
        self.dialog: Dialog | None = None
        self.sent = b""
        self.written = b""
        self.queued: set[str] = set()
        self.checked: set[str] = set()
        self.lost = False
        self.failures: list[dict[str, Any]] = []
        self._observer = FailureObserver(self.failures)
        globalLogPublisher.addObserver(self._observer)

    def teardown(self) -> None:
        globalLogPublisher.removeObserver(self._observer)
        shutil.rmtree(self.tmp, ignore_errors=True)

    @initialize(role=st.sampled_from(["submission", "submissions", "smtp"]),
                plaintext=st.booleans(), trusted=st.booleans(),
                max_recipients=st.sampled_from(["2", "5"]))
    def start(self, role: str, plaintext: bool, trusted: bool, max_recipients: str) -> None:
        self.dialog = Dialog(self.tmp, {
            "role": role,
            "allow_plaintext": "yes" if plaintext else "no",
            "trusted": "192.0.2.0/24" if trusted else "",
            "max_size": "10000",
            "max_recipients": max_recipients,
        })
        self._collect()

    # -- driving ---------------------------------------------------------------------------

    def _feed(self, data: bytes, cuts: list[int] | None = None) -> None:
        assert self.dialog is not None
        points = [0, *(cuts or []), len(data)]
        for start, end in itertools.pairwise(points):
            if start == end:
                continue
            self.sent += data[start:end]
            # No exception may escape: hypothesis reports it as the failure.
            self.dialog.session.dataReceived(data[start:end])
            self._collect()

    @rule(line=COMMANDS, ending=ENDINGS)
    def command(self, line: str, ending: bytes) -> None:
        self._feed(line.encode("utf-8", "surrogatepass") + ending)

    @rule(pipeline=pipelines())
    def pipelined(self, pipeline: tuple[bytes, list[int]]) -> None:
        self._feed(*pipeline)

    @rule(data=st.binary(max_size=300))
    def raw_bytes(self, data: bytes) -> None:
        self._feed(data)

    @rule(size=st.integers(900, 40_000), fill=st.sampled_from([b"A", b".", b"\r", b"x\r\n"]),
          ending=ENDINGS)
    def huge_line(self, size: int, fill: bytes, ending: bytes) -> None:
        data = (fill * size)[:size] + ending
        self._feed(data, [size // 3, size // 2])

    @rule(body=bodies(), cut=st.integers(0, 200))
    def message_data(self, body: bytes, cut: int) -> None:
        self._feed(body, [min(cut, len(body))])

    @rule(sender=st.sampled_from(["<>", "<alice@example.test>", "<bob@bob.test>"]),
          recipients=st.lists(st.sampled_from(["<bob@example.test>", "<x@remote.test>",
                                               "<Carol@Example.Test>"]), min_size=1,
                              max_size=3),
          body=bodies(), greet=st.booleans(), cut=st.integers(0, 400))
    def transaction(
        self, sender: str, recipients: list[str], body: bytes, greet: bool, cut: int
    ) -> None:
        """A whole transaction pipelined: mostly valid, sometimes with a bad body end."""
        lines = (["EHLO client.test"] if greet else []) + [f"MAIL FROM:{sender}"]
        lines += [f"RCPT TO:{r}" for r in recipients] + ["DATA"]
        data = "".join(line + "\r\n" for line in lines).encode() + body
        self._feed(data, [min(cut, len(data))])

    @rule(seconds=st.sampled_from([0.5, 1, 2, 5, 30, 301]))
    def time_passes(self, seconds: float) -> None:
        assert self.dialog is not None
        self.dialog.clock.advance(seconds)
        self._collect()

    # -- checking --------------------------------------------------------------------------

    def _collect(self) -> None:
        """Read what the server wrote and check every reply line."""
        assert self.dialog is not None
        transport = self.dialog.transport
        new = transport.value()
        transport.clear()
        if self.lost:
            assert new == b"", f"written after the connection was closed: {new!r}"
        self.written += new
        assert self.written == b"" or self.written.endswith(b"\r\n"), self.written[-200:]
        lines = new.split(b"\r\n")[:-1]
        group: list[bytes] = []
        for line in lines:
            assert b"\r" not in line and b"\n" not in line, line
            m = REPLY_LINE.match(line)
            assert m is not None, f"not a reply line: {line!r}"
            group.append(line)
            if m.group(2) == b" ":
                self._check_reply(group)
                group = []
        assert group == [], f"multi-line reply without its last line: {group!r}"
        if transport.disconnecting and not self.lost:
            # A real transport reports the close; the session must then stay silent.
            self.lost = True
            self.dialog.session.connectionLost(Failure(ConnectionDone()))

    def _check_reply(self, group: list[bytes]) -> None:
        code = group[0][:3]
        assert all(line[:3] == code for line in group), group
        if code in EXEMPT:
            return
        if code == b"250" and group[0][4:] == HOSTNAME:
            return  # the EHLO/HELO response and its extension lines
        for line in group:
            assert ENHANCED.match(line, 4), f"no enhanced status code: {line!r}"
            assert line[4:5] == code[:1], f"enhanced class differs from the code: {line!r}"
        queued = QUEUED.match(group[-1])
        if queued:
            self.queued.add(queued.group(1).decode())

    @invariant()
    def spool_matches_replies(self) -> None:
        if self.dialog is None:
            return
        spool = self.dialog.spool
        on_disk = {q.value for q in spool.queue_ids()}
        # Exactly the messages answered "250 ... queued as ID" are committed.
        assert on_disk == self.queued, (on_disk, self.queued)
        for queue_id in sorted(on_disk - self.checked):
            self.checked.add(queue_id)
            with spool.open_body(QueueId(queue_id)) as f:
                body = _without_trace(f.read())
            # A complete, valid message: CRLF lines only, none too long, and what the client
            # sent (dot-unstuffed) up to a <CRLF>.<CRLF>.
            assert body == b"" or body.endswith(b"\r\n"), body[-100:]
            bare = body.replace(b"\r\n", b"")
            assert b"\r" not in bare and b"\n" not in bare, body
            assert all(len(line) <= 1000 for line in body.split(b"\r\n")), "line too long"
            assert _as_sent(body).search(self.sent), body

    @invariant()
    def nothing_logged_a_crash(self) -> None:
        assert self.failures == [], self.failures


SessionMachine.TestCase.settings = settings(
    max_examples=EXAMPLES or 150,
    stateful_step_count=60 if EXAMPLES else 40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
)
TestSessionFuzz = SessionMachine.TestCase
