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

**Reading and recovery** (:mod:`smarthost.queue.index`, :mod:`smarthost.queue.recovery`): an
index in memory says where each message is; start-up checks every record, drops the unfinished
last batch, and copies any other damage to ``corrupt/`` naming every message it held.

**Space.** A segment is sealed once it passes ``segment_bytes`` (64 MiB). The oldest segment
is deleted once no queued message has its body there. When more than ``COMPACT_AFTER`` sealed
segments pile up behind a long-deferred message and the segments hold more than twice the
queued mail, the oldest one's messages are copied forward into the head (entry in force plus
body), after which it is deleted: the disk holds at most about twice the live mail plus a few
segments. A relocation that fails (a full disk) is tried again ``COMPACT_RETRY`` seconds later.
A full disk fails the batch with :class:`~smarthost.core.errors.SpoolFull` (logged once until
a batch gets through again).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO

import attrs
from twisted.internet.defer import Deferred, DeferredLock, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from smarthost.api import IIncomingMessage, ISpool
from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.core.errors import CorruptEntry, SpoolFull
from smarthost.core.maillog import MailLog
from smarthost.core.safeio import fsync_dir
from smarthost.core.types import RunBlocking
from smarthost.queue.directory import clear_tmp, make_directories, take_lock
from smarthost.queue.incoming import IncomingMessage
from smarthost.queue.index import Index, read_entries, read_entry, read_index
from smarthost.queue.recovery import RecoveryReport, recover_index
from smarthost.queue.segment import (
    CORRUPT,
    LOG,
    TMP,
    SpoolPaths,
    file_name,
    open_body,
)
from smarthost.queue.writer import (
    COMMIT,
    MAX_BATCH,
    RELOCATE,
    REMOVE,
    SEGMENT_BYTES,
    SPILL_THRESHOLD,
    UPDATE,
    Batch,
    Op,
    SegmentWriter,
    Slot,
)

