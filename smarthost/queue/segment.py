"""The spool's on-disk format: segment files of checksummed records, and how a segment is
read back. The writer is :mod:`smarthost.queue.writer`, the index :mod:`smarthost.queue.index`,
start-up recovery :mod:`smarthost.queue.recovery`.

A segment (format 2) starts with a header holding a random nonce drawn when the segment was
created; every record repeats it::

    segment header: SEGMENT_MAGIC (4) | format (1) | 0 (3) | nonce (16) | CRC-32 of these (4)
    record:         MAGIC (4) | nonce (16) | kind (1) | id length (1) | 0 (2)
                    | JSON length (u32) | body length (u64) | CRC-32 of the body (u32)
                    | CRC-32 of everything before it plus id and JSON (u32)
                    | queue id (ASCII) | JSON | body

Kinds: ``MESSAGE`` (an entry and its body: a new message, or one moved forward by compaction),
``STATE`` (a newer entry; no body), ``REMOVED`` (no JSON, no body) and ``BATCH``, the last
record of every batch: no id, and as JSON the batch's manifest (kind, id and offset of each
of its records). A batch marker says the batch was written completely; the records a damaged
stretch held are named by the marker after it.

**Resynchronisation.** After bytes that are not a record, the reader looks for the next
``MAGIC + nonce`` whose header checks out. Message bodies are bytes a sender chose and can
hold whole records with valid CRCs (queue ids are in every Received: header), but the nonce
never leaves the spool directory: a sender cannot write a record this reader accepts.

Format 1 (segments written before the nonce; no segment header, a 28-byte record header
without the nonce, no markers) is still read, with its old rule: after a bad header nothing
more of that segment is read, because searching for ``MAGIC`` there would find what senders
wrote into bodies; unless one flipped bit explains that header (:func:`repair_header`), which
gives back its length and so where the next record starts, without any search.

A segment is read into memory (one at a time), never mapped: the daemon may truncate a
segment under a reader (the admin tool), and a mapped page past the end is SIGBUS.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from contextlib import suppress
from typing import Any, BinaryIO

import attrs

from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.core.errors import CorruptEntry
from smarthost.queue.crcfix import single_bit, stored_bit

FILE_MODE = 0o600  # mail is private: only the daemon's user reads the spool
DIR_MODE = 0o700

TMP, LOG, CORRUPT = "tmp", "log", "corrupt"
LOCK_FILE = "lock"
SEGMENT_SUFFIX = ".seg"

MESSAGE, STATE, REMOVED, BATCH = 1, 2, 3, 4
KIND_NAMES = {MESSAGE: "message", STATE: "state", REMOVED: "removed", BATCH: "batch marker"}

# PNG's trick: a high-bit byte and letters, so a text-mode copy or a shifted offset shows.
MAGIC = b"\x89SQR"
SEGMENT_MAGIC = b"\x89SQS"
FORMAT = 2
NONCE_SIZE = 16
SEGMENT_HEADER = struct.Struct(">4sB3x16s")  # magic, format, nonce; then their CRC-32
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size + 4
PREFIX = struct.Struct(">4s16sBBxxIQI")  # magic, nonce, kind, id length, JSON, body, body CRC
HEADER_SIZE = PREFIX.size + 4  # then the CRC of prefix + id + JSON
PREFIX_V1 = struct.Struct(">4sBBxxIQI")  # format 1: the same without the nonce
HEADER_SIZE_V1 = PREFIX_V1.size + 4
MAX_JSON = 64 * 1024 * 1024  # far beyond any envelope: a bigger length is damage
MAX_BODY = 1 << 40


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


def encode_segment_header(nonce: bytes) -> bytes:
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT, nonce)
    return head + struct.pack(">I", zlib.crc32(head))


def encode_header(kind: int, queue_id: QueueId | None, raw: bytes, body_length: int,
                  body_crc: int, nonce: bytes) -> bytes:
    """A record's header, id and JSON (the body follows); ``queue_id`` None for ``BATCH``."""
    ident = queue_id.value.encode("ascii") if queue_id is not None else b""
    prefix = PREFIX.pack(MAGIC, nonce, kind, len(ident), len(raw), body_length, body_crc)
    return prefix + struct.pack(">I", zlib.crc32(raw, zlib.crc32(ident, zlib.crc32(prefix)))) \
        + ident + raw


