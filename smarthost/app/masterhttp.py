"""The master's ``[http]`` side with ``[server] workers`` > 1: one ``/metrics`` for all workers,
``/healthz`` for the load balancer, and a status page listing the workers.

Each worker serves the usual HTTP side on ``<its spool>/http.sock``
(:func:`smarthost.app.workerspools.http_socket`); the master fetches every worker's
``/metrics`` over that socket at each scrape, in parallel, and adds them up: counters,
histograms and gauges that count things are summed, the few gauges whose sum means nothing
are combined as :data:`smarthost.app.metrics.GAUGE_MERGE` says (the oldest message: max;
the certificate's expiry: min). Prometheus so scrapes one target per node, as with one
process. Rejected: prometheus_client's multiprocess mode (files in a shared directory) has
no custom collectors, and the queue and connection gauges are collectors.

A worker that does not answer within :data:`SCRAPE_TIMEOUT` is left out of that scrape and
counted in ``smarthost_workers_scrape_failed``; ``smarthost_workers{state}`` says how many
run, do not answer, or are down (being restarted). Its counters still count, with the
values it last answered; a restarted worker's start again at 0 on top of what its earlier
processes had counted (:class:`smarthost.app.countercarry.CounterCarry`): the sums never go
down, which Prometheus would read as a reset of the whole node's count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from zope.interface import implementer

from smarthost.app import control, workerspools
from smarthost.app.countercarry import CounterCarry
from smarthost.app.http import (
    HealthResource,
    MetricsPage,
    QuietSite,
    SiteService,
    StartupSteps,
    StatusPageResource,
)
from smarthost.app.metrics import GAUGE_MERGE, GAUGE_MERGE_SUFFIXES
from smarthost.app.statuspage import WorkerStatus, WorkersView, render_workers
from smarthost.core.maillog import MailLog

SCRAPE_TIMEOUT = 2.0  # seconds a worker has to answer; Prometheus' own default timeout is 10
MAX_BODY = 16 * 1024 * 1024  # a worker's metrics are a few KB: more is a bug, not data
_ADDITIVE_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
_COMBINE: dict[str, Callable[[float, float], float]] = {"sum": lambda a, b: a + b,
                                                       "max": max, "min": min}


@attrs.frozen
class MasterSources:
    """What the master's HTTP side reads from the master."""

    sockets: Callable[[], Sequence[Path]]  # each running worker's http.sock
    ready: Callable[[], bool]  # every worker is up (SPEC: ready is all or nothing)
    startup: StartupSteps
    hostname: Callable[[], str]
    maillog: MailLog
    expected: Callable[[], int] | None = None  # workers that should run; missing ones are down


def make_master_http_service(
    reactor: Any, listen: Sequence[str], sources: MasterSources
) -> SiteService:
    """The master's service of the ``[http] listen`` endpoints (reports the ``http`` step)."""
    return MasterHTTPService(reactor, listen, sources)


# -- fetching from the workers --------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class UnixSocketEndpoint:
    """Connects to a unix socket whatever its path's length, through the directory's
    descriptor (:class:`smarthost.app.control.ShortPath`), closed once connected."""

    def __init__(self, reactor: Any, socket: Path, timeout: float) -> None:
        self._reactor = reactor
        self._socket = socket
        self._timeout = timeout

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        path = control.ShortPath(str(self._socket.parent), self._socket.name)
        endpoint = UNIXClientEndpoint(  # type: ignore[no-untyped-call]
            self._reactor, path.path, timeout=self._timeout)
        d: Deferred[Any] = endpoint.connect(factory)  # type: ignore[no-untyped-call]

        def close(result: object) -> object:
            path.close()
            return result

        return d.addBoth(close)


@implementer(IAgentEndpointFactory)
class _Only:
    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self._endpoint


