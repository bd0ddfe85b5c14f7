"""One message arriving in DATA: its bytes streamed into the spool through the DATA reader,
its header section kept for plugins, and a full disk turned into ``452`` at the end of DATA
instead of a dead session (RFC 5321 4.2.5: the client must learn the message was not taken).
"""

from __future__ import annotations

from smarthost.api import IIncomingMessage, MessageView
from smarthost.core.envelope import Envelope
from smarthost.core.maillog import MailLog
from smarthost.core.replies import NO_STORAGE, Reply
from smarthost.smtpd.dotreader import DataReader, DataResult, HeaderCapture


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
