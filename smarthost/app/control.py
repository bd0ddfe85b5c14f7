"""The control channel between the ``smarthost`` admin tool and the running daemon.

``smarthost queue flush|delete|hold|release`` ask the daemon, which holds the schedule, to make
each change itself, so no change races a delivery in flight: a hold or release is written by
the scheduler (:meth:`~smarthost.delivery.scheduler.Scheduler.hold`), which alone knows what an
attempt in flight is about to save. The channel is Twisted's AMP over the unix socket
``<spool>/control.sock`` (mode 0600, inside the spool directory that only the daemon's user may
enter): every request and answer is a box of named, typed values.

**Any spool path length.** A unix socket's address holds at most 107 bytes (``sun_path``), so
``bind``/``connect`` on ``<a long spool path>/control.sock`` fail. Both sides therefore name
the socket through an open descriptor of the spool directory: ``/proc/self/fd/N/control.sock``
is about 30 bytes whatever the directory's path, and the kernel resolves it to the same file
in the spool directory, with the same permissions. Rejected alternatives: an abstract socket
(Linux) has no file permissions (any local user could connect, or take the name first) and does
not reach across network namespaces (systemd's ``PrivateNetwork=``); a ``chdir`` into the spool
would change the whole daemon's working directory under its other relative paths. Where
``/proc`` is not mounted (a chroot) the plain path is used, which works up to ~100 bytes; a
longer one fails at start-up, naming ``queue.directory``.

**Any number of ids.** An AMP value is at most 65,535 bytes; the admin side sends ids in
chunks of :data:`IDS_PER_CALL` (about 34 KB), one call after another on one connection.

**Nothing from the socket is executed.** AMP dispatches only the commands below (the
responders of :class:`ControlCommands`); every id is parsed as a :class:`QueueId` (which admits
only ``[0-9A-F]{12,32}``) before the spool sees it, and one bad id refuses the whole call.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from smarthost.app import salvaging
from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.core.maillog import MailLog
from smarthost.delivery.scheduler import Scheduler
from smarthost.queue.spool import Spool

SOCKET_NAME = "control.sock"
IDS_PER_CALL = 1000  # queue ids are at most 32 characters: 1,000 of them fill ~34 KB of 64 KB
CALL_TIMEOUT = 120.0  # seconds the admin tool waits for one answer (5,000 deletions take ~1 s)

DONE, UNCHANGED, MISSING = "done", "unchanged", "missing"


class BadRequest(Exception):
    """A request the daemon refuses as a whole (a malformed queue id)."""


class ControlError(Exception):
    """The channel failed: the daemon refused a request, answered nonsense or went away."""


_ERRORS: dict[type[Exception], bytes] = {BadRequest: b"BAD_REQUEST"}
_Arguments = list[tuple[bytes, amp.Argument]]
_NOTHING: _Arguments = []
_COUNT: _Arguments = [(b"count", amp.Integer())]  # type: ignore[no-untyped-call]
_USER: _Arguments = [(b"user", amp.Unicode())]  # type: ignore[no-untyped-call]
_IDS: _Arguments = [(b"ids", amp.ListOf(amp.Unicode()))]  # type: ignore[no-untyped-call]
_LINES: _Arguments = [(b"lines", amp.ListOf(amp.Unicode()))]  # type: ignore[no-untyped-call]
# What became of each id: changed, already so (held, or not held), not queued.
_BY_ID: _Arguments = [
    (b"done", amp.ListOf(amp.Unicode())),  # type: ignore[no-untyped-call]
    (b"unchanged", amp.ListOf(amp.Unicode())),  # type: ignore[no-untyped-call]
    (b"missing", amp.ListOf(amp.Unicode())),  # type: ignore[no-untyped-call]
]


class Flush(amp.Command):
    """Retry every waiting message now."""

    arguments = _NOTHING
    response = _COUNT


class Delete(amp.Command):
    """Remove messages from the queue (and from the schedule)."""

    arguments = _IDS
    response = _BY_ID
    errors = _ERRORS


class Hold(amp.Command):
    """Keep messages queued but never deliver (nor expire) them until released."""

    arguments = _IDS
    response = _BY_ID
    errors = _ERRORS


class ReleaseIds(amp.Command):
    """Undo :class:`Hold` (or the brake) for these messages: they are tried at once."""

    arguments = _IDS
    response = _BY_ID
    errors = _ERRORS


class Release(amp.Command):
    """Release every message the compromised-account brake held for one user."""

    arguments = _USER
    response = _COUNT


class Salvage(amp.Command):
    """Put back what can be read from corrupt/ (``smarthost.app.salvaging``)."""

    arguments = _NOTHING
    response = _LINES


# -- the daemon's side --------------------------------------------------------------------


def _queue_ids(texts: Sequence[str]) -> list[QueueId]:
    try:
        return [QueueId(text) for text in dict.fromkeys(texts)]
    except ValueError as e:
        raise BadRequest(str(e)) from None


def owner(entry: QueueEntry) -> str:
    """Whose mail it is for the brake: the authenticated user, else the client address."""
    env = entry.envelope
    return env.user if env.user is not None else env.client_address


class ControlCommands(amp.CommandLocator):
    """The fixed table of what the admin tool may ask the running daemon: one responder per
    command above, nothing else. Each change goes through the scheduler and the spool of this
    process, so it cannot race a delivery."""

    def __init__(self, spool: Spool, scheduler: Scheduler, maillog: MailLog) -> None:
        self._spool = spool
        self._scheduler = scheduler
        self._log = maillog

    @Flush.responder
    def flush(self) -> dict[str, int]:
        count = self._scheduler.flush()
        self._log.notice("queue flush requested: {count} messages", count=count)
        return {"count": count}

    @Delete.responder
    def delete(self, ids: list[str]) -> Deferred[dict[str, list[str]]]:
        return self._each(ids, self._delete)

    @Hold.responder
    def hold(self, ids: list[str]) -> Deferred[dict[str, list[str]]]:
        return self._each(ids, self._hold)

    @ReleaseIds.responder
    def release_ids(self, ids: list[str]) -> Deferred[dict[str, list[str]]]:
        return self._each(ids, self._release)

    @Release.responder
    def release(self, user: str) -> Deferred[dict[str, int]]:
        return Deferred.fromCoroutine(self._release_user(user))

    @Salvage.responder
    def salvage(self) -> Deferred[dict[str, list[str]]]:
        from twisted.internet.threads import deferToThread

        async def run() -> dict[str, list[str]]:
            lines = await salvaging.in_daemon(self._spool, self._scheduler, self._log,
                                              deferToThread)
            return {"lines": lines}

        return Deferred.fromCoroutine(run())

    def _each(
        self, texts: list[str], change: Callable[[QueueId], Awaitable[str]]
    ) -> Deferred[dict[str, list[str]]]:
        """All at once: the spool writes the changes in one batch with one fsync."""
        queue_ids = _queue_ids(texts)

        async def one(queue_id: QueueId) -> tuple[QueueId, str]:
            return queue_id, await change(queue_id)

        d = gatherResults([Deferred.fromCoroutine(one(q)) for q in queue_ids], consumeErrors=True)

        def sort(results: list[tuple[QueueId, str]]) -> dict[str, list[str]]:
            answer: dict[str, list[str]] = {DONE: [], UNCHANGED: [], MISSING: []}
            for queue_id, what in results:
                answer[what].append(str(queue_id))
            return answer

        return d.addCallback(sort)

    async def _delete(self, queue_id: QueueId) -> str:
        self._scheduler.forget(queue_id)
        try:
            await self._spool.remove(queue_id)
        except KeyError:
            return MISSING
        self._log.removed(queue_id, "deleted by the operator")
        return DONE

    async def _hold(self, queue_id: QueueId) -> str:
        try:
            if not await self._scheduler.hold(queue_id):
                return UNCHANGED
        except KeyError:
            return MISSING
        self._log.notice("{queue_id}: held by the operator", queue_id=str(queue_id))
        return DONE

    async def _release(self, queue_id: QueueId) -> str:
        try:
            if not await self._scheduler.release(queue_id):
                return UNCHANGED
        except KeyError:
            return MISSING
        self._log.notice("{queue_id}: released by the operator", queue_id=str(queue_id))
        return DONE

    async def _release_user(self, user: str) -> dict[str, int]:
        # One by one through the scheduler, as by id: one may have been held during an attempt.
        chosen = [e.queue_id for e in self._spool.entries() if e.envelope.held and owner(e) == user]
        results = [await self._release(queue_id) for queue_id in chosen]
        return {"count": results.count(DONE)}


class _QuietAMP(amp.AMP):
    """AMP without its info line per connection: every admin command is one, and the
    operator log is for mail."""

    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        amp.BinaryBoxProtocol.connectionLost(self, reason)  # type: ignore[no-untyped-call]
        self.transport = None


class ControlFactory(Factory):
    """One AMP connection per admin command, answered by ``commands``."""

    def __init__(self, commands: ControlCommands) -> None:
        self._commands = commands

    def buildProtocol(self, addr: IAddress | None) -> amp.AMP:
        protocol = _QuietAMP(locator=self._commands)  # type: ignore[no-untyped-call]
        protocol.factory = self
        return protocol


class ShortPath:
    """A short path to the unix socket ``<directory>/<name>`` (see the module docstring),
    valid until :meth:`close` closes the directory's descriptor it goes through."""

    def __init__(self, directory: str, name: str = SOCKET_NAME) -> None:
        self._fd: int | None = None
        if hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd"):
            self._fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.path = f"/proc/self/fd/{self._fd}/{name}"
        else:
            self.path = os.path.join(directory, name)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@implementer(IListeningPort)
