"""The spool's files: where they live, how a message file and a state file are encoded and
checked. Pure file-format code, shared by the daemon's :class:`~smarthost.spool.Spool` and the
admin tool (through it); the group commit and the queue API are in :mod:`smarthost.spool`.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import zlib
from collections.abc import Callable
from contextlib import suppress
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred

from smarthost.envelope import QueueEntry, QueueId

FILE_MODE = 0o600  # mail is private: only the daemon's user reads the spool
DIR_MODE = 0o700

TMP, DATA, STATE, CORRUPT = "tmp", "data", "state", "corrupt"
STATE_SUFFIX = ".json"
COMMIT_SUFFIX = ".q"

# PNG's trick: a high-bit byte, CRLF, ^Z and LF, so a file mangled by a text-mode copy shows.
# No body the previous layout stored can begin with it: those start with our Received: line.
MAGIC = b"\x89SHQ\r\n\x1a\n"
HEADER = struct.Struct(">8sII")  # magic, JSON length, CRC-32 of the JSON
MAX_HEADER_JSON = 64 * 1024 * 1024  # far beyond any envelope; a bigger length is damage
FIRST_READ = 16 * 1024  # one read() fetches header and body of a typical message
SPILL_THRESHOLD = 1024 * 1024
MAX_BATCH = 128  # operations per blocking job: bounds a batch's latency and open files
# Recorded in state files: the message file's length when the state was written, so recovery
# can check a body's size with one stat() and without reading its header.
DATA_LENGTH = "spool_data_length"

RunBlocking = Callable[..., "Deferred[Any]"]


class CorruptEntry(ValueError):
    """A message's state (or header record) exists but does not hold a QueueEntry for its id."""


@attrs.frozen
class CorruptFile:
    """One file recovery moved aside; paths are relative to the spool directory."""

    path: str  # where it was, e.g. "state/<id>.json"
    moved_to: str  # e.g. "corrupt/<id>.json"
    reason: str


@attrs.frozen
class RecoveryReport:
    """What start-up recovery found and did, for the operator log."""

    queued: int  # committed messages found intact
    removed_tmp: tuple[str, ...] = ()  # names in tmp/: receptions never acknowledged
    removed_orphans: tuple[str, ...] = ()  # kept for callers; this layout has no orphans
    corrupt: tuple[CorruptFile, ...] = ()

    @property
    def clean(self) -> bool:
        return not (self.removed_tmp or self.removed_orphans or self.corrupt)


@attrs.frozen
class SpoolPaths:
    """Every path in the spool. Only validated :class:`QueueId` values become file names."""

    root: str

    def dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def spill(self, queue_id: QueueId) -> str:
        return os.path.join(self.root, TMP, file_name(queue_id))

    def commit_tmp(self, queue_id: QueueId) -> str:
        return os.path.join(self.root, TMP, file_name(queue_id) + COMMIT_SUFFIX)

    def state_tmp(self, queue_id: QueueId) -> str:
        # Random part: the admin CLI may rewrite a state file while the daemon does.
        return os.path.join(self.root, TMP, f"{file_name(queue_id)}.{secrets.token_hex(4)}.json")

    def data(self, queue_id: QueueId) -> str:
        return os.path.join(self.root, DATA, file_name(queue_id))

    def state(self, queue_id: QueueId) -> str:
        return os.path.join(self.root, STATE, file_name(queue_id) + STATE_SUFFIX)


def file_name(queue_id: QueueId) -> str:
    # A plain str here would be a path built from unvalidated input (``../../etc/x``).
    if not isinstance(queue_id, QueueId):
        raise TypeError(f"expected a QueueId, got {type(queue_id).__name__}")
    return queue_id.value


def parse_id(name: str) -> QueueId | None:
    try:
        return QueueId(name)
    except ValueError:
        return None


def id_from_state_name(name: str) -> QueueId | None:
    if not name.endswith(STATE_SUFFIX):
        return None
    return parse_id(name[: -len(STATE_SUFFIX)])


def create_exclusive(path: str) -> int:
    # O_EXCL: never write through a file (or symlink) someone else put there.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def unlink_quietly(path: str | None) -> None:
    # Only on paths to undo after a failure, where the original error is the one to report.
    if path is not None:
        with suppress(OSError):
            os.unlink(path)


def encode_json(data: dict[str, Any]) -> bytes:
    # Compact, so json uses its C encoder; ensure_ascii: any str (even a lone surrogate from a
    # sloppy decoder) round-trips.
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("ascii")


def encode_state(entry: QueueEntry, data_length: int) -> bytes:
    return encode_json({**entry.to_json(), DATA_LENGTH: data_length}) + b"\n"


def encode_header(entry: QueueEntry) -> bytes:
    raw = encode_json(entry.to_json())
    return HEADER.pack(MAGIC, len(raw), zlib.crc32(raw)) + raw


def decode_entry(
    queue_id: QueueId, raw: bytes, what: str = "state"
) -> tuple[QueueEntry, int | None]:
    """The entry, and the message file length the state recorded (None: the old layout)."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        entry = QueueEntry.from_json(data)
        length = data.get(DATA_LENGTH)
        if length is not None and not isinstance(length, int):
            raise ValueError(f"{DATA_LENGTH} is not a number")
    except Exception as e:
        # Includes KeyError from a missing field, which must not read as "not queued".
        raise CorruptEntry(f"{queue_id}: unreadable {what}: {type(e).__name__}: {e}") from e
    if entry.queue_id != queue_id:
        raise CorruptEntry(f"{queue_id}: {what} names another message ({entry.queue_id})")
    return entry, length


def read_header(queue_id: QueueId, f: BinaryIO) -> tuple[QueueEntry, int]:
    """The committed entry and the body's offset, from a message file at position 0.

    :class:`CorruptEntry` when the header record is damaged or missing, or when the file's
    length disagrees with the body size the header records.
    """
    head = f.read(FIRST_READ)
    if not head.startswith(MAGIC):
        raise CorruptEntry(f"{queue_id}: message file without header and without state")
    if len(head) < HEADER.size:
        raise CorruptEntry(f"{queue_id}: message file too short for its header")
    _, length, crc = HEADER.unpack_from(head)
    if length > MAX_HEADER_JSON:
        raise CorruptEntry(f"{queue_id}: header length {length} is not plausible")
    offset = HEADER.size + length
    raw = head[HEADER.size : offset]
    if len(raw) < length:
        raw += f.read(length - len(raw))
    if len(raw) != length or zlib.crc32(raw) != crc:
        raise CorruptEntry(f"{queue_id}: header checksum mismatch")
    entry, _ = decode_entry(queue_id, raw, "header")
    size = os.fstat(f.fileno()).st_size
    if size != offset + entry.size:
        raise CorruptEntry(
            f"{queue_id}: message body is {size - offset} bytes, header says {entry.size}"
        )
    return entry, offset