class _Body(Protocol):
    """Collects a response's body, at most :data:`MAX_BODY` bytes. Not ``readBody``: it
    warns that the proxy transport it sees has no ``abortConnection``; cancelling this one
    stops the transport (the connection is closed)."""

    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred(lambda _d: self._stop())
        self._parts: list[bytes] = []
        self._size = 0

    def _stop(self) -> None:
        transport: Any = self.transport  # the response's TransportProxyProducer
        if transport is not None:
            transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        self._parts.append(data)
        if self._size > MAX_BODY and not self.done.called:
            self.done.errback(OSError(f"more than {MAX_BODY} bytes"))
            self._stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):  # type: ignore[no-untyped-call]
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)


async def _get(reactor: Any, socket: Path, path: bytes, timeout: float) -> bytes:
    endpoint = UnixSocketEndpoint(reactor, socket, timeout)
    agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
        reactor, _Only(endpoint))
    response = await agent.request(b"GET", b"http://worker" + path)
    body = _Body()
    response.deliverBody(body)
    data = await body.done
    if response.code != 200:
        raise OSError(f"{socket}: HTTP {response.code}")
    return data


def fetch(reactor: Any, socket: Path, path: bytes,
          timeout: float = SCRAPE_TIMEOUT) -> Deferred[bytes]:
    """``path`` from the HTTP server on the unix socket ``socket``, given up after
    ``timeout`` seconds (the request is cancelled: its connection is closed)."""
    d = Deferred.fromCoroutine(_get(reactor, socket, path, timeout))
    return d.addTimeout(timeout, reactor)


@attrs.frozen
class Scrape:
    """One worker's metrics at one scrape; ``families`` None when it did not answer in time,
    or answered something that is not the text format."""

    socket: Path
    families: Sequence[Metric] | None

    @property
    def name(self) -> str:
        index = workerspools.worker_index(self.socket.parent)
        return self.socket.parent.name if index is None else f"worker {index}"


def parse(text: str) -> list[Metric] | None:
    try:
        return list(text_string_to_metric_families(text))
    except ValueError:
        return None


def scrape(reactor: Any, sockets: Sequence[Path],
           timeout: float = SCRAPE_TIMEOUT) -> Deferred[list[Scrape]]:
    """Every worker's ``/metrics`` at once; never fails (a worker that fails is marked)."""

    def one(socket: Path) -> Deferred[Scrape]:
        d = fetch(reactor, socket, b"/metrics", timeout)

        def parsed(body: bytes) -> Scrape:
            return Scrape(socket, parse(body.decode("utf-8", "replace")))

        def failed(_failure: Failure) -> Scrape:
            return Scrape(socket, None)

        return d.addCallbacks(parsed, failed)

    return gatherResults([one(socket) for socket in sockets])


# -- adding them up ---------------------------------------------------------------------------


def merge_rule(family: Metric) -> str:
    """sum, max or min, for every sample of ``family`` (see :data:`GAUGE_MERGE`)."""
    if family.type in _ADDITIVE_TYPES:
        return "sum"
    if family.name in GAUGE_MERGE:
        return GAUGE_MERGE[family.name]
    for suffix, rule in GAUGE_MERGE_SUFFIXES.items():
        if family.name.endswith(suffix):
            return rule
    return "sum"


_Key = tuple[str, tuple[tuple[str, str], ...]]


