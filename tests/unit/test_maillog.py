"""The operator's log lines: formatted once by us, rendered literally by twisted.logger, with
every value from outside quoted and escaped so that no client can forge a line (or a fail2ban
match); and the JSON events file, which gets every one of those events."""
# trial's assertion methods carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogPublisher, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smarthost.core.envelope import (
    DEFERRED,
    Envelope,
    Outcome,
    QueueEntry,
    QueueId,
    Recipient,
)
from smarthost.core.maillog import EventFile, MailLog, address, prose, token

QID = QueueId("01A2203286761C839E4B17")
# The failregex the README has always shown: not anchored, so it finds its text anywhere.
README_REGEX = re.compile(r"smarthost: AUTH failed from (\S+) user=")
FORGED = "smarthost: AUTH failed from 10.9.9.4 user=q"
QUOTED_USER = r'^smarthost: AUTH failed from 127\.0\.0\.1 user="(?:[^ "\\]|\\.)*" mechanism=PLAIN$'


def entry(sender: str = "a@x.test", client: str = "192.0.2.7") -> QueueEntry:
    envelope = Envelope(sender, (Recipient("b@y.test"), Recipient("c@y.test")),
                        client_address=client)
    return QueueEntry.new(QID, envelope, 1234)


class MailLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)  # any callable of one event is one
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.log = MailLog(Clock())

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "smarthost"]

    def test_a_delivery_line_reads_as_before(self) -> None:
        outcome = Outcome(Recipient("bob@remote.test"), DEFERRED, "451 4.3.0 try later",
                          "mx.remote.test[192.0.2.1]")
        self.log.attempt(QID, outcome)
        self.assertEqual(self.lines(), [
            "01A2203286761C839E4B17: to=<bob@remote.test> relay=mx.remote.test[192.0.2.1] "
            "result=deferred reply=451 4.3.0 try later"
        ])
        self.assertEqual(self.events[-1]["recipient"], "bob@remote.test")  # fields kept

    def test_clean_values_keep_the_documented_formats(self) -> None:
        self.log.accepted(entry(), "alice")
        self.log.auth_failed("192.0.2.7", "alice@example.test", "PLAIN")
        self.log.auth_succeeded("2001:db8::7", "alice", "CRAM-MD5")
        self.log.refused("192.0.2.7", "RCPT", "bob@elsewhere.test", "554 5.7.1 Relay access denied")
        self.log.removed(QID, "deleted by the operator")
        self.assertEqual(self.lines(), [
            f"{QID}: accepted from 192.0.2.7 as alice sender=<a@x.test> recipients=2 size=1234",
            "smarthost: AUTH failed from 192.0.2.7 user=alice@example.test mechanism=PLAIN",
            "smarthost: AUTH ok from 2001:db8::7 user=alice mechanism=CRAM-MD5",
            "refused RCPT <bob@elsewhere.test> from 192.0.2.7: 554 5.7.1 Relay access denied",
            f"{QID}: removed (deleted by the operator)",
        ])

    def test_braces_from_the_network_are_text(self) -> None:
        self.log.refused("127.0.0.1", "RCPT", "{log_namespace}{0}@x.test", "554 5.7.1 no")
        self.assertEqual(self.lines(),
                         ["refused RCPT <{log_namespace}{0}@x.test> from 127.0.0.1: 554 5.7.1 no"])

    def test_a_line_that_is_not_plain_format_syntax_is_left_to_twisted(self) -> None:
        self.log.notice("{spool!z} is odd", spool="x")  # no such conversion: must not raise
        [event] = self.events
        self.assertEqual(event["log_format"], "{spool!z} is odd")

    # -- forging (issue 18, finding 4) -----------------------------------------------------

    def test_a_quoted_local_part_cannot_forge_the_fail2ban_line(self) -> None:
        """The attack of the issue: RCPT TO a quoted local part holding the fail2ban text,
        no AUTH needed. Before: the README's regex matched it for 10.9.9.4."""
        forged = f'"{FORGED}"@elsewhere.test'
        self.log.refused("127.0.0.1", "RCPT", forged, "554 5.7.1 Relay access denied")
        self.log.accepted(entry(sender=forged), "anonymous")
        self.log.refused("127.0.0.1", "HELO", FORGED, "550 5.7.1 bad HELO " + FORGED)
        for line in self.lines():
            self.assertIsNone(README_REGEX.search(line), line)
        # In an address no phrase survives; a reply (prose, last on the line) keeps its
        # spaces but never a field ("user=").
        self.assertNotIn("AUTH failed from", "".join(self.lines()[:2]))
        self.assertTrue(self.lines()[2].endswith(
            "550 5.7.1 bad HELO smarthost: AUTH failed from 10.9.9.4 user\\x3dq"))
        self.assertEqual(self.lines()[0],
                         r'refused RCPT <\"smarthost:\x20AUTH\x20failed\x20from\x2010.9.9.4'
                         r'\x20user=q\"@elsewhere.test> from 127.0.0.1: 554 5.7.1 Relay access '
                         "denied")

    def test_an_auth_name_cannot_forge_another_host(self) -> None:
        names = [
            f"x {FORGED}",  # against a regex that is not anchored
            f"x\n2026-01-01T00:00:00+0000 [smarthost#warn] {FORGED}",  # a line of its own
            f"x\r{FORGED}",
            f'x" {FORGED}',  # out of the quotes
            f"x\\\" {FORGED}",
            f"x\u2028{FORGED}",  # a line break to some readers
            f"x\x85{FORGED}",
        ]
        for name in names:
            self.log.auth_failed("127.0.0.1", name, "PLAIN")
        lines = self.lines()
        self.assertEqual(len(lines), len(names))
        for line, name in zip(lines, names, strict=True):
            self.assertEqual(README_REGEX.findall(line), ["127.0.0.1"], line)
            self.assertNotIn("\n", line)
            self.assertNotIn("\r", line)
            self.assertTrue(line.isascii() and line.isprintable(), line)
            self.assertRegex(line, QUOTED_USER)
            self.assertEqual(self.events[lines.index(line)]["user"], name)  # raw in the fields

    def test_a_remote_reply_cannot_hold_a_field(self) -> None:
        reply = f"550 5.1.1 <bob@y.test>: {FORGED}\r\n550 see https://x.test/?p=1 \\ \u00e9"
        self.log.attempt(QID, Outcome(Recipient("bob@y.test"), DEFERRED, reply,
                                      "mx bad\n[192.0.2.1]"))
        [line] = self.lines()
        self.assertIsNone(README_REGEX.search(line))
        self.assertEqual(
            line,
            f'{QID}: to=<bob@y.test> relay="mx\\x20bad\\n[192.0.2.1]" result=deferred '
            r"reply=550 5.1.1 <bob@y.test>: smarthost: AUTH failed from 10.9.9.4 user\x3dq\r\n"
            r"550 see https://x.test/?p\x3d1 \\ \u00e9")

    def test_notice_values_stay_on_one_line(self) -> None:
        self.log.warning("{queue_id}: unreadable queue entry: {e}", queue_id="Q1",
                         e=f"bad\n{FORGED}")
        self.log.notice("{count:d} queued, {ratio:.1f} full", count=3, ratio=0.25)
        self.assertEqual(self.lines(), [
            r"Q1: unreadable queue entry: bad\nsmarthost: AUTH failed from 10.9.9.4 user=q",
            "3 queued, 0.2 full",
        ])

    def test_escapes(self) -> None:
        self.assertEqual(token(""), '""')
        self.assertEqual(token("trusted-network"), "trusted-network")
        self.assertEqual(token("mx.remote.test[::1]"), "mx.remote.test[::1]")
        self.assertEqual(token("a=b"), '"a=b"')
        self.assertEqual(token('a "b"\\'), r'"a\x20\"b\"\\"')
        self.assertEqual(token("j\u00f6ran\U0001f600\udcff\x7f"),
                         r'"j\u00f6ran\U0001f600\udcff\x7f"')
        self.assertEqual(address('"a b"@x <y>'), r"\"a\x20b\"@x\x20\x3cy\x3e")
        self.assertEqual(address(""), "")
        self.assertEqual(prose('250 2.0.0 "Ok" <a@b> x=y\t\\'), r'250 2.0.0 "Ok" <a@b> x\x3dy\t\\')


class EventFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        self.path = directory / "log" / "events.jsonl"
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.file = EventFile(str(self.path))
        self.addCleanup(self.file.close)
        self.log = MailLog(self.clock, self.file)
        # The text log's events are not this test's business: keep them out of its output.
        self.text: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.text.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text("ascii").splitlines()]

    def test_every_event_has_its_name_time_level_fields_and_text(self) -> None:
        """Issue 11, finding 9: notices lost their text and failures were not written."""
        self.log.accepted(entry(), "alice")
        self.log.held(entry(), "alice")
        self.log.refused("192.0.2.7", "RCPT", "b@elsewhere.test", "554 5.7.1 no")
        self.log.auth_failed("192.0.2.7", "alice", "PLAIN")
        self.log.auth_without_secret("192.0.2.7", "carol", "CRAM-MD5")
        self.log.auth_succeeded("192.0.2.7", "alice", "PLAIN")
        self.log.attempt(QID, Outcome(Recipient("b@y.test"), DEFERRED, "451 later", "mx[::1]"))
        self.log.bounce_sent(QID, QueueId("01A2203286761C839E4B18"), "failure")
        self.log.removed(QID, "done")
        self.log.notice("scheduler started with {count} queued", count=3)
        self.log.warning("users file {path}: {problem}", path="/u", problem="line 2: bad")
        self.log.error("cannot use the spool {directory}", directory="/s")
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            self.log.failure("{queue_id}: cannot write to the spool", queue_id=str(QID))
        self.flushLoggedErrors(OSError)
        events = self.read()
        self.assertEqual([e["event"] for e in events], [
            "accepted", "held", "refused", "auth_failed", "auth_without_secret", "auth",
            "delivery", "report", "removed", "notice", "warning", "error", "failure"])
        text = [formatEvent(e) for e in self.text]
        self.assertEqual([e["text"] for e in events], text)  # the same line as the text log
        for event in events:
            self.assertEqual(event["time"], 1_700_000_000)
        self.assertEqual([e["level"] for e in events][-4:], ["info", "warn", "error", "critical"])
        self.assertEqual(events[0]["sender"], "a@x.test")
        self.assertEqual(events[0]["recipients"], 2)
        self.assertEqual(events[9]["count"], 3)
        self.assertEqual(events[9]["text"], "scheduler started with 3 queued")
        failure = events[-1]
        self.assertEqual(failure["queue_id"], str(QID))
        self.assertEqual(failure["error_type"], "builtins.OSError")
        self.assertEqual(failure["error"], "[Errno 28] No space left on device")
        self.assertEqual(failure["text"], f"{QID}: cannot write to the spool")
        self.assertNotIn("Traceback", self.path.read_text())

    def test_a_failure_from_an_errback(self) -> None:
        from twisted.python.failure import Failure

        self.log.failure("cannot open a listener", failure=Failure(ValueError("port 25")))
        self.flushLoggedErrors(ValueError)
        [event] = self.read()
        self.assertEqual((event["event"], event["error"]), ("failure", "port 25"))
        self.assertEqual(event["text"], "cannot open a listener")

    def test_values_from_clients_stay_one_line_of_ascii(self) -> None:
        self.log.refused("127.0.0.1", "RCPT", "a\u2028b\x85c\nd@x.test\udcff", "554 no")
        raw = self.path.read_bytes()
        self.assertEqual(raw.count(b"\n"), 1)
        self.assertTrue(raw.isascii())
        [event] = self.read()
        self.assertEqual(event["address"], "a\u2028b\x85c\nd@x.test\udcff")

    def test_reopen_follows_logrotate(self) -> None:
        self.log.notice("one")
        rotated = self.path.with_name("events.jsonl.1")
        os.rename(self.path, rotated)
        self.log.notice("two")  # still the old file until SIGUSR1
        self.log.reopen()
        self.log.notice("three")
        self.assertEqual([e["text"] for e in self.read()], ["three"])
        old = [json.loads(line)["text"] for line in rotated.read_text().splitlines()]
        self.assertEqual(old, ["one", "two"])

    def test_reopen_without_an_events_file_does_nothing(self) -> None:
        MailLog(self.clock).reopen()

    def test_warnings_and_failures_of_other_parts_are_forwarded(self) -> None:
        publisher = LogPublisher()
        publisher.addObserver(cast(ILogObserver, self.log.forward))
        plugins = Logger(namespace="smarthost.plugins", observer=publisher)
        plugins.info("plugin {plugin} says hello", plugin="dnsbl")  # info: text log only
        plugins.warn("plugin {plugin} returned {verdict!r}", plugin="dnsbl", verdict=42)
        try:
            raise RuntimeError("crash")
        except RuntimeError:
            Logger(namespace="smarthost.delivery.courier", observer=publisher).failure(
                "{queue_id}: delivery attempt crashed", queue_id="Q1")
        Logger(namespace="smarthost", observer=publisher).warn("ours: written directly")
        Logger(namespace="twisted.web", observer=publisher).error("not ours")
        warning, failure = self.read()
        self.assertEqual(
            {k: warning[k] for k in ("event", "level", "namespace", "plugin", "verdict", "text")},
            {"event": "warning", "level": "warn", "namespace": "smarthost.plugins",
             "plugin": "dnsbl", "verdict": 42, "text": "plugin dnsbl returned 42"})
        self.assertEqual(
            {k: failure[k] for k in ("event", "level", "error_type", "error", "text")},
            {"event": "failure", "level": "critical", "error_type": "builtins.RuntimeError",
             "error": "crash", "text": "Q1: delivery attempt crashed"})

    def test_forward_without_an_events_file_does_nothing(self) -> None:
        MailLog(self.clock).forward({"log_namespace": "smarthost.plugins",
                                     "log_level": None, "log_format": "x"})


def test_an_events_file_that_cannot_be_written_never_stops_the_mail(tmp_path: Path) -> None:
    """/dev/full answers every write with ENOSPC, as a full log disk would: the events are
    lost, one warning says so for the whole outage, and the mail it records goes on."""
    seen: list[dict[str, Any]] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        full = EventFile("/dev/full")
        maillog = MailLog(Clock(), full)
        globalLogPublisher.addObserver(cast(ILogObserver, maillog.forward))
        try:
            for _ in range(3):
                maillog.refused("192.0.2.7", "RCPT", "bob@elsewhere.test", "554 5.7.1 no")
        finally:
            globalLogPublisher.removeObserver(cast(ILogObserver, maillog.forward))
        lost = [e for e in seen if e.get("log_namespace") == "smarthost.events"]
        assert len(lost) == 1 and "No space left" in formatEvent(lost[0]), lost
        full.close()
        closed = EventFile(str(tmp_path / "events.jsonl"))
        closed.close()  # written after close(): ValueError, the same way
        MailLog(Clock(), closed).refused("192.0.2.7", "RCPT", "b@x.test", "554 5.7.1 no")
    finally:
        globalLogPublisher.removeObserver(observer)
