"""The daemon's own signals: SIGHUP reloads the configuration, SIGUSR1 reopens the logs.

A Python signal handler runs between two bytecodes of whatever the main thread was doing,
possibly in the middle of the reactor's own work; so the handler only asks the reactor to run
the action, through ``callFromThread`` (as Twisted's own SIGINT and SIGTERM handlers do),
and the action runs on the reactor like any other event.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from twisted.application.service import Service

Install = Callable[[int, Any], Any]  # signal.signal's shape


class SignalService(Service):
    """Installs the handlers while the daemon runs; puts the previous ones back at stop."""

    def __init__(
        self,
        reactor: Any,
        actions: Mapping[int, Callable[[], None]],
        install: Install = signal.signal,
    ) -> None:
        self._reactor = reactor
        self._actions = actions
        self._install = install
        self._previous: dict[int, Any] = {}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for signum, action in self._actions.items():
            self._previous[signum] = self._install(signum, self._handler(action))

    def _handler(self, action: Callable[[], None]) -> Callable[[int, FrameType | None], None]:
        def handle(signum: int, frame: FrameType | None) -> None:
            self._reactor.callFromThread(action)

        return handle

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            self._install(signum, handler if handler is not None else signal.SIG_DFL)
