"""Unit tests use no network: a test that binds or connects an IP socket belongs in
tests/integration/ (in-process servers on loopback) or tests/e2e/ (a twistd subprocess).
Unix sockets stay allowed: the admin tool looks for the daemon's control socket."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest


def _guard(original: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(
                "a unit test opened a network socket: use MemoryReactor/StringTransport, or "
                "move the test to tests/integration/ or tests/e2e/"
            )
        return original(self, *args, **kwargs)

    return guarded


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for method in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, method, _guard(getattr(socket.socket, method)))
    yield
