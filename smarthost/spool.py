"""The durable queue on disk: the only bridge from receiving to delivering.

The directories are the interface (as in Postfix): the daemon writes them and ``smarthost
queue`` reads them from another process while the daemon runs, so a file is only ever renamed
into ``data/`` or ``state/`` once it is complete::

    tmp/<id>              a body being received
    tmp/<id>.<rnd>.json   a state file being written
    data/<id>             the committed message bytes, never changed afterwards
    state/<id>.json       the QueueEntry as JSON; renaming it into place is the commit point
    corrupt/              damaged files moved aside at start-up, never deleted

Commit order, each step only after the one before is on disk::

    fsync tmp/<id> -> rename to data/<id> -> fsync data/
    -> write + fsync tmp/<id>.<rnd>.json -> rename to state/<id>.json -> fsync state/

``data/`` is fsynced *before* the state rename (not together with ``state/`` at the end) so that
a durable state file always implies a durable body. Recovery can then read the two half-states
a crash leaves without guessing: a body without state was never acknowledged (remove it), and
a state without its body is real damage (move it to ``corrupt/``).

This spool pays three fsyncs per message; a group-commit spool can replace it behind
:class:`~smarthost.interfaces.ISpool`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from smarthost.envelope import Envelope, QueueEntry, QueueId
from smarthost.interfaces import IIncomingMessage, ISpool
from smarthost.safeio import fsync_dir

FILE_MODE = 0o600  # mail is private: only the daemon's user reads the spool
DIR_MODE = 0o700

TMP, DATA, STATE, CORRUPT = "tmp", "data", "state", "corrupt"
_STATE_SUFFIX = ".json"

RunBlocking = Callable[..., "Deferred[Any]"]


class CorruptEntry(ValueError):
    """A state file exists but does not hold a QueueEntry for its own id."""


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
    removed_orphans: tuple[str, ...] = ()  # data/ bodies whose state never became durable
    corrupt: tuple[CorruptFile, ...] = ()

    @property
    def clean(self) -> bool:
        return not (self.removed_tmp or self.removed_orphans or self.corrupt)


@attrs.frozen
class _Paths:
    """Every path in the spool. Only validated :class:`QueueId` values become file names."""

    root: str

    def dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def body_tmp(self, queue_id: QueueId) -> str:
        return os.path.join(self.root, TMP, _name(queue_id))

    def state_tmp(self, queue_id: QueueId) -> str:
        # Random part: the admin CLI may rewrite a state file while the daemon does.
        return os.path.join(self.root, TMP, f"{_name(queue_id)}.{secrets.token_hex(4)}.json")

    def data(self, queue_id: QueueId) -> str:
        return os.path.join(self.root, DATA, _name(queue_id))

    def state(self, queue_id: QueueId) -> str:
        return os.path.join(self.root, STATE, _name(queue_id) + _STATE_SUFFIX)


def _name(queue_id: QueueId) -> str:
    # A plain str here would be a path built from unvalidated input (``../../etc/x``).
    if not isinstance(queue_id, QueueId):
        raise TypeError(f"expected a QueueId, got {type(queue_id).__name__}")
    return queue_id.value


def _parse_id(name: str) -> QueueId | None:
    try:
        return QueueId(name)
    except ValueError:
        return None


def _id_from_state_name(name: str) -> QueueId | None:
    if not name.endswith(_STATE_SUFFIX):
        return None
    return _parse_id(name[: -len(_STATE_SUFFIX)])



def _create(path: str) -> int:
    # O_EXCL: never write through a file (or symlink) someone else put there.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)


def _write_durably(path: str, data: bytes) -> None:
    fd = _create(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    # Only on paths to undo after a failure, where the original error is the one to report.
    with suppress(OSError):
        os.unlink(path)


def _encode(entry: QueueEntry) -> bytes:
    # ensure_ascii: any str (even a lone surrogate from a sloppy decoder) round-trips.
    return json.dumps(entry.to_json(), indent=2, sort_keys=True).encode("ascii") + b"\n"


def _decode(queue_id: QueueId, raw: bytes) -> QueueEntry:
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        entry = QueueEntry.from_json(data)
    except Exception as e:
        # Includes KeyError from a missing field, which must not read as "not queued".
        raise CorruptEntry(f"{queue_id}: unreadable state: {type(e).__name__}: {e}") from e
    if entry.queue_id != queue_id:
        raise CorruptEntry(f"{queue_id}: state names another message ({entry.queue_id})")
    return entry


_RECEIVING, _COMMITTING, _DONE = "receiving", "committing", "done"


@implementer(IIncomingMessage)
class IncomingMessage:
    """One message on its way to disk; made by :meth:`Spool.receive`."""

    def __init__(
        self, queue_id: QueueId, file: BinaryIO, paths: _Paths, run_blocking: RunBlocking
    ) -> None:
        self.queue_id = queue_id
        self._file = file
        self._paths = paths
        self._run_blocking = run_blocking
        self._size = 0
        self._state = _RECEIVING

    def write(self, data: bytes) -> None:
        """Buffered and on the calling thread: the fsync at commit is what costs time.

        An ``OSError`` (disk full) propagates; the session should answer 452 and abort.
        """
        if self._state != _RECEIVING:
            raise RuntimeError(f"{self.queue_id}: write after commit or abort")
        self._file.write(data)
        self._size += len(data)

    def commit(self, envelope: Envelope) -> Deferred[QueueEntry]:
        if self._state != _RECEIVING:
            raise RuntimeError(f"{self.queue_id}: commit after commit or abort")
        self._state = _COMMITTING
        entry = QueueEntry.new(self.queue_id, envelope, self._size)
        d = self._run_blocking(self._commit_blocking, entry)

        def committed(_: object) -> QueueEntry:
            self._state = _DONE
            return entry

        def failed(reason: Any) -> Any:
            self._state = _DONE
            return reason

        d.addCallbacks(committed, failed)
        return d

    def _commit_blocking(self, entry: QueueEntry) -> None:
        """Runs in a thread; the reactor thread leaves this message alone meanwhile."""
        body_tmp = self._paths.body_tmp(self.queue_id)
        state_tmp = self._paths.state_tmp(self.queue_id)
        data = self._paths.data(self.queue_id)
        state = self._paths.state(self.queue_id)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.rename(body_tmp, data)
            fsync_dir(self._paths.dir(DATA))
            _write_durably(state_tmp, _encode(entry))
            os.rename(state_tmp, state)  # the commit point
            fsync_dir(self._paths.dir(STATE))
        except BaseException:
            # Not acknowledged, so not queued: the client will retry after our 4xx. Undo
            # everything, including a state rename whose directory fsync failed.
            with suppress(OSError):
                self._file.close()
            for path in (state, state_tmp, data, body_tmp):
                _unlink_quietly(path)
            raise

    def read(self) -> bytes:
        """Everything written so far; only plugins that must see the whole message (signers,
        scanners) call this, at the end of DATA."""
        if self._state != _RECEIVING:
            raise RuntimeError(f"{self.queue_id}: read after commit or abort")
        self._file.flush()
        with open(self._paths.body_tmp(self.queue_id), "rb") as f:
            return f.read()

    def prepend(self, data: bytes) -> None:
        """Rewrite the temp file as ``data`` + what is there: one copy of the message, paid
        only when a plugin adds headers (the body is already on disk by then)."""
        if self._state != _RECEIVING:
            raise RuntimeError(f"{self.queue_id}: prepend after commit or abort")
        path = self._paths.body_tmp(self.queue_id)
        self._file.flush()
        fd = _create(path + ".new")
        try:
            new = os.fdopen(fd, "wb")
            new.write(data)
            new.flush()
            with open(path, "rb") as old:
                shutil.copyfileobj(old, new)
            new.flush()
        except BaseException:
            _unlink_quietly(path + ".new")
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
        with suppress(OSError):
            self._file.close()
        _unlink_quietly(self._paths.body_tmp(self.queue_id))


@implementer(ISpool)
class Spool:
    """The spool in one directory.

    Constructing one touches nothing on disk, so the admin CLI can read a spool a running
    daemon owns. Only the daemon calls :meth:`recover` (or :meth:`open`), once, before it
    receives or delivers: recovery deletes ``tmp/``, which would destroy in-flight messages of
    a running daemon.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, clock: IReactorTime, run_blocking: RunBlocking
    ) -> None:
        self._paths = _Paths(os.path.abspath(os.fspath(directory)))
        self._clock = clock
        self._run_blocking = run_blocking
        # update/remove of one message run one at a time, in call order: on a thread pool a
        # later update could otherwise land before an earlier one, or resurrect a removal.
        self._locks: dict[QueueId, DeferredLock] = {}

    @property
    def directory(self) -> str:
        return self._paths.root

    @classmethod
    def open(
        cls, directory: str | os.PathLike[str], *, clock: IReactorTime, run_blocking: RunBlocking
    ) -> tuple[Spool, RecoveryReport]:
        """Daemon start-up: create the directories if needed, then recover."""
        spool = cls(directory, clock=clock, run_blocking=run_blocking)
        return spool, spool.recover()

    # -- start-up -------------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Bring the directories back to "every state has its body, nothing else".

        Synchronous: it runs once before the daemon listens, and nothing can proceed without it.
        """
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

        intact: set[QueueId] = set()
        for name in sorted(os.listdir(state)):
            queue_id = _id_from_state_name(name)
            if queue_id is None:
                corrupt.append(self._quarantine(STATE, name, "not a state file name"))
                continue
            reason = self._check(queue_id)
            if reason is None:
                intact.add(queue_id)
                continue
            corrupt.append(self._quarantine(STATE, name, reason))
            if os.path.lexists(self._paths.data(queue_id)):
                corrupt.append(self._quarantine(DATA, queue_id.value, reason))

        removed_orphans = []
        for name in sorted(os.listdir(data)):
            queue_id = _parse_id(name)
            if queue_id is None:
                corrupt.append(self._quarantine(DATA, name, "not a queue id"))
            elif queue_id in intact:
                continue
            elif os.path.isdir(os.path.join(data, name)):
                corrupt.append(self._quarantine(DATA, name, "unexpected directory"))
            else:
                # Its state rename never became durable, so it was never acknowledged.
                os.unlink(os.path.join(data, name))
                removed_orphans.append(name)

        if removed_tmp or removed_orphans or corrupt:
            for name in (TMP, DATA, STATE, CORRUPT):
                fsync_dir(self._paths.dir(name))
        return RecoveryReport(
            queued=len(intact),
            removed_tmp=tuple(removed_tmp),
            removed_orphans=tuple(removed_orphans),
            corrupt=tuple(corrupt),
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

    def _check(self, queue_id: QueueId) -> str | None:
        """Why this committed message cannot be delivered, or None when it is intact."""
        try:
            entry = self._read(queue_id)
        except KeyError:  # listed a moment ago: someone else is changing the spool
            return "state file vanished"
        except (OSError, CorruptEntry) as e:
            return str(e)
        try:
            size = os.stat(self._paths.data(queue_id)).st_size
        except FileNotFoundError:
            return "message data missing"
        if size != entry.size:
            return f"message data is {size} bytes, state says {entry.size}"
        return None

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
        # Ids carry 40 random bits per millisecond; a collision is only retried, not prevented.
        for _ in range(5):
            queue_id = QueueId.new(self._clock.seconds())
            try:
                fd = _create(self._paths.body_tmp(queue_id))
            except FileExistsError:
                continue
            if os.path.lexists(self._paths.data(queue_id)):
                os.close(fd)
                os.unlink(self._paths.body_tmp(queue_id))
                continue
            return IncomingMessage(queue_id, os.fdopen(fd, "wb"), self._paths, self._run_blocking)
        raise RuntimeError("could not allocate a unique queue id")

    # -- reading ----------------------------------------------------------------------------

    def entries(self) -> Iterator[QueueEntry]:
        """Messages removed or damaged while we iterate are skipped (recovery moves damaged
        ones aside at the next start; :meth:`load` says what is wrong with them)."""
        for queue_id in self.queue_ids():
            try:
                yield self.load(queue_id)
            except (KeyError, CorruptEntry):
                continue

    def queue_ids(self) -> list[QueueId]:
        """Committed ids in arrival order, without reading any state: cheap for counting."""
        ids = (_id_from_state_name(n) for n in os.listdir(self._paths.dir(STATE)))
        return sorted((i for i in ids if i is not None), key=lambda i: i.value)

    def load(self, queue_id: QueueId) -> QueueEntry:
        """KeyError when not queued; :class:`CorruptEntry` when the state file is damaged."""
        return self._read(queue_id)

    def _read(self, queue_id: QueueId) -> QueueEntry:
        try:
            with open(self._paths.state(queue_id), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        return _decode(queue_id, raw)

    def open_body(self, queue_id: QueueId) -> BinaryIO:
        try:
            return open(self._paths.data(queue_id), "rb")
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    # -- changing ---------------------------------------------------------------------------

    def update(self, entry: QueueEntry) -> Deferred[None]:
        """Fails with KeyError when the message is no longer queued: an update racing a
        removal must not bring back a state file without its body."""
        _name(entry.queue_id)
        data = _encode(entry)
        return self._exclusive(entry.queue_id, self._update_blocking, entry.queue_id, data)

    def _update_blocking(self, queue_id: QueueId, data: bytes) -> None:
        state = self._paths.state(queue_id)
        if not os.path.exists(state):
            raise KeyError(queue_id)
        state_tmp = self._paths.state_tmp(queue_id)
        try:
            _write_durably(state_tmp, data)
            os.replace(state_tmp, state)
        except BaseException:
            _unlink_quietly(state_tmp)
            raise
        fsync_dir(self._paths.dir(STATE))

    def remove(self, queue_id: QueueId) -> Deferred[None]:
        """Fails with KeyError when the message is not queued."""
        _name(queue_id)  # a wrong type is a bug in the caller: raise now, not in a thread
        return self._exclusive(queue_id, self._remove_blocking, queue_id)

    def _remove_blocking(self, queue_id: QueueId) -> None:
        # State first, durably: a crash in between leaves an orphan body, which recovery
        # removes, rather than a state without body, which it would call corrupt.
        try:
            os.unlink(self._paths.state(queue_id))
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        fsync_dir(self._paths.dir(STATE))
        with suppress(FileNotFoundError):
            os.unlink(self._paths.data(queue_id))
        fsync_dir(self._paths.dir(DATA))

    def _exclusive(
        self, queue_id: QueueId, f: Callable[..., None], *args: object
    ) -> Deferred[None]:
        lock = self._locks.setdefault(queue_id, DeferredLock())
        d: Deferred[None] = lock.run(self._run_blocking, f, *args)

        def forget(result: object) -> object:
            # The lock has been released (and handed to any waiter) before this runs.
            if not lock.locked and self._locks.get(queue_id) is lock:
                del self._locks[queue_id]
            return result

        d.addBoth(forget)
        return d


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
