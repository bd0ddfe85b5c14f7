"""The blocking half of the group commit: :class:`SegmentWriter` appends one batch of records
to the head segment, ends it with a batch marker, and calls ``fdatasync`` once (run in a
thread; the batching is in :mod:`smarthost.queue.spool`, the format in
:mod:`smarthost.queue.segment`)."""

from __future__ import annotations

import errno
import os
import zlib
from contextlib import suppress
from typing import BinaryIO

import attrs
from twisted.internet.defer import Deferred

from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.core.errors import CorruptEntry, SpoolFull
from smarthost.core.safeio import fsync_dir
from smarthost.queue.segment import (
    BATCH,
    LOG,
    MESSAGE,
    NONCE_SIZE,
    REMOVED,
    STATE,
    Manifest,
    SpoolPaths,
    create_exclusive,
    encode_entry,
    encode_header,
    encode_manifest,
    encode_segment_header,
    open_body,
    read_range,
    unlink_quietly,
    write_all,
)

SPILL_THRESHOLD = 1024 * 1024
SEGMENT_BYTES = 64 * 1024 * 1024  # a segment is sealed once it grows past this
MAX_BATCH = 256  # operations per blocking job: bounds one batch's latency
COPY_CHUNK = 1024 * 1024

COMMIT, UPDATE, REMOVE, RELOCATE = "commit", "update", "remove", "relocate"
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def spool_error(error: BaseException) -> BaseException:
    """A full disk or quota as :class:`SpoolFull` (the session answers 452 to it); any other
    error as it is."""
    if isinstance(error, OSError) and not isinstance(error, SpoolFull) and error.errno in _FULL:
        full = SpoolFull(error.errno, error.strerror)
        full.__cause__ = error
        return full
    return error


@attrs.define(eq=False)
class Op:
    """One change waiting for (or inside) a batch. The thread owns it while the batch runs."""

    kind: str
    queue_id: QueueId
    entry: QueueEntry | None = None  # commit, update
    chunks: list[bytes] = attrs.Factory(list)  # commit: the body, in memory
    spill: BinaryIO | None = None  # commit: the body, spilled to tmp/<id>
    source: Slot | None = None  # relocate: where the message is now
    deferred: Deferred[None] = attrs.Factory(Deferred)
    # Set by the thread:
    placed: Slot | None = None  # where the message went (commit, relocate)
    entry_at: tuple[int, int, int] | None = None  # update: the new entry's segment, offset, length
    error: BaseException | None = None


@attrs.define(slots=True)
class Slot:
    """Where a queued message lives: its body, and the entry in force (the newest record)."""

    body_segment: int
    body_offset: int
    size: int
    body_crc: int
    entry_segment: int
    entry_offset: int
    entry_length: int


@attrs.define
class Batch:
    ops: list[Op]
    doomed: list[int]  # segments to delete, oldest first, once this batch is durable
    # Set by the thread:
    head: int = 0  # the segment written to (0: none, or it was removed again)
    head_size: int = 0  # its length after the batch
    error: BaseException | None = None  # the batch failed as a whole
    deleted: list[int] = attrs.Factory(list)
    deletion_error: OSError | None = None  # the ops are durable all the same