class _UnixPort:
    """The listening socket, plus the directory's descriptor its path goes through: closed
    only after the port (which unlinks the socket by that path) has stopped."""

    def __init__(self, port: IListeningPort, path: ShortPath) -> None:
        self._port = port
        self._path = path

    def startListening(self) -> None:
        self._port.startListening()

    def stopListening(self) -> Deferred[None]:
        d: Deferred[None] = maybeDeferred(_stop, self._port)

        def close(result: object) -> object:
            self._path.close()
            return result

        return d.addBoth(close)

    def getHost(self) -> IAddress:
        return self._port.getHost()


async def _stop(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


def listen_unix(
    reactor: Any, directory: str, name: str, factory: IProtocolFactory
) -> Deferred[IListeningPort]:
    """Serve ``factory`` on the unix socket ``<directory>/<name>`` (mode 0600) however long
    the path: the control socket, and a worker's ``http.sock`` the master scrapes.

    Fails with a :class:`ControlError` holding only the reason (the caller names the socket
    and its setting). A socket left by a process that was killed is replaced (Twisted's pid
    lock beside it says so).
    """

    def failed(reason: str) -> Failure:
        return Failure(ControlError(reason))  # type: ignore[no-untyped-call]

    try:
        path = ShortPath(directory, name)
    except OSError as e:
        return fail(failed(e.strerror or str(e)))
    endpoint = UNIXServerEndpoint(  # type: ignore[no-untyped-call]
        reactor, path.path, mode=0o600, wantPID=True
    )
    d: Deferred[IListeningPort] = endpoint.listen(factory)  # type: ignore[no-untyped-call]

    def listening(port: IListeningPort) -> IListeningPort:
        return _UnixPort(port, path)

    def not_listening(failure: Failure) -> Failure:
        path.close()
        error = failure.value
        if isinstance(error, CannotListenError):  # its text names the /proc/self/fd path
            error = error.socketError
        return failed(getattr(error, "strerror", None) or str(error))

    return d.addCallbacks(listening, not_listening)


def listen_control(
    reactor: Any, spool_dir: str, commands: ControlCommands
) -> Deferred[IListeningPort]:
    """Serve ``commands`` on ``<spool_dir>/control.sock`` (:func:`listen_unix`)."""
    return listen_unix(reactor, spool_dir, SOCKET_NAME, ControlFactory(commands))


# -- the admin tool's side ------------------------------------------------------------------


class _Transport:
    """The slice of a transport AMP writes to, over a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def write(self, data: bytes) -> None:
        self._sock.sendall(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self._sock.sendall(b"".join(data))

    def loseConnection(self) -> None:
        self._sock.close()

    def getPeer(self) -> str:
        return "daemon"

    def getHost(self) -> str:
        return "admin"


class ControlClient:
    """The admin tool's end: AMP calls made one at a time over a blocking socket.

    No reactor: the admin tool is a plain synchronous program (and a test process cannot
    restart the global reactor). AMP's own protocol object frames the boxes; this class only
    moves bytes until the answer to the call in progress has arrived.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._amp = amp.AMP()  # type: ignore[no-untyped-call]
        self._amp.makeConnection(_Transport(sock))  # type: ignore[no-untyped-call]

    @classmethod
    def connect(cls, spool_dir: str, timeout: float = CALL_TIMEOUT) -> ControlClient | None:
        """None when no daemon listens on this spool (no socket, or a stale one); any other
        failure (e.g. permission denied) is raised as :class:`ControlError`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            path = ShortPath(spool_dir)
            try:
                sock.connect(path.path)
            finally:
                path.close()
        except OSError as e:
            sock.close()
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
                return None
            raise ControlError(
                f"cannot reach the daemon through {spool_dir}/{SOCKET_NAME}: {e.strerror or e}"
            ) from None
        return cls(sock)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, command: type[amp.Command], **arguments: Any) -> dict[str, Any]:
        answers: list[object] = []
        d = self._amp.callRemote(command, **arguments)  # type: ignore[no-untyped-call]
        d.addBoth(answers.append)
        try:
            while not answers:
                data = self._sock.recv(65536)
                if not data:
                    raise ControlError("the daemon closed the connection without an answer")
                self._amp.dataReceived(data)  # type: ignore[no-untyped-call]
        except OSError as e:
            raise ControlError(f"the daemon did not answer: {e.strerror or e}") from None
        answer = answers[0]
        if isinstance(answer, Failure):
            raise ControlError(answer.getErrorMessage())
        assert isinstance(answer, dict)
        return answer

    def each_chunk(
        self, command: type[amp.Command], ids: Sequence[str]
    ) -> dict[str, list[str]]:
        """``command`` for any number of ids, :data:`IDS_PER_CALL` at a time; the answers'
        lists joined."""
        joined: dict[str, list[str]] = {DONE: [], UNCHANGED: [], MISSING: []}
        for start in range(0, len(ids), IDS_PER_CALL):
            answer = self.call(command, ids=list(ids[start : start + IDS_PER_CALL]))
            for key, values in joined.items():
                values.extend(answer[key])
        return joined
