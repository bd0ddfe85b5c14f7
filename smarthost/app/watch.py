"""Everything the metrics and the status page count, as one object the wiring builds once.

A reload (SIGHUP) rebuilds a generation (policy, portal, session factories) but never this:
the counters, the last hour's activity and the listeners' connection counts live here, so
they carry on through every reload until the process ends.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from smarthost.api import ISpool
from smarthost.app.activity import Activity
from smarthost.app.meters import ConnectionCounts, ReceivingSpool
from smarthost.app.metrics import Metrics


class Watch:
    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.metrics = Metrics()
        self.activity = Activity(clock, self.metrics)  # a log observer (see http.py)
        self.connections = ConnectionCounts()

    def receiving(self, listener: str, spool: ISpool) -> ISpool:
        """The spool for the sessions of ``listener`` (a ``[listen]`` key): commits timed,
        accepted messages counted."""
        return ReceivingSpool(spool, listener, self._clock, accepted=self.activity.accepted,
                              commit_seconds=self.metrics.commit_seconds)

    def counted(self, listener: str, description: str, factory: Factory) -> Factory:
        """``factory`` of one listening endpoint, its open connections counted."""
        return self.connections.counted(listener, description, factory)
