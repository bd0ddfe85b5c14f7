"""The master's HTTP side with `[server] workers` > 1, on the real reactor: workers serve
their HTTP side on unix sockets whose paths are longer than a socket address may be (one a
real daemon HTTPService over a real spool, one a plain Twisted web server serving metrics
text made by the real registry, one that never answers, one whose socket nobody listens on
any more), and the master's /metrics, /healthz and / over loopback TCP."""
# Twisted's web and trial's assertions carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_http import _fetch, scratch
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from smarthost.app import control, masterhttp
from smarthost.app.http import STEP, StatusSources, make_http_service
from smarthost.app.metrics import Metrics, State
from smarthost.app.watch import Watch
from smarthost.core.envelope import Envelope, Recipient
from smarthost.core.maillog import MailLog
from smarthost.queue.spool import Spool

SUN_PATH_MAX = 108


class Startup:
    """Fires ``listening`` when the service reports its step (all its ports are open)."""

    def __init__(self) -> None:
        self.listening: Deferred[str] = Deferred()
        self.failed: list[tuple[str, str]] = []

    def done(self, step: str) -> None:
        self.listening.callback(step)

    def fail(self, key: str, problem: str) -> None:
        self.failed.append((key, problem))


class _Text(Resource):
    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__()
        self.text = text  # what the next request gets

    def render_GET(self, request: Any) -> bytes:
        return self.text


class _Never(Resource):
    """A worker stuck (e.g. its reactor blocked): accepts, never answers."""

    isLeaf = True

    def render_GET(self, request: Any) -> int:
        return NOT_DONE_YET


