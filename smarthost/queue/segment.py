"""The spool's on-disk format: segment files of checksummed records, how a segment is scanned
at start-up, and the blocking half of the group commit (:class:`SegmentWriter`, run in a
thread). The queue API and the batching are in :mod:`smarthost.queue.spool`, the in-memory index in
:mod:`smarthost.queue.index`.

A record::

    MAGIC (4) | kind (1) | id length (1) | 0 (2) | JSON length (u32) | body length (u64)
    | CRC-32 of the body (u32) | CRC-32 of everything before it plus id and JSON (u32)
    | queue id (ASCII) | JSON (the QueueEntry) | body

Kinds: ``MESSAGE`` (an entry and its body: a new message, or one moved forward by
compaction), ``STATE`` (a newer entry for a message; no body) and ``REMOVED`` (no JSON, no
body). The id sits outside the JSON so start-up can index a segment without parsing JSON.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import suppress
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred

from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.core.errors import CorruptEntry
from smarthost.core.safeio import fsync_dir

FILE_MODE = 0o600  # mail is private: only the daemon's user reads the spool
DIR_MODE = 0o700

TMP, LOG, CORRUPT = "tmp", "log", "corrupt"
LOCK_FILE = "lock"
SEGMENT_SUFFIX = ".seg"

MESSAGE, STATE, REMOVED = 1, 2, 3
KINDS = frozenset({MESSAGE, STATE, REMOVED})

# PNG's trick: a high-bit byte and letters, so a text-mode copy or a shifted offset shows.
MAGIC = b"\x89SQR"
PREFIX = struct.Struct(">4sBBxxIQI")  # magic, kind, id length, JSON length, body length, body CRC
HEADER_SIZE = PREFIX.size + 4  # then the CRC of prefix + id + JSON
MAX_JSON = 64 * 1024 * 1024  # far beyond any envelope: a bigger length is damage
MAX_BODY = 1 << 40

SPILL_THRESHOLD = 1024 * 1024
SEGMENT_BYTES = 64 * 1024 * 1024  # a segment is sealed once it grows past this
MAX_BATCH = 256  # operations per blocking job: bounds one batch's latency
COPY_CHUNK = 1024 * 1024

@attrs.frozen
class Damage:
    """Bytes of a segment start-up could not read as records; copied to ``corrupt/``."""

    segment: str  # e.g. "log/00000003.seg"
    start: int
    end: int
    moved_to: str | None  # the copy in corrupt/ (None: a torn tail, nothing worth keeping)
    reason: str


@attrs.frozen
class RecoveryReport:
    """What start-up recovery found and did, for the operator log."""

    queued: int  # committed messages found intact
    removed_tmp: tuple[str, ...] = ()  # names in tmp/: receptions never acknowledged
    torn: tuple[Damage, ...] = ()  # unfinished writes at a segment's end: never acknowledged
    corrupt: tuple[Damage, ...] = ()  # damage with intact records after it, or bad entries

    @property
    def clean(self) -> bool:
        return not (self.removed_tmp or self.torn or self.corrupt)


@attrs.frozen
class SpoolPaths:
    """Every path in the spool. Only validated :class:`QueueId` values become file names."""

    root: str

    def dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def spill(self, queue_id: QueueId) -> str:
        return os.path.join(self.root, TMP, file_name(queue_id))

    def segment(self, number: int) -> str:
        return os.path.join(self.root, LOG, segment_name(number))

    def lock(self) -> str:
        return os.path.join(self.root, LOCK_FILE)


def file_name(queue_id: QueueId) -> str:
    # A plain str here would be a path built from unvalidated input (``../../etc/x``).
    if not isinstance(queue_id, QueueId):
        raise TypeError(f"expected a QueueId, got {type(queue_id).__name__}")
    return queue_id.value


def segment_name(number: int) -> str:
    return f"{number:08d}{SEGMENT_SUFFIX}"


def segment_number(name: str) -> int | None:
    stem = name.removesuffix(SEGMENT_SUFFIX)
    if stem == name or len(stem) != 8 or not stem.isdigit():
        return None
    return int(stem)


def parse_id(name: str) -> QueueId | None:
    try:
        return QueueId(name)
    except ValueError:
        return None


def create_exclusive(path: str) -> int:
    # O_EXCL: never write through a file (or symlink) someone else put there.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def unlink_quietly(path: str | None) -> None:
    # Only on paths to undo after a failure, where the original error is the one to report.
    if path is not None:
        with suppress(OSError):
            os.unlink(path)


def encode_entry(entry: QueueEntry) -> bytes:
    # Compact, so json uses its C encoder; ensure_ascii: any str (even a lone surrogate from a
    # sloppy decoder) round-trips.
    return json.dumps(entry.to_json(), sort_keys=True, separators=(",", ":")).encode("ascii")


def decode_entry(queue_id: QueueId, raw: bytes) -> QueueEntry:
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        entry = QueueEntry.from_json(data)
    except Exception as e:
        # Includes KeyError from a missing field, which must not read as "not queued".
        raise CorruptEntry(f"{queue_id}: unreadable entry: {type(e).__name__}: {e}") from e
    if entry.queue_id != queue_id:
        raise CorruptEntry(f"{queue_id}: entry names another message ({entry.queue_id})")
    return entry


def encode_header(kind: int, queue_id: QueueId, raw: bytes, body_length: int,
                  body_crc: int) -> bytes:
    ident = queue_id.value.encode("ascii")
    prefix = PREFIX.pack(MAGIC, kind, len(ident), len(raw), body_length, body_crc)
    return prefix + struct.pack(">I", zlib.crc32(raw, zlib.crc32(ident, zlib.crc32(prefix)))) \
        + ident + raw


# -- reading --------------------------------------------------------------------------------


@attrs.frozen
class Record:
    """One intact record found by :func:`scan`; offsets are into its segment file."""

    kind: int
    queue_id: QueueId
    entry_offset: int  # the JSON
    entry_length: int
    body_offset: int
    body_length: int
    body_crc: int
    end: int


def _header_at(buf: bytes, pos: int, ids: dict[bytes, QueueId]) -> Record | None:
    """The record whose header starts at ``pos``, if that header checks out (magic, sane
    lengths, CRC, a valid id). Its body may still be short or damaged: see :func:`scan`."""
    if pos + HEADER_SIZE > len(buf) or buf[pos : pos + 4] != MAGIC:
        return None
    _, kind, id_len, json_len, body_len, body_crc = PREFIX.unpack_from(buf, pos)
    (header_crc,) = struct.unpack_from(">I", buf, pos + PREFIX.size)
    if kind not in KINDS or json_len > MAX_JSON or body_len > MAX_BODY:
        return None
    entry_offset = pos + HEADER_SIZE + id_len
    body_offset = entry_offset + json_len
    if body_offset > len(buf):
        return None
    crc = zlib.crc32(buf[pos : pos + PREFIX.size])
    if zlib.crc32(buf[pos + HEADER_SIZE : body_offset], crc) != header_crc:
        return None
    raw_id = buf[pos + HEADER_SIZE : entry_offset]
    queue_id = ids.get(raw_id)
    if queue_id is None:  # validated once per id and segment (its state records repeat it)
        queue_id = parse_id(raw_id.decode("ascii", "replace"))
        if queue_id is None:
            return None
        ids[raw_id] = queue_id
    end = body_offset + body_len
    return Record(kind, queue_id, entry_offset, json_len, body_offset, body_len, body_crc, end)


@attrs.frozen
class Gap:
    """Bytes between intact records (or at the end) that are not a record."""

    start: int
    end: int
    tail: bool  # runs to the end of the segment: nothing after it is read


def scan(path: str) -> Iterator[Record | Gap]:
    """Every record of one segment in order, and the bytes that are not one.

    Records are only ever looked for where the previous one ends. A record whose header
    checks out but whose body does not (a write the crash cut short may leave the right length
    with the wrong bytes on file systems that extend the size first) is skipped by its
    declared length. After a header that does not check out nothing more of the segment is
    read: where the next record starts is unknown, and searching for one would find the
    records a sender can write into a message body.

    The segment is read into memory (one segment at a time), not mapped: a mapped file that
    the daemon truncates under a reader (the admin tool) kills that reader with SIGBUS.
    """
    with open(path, "rb") as f:
        buf = f.read()
    size, pos = len(buf), 0
    ids: dict[bytes, QueueId] = {}
    while pos < size:
        record = _header_at(buf, pos, ids)
        if record is None or record.end > size:
            yield Gap(pos, size, True)
            return
        body = memoryview(buf)[record.body_offset : record.end]
        if record.body_length and zlib.crc32(body) != record.body_crc:
            yield Gap(pos, record.end, record.end == size)
        else:
            yield record
        pos = record.end


def read_range(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise CorruptEntry(f"{path}: short read at {offset}")
    return data


class BodyReader(io.RawIOBase):
    """A message body: a byte range of a segment, read with ``pread`` (so a reader in a
    thread and the writer appending to the same file never share a file position)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd: int | None = fd
        self._start, self._length, self._pos = start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._fd is None:
            raise ValueError("read from a closed body")
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._length - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._start + self._pos)
        if not data:
            raise CorruptEntry("message body ends early: its segment was truncated")
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        super().close()