Manifest = list[tuple[int, QueueId, int]]  # per record of a batch: kind, id, offset
Buffer = bytes | bytearray  # salvage repairs a copy in place before reading it


def encode_manifest(manifest: Manifest) -> bytes:
    return json.dumps([[k, i.value, o] for k, i, o in manifest],
                      separators=(",", ":")).encode("ascii")


def decode_manifest(raw: bytes) -> Manifest:
    """Only ever called on a marker whose CRC checked out: anything odd is a writer's bug."""
    return [(int(k), QueueId(str(i)), int(o)) for k, i, o in json.loads(raw)]


# -- reading --------------------------------------------------------------------------------


@attrs.frozen
class Record:
    """One intact record found by :func:`scan`; offsets are into its segment file."""

    kind: int
    queue_id: QueueId
    start: int
    entry_offset: int  # the JSON
    entry_length: int
    body_offset: int
    body_length: int
    body_crc: int
    end: int


@attrs.frozen
class Marker:
    """A batch marker: the batch before it was written completely."""

    start: int
    end: int
    manifest_offset: int
    manifest_length: int


@attrs.frozen
class Gap:
    """Bytes between intact records (or at the end) that are not a record."""

    start: int
    end: int
    tail: bool  # runs to the end of the segment: nothing after it is a record


@attrs.frozen
class Scan:
    """One segment, read: what its records are, and where it is not readable."""

    format: int  # 2, 1, or 0 when neither a segment header nor a first record checks out
    nonce: bytes | None  # format 2
    size: int
    items: list[Record | Marker | Gap]

    def markers(self) -> list[Marker]:
        return [item for item in self.items if isinstance(item, Marker)]


def scan(path: str) -> Scan:
    with open(path, "rb") as f:
        return scan_bytes(f.read())


def scan_bytes(buf: bytes) -> Scan:
    """Every record in order, and the bytes that are not one.

    A record whose header checks out but whose body does not (a write the crash cut short may
    leave the right length with the wrong bytes) is skipped by its declared length. After a
    header that does not check out, format 2 resynchronises on the next record carrying the
    segment's nonce; format 1 goes on only when one flipped bit explains the header (its
    length is then known), and otherwise reads no further.
    """
    fmt, nonce, pos = detect(buf)
    size = len(buf)
    if nonce is None and fmt != 1:  # unreadable, or a segment header cut short
        return Scan(fmt, None, size, [Gap(0, size, True)] if size else [])
    items: list[Record | Marker | Gap] = []
    if pos == 0 and fmt == FORMAT:  # the segment header itself is damaged
        pos = SEGMENT_HEADER_SIZE
        items.append(Gap(0, pos, False))
    ids: dict[bytes, QueueId] = {}
    while pos < size:
        item = parse_at(buf, pos, nonce, ids)
        if item is not None:
            if isinstance(item, Record) and item.body_length and zlib.crc32(
                    memoryview(buf)[item.body_offset : item.end]) != item.body_crc:
                items.append(Gap(pos, item.end, item.end == size))
            else:
                items.append(item)
            pos = item.end
            continue
        following = (resync(buf, pos + 1, nonce, ids) if nonce is not None
                     else _past_one_bit(buf, pos))
        if following is None:
            items.append(Gap(pos, size, True))
            break
        items.append(Gap(pos, following, False))
        pos = following
    return Scan(fmt, nonce, size, items)


def _past_one_bit(buf: bytes, pos: int) -> int | None:
    """Format 1: where the damaged record at ``pos`` ends, when one flipped bit explains its
    header (so its length is known again); None otherwise."""
    data = bytearray(buf[pos:])
    if repair_header(data, 0, None) is None:
        return None
    item = parse_at(data, 0, None, {})
    return pos + item.end if item is not None else None


