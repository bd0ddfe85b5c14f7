"""What the metrics and the status page count, without a network: the operator log's events
through the Activity observer, the commit timer and connection counts, the queue summary,
the Prometheus text (read back with prometheus_client's own parser) and the page's HTML."""
# trial's assertion methods and Twisted's test transports carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import html
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import attrs
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fakes import run_now
from smarthost.api import IIncomingMessage, ISpool
from smarthost.app.activity import AUTH_WINDOW, PerMinute
from smarthost.app.meters import ListenerLoad
from smarthost.app.metrics import State
from smarthost.app.queueview import QueueSnapshot, QueueView, summarize
from smarthost.app.statuspage import CertificateInfo, StatusView, age, chart, render
from smarthost.app.watch import Watch
from smarthost.core.envelope import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    Envelope,
    Outcome,
    QueueEntry,
    QueueId,
    Recipient,
)
from smarthost.core.maillog import EVENT_KEY, MailLog
from smarthost.queue.spool import Spool

START = 1_700_000_000.0  # a round minute boundary is not assumed anywhere


def scratch(test: Any) -> Path:
    """A temporary directory removed after ``test`` (trial's mktemp writes into the working
    directory under pytest)."""
    directory = Path(tempfile.mkdtemp(prefix="smarthost-watch-"))
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


