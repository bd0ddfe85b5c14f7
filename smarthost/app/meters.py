"""The two measurements no log line carries: how long the spool takes to make a message
durable (and on which listener it came in), and how many connections each listener holds.

Both are thin wrappers put around objects the wiring already builds, so nothing in smtpd or
the queue knows it is measured:

- :class:`ReceivingSpool` is the spool as one listener's sessions see it. Each commit is
  timed from the call to the moment the spool says the message is on disk (the wait a client
  has after its final dot), and a durable commit is the message accepted on that listener:
  the log line of an accepted message does not name the listener.
- :class:`ConnectionCounts` wraps each listener's factory; the Twisted wrapping factory keeps
  the set of open connections itself, so the gauge is that set's size, read at scrape time.

Per message this costs two clock reads and a counter increment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory
from twisted.protocols import policies
from zope.interface import implementer

from smarthost.api import IIncomingMessage, ISpool
from smarthost.core.envelope import Envelope, QueueEntry, QueueId


@implementer(ISpool)
class ReceivingSpool:
    """``spool`` for the sessions of one listener: every commit is timed and counted."""

    def __init__(
        self,
        spool: ISpool,
        listener: str,
        clock: IReactorTime,
        *,
        accepted: Callable[[str], None],
        commit_seconds: Callable[[float], None],
    ) -> None:
        self._spool = spool
        self._listener = listener
        self._clock = clock
        self._accepted = accepted
        self._commit_seconds = commit_seconds

    def receive(self) -> IIncomingMessage:
        return _TimedMessage(self._spool.receive(), self._clock, self._committed)

    def _committed(self, seconds: float) -> None:
        self._commit_seconds(seconds)
        self._accepted(self._listener)

    def entries(self) -> Iterator[QueueEntry]:
        return self._spool.entries()

    def load(self, queue_id: QueueId) -> QueueEntry:
        return self._spool.load(queue_id)

    def open_body(self, queue_id: QueueId) -> BinaryIO:
        return self._spool.open_body(queue_id)

    def update(self, entry: QueueEntry) -> Deferred[None]:
        return self._spool.update(entry)

    def remove(self, queue_id: QueueId) -> Deferred[None]:
        return self._spool.remove(queue_id)


@implementer(IIncomingMessage)
class _TimedMessage:
    def __init__(
        self, incoming: IIncomingMessage, clock: IReactorTime, committed: Callable[[float], None]
    ) -> None:
        self._incoming = incoming
        self._clock = clock
        self._committed = committed
        self.queue_id = incoming.queue_id

    def write(self, data: bytes) -> None:
        self._incoming.write(data)

    def read(self) -> bytes:
        return self._incoming.read()

    def prepend(self, data: bytes) -> None:
        self._incoming.prepend(data)

    def abort(self) -> None:
        self._incoming.abort()

    def commit(self, envelope: Envelope) -> Deferred[QueueEntry]:
        started = self._clock.seconds()

        def durable(entry: QueueEntry) -> QueueEntry:
            self._committed(self._clock.seconds() - started)
            return entry

        return self._incoming.commit(envelope).addCallback(durable)


@attrs.frozen
class ListenerLoad:
    """One listening endpoint and the connections it holds now."""

    listener: str  # the [listen] key: submission, submissions, smtp
    description: str  # the endpoint string
    connections: int


class ConnectionCounts:
    """The listeners' factories, wrapped so each knows its open connections."""

    def __init__(self) -> None:
        self._factories: list[tuple[str, str, _CountingFactory]] = []

    def counted(self, listener: str, description: str, factory: Factory) -> Factory:
        wrapped = _CountingFactory(factory)  # type: ignore[no-untyped-call]
        self._factories.append((listener, description, wrapped))
        return wrapped  # type: ignore[return-value]

    def listeners(self) -> list[ListenerLoad]:
        return [ListenerLoad(listener, description, len(factory.protocols))
                for listener, description, factory in self._factories]

    def by_listener(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for load in self.listeners():
            totals[load.listener] = totals.get(load.listener, 0) + load.connections
        return totals


@implementer(IHandshakeListener)
class _Counted(policies.ProtocolWrapper):
    """Passes everything through. A TLS layer under it (implicit TLS, or STARTTLS on the TCP
    transport) reports the end of its handshake here; the session's handshake deadline waits
    for that report, so it is passed on."""

    def handshakeCompleted(self) -> None:
        wrapped = self.wrappedProtocol
        if wrapped is not None and IHandshakeListener.providedBy(wrapped):
            wrapped.handshakeCompleted()


class _CountingFactory(policies.WrappingFactory[_Counted]):
    protocol = _Counted

    def buildProtocol(self, addr: Any) -> Any:
        inner = self.wrappedFactory.buildProtocol(addr)
        return None if inner is None else _Counted(self, inner)
