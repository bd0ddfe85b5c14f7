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

from smarthost.core.envelope import QueueId
from smarthost.core.maillog import MailLog
from smarthost.delivery.scheduler import Scheduler
from smarthost.queue.spool import Spool, release_held

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


class ControlCommands:
    """The fixed table of what the admin tool may ask the running daemon. Each change goes
    through the scheduler and the spool of this process, so it cannot race a delivery."""

    def __init__(self, spool: Spool, scheduler: Scheduler, maillog: MailLog) -> None:
        self._spool = spool
        self._scheduler = scheduler
        self._log = maillog

    def handlers(self) -> dict[str, Handler]:
        return {"flush": self.flush, "delete": self.delete, "release": self.release}

    def flush(self, args: list[str]) -> str:
        count = self._scheduler.flush()
        self._log.notice("queue flush requested: {count} messages", count=count)
        return f"flushed: {count} messages will be retried now"

    async def delete(self, args: list[str]) -> str:
        deleted = 0
        for text in args:
            queue_id = QueueId(text)
            self._scheduler.forget(queue_id)
            try:
                await self._spool.remove(queue_id)
            except KeyError:
                continue
            self._log.removed(queue_id, "deleted by the operator")
            deleted += 1
        return f"deleted {deleted}"

    async def release(self, args: list[str]) -> str:
        if len(args) != 1:
            return "error: release needs one user name"
        released = await release_held(self._spool, args[0])
        for entry in released:
            self._log.notice("{queue_id}: released by the operator", queue_id=str(entry.queue_id))
            self._scheduler.enqueue(entry)
        return f"released {len(released)}"