def samples(watch: Watch) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry as Prometheus would read it."""
    text = generate_latest(watch.metrics.registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(watch: Watch, name: str, **labels: str) -> float:
    return samples(watch).get((name, tuple(sorted(labels.items()))), 0.0)


class Spooled:
    """A real spool in ``directory`` on a virtual clock."""

    def __init__(self, directory: Path, clock: Clock) -> None:
        self.clock = clock
        self.spool, _ = Spool.open(directory, clock=clock, run_blocking=run_now)

    def add(self, *recipients: str, held: bool = False) -> QueueEntry:
        incoming = self.spool.receive()
        incoming.write(b"Subject: hi\r\n\r\nHello.\r\n")
        envelope = Envelope("a@example.test", tuple(Recipient(r) for r in recipients),
                            client_address="192.0.2.7", held=held,
                            received_at=self.clock.seconds())
        results: list[QueueEntry] = []
        incoming.commit(envelope).addCallback(results.append)
        return results[0]

    def defer(self, entry: QueueEntry, reply: str, remote: str, when: float) -> QueueEntry:
        states = tuple(attrs.evolve(s, last_reply=reply, remote=remote, attempts=1)
                       for s in entry.recipients)
        deferred = attrs.evolve(entry, recipients=states, attempts=1, next_attempt=when,
                                last_error=reply)
        self.spool.update(deferred)
        return deferred


class ActivityTests(SynchronousTestCase):
    """The counters move with the operator log's own events, whatever their text."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.watch = Watch(self.clock)
        observer = cast(ILogObserver, self.watch.activity)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.log = MailLog(self.clock)

    def attempt(self, recipient: str, result: Any, reply: str = "250 ok") -> None:
        self.log.attempt(QueueId("01A2203286761C839E4B17"),
                         Outcome(Recipient(recipient), result, reply, "mx.y.test[192.0.2.9]"))

    def test_delivery_results_are_counted(self) -> None:
        self.attempt("a@y.test", DELIVERED)
        self.attempt("b@y.test", DELIVERED)
        self.attempt("c@z.test", DEFERRED, "451 4.7.1 greylisted")
        self.attempt("d@z.test", BOUNCED, "550 5.1.1 no such user")
        self.assertEqual(value(self.watch, "smarthost_recipients_delivered_total"), 2)
        self.assertEqual(value(self.watch, "smarthost_recipients_deferred_total"), 1)
        self.assertEqual(value(self.watch, "smarthost_recipients_bounced_total"), 1)
        self.assertEqual(self.watch.activity.totals(),
                         {"accepted": 0, "delivered": 2, "deferred": 1, "bounced": 1})

    def test_the_last_deferral_per_domain_is_kept(self) -> None:
        self.attempt("c@Z.test", DEFERRED, "451 4.7.1 greylisted")
        self.clock.advance(30)
        self.attempt("d@z.test", DEFERRED, "421 4.3.2 try later")
        [(domain, last)] = self.watch.activity.deferrals().items()
        self.assertEqual((domain, last.reply, last.when), ("z.test", "421 4.3.2 try later",
                                                           START + 30))

    def test_auth_failures_by_mechanism_and_client(self) -> None:
        self.log.auth_failed("192.0.2.1", "bob", "plain")
        self.log.auth_failed("192.0.2.1", "root", "LOGIN")
        self.clock.advance(1)
        self.log.auth_failed("198.51.100.2", "admin", "CRAM-MD5")
        self.log.auth_failed("198.51.100.2", "x", "NOT-A-MECHANISM")
        # A success and a missing secret carry the same fields at another level: not counted.
        self.log.auth_succeeded("192.0.2.1", "alice", "PLAIN")
        self.log.auth_without_secret("192.0.2.1", "carol", "CRAM-MD5")
        self.assertEqual(value(self.watch, "smarthost_auth_failures_total", mechanism="PLAIN"), 1)
        self.assertEqual(value(self.watch, "smarthost_auth_failures_total", mechanism="LOGIN"), 1)
        self.assertEqual(
            value(self.watch, "smarthost_auth_failures_total", mechanism="CRAM-MD5"), 1)
        self.assertEqual(value(self.watch, "smarthost_auth_failures_total", mechanism="OTHER"), 1)
        failures = self.watch.activity.auth_failures()
        self.assertEqual([(f.client, f.count, f.user) for f in failures],
                         [("198.51.100.2", 2, "x"), ("192.0.2.1", 2, "root")])

    def test_auth_failures_older_than_the_window_are_dropped(self) -> None:
        self.log.auth_failed("192.0.2.1", "bob", "PLAIN")
        self.clock.advance(AUTH_WINDOW + 1)
        self.assertEqual(self.watch.activity.auth_failures(), [])
        self.log.auth_failed("192.0.2.1", "bob", "PLAIN")
        [failure] = self.watch.activity.auth_failures()
        self.assertEqual(failure.count, 1)  # counting starts again

    def test_memory_is_bounded(self) -> None:
        watch = Watch(self.clock)
        watch.activity._keep = 3
        for i in range(10):
            self.clock.advance(1)
            watch.activity({"log_namespace": "smarthost", "log_level": LogLevel.warn,
                            EVENT_KEY: "auth_failed", "client": f"192.0.2.{i}", "user": "u",
                            "mechanism": "PLAIN"})
        self.assertEqual({f.client for f in watch.activity.auth_failures()},
                         {"192.0.2.7", "192.0.2.8", "192.0.2.9"})

    def test_other_namespaces_and_notices_are_ignored(self) -> None:
        self.log.notice("{recipient}: {result} by the operator", recipient="a@b",
                        result="delivered", relay="r", reply="250", queue_id="Q1")
        self.watch.activity({"log_namespace": "smarthost.delivery", "queue_id": "Q",
                             "recipient": "a@b", "relay": "r", "result": "delivered",
                             "reply": "250"})  # the fields of a delivery, not its name
        self.assertEqual(value(self.watch, "smarthost_recipients_delivered_total"), 0)


class PerMinuteTests(SynchronousTestCase):
    def test_an_hour_of_minutes_oldest_first(self) -> None:
        minutes = PerMinute()
        minutes.add("accepted", START)
        minutes.add("accepted", START + 1)
        minutes.add("delivered", START + 60)
        hour = minutes.last_hour(START + 60)
        self.assertEqual(len(hour["accepted"]), 60)
        self.assertEqual(hour["accepted"][-2:], [2, 0])
        self.assertEqual(hour["delivered"][-1], 1)

    def test_buckets_older_than_an_hour_are_forgotten(self) -> None:
        minutes = PerMinute()
        minutes.add("bounced", START)
        self.assertEqual(sum(minutes.last_hour(START + 3600)["bounced"]), 0)
        minutes.add("bounced", START + 3600)  # the same slot, a new minute
        self.assertEqual(minutes.last_hour(START + 3600)["bounced"][-1], 1)


