"""The one memory of failed next-hop hosts, and its one rule.

A host that took no connection (refused, timed out) is remembered for ``hold`` seconds from the
start of the attempt that found it down; ``hold`` is the first interval of ``[queue] retry``,
but never more than a minute. While it is remembered:

- routing lists it last among its route's hosts (moved, never dropped: a host that was down
  a moment ago may be the only one that works now);
- a route ALL of whose hosts are remembered is suspended, like Postfix's dead destinations:
  its mail is deferred at once ("delivery temporarily suspended: ...") instead of each
  message paying a connect attempt, or a 30 s connect timeout, against a next hop that is
  down. Being a property of the hosts, a suspension does not depend on the order routing
  lists them in.

Why the hold follows the retry schedule: a memory that outlives the first retry interval
defers the message's next attempt without trying, so the operator's schedule would not be
the one followed (with ``retry = [1, 1, 2]`` mail waited a full minute for an MX that was
back after two seconds). ``smarthost queue flush`` forgets everything, as ``postqueue -f``
forgets dead destinations.

The scheduler writes here (the hosts an attempt found unreachable, as the SMTP agent reported
them through the courier) and forgets on a flush; routing and the courier read. The agents
never see this memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime

from smarthost.delivery.routing import Host, HostFailure

MAX_HOLD = 60.0  # seconds; Postfix keeps a dead destination about as long


class HostCache:
    """Hosts that recently took no connection, each remembered for ``hold`` seconds."""

    def __init__(self, clock: IReactorTime, first_retry: float) -> None:
        self._clock = clock
        self.hold = max(0.0, min(first_retry, MAX_HOLD))
        # (address, port) -> (when, order of recording, the failure); kept in recording order
        # so expired entries are found at the front.
        self._failed: dict[tuple[str, int], tuple[float, int, HostFailure]] = {}
        self._seq = itertools.count()

    def failed(self, failure: HostFailure, since: float) -> None:
        """Remember that ``failure.host`` took no connection in the attempt that started at
        ``since``. The hold counts from there, not from the failure (a connect timeout can come
        30 s later): the attempt's message, retried one first interval later at the earliest,
        always finds the hold over."""
        self._forget_expired(self._clock.seconds())
        key = _key(failure.host)
        self._failed.pop(key, None)  # re-recorded: now the most recent
        self._failed[key] = (since, next(self._seq), failure)

    def remembered(self, host: Host) -> bool:
        """Whether ``host`` failed less than ``hold`` seconds ago."""
        return self._failure(host) is not None

    def order(self, hosts: Iterable[Host]) -> tuple[Host, ...]:
        """``hosts`` with the remembered ones moved to the end, each part in its order."""
        listed = list(hosts)
        fresh = [h for h in listed if not self.remembered(h)]
        stale = [h for h in listed if self.remembered(h)]
        return (*fresh, *stale)

    def suspended(self, hosts: Iterable[Host]) -> HostFailure | None:
        """When every one of ``hosts`` is remembered, the most recent of their failures
        (what the deferral says); None while any of them may be tried."""
        latest: tuple[float, int, HostFailure] | None = None
        for host in hosts:
            found = self._failure(host)
            if found is None:
                return None
            if latest is None or found[:2] > latest[:2]:
                latest = found
        return None if latest is None else latest[2]

    def forget_all(self) -> None:
        """The operator says the next hops are back (``queue flush``): try them all again."""
        self._failed.clear()

    def _failure(self, host: Host) -> tuple[float, int, HostFailure] | None:
        found = self._failed.get(_key(host))
        if found is None or self._clock.seconds() - found[0] >= self.hold:
            return None
        return found

    def _forget_expired(self, now: float) -> None:
        # Roughly oldest first (attempts that overlap may record out of order, and a clock
        # can step back), so the memory holds about the hosts of the last `hold` seconds; an
        # entry left a little longer is harmless, as _failure compares times.
        while self._failed:
            key, (when, _, _) = next(iter(self._failed.items()))
            if now - when < self.hold:
                break
            del self._failed[key]


def _key(host: Host) -> tuple[str, int]:
    # What refuses connections is an address and port; the name is only how we found it.
    return (host.address, host.port)
