"""The daemon's control socket, ``<spool>/control.sock`` (mode 0600).

``smarthost queue flush|delete|release`` talk to a running daemon here, so that the daemon,
which holds the schedule, makes every change itself (no race with a delivery in flight).
One command per connection, one line back. Nothing from the socket is executed: commands are
matched against a fixed table and queue ids are validated before they become paths.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

SOCKET_NAME = "control.sock"

Handler = Callable[[list[str]], Any]  # returns str, Deferred[str] or a coroutine of str


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self._handlers = handlers

    def lineReceived(self, line: bytes) -> None:
        words = line.decode("utf-8", "replace").split()
        handler = self._handlers.get(words[0]) if words else None
        if handler is None:
            self._answer("error: unknown command")
            return
        d = maybeDeferred(handler, words[1:])
        d.addCallback(lambda result: Deferred.fromCoroutine(result)
                      if inspect.iscoroutine(result) else result)
        d.addCallbacks(self._answer, self._failed)

    def _failed(self, failure: Failure) -> None:
        self._answer(f"error: {failure.getErrorMessage()}")

    def _answer(self, text: str) -> None:
        self.sendLine(text.encode("utf-8"))  # type: ignore[no-untyped-call]
        assert self.transport is not None
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answer("error: line too long")


class ControlFactory(Factory):
    def __init__(self, handlers: dict[str, Handler]) -> None:
        self._handlers = handlers

    def buildProtocol(self, addr: object) -> ControlProtocol:
        protocol = ControlProtocol(self._handlers)
        protocol.factory = self
        return protocol
