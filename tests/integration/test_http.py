"""The [http] listener in-process on loopback, over a real spool: /healthz flips with
readiness and the stop, /metrics scrapes with prometheus_client's own parser and moves with
commits, deliveries and AUTH failures, and / is an HTML page with every outside text escaped.
"""
# Twisted's web client and trial's assertions carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from typing import Any, cast

import attrs
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from smarthost.app import tlscert
from smarthost.app.http import STEP, HTTPService, StatusSources, make_http_service
from smarthost.app.watch import Watch
from smarthost.core.envelope import (
    DEFERRED,
    DELIVERED,
    Envelope,
    Outcome,
    QueueEntry,
    Recipient,
)
from smarthost.core.maillog import MailLog
from smarthost.queue.spool import Spool

EVIL = '<img src=x onerror="alert(1)">'


def scratch(test: Any) -> Path:
    """A temporary directory removed after ``test`` (trial's mktemp writes into the working
    directory under pytest)."""
    directory = Path(tempfile.mkdtemp(prefix="smarthost-watch-"))
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


class Steps:
    def __init__(self) -> None:
        self.done: list[str] = []
        self.failed: list[tuple[str, str]] = []

    def fail(self, key: str, problem: str) -> None:
        self.failed.append((key, problem))


class Triggers:
    """The reactor, except that system event triggers are only recorded (a test cannot shut
    the real reactor down): the test fires them."""

    def __init__(self) -> None:
        self.added: dict[int, tuple[str, Callable[[], Any]]] = {}

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], Any]) -> int:
        assert event == "shutdown"
        self.added[len(self.added)] = (phase, f)
        return len(self.added) - 1

    def removeSystemEventTrigger(self, trigger: int) -> None:
        del self.added[trigger]

    def fire(self, phase: str) -> list[Any]:
        return [f() for p, f in list(self.added.values()) if p == phase]

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class HTTPTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.spool, _ = Spool.open(scratch(self), clock=reactor, run_blocking=deferToThread)
        self.addCleanup(self.spool.close)
        self.watch = Watch(reactor)
        self.maillog = MailLog(reactor)
        self.steps = Steps()
        self.ready = False
        pair = tlscert.issue(("mx.smarthost.test",))
        self.certificate = x509.load_pem_x509_certificate(pair.cert_pem)

    def sources(self) -> StatusSources:
        steps = self.steps

        class Startup:
            def done(self, step: str) -> None:
                steps.done.append(step)

            def fail(self, key: str, problem: str) -> None:
                steps.fail(key, problem)

        return StatusSources(
            watch=self.watch, spool=self.spool, maillog=self.maillog, startup=Startup(),
            ready=lambda: self.ready, hostname=lambda: "mx.smarthost.test",
            certificate=lambda: self.certificate,
        )

    async def started(self, reactor_: Any = reactor, listen: str = "tcp:0:interface=127.0.0.1"
                      ) -> tuple[HTTPService, int]:
        service = make_http_service(reactor_, [listen], self.sources())
        assert isinstance(service, HTTPService)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        await _turn()
        [port] = service._ports
        return service, int(getattr(port.getHost(), "port", 0))

    async def get(self, port: int, path: str) -> tuple[Fetched, str]:
        fetched = await deferToThread(_fetch, f"http://127.0.0.1:{port}{path}")
        return fetched, fetched.body

    async def commit(self, *recipients: str, listener: str = "submission") -> QueueEntry:
        incoming = self.watch.receiving(listener, self.spool).receive()
        incoming.write(b"Subject: hi\r\n\r\nHello.\r\n")
        envelope = Envelope("a@example.test", tuple(Recipient(r) for r in recipients),
                            client_address="192.0.2.7", received_at=reactor.seconds())
        return await incoming.commit(envelope)

    async def test_healthz_follows_readiness(self) -> None:
        service, port = await self.started()
        self.assertEqual(self.steps.done, [STEP])
        response, body = await self.get(port, "/healthz")
        self.assertEqual((response.code, body), (503, "starting\n"))
        self.ready = True
        response, body = await self.get(port, "/healthz")
        self.assertEqual((response.code, body), (200, "ok\n"))
        await _maybe(service.stopService())
        with self.assertRaises(urllib.error.URLError):
            await self.get(port, "/healthz")

    async def test_503_from_the_start_of_the_stop_until_the_port_closes(self) -> None:
        triggers = Triggers()
        service, port = await self.started(triggers)
        self.ready = True
        triggers.fire("before")
        response, body = await self.get(port, "/healthz")
        self.assertEqual((response.code, body), (503, "stopping\n"))
        self.assertIsNone(service.stopService())  # the port stays open: still answering
        response, _ = await self.get(port, "/healthz")
        self.assertEqual(response.code, 503)
        [closing] = triggers.fire("during")
        await closing
        with self.assertRaises(urllib.error.URLError):
            await self.get(port, "/healthz")

    async def test_metrics_move_with_the_mail(self) -> None:
        _, port = await self.started()
        counted = self.watch.counted("smtp", "tcp:25", cast(Factory, _NoSessions()))
        first = await self.commit("a@slow.test", "b@slow.test")
        await self.commit("c@y.test", listener="smtp")
        await self.spool.update(attrs.evolve(first, attempts=1))
        self.maillog.attempt(first.queue_id, Outcome(Recipient("c@y.test"), DELIVERED, "250 ok"))
        self.maillog.attempt(first.queue_id,
                             Outcome(Recipient("a@slow.test"), DEFERRED, "451 4.7.1 later"))
        self.maillog.auth_failed("192.0.2.1", "bob", "login")
        response, text = await self.get(port, "/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn("text/plain", response.headers["content-type"])
        found = _samples(text)
        self.assertEqual(found["smarthost_messages_accepted_total", "listener=submission"], 1)
        self.assertEqual(found["smarthost_messages_accepted_total", "listener=smtp"], 1)
        self.assertEqual(found["smarthost_messages_accepted_total", "listener=submissions"], 0)
        self.assertEqual(found["smarthost_recipients_delivered_total", ""], 1)
        self.assertEqual(found["smarthost_recipients_deferred_total", ""], 1)
        self.assertEqual(found["smarthost_recipients_bounced_total", ""], 0)
        self.assertEqual(found["smarthost_auth_failures_total", "mechanism=LOGIN"], 1)
        self.assertEqual(found["smarthost_queue_messages", "status=queued"], 1)
        self.assertEqual(found["smarthost_queue_messages", "status=deferred"], 1)
        self.assertEqual(found["smarthost_queue_messages", "status=held"], 0)
        self.assertGreaterEqual(found["smarthost_queue_oldest_age_seconds", ""], 0)
        self.assertEqual(found["smarthost_spool_commit_seconds_count", ""], 2)
        self.assertEqual(found["smarthost_connections", "listener=smtp"], 0)
        self.assertEqual(found["smarthost_tls_certificate_expiry_timestamp_seconds", ""],
                         self.certificate.not_valid_after_utc.timestamp())
        self.assertIsNotNone(counted)

    async def test_status_page_escapes_what_came_from_outside(self) -> None:
        _, port = await self.started()
        entry = await self.commit("a@slow.test")
        states = tuple(attrs.evolve(s, last_reply=f"451 {EVIL}", remote="mx[192.0.2.9]")
                       for s in entry.recipients)
        await self.spool.update(attrs.evolve(entry, recipients=states, attempts=1))
        self.maillog.auth_failed("192.0.2.1", EVIL, "PLAIN")
        response, page = await self.get(port, "/")
        self.assertEqual(response.code, 200)
        headers = response.headers
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        self.assertIn("default-src 'none'", headers["content-security-policy"])
        self.assertNotIn("<img", page)
        self.assertIn("451 &lt;img src=x onerror=&quot;alert(1)&quot;&gt;", page)
        self.assertIn("slow.test", page)
        self.assertIn("192.0.2.1", page)
        self.assertIn("<svg", page)

    async def test_a_port_that_cannot_be_opened_fails_the_start(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            number = taken.getsockname()[1]
            service = make_http_service(reactor, [f"tcp:{number}:interface=127.0.0.1"],
                                        self.sources())
            service.privilegedStartService()
            await _turn()
        [(key, problem)] = self.steps.failed
        self.assertEqual(key, "http.listen[0]")
        self.assertIn(str(number), problem)
        self.assertEqual(self.steps.done, [])
        service.startService()
        await _maybe(service.stopService())

    async def test_no_endpoints_no_listener(self) -> None:
        service = make_http_service(reactor, [], self.sources())
        service.privilegedStartService()
        service.startService()
        self.assertEqual(self.steps.done, [])
        await _maybe(service.stopService())


@attrs.frozen
class Fetched:
    code: int
    headers: Message
    body: str


def _fetch(url: str) -> Fetched:
    """In a thread: one plain GET, whatever its status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return Fetched(response.status, response.headers, response.read().decode())
    except urllib.error.HTTPError as e:
        return Fetched(e.code, e.headers, e.read().decode())


class _NoSessions:
    def buildProtocol(self, addr: Any) -> None:
        return None

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


def _samples(text: str) -> dict[tuple[str, str], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[(sample.name, labels)] = sample.value
    return found


async def _turn() -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(0, d.callback, None)
    await d


async def _maybe(result: Deferred[Any] | None) -> None:
    if result is not None:
        await result

