"""Small types shared by every part: how blocking work is handed off, what a network is."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

from twisted.internet.defer import Deferred

_P = ParamSpec("_P")
_R = TypeVar("_R")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RunBlocking(Protocol):
    """Runs blocking work off the reactor thread: ``deferToThread`` in production, a
    synchronous ``succeed(f(*args))`` fake in tests. Every part that touches the disk or a
    blocking library takes one, so nothing slow runs on the reactor and tests need no
    threads."""

    def __call__(
        self, f: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs
    ) -> Deferred[_R]: ...