# Sealed segments allowed behind the head before the oldest one's messages are copied forward.
COMPACT_AFTER = 3
COMPACT_RETRY = 60.0  # seconds after a failed relocation before compaction tries again
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
        maillog: MailLog | None = None,
        id_origin: str = "",
        gather: bool = False,
    ) -> None:
        self._paths = SpoolPaths(os.path.abspath(os.fspath(directory)))
        self._id_origin = id_origin  # ends every id this spool makes (QueueId.new)
        self._clock = clock
        self._run_blocking = run_blocking
        self._spill_threshold = spill_threshold
        self._segment_bytes = segment_bytes
        self._log = maillog  # the daemon's; the admin tool reports on its own
        # update/remove of one message run one at a time, in call order.
        self._locks: dict[QueueId, DeferredLock] = {}
        self._live: set[QueueId] = set()  # ids being received or committed here
        self._index: Index | None = None  # read on first use
        self._writer: SegmentWriter | None = None  # made by recover(), or on a first change
        self._lock_fd: int | None = None
        self._waiting: list[Op] = []  # the next batch
        self._doomed: list[int] = []  # segments the next batch deletes
        self._compacting: set[int] = set()
        self._compact_from = 0.0  # no compaction before this time (after a failed relocation)
        self._full = False  # the last batch failed with SpoolFull (logged once)
        self._syncing = False  # a batch's blocking job is running
        # The daemon's: an operation arriving while idle starts its batch at the end of the
        # reactor's turn (clock.callLater(0)), not at once (see _submit).
        self._gather = gather
        self._gathering = False  # a batch start is waiting for the end of this turn
        self.batches = 0  # blocking jobs started: for tests and the curious
        # What recovery read, served once by entries() (the scheduler's start) so start-up
        # parses each entry once; kept up to date by this process's changes until then.
        self._recovered: dict[QueueId, QueueEntry] | None = None

    @property
    def directory(self) -> str:
        return self._paths.root

    @property
    def paths(self) -> SpoolPaths:
        return self._paths

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        clock: IReactorTime,
        run_blocking: RunBlocking,
        spill_threshold: int = SPILL_THRESHOLD,
        segment_bytes: int = SEGMENT_BYTES,
        maillog: MailLog | None = None,
        id_origin: str = "",
        gather: bool = False,
    ) -> tuple[Spool, RecoveryReport]:
        """Daemon start-up: create the directories if needed, then recover."""
        spool = cls(
            directory, clock=clock, run_blocking=run_blocking, spill_threshold=spill_threshold,
            segment_bytes=segment_bytes, maillog=maillog, id_origin=id_origin, gather=gather,
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
        """Read every segment, drop the unfinished last batch, copy damage aside (holding or
        removing what it says to, see :mod:`smarthost.queue.recovery`), and take the lock.

        Synchronous: it runs once before the daemon listens, and nothing can proceed without it.
        """
        self.close()
        make_directories(self._paths)
        self._take_lock()
        removed_tmp = clear_tmp(self._paths)
        found = recover_index(self._paths)
        self._writer = SegmentWriter(self._paths, found.newest + 1, self._segment_bytes)
        # Quarantined entries are never read again; lost removals are written again; a
        # message whose newer state was lost waits for the operator.
        ops = [Op(REMOVE, queue_id) for queue_id in (*found.damaged, *found.dropped)]
        ops += [Op(UPDATE, queue_id, entry) for queue_id, entry in found.held.items()]
        if ops:
            batch = Batch(ops, [])
            self._writer.run(batch)
            for op in ops:
                if op.error is not None:
                    raise op.error
            found.index.apply(batch)
            for queue_id in found.dropped:
                del found.intact[queue_id]
            found.intact.update(found.held)
        if removed_tmp or found.corrupt or found.torn:
            for name in (TMP, LOG, CORRUPT):
                fsync_dir(self._paths.dir(name))
        self._index = found.index
        self._recovered = found.intact
        self._tidy()
        return RecoveryReport(queued=len(found.intact), removed_tmp=tuple(removed_tmp),
                              torn=found.torn, corrupt=found.corrupt)

    def _take_lock(self) -> None:
        if self._lock_fd is None:
            self._lock_fd = take_lock(self._paths)

    # -- receiving --------------------------------------------------------------------------

    def receive(self) -> IIncomingMessage:
        """No file is made here (see the module docstring). Ids carry 40 random bits per
        millisecond; one that is queued already is drawn again."""
        for _ in range(5):
            queue_id = QueueId.new(self._clock.seconds(), self._id_origin)
            if queue_id not in self._live and queue_id not in self._ensure_index().slots:
                self._live.add(queue_id)
                return IncomingMessage(queue_id, self._paths, self._spill_threshold,
                                       self._submit, self._committed, self._live.discard)
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
                                 slot.size, slot.body_crc)
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

    def restore(self, entry: QueueEntry, body: bytes) -> Deferred[None]:
        """Put a message back under its own id and entry (``smarthost queue salvage``). Fails
        with ``ValueError`` when that id is queued already, or on its way in."""
        queue_id = entry.queue_id
        file_name(queue_id)
        try:
            self._ensure_writer()  # the admin tool reads the index afresh under the lock
        except OSError as e:
            return fail(e)
        if len(body) != entry.size:
            return fail(ValueError(f"{queue_id}: body is {len(body)} bytes, entry says "
                                   f"{entry.size}"))
        if queue_id in self._live or queue_id in self._ensure_index().slots:
            return fail(ValueError(f"{queue_id} is queued already"))
        self._live.add(queue_id)

        def failed(reason: Failure) -> Failure:
            self._live.discard(queue_id)
            return reason

        d = self._submit(Op(COMMIT, queue_id, entry, [body]))
        return d.addCallbacks(lambda _: self._committed(entry), failed)

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
            make_directories(self._paths)
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
        if self._syncing or self._gathering:
            return op.deferred
        if self._gather:
            # The other sessions whose message ended in this turn of the reactor (one epoll
            # wakeup often holds several) join this batch rather than wait for the next: one
            # fdatasync and one thread hand-off fewer. No added wait: the call runs as soon as
            # this turn's events are handled. Measured with bench/run (accept, 20 sessions,
            # alternating runs): CPU per message 0.42/0.45 -> 0.39/0.37 ms with one process,
            # 0.53/0.47 -> 0.44/0.45 ms with 2 workers.
            self._gathering = True
            self._clock.callLater(0, self._gathered)
        else:
            self._start_batch()
        return op.deferred

    def _gathered(self) -> None:
        self._gathering = False
        if not self._syncing and self._waiting:
            self._start_batch()

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
            self._note_space(batch)
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

    def _note_space(self, batch: Batch) -> None:
        """One line when the disk fills up (not one traceback per message), one when a batch
        gets through again."""
        full = next((e for e in (batch.error, *(op.error for op in batch.ops))
                     if isinstance(e, SpoolFull)), None)
        if full is not None and not self._full:
            self._full = True
            if self._log is not None:
                self._log.warning(
                    "spool {directory}: no space left ({error}): new mail is answered 452 "
                    "until there is space again", directory=self.directory, error=str(full))
        elif full is None and self._full and batch.ops and batch.error is None:
            self._full = False
            if self._log is not None:
                self._log.notice("spool {directory}: writing again", directory=self.directory)

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
                and sealed[0] not in self._compacting
                and self._clock.seconds() >= self._compact_from):
            oldest = sealed[0]
            self._compacting.add(oldest)
            for queue_id in sorted(index.bodies.get(oldest, ()), key=lambda i: i.value):
                # A failure leaves the message where it is.
                d = self._exclusive(Op(RELOCATE, queue_id))
                d.addErrback(self._relocation_failed, oldest)

    def _relocation_failed(self, reason: Failure, segment: int) -> None:
        """The message went meanwhile: nothing to do. Anything else (a full disk, a body that
        rotted): that segment is tried again, ``COMPACT_RETRY`` seconds from now, not never
        (the rule only looks at the oldest sealed segment) and not in a loop."""
        if not isinstance(reason.value, KeyError):
            self._compacting.discard(segment)
            self._compact_from = self._clock.seconds() + COMPACT_RETRY


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
