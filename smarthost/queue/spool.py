"""The durable queue on disk: the only bridge from receiving to delivering.

The spool is a log (the issue's "group commit" design; Postfix keeps one file per message, but
a file create and its fsync cost ~0.7 ms here, while one ``fdatasync`` covers a whole batch of
appended records)::

    log/<n>.seg    segments of checksummed records (:mod:`smarthost.queue.segment`), appended to
                   and never rewritten; the newest is the head
    tmp/<id>       a large message's body, spilled to disk while it is received
    corrupt/       damaged bytes and entries found at start-up, copied out, never deleted
    lock           flock()ed by the one process that may append: the daemon (or the admin
                   tool when no daemon runs)

A message is one ``MESSAGE`` record (entry and body). An update appends a ``STATE`` record
with the new entry; a removal a ``REMOVED`` record. The newest record of an id is in force.

**Receiving costs no system call.** :meth:`Spool.receive` creates nothing; ``write`` appends to
a list in memory. A message that grows past ``spill_threshold`` (1 MiB) is moved to
``tmp/<id>`` and written through from then on: that rare create happens on the calling (reactor)
thread, because ``write`` must raise ``OSError`` on a full disk right away (the session answers
452 to it).

**Group commit.** Every change (commit, update, remove) becomes an operation in a batch. One
blocking job runs at a time; operations that arrive while it runs wait and form the next batch.
The job appends every record of the batch (one ``write`` for those in memory) and calls
``fdatasync`` once; only then are the batch's Deferreds fired on the reactor thread, so a 250
after DATA means the record is on disk. A failed write or sync fails the whole batch and the
next one starts a new segment.

**Reading and recovery** (:mod:`smarthost.queue.index`): an index in memory says where each
message is; start-up checks every record, drops a torn tail and copies damage to ``corrupt/``.

**Space.** A segment is sealed once it passes ``segment_bytes`` (64 MiB). The oldest segment
is deleted once no queued message has its body there. When more than ``COMPACT_AFTER`` sealed
segments pile up behind a long-deferred message and the segments hold more than twice the
queued mail, the oldest one's messages are copied forward into the head (entry in force plus
body), after which it is deleted: the disk holds at most about twice the live mail plus a few
segments. A relocation that fails (a full disk) is tried again after the next start.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import suppress
from typing import BinaryIO

import attrs
from twisted.internet.defer import Deferred, DeferredLock, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from smarthost.api import IIncomingMessage, ISpool
from smarthost.core.envelope import Envelope, QueueEntry, QueueId
from smarthost.core.errors import CorruptEntry
from smarthost.core.safeio import fsync_dir
from smarthost.core.types import RunBlocking
from smarthost.queue.index import Index, read_entries, read_entry, read_index, recover_index
from smarthost.queue.segment import (
    COMMIT,
    CORRUPT,
    DIR_MODE,
    LOG,
    MAX_BATCH,
    RELOCATE,
    REMOVE,
    SEGMENT_BYTES,
    SPILL_THRESHOLD,
    TMP,
    UPDATE,
    Batch,
    Op,
    RecoveryReport,
    SegmentWriter,
    Slot,
    SpoolPaths,
    create_exclusive,
    file_name,
    open_body,
    unlink_quietly,
)

# Sealed segments allowed behind the head before the oldest one's messages are copied forward.
COMPACT_AFTER = 3
LEGACY = ("data", "state")  # the one-file-per-message layout before the log


class SpoolLocked(OSError):
    """Another process (a running daemon) holds the spool's lock."""


_RECEIVING, _COMMITTING, _DONE = "receiving", "committing", "done"