def open_body(path: str, start: int, length: int) -> BinaryIO:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return io.BufferedReader(BodyReader(fd, start, length), 64 * 1024)


# -- writing --------------------------------------------------------------------------------

COMMIT, UPDATE, REMOVE, RELOCATE = "commit", "update", "remove", "relocate"


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
    head: int = 0  # the segment written to
    head_size: int = 0  # its length after the batch
    error: BaseException | None = None  # the batch failed as a whole
    deleted: list[int] = attrs.Factory(list)
    deletion_error: OSError | None = None  # the ops are durable all the same


class SegmentWriter:
    """The blocking half of the group commit: appends one batch's records to the head segment,
    one ``fdatasync`` for all of them, then deletes segments nothing refers to any more.

    Only one batch runs at a time (the spool sees to that), so the head's descriptor and
    length belong to whichever thread runs the current batch.
    """

    def __init__(self, paths: SpoolPaths, next_number: int, segment_bytes: int) -> None:
        self.paths = paths
        self.head = next_number
        self.limit = segment_bytes
        self._fd: int | None = None
        self._size = 0
        self._opened = False  # ``head`` has been created (so a rotation moves on)
        self._pending = 0  # bytes encoded, not yet written

    def run(self, batch: Batch) -> None:
        """The blocking job; each operation's failure is kept in ``op.error``."""
        pending: list[bytes] = []
        try:
            if self._fd is None or self._size >= self.limit:
                self._rotate()
            assert self._fd is not None
            batch.head = self.head
            for op in batch.ops:
                if op.kind == RELOCATE or op.spill is not None:
                    self._flush(pending)
                    self._stream(op)
                else:
                    self._encode(op, pending)
            self._flush(pending)
            os.fdatasync(self._fd)
        except BaseException as e:
            # A failed write or fdatasync leaves the file's contents unknown: nothing of this
            # batch is acknowledged, and the next batch starts a fresh segment. (Its records
            # may still have reached the disk: after a restart such a message is delivered
            # although its client got a 4xx and sends it again; at-least-once, never lost.)
            for op in batch.ops:
                op.error = op.error or e
                op.placed = op.entry_at = None
            batch.error = e
            batch.head_size = self._size
            self._pending = 0
            self._close()
            return
        finally:
            for op in batch.ops:
                self._drop_spill(op)
        batch.head_size = self._size
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

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            with suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _rotate(self) -> None:
        self._close()
        if self._opened:
            self.head += 1
        self._opened = True
        fd = create_exclusive(self.paths.segment(self.head))
        try:
            fsync_dir(self.paths.dir(LOG))
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size = fd, 0

    def _encode(self, op: Op, pending: list[bytes]) -> None:
        """A record whose bytes are all in memory, for :meth:`_flush`."""
        offset = self._size + self._pending
        if op.kind == REMOVE:
            self._add(pending, encode_header(REMOVED, op.queue_id, b"", 0, 0))
            return
        assert op.entry is not None
        raw = encode_entry(op.entry)
        if op.kind == UPDATE:
            header = encode_header(STATE, op.queue_id, raw, 0, 0)
            self._add(pending, header)
            op.entry_at = (self.head, offset + len(header) - len(raw), len(raw))
            return
        crc = 0
        for chunk in op.chunks:
            crc = zlib.crc32(chunk, crc)
        header = encode_header(MESSAGE, op.queue_id, raw, op.entry.size, crc)
        self._add(pending, header, *op.chunks)
        op.placed = Slot(self.head, offset + len(header), op.entry.size, crc,
                         self.head, offset + len(header) - len(raw), len(raw))

    def _add(self, pending: list[bytes], *parts: bytes) -> None:
        pending.extend(parts)
        self._pending += sum(map(len, parts))

    def _flush(self, pending: list[bytes]) -> None:
        if not pending:
            return
        data = b"".join(pending)
        pending.clear()
        self._pending = 0
        start = self._size
        try:
            write_all(self._fd or -1, data)
        except BaseException:
            self._truncate(start)
            raise
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
            op.error = e
            return
        with body:
            try:
                header = encode_header(MESSAGE, op.queue_id, raw, size, 0)
                write_all(fd, header)
                crc, copied = 0, 0
                while chunk := body.read(COPY_CHUNK):
                    crc = zlib.crc32(chunk, crc)
                    write_all(fd, chunk)
                    copied += len(chunk)
                if copied != size:
                    raise CorruptEntry(f"{op.queue_id}: body is {copied} bytes, entry says {size}")
                if op.source is not None and crc != op.source.body_crc:
                    # Rot since start-up: never copied forward under a fresh, valid checksum.
                    raise CorruptEntry(f"{op.queue_id}: body no longer matches its checksum")
                os.pwrite(fd, encode_header(MESSAGE, op.queue_id, raw, size, crc), start)
            except (OSError, CorruptEntry) as e:
                self._truncate(start)
                op.error = e
                return
            except BaseException:
                self._truncate(start)
                raise
        self._size = start + len(header) + size
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
                             source.size)
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