def detect(buf: bytes) -> tuple[int, bytes | None, int]:
    """(format, nonce, where the records start). Format 2 with a nonce and a start of 0: the
    segment header is damaged and the nonce was taken from a record that checks out with it;
    without a nonce: an empty segment, or a header cut short. Format 0: neither a header nor a
    first record checks out.

    Only bytes the spool wrote at known places are candidates for the nonce (the header's
    nonce field, the first record's): never a value found by searching, which a body could
    have planted.
    """
    if not buf or (buf.startswith(SEGMENT_MAGIC[: len(buf)]) and len(buf) < SEGMENT_HEADER_SIZE):
        return FORMAT, None, 0  # empty, or a header cut short: nothing to read
    if len(buf) >= SEGMENT_HEADER_SIZE:
        magic, fmt, nonce = SEGMENT_HEADER.unpack_from(buf)
        (crc,) = struct.unpack_from(">I", buf, SEGMENT_HEADER.size)
        if magic == SEGMENT_MAGIC and fmt == FORMAT and zlib.crc32(
                buf[: SEGMENT_HEADER.size]) == crc:
            return FORMAT, nonce, SEGMENT_HEADER_SIZE
    if parse_at(buf, 0, None, {}) is not None:
        return 1, None, 0
    first = SEGMENT_HEADER_SIZE + len(MAGIC)
    for nonce in (buf[8:24], buf[first : first + NONCE_SIZE]):
        if len(nonce) == NONCE_SIZE and (
                parse_at(buf, SEGMENT_HEADER_SIZE, nonce, {}) is not None
                or resync(buf, SEGMENT_HEADER_SIZE, nonce, {}) is not None):
            return FORMAT, nonce, 0
    if _past_one_bit(buf, 0) is not None:  # format 1, its first header one bit off
        return 1, None, 0
    return 0, None, 0


def resync(buf: Buffer, pos: int, nonce: bytes, ids: dict[bytes, QueueId]) -> int | None:
    """Where the next record that checks out starts, at ``pos`` or later."""
    pattern = MAGIC + nonce
    at = buf.find(pattern, pos)
    while at != -1:
        if parse_at(buf, at, nonce, ids) is not None:
            return at
        at = buf.find(pattern, at + 1)
    return None


def parse_at(buf: Buffer, pos: int, nonce: bytes | None,
             ids: dict[bytes, QueueId]) -> Record | Marker | None:
    """The record whose header starts at ``pos`` if that header checks out (magic, nonce,
    sane lengths, CRC, a valid id) and the record ends within ``buf``; its body may still be
    damaged. ``nonce`` None reads format 1."""
    if nonce is None:
        if pos + HEADER_SIZE_V1 > len(buf) or buf[pos : pos + 4] != MAGIC:
            return None
        _, kind, id_len, json_len, body_len, body_crc = PREFIX_V1.unpack_from(buf, pos)
        prefix = PREFIX_V1.size
    else:
        if pos + HEADER_SIZE > len(buf) or buf[pos : pos + 20] != MAGIC + nonce:
            return None
        _, _, kind, id_len, json_len, body_len, body_crc = PREFIX.unpack_from(buf, pos)
        prefix = PREFIX.size
    if kind not in KIND_NAMES or json_len > MAX_JSON or body_len > MAX_BODY:
        return None
    if kind == BATCH and (nonce is None or id_len or body_len):
        return None
    entry_offset = pos + prefix + 4 + id_len
    body_offset = entry_offset + json_len
    end = body_offset + body_len
    if end > len(buf):
        return None
    (header_crc,) = struct.unpack_from(">I", buf, pos + prefix)
    view = memoryview(buf)
    if zlib.crc32(view[pos + prefix + 4 : body_offset],
                  zlib.crc32(view[pos : pos + prefix])) != header_crc:
        return None
    if kind == BATCH:
        return Marker(pos, end, entry_offset, json_len)
    raw_id = bytes(buf[pos + prefix + 4 : entry_offset])
    queue_id = ids.get(raw_id)
    if queue_id is None:  # validated once per id and segment (its state records repeat it)
        queue_id = parse_id(raw_id.decode("ascii", "replace"))
        if queue_id is None:
            return None
        ids[raw_id] = queue_id
    return Record(kind, queue_id, pos, entry_offset, json_len, body_offset, body_len, body_crc,
                  end)