def merge(workers: Iterable[Sequence[Metric]]) -> list[Metric]:
    """One family per name, in the order first seen; samples with the same name and labels
    combined by :func:`merge_rule`. A family a worker reports with another type (two
    versions running during an upgrade) is left out for that worker."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[_Key, Sample]] = {}
    for families in workers:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation,
                                                    family.type)
                values[family.name] = {}
            elif into.type != family.type:
                continue
            combine = _COMBINE[merge_rule(family)]
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                known = samples.get(key)
                samples[key] = sample if known is None else known._replace(
                    value=combine(known.value, sample.value))
    for name, family in merged.items():
        family.samples = [Sample(s.name, s.labels, s.value) for s in values[name].values()]
    return list(merged.values())


def _workers_families(scrapes: Sequence[Scrape], expected: int | None) -> list[Metric]:
    failed = sum(1 for s in scrapes if s.families is None)
    states = Metric("smarthost_workers", "Worker processes, by state", "gauge")
    for state, count in (("running", len(scrapes) - failed), ("not_answering", failed),
                         ("down", max(0, (expected or 0) - len(scrapes)))):
        states.add_sample("smarthost_workers", {"state": state}, count)
    failures = Metric("smarthost_workers_scrape_failed",
                      "Workers left out of this scrape: no answer within "
                      f"{SCRAPE_TIMEOUT:g} s", "gauge")
    failures.add_sample("smarthost_workers_scrape_failed", {}, failed)
    return [states, failures]


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def exposition(scrapes: Sequence[Scrape], expected: int | None = None,
               carry: CounterCarry | None = None, ticket: int = 0) -> bytes:
    """The text Prometheus reads: the workers' metrics added up, their counters carried by
    ``carry`` (taken at ``ticket``; a new one: as the master's first scrape), then the
    workers' own."""
    carry = CounterCarry() if carry is None else carry
    merged = merge(carry.add(ticket, [(s.socket, s.families) for s in scrapes]))
    return generate_latest(_Families([*merged, *_workers_families(scrapes, expected)]))


def worker_status(scrape: Scrape) -> WorkerStatus:
    """Its line on the master's page, from its metrics."""
    if scrape.families is None:
        return WorkerStatus(scrape.name, False, {}, 0.0, 0)
    by_name = {family.name: family for family in scrape.families}

    def samples(name: str) -> list[Sample]:
        family = by_name.get(name)
        return [] if family is None else list(family.samples)

    queue = {s.labels.get("status", ""): int(s.value)
             for s in samples("smarthost_queue_messages")}
    oldest = max((s.value for s in samples("smarthost_queue_oldest_age_seconds")), default=0.0)
    connections = int(sum(s.value for s in samples("smarthost_connections")))
    return WorkerStatus(scrape.name, True, queue, oldest, connections)


# -- the service --------------------------------------------------------------------------------


class MasterHTTPService(SiteService):
    """``/metrics``, ``/healthz`` and ``/`` of the master: each request asks the workers
    afresh (a scrape is a few KB from each; Prometheus asks every 15 s or so)."""

    def __init__(self, reactor: Any, listen: Sequence[str], sources: MasterSources) -> None:
        self._sources = sources
        self._carry = CounterCarry()
        root = Resource()  # type: ignore[no-untyped-call]
        root.putChild(b"", StatusPageResource(self.page, sources.maillog))
        root.putChild(b"healthz", HealthResource(self._health))
        root.putChild(b"metrics", MetricsPage(self._metrics, sources.maillog))
        super().__init__(reactor, listen, QuietSite(root),  # type: ignore[no-untyped-call]
                         sources.startup, sources.maillog)

    def _health(self) -> str:
        return self.health(self._sources.ready())

    def _expected(self) -> int | None:
        return None if self._sources.expected is None else self._sources.expected()

    def metrics(self) -> Deferred[bytes]:
        """Every running worker's metrics, added up, their counters carried across restarts
        and missed scrapes (never fails: see :func:`scrape`)."""
        ticket = self._carry.ticket()
        d = scrape(self._reactor, list(self._sources.sockets()))
        return d.addCallback(exposition, self._expected(), self._carry, ticket)

    def _metrics(self, accept: str) -> Deferred[tuple[str, bytes]]:
        # Always the Prometheus text: what the workers send is parsed in that format.
        return self.metrics().addCallback(lambda text: (CONTENT_TYPE_LATEST, text))

    def page(self) -> Deferred[str]:
        def render(scrapes: list[Scrape]) -> str:
            expected = self._expected()
            return render_workers(WorkersView(
                hostname=self._sources.hostname(),
                now=self._reactor.seconds(),
                health=self._health(),
                workers=[worker_status(s) for s in scrapes],
                down=max(0, (expected or 0) - len(scrapes)),
            ))

        return scrape(self._reactor, list(self._sources.sockets())).addCallback(render)
