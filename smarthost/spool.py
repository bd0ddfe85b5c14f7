"""The durable queue on disk: the only bridge from receiving to delivering.

The directories are the interface (as in Postfix): the daemon writes them and ``smarthost
queue`` reads them from another process while the daemon runs, so a file is only ever renamed
into ``data/`` or ``state/`` once it is complete::

    tmp/<id>              a large message's body, spilled to disk while it is received
    tmp/<id>.q            a message file being committed
    tmp/<id>.<rnd>.json   a state file being written
    data/<id>             the committed message: header record + body, never changed afterwards;
                          renaming it into place is the commit point
    state/<id>.json       the QueueEntry as JSON, written only by :meth:`Spool.update`; when
                          present it supersedes the header record
    corrupt/              damaged files moved aside at start-up, never deleted

A message file starts with a header record holding the QueueEntry as committed::

    MAGIC (8 bytes) | JSON length (u32, big endian) | CRC-32 of the JSON (u32) | JSON | body

so one rename publishes envelope and body together. ``QueueEntry.size`` is the body's size.

**Receiving costs no system call.** :meth:`Spool.receive` creates nothing; ``write`` appends to
a list in memory. A message that grows past ``spill_threshold`` (1 MiB) is moved to
``tmp/<id>`` and written through from then on: that rare create happens on the calling (reactor)
thread, because ``write`` must raise ``OSError`` on a full disk right away (the session answers
452 to it), and because big messages are rare enough that one ``open()`` does not matter.

**Group commit.** Every change (commit, update, remove) becomes an operation in a batch. One
blocking job runs at a time; operations that arrive while it runs wait and form the next batch.
A batch, in its thread, in this order:

1. writes each new file in ``tmp/``, then fsyncs each;
2. renames each into ``data/`` or ``state/`` (the commit points), unlinks removed files;
3. fsyncs each directory it changed, once for the whole batch;
4. removals of messages that had a state file: unlinks their bodies, fsyncs ``data/`` again
   (the state goes first, so a crash in between never leaves a state without its body);

and only then are the batch's Deferreds fired on the reactor thread: a 250 after DATA means the
message file and its directory entry are on disk. Per message, a commit costs one file fsync
plus a share of one ``data/`` fsync (the previous layout: four fsyncs, body, ``data/``, state
file, ``state/``); an update one file fsync plus a share of a ``state/`` fsync (before: two); a
removal of a message never updated a share of one ``data/`` fsync (before: two).

Recovery (:meth:`Spool.recover`) clears ``tmp/``, checks every message file's header (or its
state file and size), and moves whatever cannot be delivered to ``corrupt/``. The spool layout
before this one (``data/<id>`` holding only the body, ``state/<id>.json`` written at commit)
still loads: a file without the magic is such a body, and its state file says everything.
"""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Iterator
from contextlib import suppress
from typing import BinaryIO

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from smarthost.envelope import Envelope, QueueEntry, QueueId
from smarthost.interfaces import IIncomingMessage, ISpool
from smarthost.safeio import fsync_dir
from smarthost.spoolfile import (
    COMMIT,
    CORRUPT,
    DATA,
    DIR_MODE,
    HEADER,
    MAGIC,
    MAX_BATCH,
    REMOVE,
    SPILL_THRESHOLD,
    STATE,
    TMP,
    UPDATE,
    BatchWriter,
    CorruptEntry,
    CorruptFile,
    Op,
    RecoveryReport,
    RunBlocking,
    SpoolPaths,
    create_exclusive,
    decode_entry,
    file_name,
    id_from_state_name,
    parse_id,
    read_header,
    unlink_quietly,
)

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
    receives or delivers: recovery deletes ``tmp/``, which would destroy in-flight messages of
    a running daemon.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        clock: IReactorTime,
        run_blocking: RunBlocking,
        spill_threshold: int = SPILL_THRESHOLD,
    ) -> None:
        self._paths = SpoolPaths(os.path.abspath(os.fspath(directory)))
        self._clock = clock
        self._run_blocking = run_blocking
        self._spill_threshold = spill_threshold
        # update/remove of one message run one at a time, in call order: each batch applies
        # its operations by phase, so two changes to one message must not share a batch.
        self._locks: dict[QueueId, DeferredLock] = {}
        self._live: set[QueueId] = set()  # ids being received or committed here
        self._writer = BatchWriter(self._paths)
        self._waiting: list[Op] = []  # the next batch
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
    ) -> tuple[Spool, RecoveryReport]:
        """Daemon start-up: create the directories if needed, then recover."""
        spool = cls(
            directory, clock=clock, run_blocking=run_blocking, spill_threshold=spill_threshold
        )
        return spool, spool.recover()

    # -- start-up -------------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Bring the directories back to "every message file is whole, nothing else".

        Synchronous: it runs once before the daemon listens, and nothing can proceed without it.
        Each entry is read once here; the first :meth:`entries` call serves them from memory.
        """
        # Recovery keeps every entry it reads (for entries()); with the collector on, each
        # generation-2 pass walks all of them again: 100,000 entries cost ~20% more time.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._recover()
        finally:
            if collecting:
                gc.enable()

    def _recover(self) -> RecoveryReport:
        self._make_directories()
        tmp, data, state = (self._paths.dir(n) for n in (TMP, DATA, STATE))
        corrupt: list[CorruptFile] = []

        removed_tmp = []
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if os.path.isdir(path) and not os.path.islink(path):
                corrupt.append(self._quarantine(TMP, name, "unexpected directory"))
            else:
                os.unlink(path)
                removed_tmp.append(name)

        states: dict[QueueId, str] = {}
        for name in sorted(os.listdir(state)):
            queue_id = id_from_state_name(name)
            if queue_id is None:
                corrupt.append(self._quarantine(STATE, name, "not a state file name"))
            else:
                states[queue_id] = name

        intact: dict[QueueId, QueueEntry] = {}
        for name in sorted(os.listdir(data)):
            queue_id = parse_id(name)
            if queue_id is None:
                corrupt.append(self._quarantine(DATA, name, "not a queue id"))
                continue
            state_name = states.pop(queue_id, None)
            try:
                intact[queue_id] = self._check(queue_id, has_state=state_name is not None)
                continue
            except (OSError, CorruptEntry) as e:
                reason = str(e) if isinstance(e, CorruptEntry) else f"{queue_id}: {e}"
            if state_name is not None:
                corrupt.append(self._quarantine(STATE, state_name, reason))
            corrupt.append(self._quarantine(DATA, name, reason))

        for name in states.values():  # the bodies of these were not in data/
            corrupt.append(self._quarantine(STATE, name, "message data missing"))

        if removed_tmp or corrupt:
            for name in (TMP, DATA, STATE, CORRUPT):
                fsync_dir(self._paths.dir(name))
        self._recovered = intact
        return RecoveryReport(
            queued=len(intact), removed_tmp=tuple(removed_tmp), corrupt=tuple(corrupt)
        )

    def _make_directories(self) -> None:
        created = False
        if not os.path.isdir(self._paths.root):
            os.makedirs(self._paths.root, mode=DIR_MODE)
            created = True
        for name in (TMP, DATA, STATE, CORRUPT):
            path = self._paths.dir(name)
            if not os.path.isdir(path):
                os.mkdir(path, DIR_MODE)
                created = True
        if created:
            # The first message's directory fsyncs do not cover the directories' own entries.
            fsync_dir(self._paths.root)
            fsync_dir(os.path.dirname(self._paths.root))

    def _check(self, queue_id: QueueId, *, has_state: bool) -> QueueEntry:
        """The entry of an intact message; CorruptEntry or OSError saying what is wrong."""
        if not has_state:
            with open(self._paths.data(queue_id), "rb") as f:
                entry, _ = read_header(queue_id, f)
            return entry
        try:
            with open(self._paths.state(queue_id), "rb") as f:
                entry, length = decode_entry(queue_id, f.read())
        except FileNotFoundError:  # listed a moment ago: someone else is changing the spool
            raise CorruptEntry(f"{queue_id}: state file vanished") from None
        size = os.stat(self._paths.data(queue_id)).st_size
        expected = entry.size if length is None else length  # None: the old layout
        if size != expected:
            raise CorruptEntry(f"{queue_id}: message data is {size} bytes, state says {expected}")
        return entry

    def _quarantine(self, directory: str, name: str, reason: str) -> CorruptFile:
        # ``name`` comes from listdir, so it cannot hold a "/"; never overwrite earlier finds.
        target, n = name, 0
        while os.path.lexists(os.path.join(self._paths.dir(CORRUPT), target)):
            n += 1
            target = f"{name}.{n}"
        os.rename(
            os.path.join(self._paths.dir(directory), name),
            os.path.join(self._paths.dir(CORRUPT), target),
        )
        return CorruptFile(f"{directory}/{name}", f"{CORRUPT}/{target}", reason)

    # -- receiving --------------------------------------------------------------------------

    def receive(self) -> IIncomingMessage:
        """No file is made here (see the module docstring). Ids carry 40 random bits per
        millisecond; one that exists on disk already fails its commit rather than replace it."""
        for _ in range(5):
            queue_id = QueueId.new(self._clock.seconds())
            if queue_id not in self._live:
                self._live.add(queue_id)
                return IncomingMessage(queue_id, self, self._spill_threshold)
        raise RuntimeError("could not allocate a unique queue id")

    def _committed(self, entry: QueueEntry) -> None:
        self._live.discard(entry.queue_id)
        if self._recovered is not None:
            self._recovered[entry.queue_id] = entry

    # -- reading ----------------------------------------------------------------------------

    def entries(self) -> Iterator[QueueEntry]:
        """Messages removed or damaged while we iterate are skipped (recovery moves damaged
        ones aside at the next start; :meth:`load` says what is wrong with them).

        The first call after :meth:`recover` serves what recovery read, from memory: the
        scheduler's start does not parse the whole spool a second time.
        """
        recovered, self._recovered = self._recovered, None
        if recovered is not None:
            return iter([recovered[k] for k in sorted(recovered, key=lambda i: i.value)])
        return self._read_entries()

    def _read_entries(self) -> Iterator[QueueEntry]:
        for queue_id in self.queue_ids():
            try:
                yield self.load(queue_id)
            except (KeyError, CorruptEntry):
                continue

    def queue_ids(self) -> list[QueueId]:
        """Committed ids in arrival order, without reading any file: cheap for counting."""
        ids = (parse_id(n) for n in os.listdir(self._paths.dir(DATA)))
        return sorted((i for i in ids if i is not None), key=lambda i: i.value)

    def load(self, queue_id: QueueId) -> QueueEntry:
        """KeyError when not queued; :class:`CorruptEntry` when its state or header is damaged.

        The state file wins when there is one; otherwise the entry is the message's header.
        """
        try:
            with open(self._paths.state(queue_id), "rb") as f:
                return decode_entry(queue_id, f.read())[0]
        except FileNotFoundError:
            pass
        try:
            with open(self._paths.data(queue_id), "rb") as f:
                return read_header(queue_id, f)[0]
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    def open_body(self, queue_id: QueueId) -> BinaryIO:
        """The message file, positioned at the body (so ``read()`` returns exactly the body)."""
        try:
            f = open(self._paths.data(queue_id), "rb")
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        try:
            head = f.read(HEADER.size)
            if len(head) == HEADER.size and head[:8] == MAGIC:
                f.seek(HEADER.size + HEADER.unpack(head)[1])
            else:
                f.seek(0)  # the previous layout: the file is the body
        except BaseException:
            f.close()
            raise
        return f

    # -- changing ---------------------------------------------------------------------------

    def update(self, entry: QueueEntry) -> Deferred[None]:
        """Fails with KeyError when the message is no longer queued: an update racing a
        removal must not bring back a state file without its body."""
        file_name(entry.queue_id)
        return self._exclusive(Op(UPDATE, entry.queue_id, entry))

    def remove(self, queue_id: QueueId) -> Deferred[None]:
        """Fails with KeyError when the message is not queued."""
        file_name(queue_id)  # a wrong type is a bug in the caller: raise now, not in a thread
        return self._exclusive(Op(REMOVE, queue_id))

    def _exclusive(self, op: Op) -> Deferred[None]:
        queue_id = op.queue_id
        lock = self._locks.setdefault(queue_id, DeferredLock())
        d: Deferred[None] = lock.run(self._submit, op)

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

    # -- group commit -----------------------------------------------------------------------

    def _submit(self, op: Op) -> Deferred[None]:
        self._waiting.append(op)
        if not self._syncing:
            self._start_batch()
        return op.deferred

    def _start_batch(self) -> None:
        batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
        self._syncing = True
        self.batches += 1
        d = self._run_blocking(self._writer.run, batch)
        d.addBoth(self._batch_done, batch)

    def _batch_done(self, result: object, batch: list[Op]) -> None:
        """On the reactor thread, after the blocking job: start the next batch (the disk works
        while we answer), then fire this one's Deferreds."""
        self._syncing = False
        if self._waiting:
            self._start_batch()
        for op in batch:
            if isinstance(result, Failure):  # a bug in the batch writer itself: nothing is known
                op.deferred.errback(result)
            elif op.error is not None:
                op.deferred.errback(op.error)
            else:
                op.deferred.callback(None)

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