def repair_header(data: bytearray, pos: int, nonce: bytes | None) -> str | None:
    """Undo the one flipped bit that makes the header at ``pos`` check out, when exactly one
    does (the data is changed in place); says which it was."""
    prefix = PREFIX.size if nonce is not None else PREFIX_V1.size
    size = HEADER_SIZE if nonce is not None else HEADER_SIZE_V1
    candidates: set[tuple[int, int]] = set()
    # A flipped length moves the end of what the CRC covers: each such bit is tried alone.
    lengths = range(prefix - 19, prefix - 4) if nonce is not None else range(5, prefix - 4)
    for byte in lengths:
        candidates.update((pos + byte, bit) for bit in range(8))
    # Otherwise the CRC itself says where the bit is (or that it was the CRC's own).
    end = _covered_end(data, pos, nonce)
    if end is not None:
        covered = bytes(data[pos : pos + prefix]) + bytes(data[pos + size : end])
        stored = int.from_bytes(data[pos + prefix : pos + size], "big")
        crc_bit = stored_bit(covered, stored)
        if crc_bit is not None:
            candidates.add((pos + prefix + 3 - crc_bit // 8, crc_bit % 8))
        for byte, bit in single_bit(covered, stored):
            candidates.add((pos + byte if byte < prefix else pos + byte + 4, bit))
    good = [c for c in candidates if c[0] < len(data) and _checks_with(data, pos, nonce, c)]
    if len(good) != 1:
        return None
    byte, bit = good[0]
    data[byte] ^= 1 << bit
    return f"header byte {byte - pos} bit {bit} undone"


def _covered_end(data: bytearray, pos: int, nonce: bytes | None) -> int | None:
    """Where the header's CRC coverage ends (after id and JSON), as the lengths say."""
    if nonce is not None and pos + HEADER_SIZE <= len(data):
        id_len, json_len = data[pos + 21], int.from_bytes(data[pos + 24 : pos + 28], "big")
        end = pos + HEADER_SIZE + id_len + json_len
    elif nonce is None and pos + HEADER_SIZE_V1 <= len(data):
        id_len, json_len = data[pos + 5], int.from_bytes(data[pos + 8 : pos + 12], "big")
        end = pos + HEADER_SIZE_V1 + id_len + json_len
    else:
        return None
    return end if end <= len(data) else None


def _checks_with(data: bytearray, pos: int, nonce: bytes | None, flip: tuple[int, int]) -> bool:
    byte, bit = flip
    data[byte] ^= 1 << bit
    try:
        return parse_at(data, pos, nonce, {}) is not None
    finally:
        data[byte] ^= 1 << bit


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
    thread and the writer appending to the same file never share a file position).

    Read from the start to the end, the bytes are checked against the body's CRC: the read
    that would hand out the last bytes of a body that rotted since it was written raises
    :class:`CorruptEntry` instead, so no consumer ever takes a damaged body for a whole one.
    """

    def __init__(self, fd: int, start: int, length: int, crc: int) -> None:
        super().__init__()
        self._fd: int | None = fd
        self._start, self._length, self._pos = start, length, 0
        self._expected = crc
        self._crc: int | None = 0  # of bytes 0.._pos; None once reading skipped around

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
        if self._crc is not None:
            self._crc = zlib.crc32(data, self._crc)
            if self._pos + len(data) == self._length and self._crc != self._expected:
                raise CorruptEntry("message body does not match its checksum")
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        if base + offset != self._pos:
            # From the start again the check starts again; anywhere else it cannot.
            self._crc = 0 if base + offset == 0 else None
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        super().close()


def open_body(path: str, start: int, length: int, crc: int) -> BinaryIO:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return io.BufferedReader(BodyReader(fd, start, length, crc), 64 * 1024)