def metrics_text(accepted: int, queued: int) -> bytes:
    metrics = Metrics()
    for _ in range(accepted):
        metrics.accepted("smtp")
    metrics.watch(lambda: State({"queued": queued}, 7.0, {"smtp": 2}, None))
    return generate_latest(metrics.registry)


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class MasterHTTPTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.root = scratch(self) / ("s" * 60) / ("p" * 40)
        self.ports: dict[int, IListeningPort] = {}

    def worker_dir(self, i: int) -> Path:
        directory = self.root / f"worker-{i}"
        directory.mkdir(parents=True, mode=0o700)
        assert len(str(directory / "http.sock")) > SUN_PATH_MAX
        return directory

    async def serve(self, i: int, root: Resource) -> Path:
        directory = self.worker_dir(i)
        site = Site(root)
        site.noisy = False
        port: IListeningPort = await control.listen_unix(reactor, str(directory), "http.sock",
                                                         site)
        self.addCleanup(port.stopListening)
        self.ports[i] = port
        return directory / "http.sock"

    async def daemon_worker(self, i: int) -> Path:
        """The worker's own HTTP side, as the daemon runs it, with one message accepted."""
        directory = self.worker_dir(i)
        spool, _ = Spool.open(directory, clock=reactor, run_blocking=deferToThread)
        self.addCleanup(spool.close)
        watch = Watch(reactor)
        startup = Startup()
        sources = StatusSources(
            watch=watch, spool=spool, maillog=MailLog(reactor), startup=startup,
            ready=lambda: True, hostname=lambda: "worker", certificate=lambda: None)
        service = make_http_service(reactor, [directory / "http.sock"], sources)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(await startup.listening, STEP)
        incoming = watch.receiving("smtp", spool).receive()
        incoming.write(b"Subject: hi\r\n\r\nHello.\r\n")
        await incoming.commit(Envelope("a@example.test", (Recipient("b@example.net"),)))
        return directory / "http.sock"

    async def master(self, sockets: list[Path], ready: bool, expected: int) -> int:
        startup = Startup()
        service = masterhttp.make_master_http_service(
            reactor, ["tcp:0:interface=127.0.0.1"], masterhttp.MasterSources(
                sockets=lambda: sockets, ready=lambda: ready, startup=startup,
                hostname=lambda: "mx.smarthost.test", maillog=MailLog(reactor),
                expected=lambda: expected))
        assert isinstance(service, masterhttp.MasterHTTPService)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(await startup.listening, STEP)
        [port] = service._ports
        return int(getattr(port.getHost(), "port", 0))

    async def test_metrics_of_every_worker_added_up(self) -> None:
        sockets = [await self.daemon_worker(1),
                   await self.serve(2, _put("metrics", _Text(metrics_text(3, 4))))]
        port = await self.master(sockets, ready=True, expected=2)
        fetched = await deferToThread(_fetch, f"http://127.0.0.1:{port}/metrics")
        self.assertEqual(fetched.code, 200)
        self.assertTrue(fetched.headers["content-type"].startswith("text/plain"))
        got = values(fetched.body)
        self.assertEqual(got["smarthost_messages_accepted_total", (("listener", "smtp"),)], 4)
        self.assertEqual(got["smarthost_queue_messages", (("status", "queued"),)], 5)
        self.assertEqual(got["smarthost_workers", (("state", "running"),)], 2)
        self.assertEqual(got["smarthost_workers_scrape_failed", ()], 0)
        health = await deferToThread(_fetch, f"http://127.0.0.1:{port}/healthz")
        self.assertEqual((health.code, health.body), (200, "ok\n"))
        page = await deferToThread(_fetch, f"http://127.0.0.1:{port}/")
        self.assertEqual(page.code, 200)
        self.assertIn("worker 1", page.body)
        self.assertIn("worker 2", page.body)
        self.assertIn("default-src 'none'", page.headers["content-security-policy"])

    async def test_a_stuck_or_dead_worker_is_skipped_and_counted(self) -> None:
        good = await self.serve(1, _put("metrics", _Text(metrics_text(2, 1))))
        stuck = await self.serve(2, _put("metrics", _Never()))
        dead = self.worker_dir(3) / "http.sock"
        bound = socket.socket(socket.AF_UNIX)  # bound, never listening: a worker killed
        shortcut = control.ShortPath(str(dead.parent), dead.name)
        bound.bind(shortcut.path)
        shortcut.close()
        bound.close()
        port = await self.master([good, stuck, dead], ready=False, expected=4)
        started = time.monotonic()
        fetched = await deferToThread(_fetch, f"http://127.0.0.1:{port}/metrics")
        took = time.monotonic() - started
        self.assertEqual(fetched.code, 200)
        self.assertLess(took, masterhttp.SCRAPE_TIMEOUT + 2)
        got = values(fetched.body)
        self.assertEqual(got["smarthost_messages_accepted_total", (("listener", "smtp"),)], 2)
        self.assertEqual(got["smarthost_workers_scrape_failed", ()], 2)
        self.assertEqual(got["smarthost_workers", (("state", "down"),)], 1)
        health = await deferToThread(_fetch, f"http://127.0.0.1:{port}/healthz")
        self.assertEqual((health.code, health.body), (503, "starting\n"))
        page = await deferToThread(_fetch, f"http://127.0.0.1:{port}/")
        self.assertIn("not answering", page.body)

    async def test_counters_do_not_go_down_when_a_worker_restarts_or_dies(self) -> None:
        """Prometheus reads a lower counter as a reset: the master's sums carry a restarted
        worker's earlier count and a dead worker's last one."""
        first = _Text(metrics_text(3, 1))
        second = _Text(metrics_text(2, 1))
        sockets = [await self.serve(1, _put("metrics", first)),
                   await self.serve(2, _put("metrics", second))]
        port = await self.master(sockets, ready=True, expected=2)
        url = f"http://127.0.0.1:{port}/metrics"
        key = "smarthost_messages_accepted_total", (("listener", "smtp"),)
        got = values((await deferToThread(_fetch, url)).body)
        self.assertEqual(got[key], 5)
        restarted = Metrics()  # worker 1 restarted: a new registry, 1 since
        restarted.accepted("smtp")
        restarted.watch(lambda: State({"queued": 4}, 0.0, {}, None))
        first.text = generate_latest(restarted.registry)
        stopped = self.ports[2].stopListening()  # worker 2 killed
        assert stopped is not None
        await stopped
        got = values((await deferToThread(_fetch, url)).body)
        self.assertEqual(got[key], 3 + 1 + 2)
        # Gauges are not carried: the dead worker's queue is not counted.
        self.assertEqual(got["smarthost_queue_messages", (("status", "queued"),)], 4)
        self.assertEqual(got["smarthost_workers_scrape_failed", ()], 1)
        restarted.accepted("smtp")
        first.text = generate_latest(restarted.registry)
        got = values((await deferToThread(_fetch, url)).body)
        self.assertEqual(got[key], 3 + 2 + 2)


def _put(name: str, child: Resource) -> Resource:
    root = Resource()
    root.putChild(name.encode(), child)
    return root
