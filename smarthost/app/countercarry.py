"""Keeps the master's summed counters from going down when a worker restarts or misses a
scrape ([server] workers > 1, :mod:`smarthost.app.masterhttp`).

Prometheus takes any decrease of a counter for a reset to zero: ``rate()`` and
``increase()`` then count the whole value after the drop as new increase. The master adds
up its workers' counters, so a worker that restarts (its counters start again at 0) or that
does not answer one scrape would take its share out of the sum, and a dashboard would show
the rest of the node's count as a spike. So the master remembers, for each worker and each
counter sample, the value it last read and an offset: what the worker's earlier processes
had counted. A worker's counters are its offset plus its current value; one that does not
answer (or is down) counts with the value it last answered. Sums of these only grow.

Carried: counter families, and histograms whole (``_bucket``, ``_count``, ``_sum``, so their
buckets stay consistent with their count), and their ``_created`` gauges, which show the
earliest one a worker had: the sum has counted since then. Gauges are not carried: a state
of a worker that does not answer is not known, and a dead worker holds nothing. Summaries
are not carried either (their quantiles do not add up; the workers expose none).

A restart is seen as a monotonic sample (``_total``, ``_count``, ``_bucket``) lower than
before, or a ``_created`` that changed (a new process made its counters afresh: this sees a
restart even when the new process has already counted past the old one's values). Then
every value of that worker's last answer moves into its offset, all at once, so a
histogram's buckets stay in step. What a worker counted after its last answer and before it
died is lost, as it would be with one process.

Memory of the master's process only: a master that restarts starts every sum at 0 again,
which Prometheus reads as the reset it is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterable, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

CARRIED_TYPES = frozenset({"counter", "histogram"})
_MONOTONIC = ("_total", "_count", "_bucket")  # never lower within a process; _sum may be
_CREATED = "_created"

SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name, its labels sorted


def sample_key(sample: Sample) -> SampleKey:
    return sample.name, tuple(sorted(sample.labels.items()))


class _Worker:
    """One worker's carried samples, kept by its place (a restarted worker takes the place
    of the one it replaces)."""

    def __init__(self) -> None:
        self.ticket = -1  # the scrape its values were read at
        self.families: dict[str, tuple[str, str]] = {}  # name: (documentation, type)
        self.family_of: dict[SampleKey, str] = {}  # every sample ever seen: its family
        self.last: dict[SampleKey, float] = {}  # at its last answer
        self.offset: dict[SampleKey, float] = {}  # counted by its earlier processes
        self.created: dict[SampleKey, float] = {}  # _created at its last answer
        self.since: dict[SampleKey, float] = {}  # the earliest _created seen

    def answer(self, families: Sequence[Metric]) -> set[str]:
        """Take a new answer in; the names of its families now carried."""
        carried = {f.name for f in families if f.type in CARRIED_TYPES}
        current: dict[SampleKey, float] = {}
        created: dict[SampleKey, float] = {}
        for family in families:
            if family.type in CARRIED_TYPES:
                into = current
            elif (family.type == "gauge" and family.name.endswith(_CREATED)
                  and family.name.removesuffix(_CREATED) in carried):
                into = created
            else:
                continue
            carried.add(family.name)
            self.families.setdefault(family.name, (family.documentation, family.type))
            for sample in family.samples:
                key = sample_key(sample)
                self.family_of.setdefault(key, family.name)
                into[key] = sample.value
        if self._restarted(current, created):
            for key, value in self.last.items():
                self.offset[key] = self.offset.get(key, 0.0) + value
        self.last, self.created = current, created
        for key, value in created.items():
            self.since[key] = min(self.since.get(key, math.inf), value)
        return carried

    def _restarted(self, current: dict[SampleKey, float],
                   created: dict[SampleKey, float]) -> bool:
        return (any(current.get(key, 0.0) < value for key, value in self.last.items()
                    if key[0].endswith(_MONOTONIC))
                or any(created.get(key, value) != value for key, value in self.created.items()))

    def metrics(self) -> dict[str, Metric]:
        """Its carried families, every sample it ever had: offset plus last value."""
        out = {name: Metric(name, documentation, kind)
               for name, (documentation, kind) in self.families.items()}
        for key, name in self.family_of.items():
            value = self.since[key] if key in self.since else (
                self.offset.get(key, 0.0) + self.last.get(key, 0.0))
            out[name].samples.append(Sample(key[0], dict(key[1]), value))
        return out


class CounterCarry:
    """The carried counters of every worker the master has read since it started."""

    def __init__(self) -> None:
        self._workers: dict[Hashable, _Worker] = {}
        self._tickets = itertools.count()

    def ticket(self) -> int:
        """Taken when a scrape starts: of two scrapes whose answers cross, the later one
        started wins (an older value read after a newer one would look like a restart)."""
        return next(self._tickets)

    def add(self, ticket: int,
            answers: Iterable[tuple[Hashable, Sequence[Metric] | None]]) -> list[list[Metric]]:
        """The families to add up for this scrape, one list per worker: an answering
        worker's own with its counters carried, then the carried counters of every worker
        that did not answer (``None``) or was not asked (down)."""
        out: list[list[Metric]] = []
        done: set[Hashable] = set()
        for place, families in answers:
            if families is None:
                continue
            worker = self._workers.setdefault(place, _Worker())
            done.add(place)
            if ticket < worker.ticket:  # a newer answer is already in: its gauges only
                carried = {f.name for f in families if f.name in worker.families}
            else:
                worker.ticket = ticket
                carried = worker.answer(families)
            mine = worker.metrics()
            out.append([mine.pop(f.name) if f.name in carried else f for f in families])
            out[-1].extend(mine.values())
        out.extend(list(worker.metrics().values())
                   for place, worker in self._workers.items() if place not in done)
        return out