class SegmentWriter:
    """Appends each batch's records to the head segment, then its marker, then one
    ``fdatasync``; then deletes the segments nothing refers to any more.

    Only one batch runs at a time (the spool sees to that), so the head's descriptor and
    length belong to whichever thread runs the current batch.
    """

    def __init__(self, paths: SpoolPaths, next_number: int, segment_bytes: int) -> None:
        self.paths = paths
        self.head = next_number
        self.limit = segment_bytes
        self._fd: int | None = None
        self._size = 0
        self._created = False  # ``head`` exists on disk (so a rotation moves on)
        self._nonce = b""
        self._pending = 0  # bytes encoded, not yet written
        self._manifest: Manifest = []  # this batch's records so far

    def run(self, batch: Batch) -> None:
        """The blocking job; each operation's failure is kept in ``op.error``."""
        if batch.ops:
            try:
                self._write(batch)
            except BaseException as e:
                # A failed write or fdatasync leaves the file's contents unknown: nothing of
                # this batch is acknowledged, its bytes are cut off again (a segment left
                # empty is removed), and the next batch starts a fresh segment.
                error = spool_error(e)
                for op in batch.ops:
                    op.error = op.error or error
                    op.placed = op.entry_at = None
                batch.error = error
                batch.head = self._abandon(batch.head_size)
                batch.head_size = self._size
                return
            finally:
                for op in batch.ops:
                    self._drop_spill(op)
        try:
            for number in batch.doomed:
                with suppress(FileNotFoundError):
                    os.unlink(self.paths.segment(number))
                # Oldest first, each durable before the next: a later segment's REMOVED
                # record must not vanish while the message it removes is still on disk.
                fsync_dir(self.paths.dir(LOG))
                batch.deleted.append(number)
        except OSError as e:
            batch.deletion_error = e

    def _write(self, batch: Batch) -> None:
        pending: list[bytes] = []
        self._pending, self._manifest = 0, []
        batch.head_size = 0  # where this batch starts, until it is done
        if self._fd is None or self._size >= self.limit:
            self._rotate(pending)
        else:
            batch.head_size = self._size
        batch.head = self.head
        for op in batch.ops:
            if op.kind == RELOCATE or op.spill is not None:
                self._flush(pending)
                self._stream(op)
            else:
                self._encode(op, pending)
        if self._manifest:
            self._add(pending, encode_header(BATCH, None, encode_manifest(self._manifest), 0, 0,
                                             self._nonce))
        self._flush(pending)
        os.fdatasync(self._fd or -1)
        batch.head_size = self._size

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            with suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _rotate(self, pending: list[bytes]) -> None:
        """A new head, numbered after the last one this writer created; its header (with a
        fresh nonce) is the first thing the batch writes."""
        self._close()
        if self._created:
            self.head += 1
            self._created = False
        path = self.paths.segment(self.head)
        fd = create_exclusive(path)
        try:
            fsync_dir(self.paths.dir(LOG))
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        self._fd, self._size, self._created = fd, 0, True
        self._nonce = os.urandom(NONCE_SIZE)
        self._add(pending, encode_segment_header(self._nonce))

    def _abandon(self, start: int) -> int:
        """After a failed batch: cut the head back to ``start`` and seal it; a head left empty
        is removed, so its number is used again. Returns the head's number, 0 if removed."""
        self._pending = 0
        if self._fd is None:  # never created, or given up after a failed truncation
            return self.head if self._created else 0
        head = self.head
        try:
            os.ftruncate(self._fd, start)
            self._size = start
        except OSError:
            start = -1  # unknown length: it stays, sealed
        self._close()
        if start == 0:
            unlink_quietly(self.paths.segment(head))
            with suppress(OSError):
                fsync_dir(self.paths.dir(LOG))
            self._created = False
            return 0
        return head

    def _encode(self, op: Op, pending: list[bytes]) -> None:
        """A record whose bytes are all in memory, for :meth:`_flush`."""
        offset = self._size + self._pending
        if op.kind == REMOVE:
            self._add(pending, encode_header(REMOVED, op.queue_id, b"", 0, 0, self._nonce))
            self._manifest.append((REMOVED, op.queue_id, offset))
            return
        assert op.entry is not None
        raw = encode_entry(op.entry)
        if op.kind == UPDATE:
            header = encode_header(STATE, op.queue_id, raw, 0, 0, self._nonce)
            self._add(pending, header)
            self._manifest.append((STATE, op.queue_id, offset))
            op.entry_at = (self.head, offset + len(header) - len(raw), len(raw))
            return
        crc = 0
        for chunk in op.chunks:
            crc = zlib.crc32(chunk, crc)
        header = encode_header(MESSAGE, op.queue_id, raw, op.entry.size, crc, self._nonce)
        self._add(pending, header, *op.chunks)
        self._manifest.append((MESSAGE, op.queue_id, offset))
        op.placed = Slot(self.head, offset + len(header), op.entry.size, crc,
                         self.head, offset + len(header) - len(raw), len(raw))

    def _add(self, pending: list[bytes], *parts: bytes) -> None:
        pending.extend(parts)
        self._pending += sum(map(len, parts))

    def _flush(self, pending: list[bytes]) -> None:
        """One write for everything encoded; a failure fails the batch (which cuts it off)."""
        if not pending:
            return
        data = b"".join(pending)
        pending.clear()
        self._pending = 0
        write_all(self._fd or -1, data)
        self._size += len(data)

    def _stream(self, op: Op) -> None:
        """A record whose body comes from a file (a spilled message, or one moved forward):
        header with a zero CRC, body copied, then the header rewritten with the real CRC.
        A failure here fails this operation only: the append is undone, the batch goes on."""
        fd = self._fd or -1
        start = self._size
        try:
            raw, size, body = self._source(op)
        except (OSError, CorruptEntry) as e:
            op.error = spool_error(e)
            return
        with body:
            try:
                header = encode_header(MESSAGE, op.queue_id, raw, size, 0, self._nonce)
                write_all(fd, header)
                crc, copied = 0, 0
                # A relocation reads through the body's CRC check (open_body): a body that
                # rotted since start-up is never re-sealed under a fresh, valid checksum.
                while chunk := body.read(COPY_CHUNK):
                    crc = zlib.crc32(chunk, crc)
                    write_all(fd, chunk)
                    copied += len(chunk)
                if copied != size:
                    raise CorruptEntry(f"{op.queue_id}: body is {copied} bytes, entry says {size}")
                os.pwrite(fd, encode_header(MESSAGE, op.queue_id, raw, size, crc, self._nonce),
                          start)
            except (OSError, CorruptEntry) as e:
                self._truncate(start)
                op.error = spool_error(e)
                return
            except BaseException:
                self._truncate(start)
                raise
        self._size = start + len(header) + size
        self._manifest.append((MESSAGE, op.queue_id, start))
        op.placed = Slot(self.head, start + len(header), size, crc,
                         self.head, start + len(header) - len(raw), len(raw))

    def _source(self, op: Op) -> tuple[bytes, int, BinaryIO]:
        """The entry's JSON, the body's size and the body, for :meth:`_stream`."""
        if op.kind == RELOCATE:
            source = op.source
            assert source is not None
            raw = read_range(self.paths.segment(source.entry_segment), source.entry_offset,
                             source.entry_length)
            body = open_body(self.paths.segment(source.body_segment), source.body_offset,
                             source.size, source.body_crc)
            return raw, source.size, body
        assert op.entry is not None and op.spill is not None
        op.spill.flush()
        return encode_entry(op.entry), op.entry.size, open(self.paths.spill(op.queue_id), "rb")

    def _truncate(self, size: int) -> None:
        """Undo a partial append; when even that fails the segment is given up."""
        try:
            os.ftruncate(self._fd or -1, size)
            os.lseek(self._fd or -1, size, os.SEEK_SET)
        except OSError:
            self._close()
            raise
        self._size = size

    def _drop_spill(self, op: Op) -> None:
        if op.spill is not None:
            with suppress(OSError):
                op.spill.close()
            op.spill = None
            unlink_quietly(self.paths.spill(op.queue_id))