@implementer(IIncomingMessage)
class SlowIncoming:
    """Commits when the test says so."""

    queue_id = QueueId("01A2203286761C839E4B17")

    def __init__(self) -> None:
        self.pending: Deferred[QueueEntry] = Deferred()
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def commit(self, envelope: Envelope) -> Deferred[QueueEntry]:
        return self.pending

    def abort(self) -> None:
        pass

    def read(self) -> bytes:
        return b"".join(self.written)

    def prepend(self, data: bytes) -> None:
        self.written.insert(0, data)


class OneMessage:
    """A spool that receives one (slow) message."""

    def __init__(self, incoming: SlowIncoming) -> None:
        self._incoming = incoming

    def receive(self) -> IIncomingMessage:
        return self._incoming


class MetersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.watch = Watch(self.clock)

    def test_the_wrappers_provide_the_interfaces(self) -> None:
        spool = Spooled(scratch(self), self.clock).spool
        receiving = self.watch.receiving("submission", spool)
        verifyObject(ISpool, receiving)
        message = receiving.receive()
        verifyObject(IIncomingMessage, message)
        message.write(b"Subject: x\r\n\r\nbody\r\n")
        message.prepend(b"Received: by test\r\n")
        self.assertTrue(message.read().startswith(b"Received"))
        entry = self.successResultOf(message.commit(Envelope("a@b.test", ())))
        self.assertEqual(receiving.load(entry.queue_id), entry)
        self.assertEqual([e.queue_id for e in receiving.entries()], [entry.queue_id])
        with receiving.open_body(entry.queue_id) as body:
            self.assertIn(b"body", body.read())
        self.successResultOf(receiving.update(entry))
        self.successResultOf(receiving.remove(entry.queue_id))
        aborted = receiving.receive()
        aborted.abort()

    def test_commit_is_timed_and_counted_on_its_listener(self) -> None:
        incoming = SlowIncoming()
        receiving = self.watch.receiving("submission", cast(ISpool, OneMessage(incoming)))
        message = receiving.receive()
        verifyObject(IIncomingMessage, message)
        message.write(b"x")
        d = message.commit(Envelope("a@b.test", (Recipient("c@d.test"),)))
        self.clock.advance(0.02)
        self.assertEqual(value(self.watch, "smarthost_messages_accepted_total",
                               listener="submission"), 0)
        entry = QueueEntry.new(incoming.queue_id, Envelope("a@b.test", ()), 1)
        incoming.pending.callback(entry)
        self.assertIs(self.successResultOf(d), entry)
        self.assertEqual(value(self.watch, "smarthost_messages_accepted_total",
                               listener="submission"), 1)
        self.assertEqual(value(self.watch, "smarthost_messages_accepted_total",
                               listener="smtp"), 0)
        self.assertEqual(value(self.watch, "smarthost_spool_commit_seconds_count"), 1)
        self.assertAlmostEqual(value(self.watch, "smarthost_spool_commit_seconds_sum"), 0.02)
        self.assertEqual(value(self.watch, "smarthost_spool_commit_seconds_bucket", le="0.025"),
                         1)
        self.assertEqual(value(self.watch, "smarthost_spool_commit_seconds_bucket", le="0.01"),
                         0)
        self.assertEqual(self.watch.activity.totals()["accepted"], 1)

    def test_a_failed_commit_is_not_accepted(self) -> None:
        incoming = SlowIncoming()
        receiving = self.watch.receiving("smtp", cast(ISpool, OneMessage(incoming)))
        d = receiving.receive().commit(Envelope("a@b.test", ()))
        incoming.pending.errback(OSError("disk full"))
        self.failureResultOf(d, OSError)
        self.assertEqual(value(self.watch, "smarthost_messages_accepted_total", listener="smtp"),
                         0)

    def test_connections_are_counted_per_listener(self) -> None:
        built: list[Handshaking] = []

        class Sessions(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                built.append(Handshaking())
                return built[-1]

        factory = self.watch.counted("submission", "tcp:2587", Sessions())
        other = self.watch.counted("submission", "tcp:587", Sessions())
        self.watch.counted("smtp", "tcp:2525", Sessions())
        address = IPv4Address("TCP", "192.0.2.7", 4321)
        first: Any = factory.buildProtocol(address)
        second: Any = other.buildProtocol(address)
        for protocol in (first, second):
            protocol.makeConnection(StringTransport())
        self.assertEqual(self.watch.connections.by_listener(), {"submission": 2, "smtp": 0})
        self.assertEqual(self.watch.connections.listeners()[0],
                         ListenerLoad("submission", "tcp:2587", 1))
        first.handshakeCompleted()  # the TLS layer's report reaches the session
        self.assertTrue(built[0].handshaken)
        first.connectionLost(cast(Any, None))
        self.assertEqual(self.watch.connections.by_listener()["submission"], 1)


@implementer(IHandshakeListener)
class Handshaking(Protocol):
    handshaken = False

    def handshakeCompleted(self) -> None:
        self.handshaken = True


class QueueViewTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spooled = Spooled(scratch(self), self.clock)

    def test_counts_by_status_oldest_and_backlog(self) -> None:
        held = self.spooled.add("h@held.test", held=True)
        self.clock.advance(100)
        first = self.spooled.add("a@slow.test", "b@slow.test")
        self.clock.advance(100)
        self.spooled.add("c@fast.test")
        self.spooled.defer(first, "451 4.7.1 <b>greylisted</b>", "mx.slow.test[192.0.2.9]",
                           START + 900)
        second = self.spooled.add("d@slow.test")
        self.spooled.defer(second, "421 4.3.2 later", "mx.slow.test[192.0.2.9]", START + 950)
        snapshot = summarize(self.spooled.spool.entries(), START + 1000)
        self.assertEqual(dict(snapshot.counts), {"queued": 1, "deferred": 2, "held": 1})
        self.assertEqual(snapshot.oldest, START + 100)  # the held one is older: left out
        self.assertEqual(snapshot.oldest_age, 900)
        [backlog] = snapshot.backlog
        self.assertEqual((backlog.domain, backlog.messages, backlog.recipients),
                         ("slow.test", 2, 3))
        self.assertEqual(backlog.last_reply, "421 4.3.2 later")  # the later next attempt
        self.assertIsNotNone(held)

    def test_scans_are_shared_and_cached(self) -> None:
        self.spooled.add("a@x.test")
        calls: list[int] = []

        def counted(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
            calls.append(1)
            return run_now(f, *args, **kwargs)

        view = QueueView(self.spooled.spool, self.clock, counted, max_age=5)
        first = self.successResultOf(view.snapshot())
        self.assertEqual(first.counts["queued"], 1)
        self.spooled.add("b@x.test")
        self.assertIs(self.successResultOf(view.snapshot()), first)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(view.snapshot()).counts["queued"], 2)
        self.assertEqual(len(calls), 2)

    def test_requests_during_a_scan_wait_for_it(self) -> None:
        started: list[Deferred[Any]] = []

        def later(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            started.append(d)
            d.addCallback(lambda _: f(*args, **kwargs))
            return d

        view = QueueView(self.spooled.spool, self.clock, later)
        a, b = view.snapshot(), view.snapshot()
        self.assertEqual(len(started), 1)
        started[0].callback(None)
        self.assertIs(self.successResultOf(a), self.successResultOf(b))


class CollectorTests(SynchronousTestCase):
    def test_gauges_are_read_at_scrape_time(self) -> None:
        watch = Watch(Clock())
        reads: list[int] = []

        def read() -> State:
            reads.append(1)
            return State({"queued": 3, "deferred": 2}, 42.5, {"smtp": 4}, 1_800_000_000.0)

        watch.metrics.watch(read)
        self.assertEqual(reads, [])  # registering reads nothing
        found = samples(watch)
        self.assertEqual(len(reads), 1)
        self.assertEqual(found[("smarthost_queue_messages", (("status", "queued"),))], 3)
        self.assertEqual(found[("smarthost_queue_messages", (("status", "held"),))], 0)
        self.assertEqual(found[("smarthost_queue_oldest_age_seconds", ())], 42.5)
        self.assertEqual(found[("smarthost_connections", (("listener", "smtp"),))], 4)
        self.assertEqual(found[("smarthost_connections", (("listener", "submission"),))], 0)
        self.assertEqual(
            found[("smarthost_tls_certificate_expiry_timestamp_seconds", ())], 1_800_000_000.0)
        # Every listener's accepted counter exists from the start, at 0.
        for listener in ("submission", "submissions", "smtp"):
            self.assertEqual(
                found[("smarthost_messages_accepted_total", (("listener", listener),))], 0)


def view(**changes: Any) -> StatusView:
    base = StatusView(
        hostname="mx.example.test",
        now=START,
        health="ready",
        queue=QueueSnapshot(START, {"queued": 1, "deferred": 0, "held": 0}, START - 90, ()),
        history={"accepted": [1] * 60, "delivered": [1] * 60, "deferred": [0] * 60,
                 "bounced": [0] * 60},
        failures=(),
        deferrals={},
        listeners=(ListenerLoad("submission", "tcp:2587", 2),),
        certificate=CertificateInfo("CN=mx.example.test", START + 90 * 86400),
    )
    return attrs.evolve(base, **changes)


class StatusPageTests(SynchronousTestCase):
    def test_text_from_outside_is_escaped(self) -> None:
        from smarthost.app.activity import AuthFailures, Deferral
        from smarthost.app.queueview import Backlog

        evil = '<script>alert("x")</script>'
        page = render(view(
            queue=QueueSnapshot(START, {"queued": 0, "deferred": 1, "held": 0}, START - 10, (
                Backlog(f"{evil}.test", 1, 1, f"451 {evil}", f"mx[{evil}]"),)),
            failures=(AuthFailures(f"{evil}", 3, START, START, f"user{evil}", "PLAIN"),),
            deferrals={"x.test": Deferral("x.test", START, "r", evil)},
            hostname=evil,
        ))
        self.assertNotIn("<script", page)
        self.assertIn(html.escape(evil), page)

    def test_the_page_says_what_an_admin_asks_first(self) -> None:
        page = render(view())
        for text in ("Queued", "Deferred", "Held", "Oldest message", "1 min", "The last hour",
                     "Destinations with deferred mail", "Failed logins", "Listeners",
                     "tcp:2587", "TLS certificate", "90 days left", "Ready"):
            self.assertIn(text, page)
        self.assertIn('<meta http-equiv="refresh"', page)
        self.assertNotIn("<script", page)

    def test_certificate_expiry_warnings(self) -> None:
        soon = render(view(certificate=CertificateInfo("CN=x", START + 3 * 86400)))
        self.assertIn("expires in 3 d", soon)
        gone = render(view(certificate=CertificateInfo("CN=x", START - 86400)))
        self.assertIn("expired 24 h ago", gone)

    def test_chart_scales_to_the_busiest_minute(self) -> None:
        svg = chart({"accepted": [0] * 59 + [37], "delivered": [0] * 60})
        self.assertEqual(svg.count("<polyline"), 4)
        ticks = [int(t) for t in re.findall(r'class="ytick">(\d+)<', svg)]
        self.assertEqual((ticks[0], ticks[-1]), (0, 40))

    def test_ages(self) -> None:
        self.assertEqual([age(s) for s in (None, 5, 125, 7260, 3 * 86400 + 3600)],
                         ["\u2014", "5 s", "2 min", "2 h 1 min", "3 d 1 h"])

