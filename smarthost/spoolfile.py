"""The spool's files: where they live, how a message file and a state file are encoded and
checked, and the blocking half of the group commit (:class:`BatchWriter`, run in a thread).
The queue API, the batching and recovery are in :mod:`smarthost.spool`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
import zlib
from collections.abc import Callable
from contextlib import suppress
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred

from smarthost.envelope import QueueEntry, QueueId
from smarthost.safeio import fsync_dir

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


COMMIT, UPDATE, REMOVE = "commit", "update", "remove"


@attrs.define(eq=False)
class Op:
    """One change waiting for (or inside) a batch. The thread owns it while the batch runs."""

    kind: str
    queue_id: QueueId
    entry: QueueEntry | None = None  # commit, update
    chunks: list[bytes] = attrs.Factory(list)  # commit: the body, in memory
    spill: BinaryIO | None = None  # commit: the body, spilled to tmp/<id>
    deferred: Deferred[None] = attrs.Factory(Deferred)
    # Thread side, during the batch:
    tmp: str | None = None  # the file written in tmp/, before its rename
    fd: int | None = None  # open on ``tmp`` until it is fsynced
    placed: str | None = None  # where a commit was renamed to (undone if the batch fails)
    had_state: bool = False  # remove: a state file existed, so the body goes in step 4
    error: BaseException | None = None


class BatchWriter:
    """The blocking half of the group commit: runs one batch in a thread (see
    :mod:`smarthost.spool` for the order of writes, fsyncs and renames)."""

    def __init__(self, paths: SpoolPaths) -> None:
        self.paths = paths

    def run(self, batch: list[Op]) -> None:
        """The blocking job for one batch; each operation's failure is kept in ``op.error``."""
        live = batch

        def fail(op: Op, error: BaseException) -> None:
            op.error = error
            unlink_quietly(op.tmp)
            unlink_quietly(op.placed)  # a commit renamed but not durable: not acknowledged

        # 1. every new file written, then each fsynced: with all of them written first, the
        # journal commit of the first fsync carries the others' creation too
        for op in live:
            try:
                if op.kind == COMMIT:
                    op.tmp, op.fd = self._write_message(op)
                elif op.kind == UPDATE:
                    op.tmp, op.fd = self._write_state(op)
                else:
                    op.had_state = os.path.lexists(self.paths.state(op.queue_id))
            except BaseException as e:
                fail(op, e)
        for op in live:
            if op.fd is not None:
                try:
                    os.fsync(op.fd)
                except BaseException as e:
                    fail(op, e)
                finally:
                    os.close(op.fd)
                    op.fd = None
        live = [op for op in live if op.error is None]

        # 2. the renames (each a commit point) and unlinks
        dirty: dict[str, list[Op]] = {DATA: [], STATE: []}
        for op in live:
            try:
                if op.kind == COMMIT:
                    target = self.paths.data(op.queue_id)
                    if os.path.lexists(target):  # never replace a committed message
                        raise FileExistsError(f"{op.queue_id}: queue id already in use")
                    os.rename(op.tmp or "", target)
                    op.tmp, op.placed = None, target
                    dirty[DATA].append(op)
                elif op.kind == UPDATE:
                    os.replace(op.tmp or "", self.paths.state(op.queue_id))
                    op.tmp = None
                    dirty[STATE].append(op)
                elif op.had_state:
                    # State first: a crash before the body goes leaves a message with its
                    # first entry, delivered again (at-least-once), never a state without body.
                    with suppress(FileNotFoundError):
                        os.unlink(self.paths.state(op.queue_id))
                    dirty[STATE].append(op)
                else:
                    try:
                        os.unlink(self.paths.data(op.queue_id))
                    except FileNotFoundError:
                        raise KeyError(op.queue_id) from None
                    dirty[DATA].append(op)
            except BaseException as e:
                fail(op, e)

        # 3. one fsync per directory changed, for the whole batch
        for name in (STATE, DATA):
            if dirty[name]:
                try:
                    fsync_dir(self.paths.dir(name))
                except BaseException as e:
                    for op in dirty[name]:
                        fail(op, e)

        # 4. the bodies of removed messages that had a state file, once that is gone for good
        late = [op for op in live if op.kind == REMOVE and op.had_state and op.error is None]
        for op in late:
            try:
                os.unlink(self.paths.data(op.queue_id))
            except FileNotFoundError:
                pass  # a state without its body: gone now, as asked
            except BaseException as e:
                fail(op, e)
        if late:
            try:
                fsync_dir(self.paths.dir(DATA))
            except BaseException as e:
                for op in late:
                    fail(op, e)

    def _write_message(self, op: Op) -> tuple[str, int]:
        """tmp/<id>.q: header record and body, written (not yet fsynced) in the batch's thread;
        returns its path and the open descriptor."""
        assert op.entry is not None
        path = self.paths.commit_tmp(op.queue_id)
        header = encode_header(op.entry)
        spill = op.spill
        try:
            fd = create_exclusive(path)
        except BaseException:
            self._drop_spill(op)
            raise
        try:
            if spill is None:
                write_all(fd, b"".join([header, *op.chunks]))
            else:
                # A large message: the header goes first, so its body is copied once.
                spill.flush()
                write_all(fd, header)
                with open(self.paths.spill(op.queue_id), "rb") as src, os.fdopen(
                    os.dup(fd), "wb"
                ) as dst:
                    shutil.copyfileobj(src, dst, 1024 * 1024)
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        finally:
            self._drop_spill(op)
        return path, fd

    def _drop_spill(self, op: Op) -> None:
        if op.spill is not None:
            with suppress(OSError):
                op.spill.close()
            op.spill = None
            unlink_quietly(self.paths.spill(op.queue_id))

    def _write_state(self, op: Op) -> tuple[str, int]:
        assert op.entry is not None
        try:
            length = os.stat(self.paths.data(op.queue_id)).st_size
        except FileNotFoundError:
            raise KeyError(op.queue_id) from None
        path = self.paths.state_tmp(op.queue_id)
        fd = create_exclusive(path)
        try:
            write_all(fd, encode_state(op.entry, length))
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        return path, fd
