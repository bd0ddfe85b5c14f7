"""The Prometheus metrics (SPEC "Watching it"), in a registry of our own.

Counters are incremented where things happen (:mod:`smarthost.app.activity` from the
operator log's events, :mod:`smarthost.app.meters` at each commit); everything that is a
state rather than an event (the queue, open connections, the certificate) is read only when
Prometheus scrapes, by :class:`StateCollector`, so it costs nothing between scrapes.

prometheus_client's ``MetricsResource`` renders in the reactor's thread pool: the collector
gets its values through ``read``, which the HTTP side makes hop to the reactor thread (where
the live objects may be read safely) and back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from smarthost.core.enums import Role

STATUSES = ("queued", "deferred", "held")
# Mechanism names a failed AUTH is counted under; any other name (there should be none: the
# session refuses mechanisms it does not offer) is counted as OTHER, so a client cannot grow
# the label set.
KNOWN_MECHANISMS = frozenset({
    "PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-256-PLUS", "OAUTHBEARER", "XOAUTH2", "GSSAPI", "EXTERNAL",
})
# From half a millisecond (a batch on a fast SSD) to ten seconds (a disk in trouble).
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0, 10.0)

# How the master adds up its workers' samples ([server] workers > 1, smarthost.app.masterhttp).
# Counters, histograms and summaries are summed; so is a gauge that counts things (queue
# size, connections). A gauge whose sum means nothing is named here, with how to combine it.
GAUGE_MERGE: Mapping[str, str] = {
    "smarthost_queue_oldest_age_seconds": "max",  # the oldest message of any worker
    "smarthost_tls_certificate_expiry_timestamp_seconds": "min",  # the first one to expire
}
# The same by the end of the name, for gauges this table does not know: prometheus_client's
# "counting since" timestamps beside each counter and histogram, other timestamps, info.
GAUGE_MERGE_SUFFIXES: Mapping[str, str] = {
    "_created": "min",
    "_timestamp_seconds": "max",
    "_info": "max",
}


@attrs.frozen
class State:
    """What the gauges show, read at one moment."""

    queue: Mapping[str, int]  # messages by status: queued, deferred, held
    oldest_age: float  # seconds since the oldest message not held was queued; 0 when none
    connections: Mapping[str, int]  # open connections by listener
    certificate_expiry: float | None  # the served certificate's notAfter, Unix time


class Metrics:
    """The counters and the histogram; made once per process, so a reload keeps them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._accepted = Counter(
            "smarthost_messages_accepted", "Messages accepted (queued), by listener",
            ["listener"], registry=self.registry,
        )
        # The children made once: labels() costs a lock and a lookup on every message.
        self._accepted_on = {str(role): self._accepted.labels(listener=str(role))
                             for role in Role}
        self._delivered = Counter(
            "smarthost_recipients_delivered", "Recipients delivered", registry=self.registry
        )
        self._deferred = Counter(
            "smarthost_recipients_deferred", "Delivery attempts to a recipient that failed "
            "temporarily", registry=self.registry,
        )
        self._bounced = Counter(
            "smarthost_recipients_bounced", "Recipients given up on (permanent failure or "
            "lifetime expired)", registry=self.registry,
        )
        self._auth_failures = Counter(
            "smarthost_auth_failures", "Failed AUTH attempts, by SASL mechanism",
            ["mechanism"], registry=self.registry,
        )
        self._commit = Histogram(
            "smarthost_spool_commit_seconds", "Time from the end of a message to its commit "
            "being on disk", buckets=COMMIT_BUCKETS, registry=self.registry,
        )
        self._results = {"delivered": self._delivered, "deferred": self._deferred,
                         "bounced": self._bounced}

    def accepted(self, listener: str) -> None:
        child = self._accepted_on.get(listener)
        if child is None:
            child = self._accepted_on[listener] = self._accepted.labels(listener=listener)
        child.inc()

    def delivery(self, result: str) -> None:
        counter = self._results.get(result)
        if counter is not None:
            counter.inc()

    def auth_failed(self, mechanism: str) -> None:
        name = mechanism.upper()
        self._auth_failures.labels(mechanism=name if name in KNOWN_MECHANISMS else "OTHER").inc()

    def commit_seconds(self, seconds: float) -> None:
        self._commit.observe(max(0.0, seconds))

    def watch(self, read: Callable[[], State]) -> None:
        """Add the gauges, whose values ``read`` returns at each scrape."""
        self.registry.register(StateCollector(read))


class StateCollector(Collector):
    def __init__(self, read: Callable[[], State]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        # Without values: registering must not read the live objects.
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        state = self._read()
        queue, oldest, connections, expiry = _families()
        for status in STATUSES:
            queue.add_metric([status], state.queue.get(status, 0))
        oldest.add_metric([], state.oldest_age)
        for role in Role:
            connections.add_metric([str(role)], state.connections.get(str(role), 0))
        found = [queue, oldest, connections]
        if state.certificate_expiry is not None:
            expiry.add_metric([], state.certificate_expiry)
            found.append(expiry)
        return iter(found)


def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily,
                         GaugeMetricFamily]:
    return (
        GaugeMetricFamily("smarthost_queue_messages", "Messages in the queue, by status",
                          labels=["status"]),
        GaugeMetricFamily("smarthost_queue_oldest_age_seconds",
                          "Age of the oldest queued or deferred message (held mail left out)"),
        GaugeMetricFamily("smarthost_connections", "Open SMTP connections, by listener",
                          labels=["listener"]),
        GaugeMetricFamily("smarthost_tls_certificate_expiry_timestamp_seconds",
                          "When the served TLS certificate expires (Unix time)"),
    )
