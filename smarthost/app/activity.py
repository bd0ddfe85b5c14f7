"""What the daemon did lately, learnt from the operator log's own events.

:class:`Activity` is a ``twisted.logger`` observer. Every line of :class:`~smarthost.core.
maillog.MailLog` is an event in the ``smarthost`` namespace carrying its named fields, and a
per-message one its name (:data:`~smarthost.core.maillog.EVENT_KEY`, the name ``[log]
events`` gives it); two of them are counted here, recognised by that name (the line's text
is free to change), their values read from their fields:

- a delivery attempt (``delivery``: ``recipient``, ``relay``, ``result``, ``reply``): the
  delivered/deferred/bounced counters, the per-minute chart, and the last temporary failure
  per destination domain;
- a failed AUTH (``auth_failed``: ``client``, ``user``, ``mechanism``; a success and a
  missing secret are other events): the counter per mechanism and the recent failures per
  client address.

Accepted messages arrive through :meth:`Activity.accepted` (the spool wrapper of each
listener calls it): the accepted line does not say which listener the message came in on.

Memory is bounded: sixty minute buckets, and at most ``keep`` client addresses and
destinations (the least recently seen go first), so a spray of addresses or domains cannot
grow it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver
from zope.interface import implementer

from smarthost.app.metrics import Metrics
from smarthost.core.maillog import EVENT_KEY

SERIES = ("accepted", "delivered", "deferred", "bounced")
MINUTES = 60
AUTH_WINDOW = 3600.0  # AUTH failures older than this are not "recent"


@attrs.frozen
class Deferral:
    """The last temporary failure of a delivery to one domain."""

    domain: str
    when: float
    relay: str
    reply: str


@attrs.frozen
class AuthFailures:
    """Failed AUTH from one client address within the window."""

    client: str
    count: int
    first: float
    last: float
    user: str  # the last user name tried
    mechanism: str


class PerMinute:
    """Counts per minute for the last hour: a ring of buckets, each stamped with its minute."""

    def __init__(self, minutes: int = MINUTES) -> None:
        self._minutes = minutes
        self._stamps = [-1] * minutes
        self._counts = {name: [0] * minutes for name in SERIES}

    def add(self, series: str, now: float) -> None:
        minute = int(now // 60)
        slot = minute % self._minutes
        if self._stamps[slot] != minute:
            self._stamps[slot] = minute
            for counts in self._counts.values():
                counts[slot] = 0
        self._counts[series][slot] += 1

    def last_hour(self, now: float) -> dict[str, list[int]]:
        """Each series, oldest minute first, the current minute last."""
        current = int(now // 60)
        minutes = range(current - self._minutes + 1, current + 1)
        return {
            name: [counts[m % self._minutes] if self._stamps[m % self._minutes] == m else 0
                   for m in minutes]
            for name, counts in self._counts.items()
        }


@implementer(ILogObserver)
class Activity:
    def __init__(self, clock: IReactorTime, metrics: Metrics, keep: int = 1000) -> None:
        self._clock = clock
        self._metrics = metrics
        self._keep = keep
        self.minutes = PerMinute()
        self._failures: OrderedDict[str, AuthFailures] = OrderedDict()
        self._deferrals: OrderedDict[str, Deferral] = OrderedDict()

    def accepted(self, listener: str) -> None:
        self._metrics.accepted(listener)
        self.minutes.add("accepted", self._clock.seconds())

    def __call__(self, event: Mapping[str, Any]) -> None:
        # One look at the name (every message logs several events): before, the set of the
        # event's fields was built and compared, 4 µs a delivery under the profiler.
        name = event.get(EVENT_KEY)
        if name == "delivery":
            self._delivery(str(event["recipient"]), str(event["result"]),
                           str(event["relay"]), str(event["reply"]))
        elif name == "auth_failed":
            self._auth_failed(str(event["client"]), str(event["user"]),
                              str(event["mechanism"]))

    def _delivery(self, recipient: str, result: str, relay: str, reply: str) -> None:
        if result not in SERIES:
            return
        now = self._clock.seconds()
        self._metrics.delivery(result)
        self.minutes.add(result, now)
        if result == "deferred":
            domain = recipient.rpartition("@")[2].lower().rstrip(".")
            self._remember(self._deferrals, domain, Deferral(domain, now, relay, reply))

    def _auth_failed(self, client: str, user: str, mechanism: str) -> None:
        self._metrics.auth_failed(mechanism)
        now = self._clock.seconds()
        before = self._failures.get(client)
        if before is None or now - before.last > AUTH_WINDOW:
            record = AuthFailures(client, 1, now, now, user, mechanism.upper())
        else:
            record = AuthFailures(client, before.count + 1, before.first, now, user,
                                  mechanism.upper())
        self._remember(self._failures, client, record)

    def _remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self._keep:
            table.popitem(last=False)

    def auth_failures(self) -> list[AuthFailures]:
        """Clients with failures in the last hour, the most failures first."""
        now = self._clock.seconds()
        recent = [f for f in self._failures.values() if now - f.last <= AUTH_WINDOW]
        return sorted(recent, key=lambda f: (-f.count, -f.last))

    def deferrals(self) -> Mapping[str, Deferral]:
        return dict(self._deferrals)

    def history(self) -> dict[str, list[int]]:
        return self.minutes.last_hour(self._clock.seconds())

    def totals(self) -> dict[str, int]:
        return {name: sum(counts) for name, counts in self.history().items()}

