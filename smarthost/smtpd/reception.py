"""One message arriving in DATA or as BDAT chunks (:mod:`smarthost.smtpd.bdat`): its bytes
streamed into the spool through the DATA reader (or the chunks' checks), its header section
kept for plugins, and a full disk (while writing or at the commit) turned into ``452 4.3.1`` at
the end of the message instead of a dead session or a ``451`` with a traceback (RFC 5321
4.2.5: the client must learn the message was not taken); then, for a complete message, the
last checks and the spool's commit point.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import attrs

from smarthost.api import IIncomingMessage, MessageView
from smarthost.core import replies as reply
from smarthost.core.envelope import Client, Envelope, QueueEntry
from smarthost.core.maillog import MailLog
from smarthost.core.replies import NO_STORAGE, Reply
from smarthost.core.tlswaiver import header_says_no
from smarthost.smtpd.dotreader import DataReader, DataResult, HeaderCapture
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits
from smarthost.smtpd.policy import RelayPolicy

# The header section kept for the From: check and plugins; one this long is not read.
HEADER_LIMIT = 256 * 1024


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
        self._reader = DataReader(self.write, max_size)
        # Always kept (it stops at the end of the header section): the From: check reads it.
        self._headers = HeaderCapture(HEADER_LIMIT)
        self._plugins_see_headers = capture_headers
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
        if not self._plugins_see_headers:
            return None
        return MessageView(envelope, self._headers.value, size, self.incoming.read)

    @property
    def header_section(self) -> bytes | None:
        """The message's header section; None when it was too long to keep whole."""
        value = self._headers.value
        return None if len(value) >= HEADER_LIMIT else value

    @property
    def write_failed(self) -> bool:
        """The spool could not take the bytes (a full disk): answer NO_STORAGE, not 250."""
        return self._write_failed

    def write(self, data: bytes) -> None:
        """Message bytes as they are to be stored (DATA's reader calls it; BDAT directly)."""
        if self._write_failed:
            return
        self._headers.feed(data)
        try:
            self.incoming.write(data)
        except OSError as e:
            self._write_failed = True
            storage_error(self._log, str(self.incoming.queue_id), e)


def disk_full(error: OSError) -> bool:
    """The spool's disk or the daemon's quota is full (the spool's SpoolFull is one): the
    client is told ``452 4.3.1`` and tries again later (RFC 3463 4.3.1)."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def storage_error(log: MailLog, queue_id: str, error: OSError) -> None:
    """Log a message the spool could not take: a full disk is expected now and then and gets
    one line; anything else is a fault, logged with its traceback (call from the handler)."""
    if disk_full(error):
        log.warning("{queue_id}: not queued, the spool is full: {error}",
                    queue_id=queue_id, error=str(error))
    else:
        log.failure("{queue_id}: cannot write to the spool", queue_id=queue_id)


class Intake:
    """Takes a complete message in: the From: ownership check, the DATA-stage plugins, the
    hold brake, the spool's commit point, the log line, then the hand-over to delivery
    (``accepted``)."""

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
        rate_key: str | None, verb: str = "DATA",
    ) -> Reply:
        """``rate_key``: whose hourly sending rate the message counts against, if anyone's;
        ``verb``: what ended the message (DATA, or BDAT LAST), for the log."""
        refusal = self._policy.check_header_from(client, reception.header_section)
        if refusal is not None:
            reception.abort()
            self._log.refused(client.address, verb, envelope.sender, str(refusal))
            return refusal
        view = reception.view(envelope, size)
        if view is not None:
            refusal = await self._hooks.screen(client, view, reception.incoming.prepend)
            if refusal is not None:
                reception.abort()
                self._log.refused(client.address, verb, envelope.sender, str(refusal))
                return refusal
        held = rate_key is not None and self._limits.rate.accepted(rate_key)
        header = reception.header_section
        waived = None if header is None else header_says_no(header)
        try:
            entry = await reception.incoming.commit(
                attrs.evolve(envelope, held=held, tls_required_no=waived))
        except OSError as e:
            if not disk_full(e):
                raise  # anything else is a local error (451), logged with its traceback
            storage_error(self._log, str(reception.incoming.queue_id), e)
            return NO_STORAGE
        if rate_key is None:
            self._limits.anonymous.accepted(client.address)
        self._log.accepted(entry, self._policy.describe(client))
        if held:
            self._log.held(entry, rate_key or "")
        self._accepted(entry)
        return reply.queued(str(entry.queue_id))
