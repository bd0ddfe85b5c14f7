"""The seams of smarthost, as zope.interface interfaces.

Internal seams (the spool, delivery agents) let a faster or different implementation replace
one part without touching the others. The plugin API (checks per SMTP stage) lives here too,
so a third-party package needs to import nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from smarthost.envelope import Envelope, QueueEntry, QueueId


class IIncomingMessage(Interface):
    """A message being received: bytes go to disk as they arrive, then commit or abort."""

    queue_id: QueueId = Attribute("The id this message will have once committed.")

    def write(data: bytes) -> None:
        """Append message bytes (header and body, CRLF line endings, dot-unstuffed)."""

    def commit(envelope: Envelope) -> Deferred[QueueEntry]:
        """Make the message durable. Fires only once data and envelope are fsynced: the
        session answers 250 after this, never before."""

    def abort() -> None:
        """Throw the partial message away (client vanished, size exceeded, bad data)."""


class ISpool(Interface):
    """The durable queue: the only bridge from receiving to delivering."""

    def receive() -> IIncomingMessage:
        """Start receiving one message."""

    def entries() -> Iterator[QueueEntry]:
        """Every committed message, in arrival order (start-up, ``queue list``)."""

    def load(queue_id: QueueId) -> QueueEntry:
        """One committed message's state; KeyError when it is not (or no longer) queued."""

    def open_body(queue_id: QueueId) -> BinaryIO:
        """The committed message bytes, for delivery or bounces."""

    def update(entry: QueueEntry) -> Deferred[None]:
        """Durably replace the state of a queued message (attempts, recipient status)."""

    def remove(queue_id: QueueId) -> Deferred[None]:
        """Durably delete a message that is fully delivered, bounced or deleted."""
