"""A message on its way into the spool: received into memory (or spilled to ``tmp/<id>``
past the threshold), then committed as one operation of a batch (see
:mod:`smarthost.queue.spool`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import suppress
from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from smarthost.api import IIncomingMessage
from smarthost.core.envelope import Envelope, QueueEntry, QueueId
from smarthost.queue.segment import SpoolPaths, create_exclusive, unlink_quietly
from smarthost.queue.writer import COMMIT, Op, spool_error

_RECEIVING, _COMMITTING, _DONE = "receiving", "committing", "done"


@implementer(IIncomingMessage)
class IncomingMessage:
    """One message on its way to disk; made by :meth:`Spool.receive`."""

    def __init__(self, queue_id: QueueId, paths: SpoolPaths, spill_threshold: int,
                 submit: Callable[[Op], Deferred[None]],
                 committed: Callable[[QueueEntry], None],
                 dropped: Callable[[QueueId], None]) -> None:
        self.queue_id = queue_id
        self._paths = paths
        self._threshold = spill_threshold
        self._submit, self._committed, self._dropped = submit, committed, dropped
        self._chunks: list[bytes] = []
        self._file: BinaryIO | None = None  # once spilled
        self._size = 0
        self._state = _RECEIVING

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def _check(self, what: str) -> None:
        if self._state != _RECEIVING:
            raise RuntimeError(f"{self.queue_id}: {what} after commit or abort")

    def write(self, data: bytes) -> None:
        """In memory (no system call) until the message passes the spill threshold.

        An ``OSError`` (:class:`SpoolFull` for a full disk, when spilling) propagates; the
        session answers 452.
        """
        self._check("write")
        try:
            if self._file is not None:
                self._file.write(data)
            else:
                self._chunks.append(bytes(data))
                if self._size + len(data) > self._threshold:
                    self._spill()
        except OSError as e:
            error = spool_error(e)
            if error is e:
                raise
            raise error from e
        self._size += len(data)

    def _spill(self) -> None:
        path = self._paths.spill(self.queue_id)
        fd = create_exclusive(path)
        try:
            file = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        try:
            file.writelines(self._chunks)
        except BaseException:
            with suppress(OSError):
                file.close()
            unlink_quietly(path)
            raise
        self._file, self._chunks = file, []

    def commit(self, envelope: Envelope) -> Deferred[QueueEntry]:
        self._check("commit")
        self._state = _COMMITTING
        entry = QueueEntry.new(self.queue_id, envelope, self._size)
        op = Op(COMMIT, self.queue_id, entry, self._chunks, self._file)
        self._chunks, self._file = [], None  # the batch's thread owns them now
        d = self._submit(op)

        def committed(_: object) -> QueueEntry:
            self._state = _DONE
            self._committed(entry)
            return entry

        def failed(reason: Failure) -> Failure:
            self._state = _DONE
            self._dropped(self.queue_id)
            return reason

        return d.addCallbacks(committed, failed)

    def read(self) -> bytes:
        """Everything written so far; only plugins that must see the whole message (signers,
        scanners) call this, at the end of DATA."""
        self._check("read")
        if self._file is not None:
            self._file.flush()
            with open(self._paths.spill(self.queue_id), "rb") as f:
                return f.read()
        whole = b"".join(self._chunks)
        self._chunks = [whole]  # a second reader (or the commit) need not join again
        return whole

    def prepend(self, data: bytes) -> None:
        """Put ``data`` first: free in memory; a spilled message is rewritten once."""
        self._check("prepend")
        if self._file is None:
            self._chunks.insert(0, bytes(data))
            self._size += len(data)
            return
        path = self._paths.spill(self.queue_id)
        self._file.flush()
        fd = create_exclusive(path + ".new")
        try:
            new = os.fdopen(fd, "wb")
            new.write(data)
            with open(path, "rb") as old:
                shutil.copyfileobj(old, new, 1024 * 1024)
            new.flush()
        except BaseException:
            unlink_quietly(path + ".new")
            raise
        os.replace(path + ".new", path)
        self._file.close()
        self._file = new
        self._size += len(data)

    def abort(self) -> None:
        """Idempotent. Once commit has started it cannot be recalled, so abort does nothing:
        a client that vanishes during the fsync may get the message delivered and resend it
        (at-least-once, as RFC 5321 6.1 prefers to losing it)."""
        if self._state != _RECEIVING:
            return
        self._state = _DONE
        self._chunks = []
        self._dropped(self.queue_id)
        if self._file is not None:
            with suppress(OSError):
                self._file.close()
            self._file = None
            unlink_quietly(self._paths.spill(self.queue_id))