@implementer(IIncomingMessage)
class IncomingMessage:
    """One message on its way to disk; made by :meth:`Spool.receive`."""

    def __init__(self, queue_id: QueueId, spool: Spool, spill_threshold: int) -> None:
        self.queue_id = queue_id
        self._spool = spool
        self._threshold = spill_threshold
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

        An ``OSError`` (disk full, when spilling) propagates; the session answers 452.
        """
        self._check("write")
        if self._file is not None:
            self._file.write(data)
        else:
            self._chunks.append(bytes(data))
            if self._size + len(data) > self._threshold:
                self._spill()
        self._size += len(data)

    def _spill(self) -> None:
        path = self._spool._paths.spill(self.queue_id)
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
        d = self._spool._submit(op)

        def committed(_: object) -> QueueEntry:
            self._state = _DONE
            self._spool._committed(entry)
            return entry

        def failed(reason: Failure) -> Failure:
            self._state = _DONE
            self._spool._live.discard(self.queue_id)
            return reason

        return d.addCallbacks(committed, failed)

    def read(self) -> bytes:
        """Everything written so far; only plugins that must see the whole message (signers,
        scanners) call this, at the end of DATA."""
        self._check("read")
        if self._file is not None:
            self._file.flush()
            with open(self._spool._paths.spill(self.queue_id), "rb") as f:
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
        path = self._spool._paths.spill(self.queue_id)
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
        self._spool._live.discard(self.queue_id)
        if self._file is not None:
            with suppress(OSError):
                self._file.close()
            self._file = None
            unlink_quietly(self._spool._paths.spill(self.queue_id))


@implementer(ISpool)
class Spool:
    """The spool in one directory.

    Constructing one touches nothing on disk, so the admin CLI can read a spool a running
    daemon owns. Only the daemon calls :meth:`recover` (or :meth:`open`), once, before it
    receives or delivers.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        clock: IReactorTime,
        run_blocking: RunBlocking,
        spill_threshold: int = SPILL_THRESHOLD,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self._paths = SpoolPaths(os.path.abspath(os.fspath(directory)))
        self._clock = clock
        self._run_blocking = run_blocking
        self._spill_threshold = spill_threshold
        self._segment_bytes = segment_bytes
        # update/remove of one message run one at a time, in call order.
        self._locks: dict[QueueId, DeferredLock] = {}
        self._live: set[QueueId] = set()  # ids being received or committed here
        self._index: Index | None = None  # read on first use
        self._writer: SegmentWriter | None = None  # made by recover(), or on a first change
        self._lock_fd: int | None = None
        self._waiting: list[Op] = []  # the next batch
        self._doomed: list[int] = []  # segments the next batch deletes
        self._compacting: set[int] = set()
        self._syncing = False  # a batch's blocking job is running
        self.batches = 0  # blocking jobs started: for tests and the curious
        # What recovery read, served once by entries() (the scheduler's start) so start-up
        # parses each entry once; kept up to date by this process's changes until then.
        self._recovered: dict[QueueId, QueueEntry] | None = None

    @property
    def directory(self) -> str:
        return self._paths.root

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        clock: IReactorTime,
        run_blocking: RunBlocking,
        spill_threshold: int = SPILL_THRESHOLD,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> tuple[Spool, RecoveryReport]:
        """Daemon start-up: create the directories if needed, then recover."""
        spool = cls(
            directory, clock=clock, run_blocking=run_blocking, spill_threshold=spill_threshold,
            segment_bytes=segment_bytes,
        )
        return spool, spool.recover()

    def close(self) -> None:
        """Release the lock and the head segment, so another Spool may open the directory (the
        daemon leaves that to its exit: a batch may still be running in a thread)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- start-up -------------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Read every segment, drop a torn tail, copy damage aside, and take the lock.

        Synchronous: it runs once before the daemon listens, and nothing can proceed without it.
        """
        self.close()
        self._make_directories()
        self._take_lock()
        tmp = self._paths.dir(TMP)
        removed_tmp = []
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if os.path.isdir(path) and not os.path.islink(path):
                raise OSError(f"{path}: unexpected directory in the spool")
            os.unlink(path)
            removed_tmp.append(name)

        found = recover_index(self._paths)
        self._writer = SegmentWriter(self._paths, found.newest + 1, self._segment_bytes)
        if found.damaged:  # quarantined: never read again
            bad = [Op(REMOVE, queue_id) for queue_id in found.damaged]
            batch = Batch(bad, [])
            self._writer.run(batch)
            for op in bad:
                if op.error is not None:
                    raise op.error
                found.index.drop(op.queue_id)
            found.index.add_segment(batch.head)
        if removed_tmp or found.corrupt or found.torn:
            for name in (TMP, LOG, CORRUPT):
                fsync_dir(self._paths.dir(name))
        self._index = found.index
        self._recovered = found.intact
        self._tidy()
        return RecoveryReport(queued=len(found.intact), removed_tmp=tuple(removed_tmp),
                              torn=found.torn, corrupt=found.corrupt)

    def _make_directories(self) -> None:
        created = False
        if not os.path.isdir(self._paths.root):
            os.makedirs(self._paths.root, mode=DIR_MODE)
            created = True
        for name in LEGACY:
            path = self._paths.dir(name)
            if os.path.isdir(path) and os.listdir(path):
                # Never silently ignore mail: the operator decides what happens to it.
                raise OSError(
                    f"{path} holds messages in the spool layout before the log, which this "
                    "version does not read; deliver them with the previous version first"
                )
        for name in (TMP, LOG, CORRUPT):
            path = self._paths.dir(name)
            if not os.path.isdir(path):
                os.mkdir(path, DIR_MODE)
                created = True
        if created:
            # The first segment's directory fsync does not cover the directories' own entries.
            fsync_dir(self._paths.root)
            fsync_dir(os.path.dirname(self._paths.root))

    def _take_lock(self) -> None:
        """One appender at a time: two daemons on one spool would each lose the other's mail."""
        if self._lock_fd is not None:
            return
        fd = os.open(self._paths.lock(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(
                f"another process (a running smarthost?) holds {self._paths.lock()}"
            ) from None
        self._lock_fd = fd

    # -- receiving --------------------------------------------------------------------------

    def receive(self) -> IIncomingMessage:
        """No file is made here (see the module docstring). Ids carry 40 random bits per
        millisecond; one that is queued already is drawn again."""
        for _ in range(5):
            queue_id = QueueId.new(self._clock.seconds())
            if queue_id not in self._live and queue_id not in self._ensure_index().slots:
                self._live.add(queue_id)
                return IncomingMessage(queue_id, self, self._spill_threshold)
        raise RuntimeError("could not allocate a unique queue id")

    def _committed(self, entry: QueueEntry) -> None:
        self._live.discard(entry.queue_id)
        if self._recovered is not None:
            self._recovered[entry.queue_id] = entry

    # -- reading ----------------------------------------------------------------------------

    def _ensure_index(self) -> Index:
        if self._index is None:
            self._index = read_index(self._paths)
        return self._index

    def entries(self) -> Iterator[QueueEntry]:
        """Messages removed or damaged while we iterate are skipped (recovery moves damaged
        ones aside at the next start; :meth:`load` says what is wrong with them).

        The first call after :meth:`recover` serves what recovery read, from memory: the
        scheduler's start does not parse the whole spool a second time.
        """
        recovered, self._recovered = self._recovered, None
        if recovered is not None:
            return iter([recovered[k] for k in sorted(recovered, key=lambda i: i.value)])
        found: dict[QueueId, QueueEntry] = {}
        wanted = list(self._ensure_index().slots)
        for _attempt in range(3):
            seen = set()
            for queue_id, entry, _ in read_entries(self._paths, self._ensure_index(), wanted):
                seen.add(queue_id)
                if entry is not None:
                    found[queue_id] = entry
            # Ids not seen had their segment deleted under us (compacted, while the admin
            # tool reads): they were moved forward, so read where the segments say now.
            wanted = [i for i in wanted if i not in seen]
            if not wanted or self._writer is not None:
                break
            self._index = None
            wanted = [i for i in wanted if i in self._ensure_index().slots]
        return iter([found[k] for k in sorted(found, key=lambda i: i.value)])

    def queue_ids(self) -> list[QueueId]:
        """Committed ids in arrival order, from the index: cheap for counting."""
        return sorted(self._ensure_index().slots, key=lambda i: i.value)

    def load(self, queue_id: QueueId) -> QueueEntry:
        """KeyError when not queued; :class:`CorruptEntry` when its entry is damaged."""
        file_name(queue_id)
        slot = self._slot(queue_id)
        for _attempt in range(3):
            try:
                return read_entry(self._paths, queue_id, slot)
            except FileNotFoundError:
                # Compaction moved it forward and deleted the old segment meanwhile.
                slot = self._moved(queue_id)
        raise CorruptEntry(f"{queue_id}: its segment keeps vanishing")

    def _moved(self, queue_id: QueueId) -> Slot:
        """The slot after its segment vanished: the daemon's index already knows the new place;
        a reader's index (the admin tool's) is read afresh from the segments."""
        if self._writer is None:
            self._index = None
        return self._slot(queue_id)

    def _slot(self, queue_id: QueueId) -> Slot:
        try:
            return self._ensure_index().slots[queue_id]
        except KeyError:
            raise KeyError(queue_id) from None

    def open_body(self, queue_id: QueueId) -> BinaryIO:
        """Exactly the message's bytes; safe to call from a thread."""
        file_name(queue_id)
        slot = self._slot(queue_id)
        for _attempt in range(3):
            try:
                return open_body(self._paths.segment(slot.body_segment), slot.body_offset,
                                 slot.size)
            except FileNotFoundError:
                slot = self._moved(queue_id)
        raise CorruptEntry(f"{queue_id}: its segment keeps vanishing")

    # -- changing ---------------------------------------------------------------------------

    def update(self, entry: QueueEntry) -> Deferred[None]:
        """Fails with KeyError when the message is no longer queued."""
        file_name(entry.queue_id)
        return self._exclusive(Op(UPDATE, entry.queue_id, entry))

    def remove(self, queue_id: QueueId) -> Deferred[None]:
        """Fails with KeyError when the message is not queued."""
        file_name(queue_id)  # a wrong type is a bug in the caller: raise now, not in a thread
        return self._exclusive(Op(REMOVE, queue_id))

    def _exclusive(self, op: Op) -> Deferred[None]:
        queue_id = op.queue_id
        lock = self._locks.setdefault(queue_id, DeferredLock())
        d: Deferred[None] = lock.run(self._submit_change, op)

        def done(result: object) -> object:
            # The lock has been released (and handed to any waiter) before this runs.
            if not lock.locked and self._locks.get(queue_id) is lock:
                del self._locks[queue_id]
            if self._recovered is not None and not isinstance(result, Failure):
                if op.kind == REMOVE:
                    self._recovered.pop(queue_id, None)
                elif op.entry is not None:
                    self._recovered[queue_id] = op.entry
            return result

        d.addBoth(done)
        return d

    def _submit_change(self, op: Op) -> Deferred[None]:
        """Under the message's lock: the index says whether it is (still) queued."""
        try:
            self._ensure_writer()
            slot = self._slot(op.queue_id)
        except (KeyError, OSError) as e:
            return fail(e)
        if op.kind == RELOCATE:
            op.source = slot  # read now, under the lock: no change of this message is pending
        return self._submit(op)

    def _ensure_writer(self) -> SegmentWriter:
        """The admin tool changes the spool itself only when no daemon runs: the lock says."""
        if self._writer is None:
            self._make_directories()
            self._take_lock()
            self._index = None  # with the lock held nobody else appends: read it afresh
            index = self._ensure_index()
            self._writer = SegmentWriter(
                self._paths, (index.segments or [0])[-1] + 1, self._segment_bytes
            )
        return self._writer

    # -- group commit -----------------------------------------------------------------------

    def _submit(self, op: Op) -> Deferred[None]:
        try:
            self._ensure_writer()
        except OSError as e:  # e.g. SpoolLocked: nothing was queued
            return fail(e)
        self._waiting.append(op)
        if not self._syncing:
            self._start_batch()
        return op.deferred

    def _start_batch(self) -> None:
        writer = self._ensure_writer()
        ops, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
        batch = Batch(ops, self._doomed)
        self._doomed = []
        self._syncing = True
        self.batches += 1
        d = self._run_blocking(writer.run, batch)
        d.addBoth(self._batch_done, batch)

    def _batch_done(self, result: object, batch: Batch) -> None:
        """On the reactor thread, after the blocking job: bring the index up to date, start the
        next batch (the disk works while we answer), then fire this one's Deferreds."""
        self._syncing = False
        index = self._ensure_index()
        if not isinstance(result, Failure):
            index.apply(batch)
            self._compacting.difference_update(batch.deleted)
            self._tidy()
        # _tidy may have started a batch already. A deletion that failed (or that a failed
        # batch never reached) is retried with the next change, not in a loop.
        clean = batch.error is None and batch.deletion_error is None
        if not self._syncing and (self._waiting or (self._doomed and clean)):
            self._start_batch()
        for op in batch.ops:
            if isinstance(result, Failure):  # a bug in the writer itself: nothing is known
                op.deferred.errback(result)
            elif op.error is not None:
                op.deferred.errback(op.error)
            else:
                op.deferred.callback(None)

    def _tidy(self) -> None:
        """Delete the oldest segments nothing needs; copy forward what pins too many."""
        index = self._index
        writer = self._writer
        if index is None or writer is None:
            return
        for number in index.segments:
            if number in self._doomed:
                continue
            if number == writer.head or index.bodies.get(number):
                break
            self._doomed.append(number)
        sealed = [n for n in index.segments if n != writer.head and n not in self._doomed]
        on_disk = sum(index.sizes.get(n, 0) for n in index.segments)
        # Copy forward only when it frees space: with more live mail than COMPACT_AFTER
        # segments hold, a rule on the count alone would rewrite the spool for ever.
        if (len(sealed) > COMPACT_AFTER and on_disk > 2 * index.live_bytes
                and sealed[0] not in self._compacting):
            oldest = sealed[0]
            self._compacting.add(oldest)
            for queue_id in sorted(index.bodies.get(oldest, ()), key=lambda i: i.value):
                # Failures (the message went meanwhile, a full disk) leave it where it is.
                self._exclusive(Op(RELOCATE, queue_id)).addErrback(lambda _: None)


async def release_held(spool: ISpool, name: str) -> list[QueueEntry]:
    """Un-hold every message held for ``name`` (a user, or the trusted client address of
    unauthenticated mail); returns the released entries, to be scheduled by the caller."""
    released = []
    for entry in list(spool.entries()):
        env = entry.envelope
        owner = env.user if env.user is not None else env.client_address
        if env.held and owner == name:
            entry = attrs.evolve(entry, envelope=attrs.evolve(env, held=False))
            await spool.update(entry)
            released.append(entry)
    return released
