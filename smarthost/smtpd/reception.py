"""One message arriving in DATA: its bytes streamed into the spool through the DATA reader,
its header section kept for plugins, and a full disk turned into ``452`` at the end of DATA
instead of a dead session (RFC 5321 4.2.5: the client must learn the message was not taken);
then, for a complete message, the last checks and the spool's commit point.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from smarthost.api import IIncomingMessage, MessageView
from smarthost.core import replies as reply
from smarthost.core.envelope import Client, Envelope, QueueEntry
from smarthost.core.maillog import MailLog
from smarthost.core.replies import NO_STORAGE, Reply
from smarthost.smtpd.dotreader import DataReader, DataResult, HeaderCapture
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits
from smarthost.smtpd.policy import RelayPolicy


class Reception:
    def __init__(
        self,
        incoming: IIncomingMessage,
        max_size: int,
        log: MailLog,
        *,
        capture_headers: bool,
    ) -> None:
        self.incoming = incoming
        self._log = log
        self._reader = DataReader(self._write, max_size)
        self._headers = HeaderCapture() if capture_headers else None
        self._write_failed = False

    def feed(self, data: bytes) -> DataResult | None:
        """Bytes from the client; a result once the end of data (or a fatal error) is seen."""
        return self._reader.feed(data)

    def abort(self) -> None:
        """Drop the message: refused, broken off, or the connection ended first."""
        self.incoming.abort()

    def error(self, result: DataResult) -> Reply | None:
        """What to answer instead of committing, if anything."""
        if result.error is None and self._write_failed:
            return NO_STORAGE
        return result.error

    def view(self, envelope: Envelope, size: int) -> MessageView | None:
        """What DATA-stage plugins see; None when no plugin asked (nothing was captured)."""
        if self._headers is None:
            return None
        return MessageView(envelope, self._headers.value, size, self.incoming.read)

    def _write(self, data: bytes) -> None:
        if self._write_failed:
            return
        if self._headers is not None:
            self._headers.feed(data)
        try:
            self.incoming.write(data)
        except OSError:
            self._log.failure("{queue_id}: cannot write to the spool",
                              queue_id=str(self.incoming.queue_id))
            self._write_failed = True


class Intake:
    """Takes a complete message in: the DATA-stage plugins, the hold brake, the spool's commit
    point, the log line, then the hand-over to delivery (``accepted``)."""

    def __init__(
        self,
        hooks: Hooks,
        limits: Limits,
        policy: RelayPolicy,
        log: MailLog,
        accepted: Callable[[QueueEntry], None],
    ) -> None:
        self._hooks = hooks
        self._limits = limits
        self._policy = policy
        self._log = log
        self._accepted = accepted

    async def accept(
        self, reception: Reception, envelope: Envelope, size: int, client: Client,
        rate_key: str | None,
    ) -> Reply:
        """``rate_key``: whose hourly sending rate the message counts against, if anyone's."""
        view = reception.view(envelope, size)
        if view is not None:
            refusal = await self._hooks.screen(client, view, reception.incoming.prepend)
            if refusal is not None:
                reception.abort()
                self._log.refused(client.address, "DATA", envelope.sender, str(refusal))
                return refusal
        held = rate_key is not None and self._limits.rate.accepted(rate_key)
        entry = await reception.incoming.commit(attrs.evolve(envelope, held=held))
        self._log.accepted(entry, self._policy.describe(client))
        if held:
            self._log.held(entry, rate_key or "")
        self._accepted(entry)
        return reply.queued(str(entry.queue_id))
