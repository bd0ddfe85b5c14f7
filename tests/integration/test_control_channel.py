"""The control socket on a real reactor and a real unix socket, with a spool path far longer
than a unix socket address may be (finding 3 of issue 11: `control.sock` could not be made,
and the admin tool said no daemon was running). The admin side is blocking, so it runs in a
thread while the reactor serves.
"""
# trial's methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from smarthost.app import control
from smarthost.core.envelope import Envelope, QueueEntry, QueueId, Recipient
from smarthost.core.maillog import MailLog
from smarthost.delivery.scheduler import Scheduler
from smarthost.queue.spool import Spool

SUN_PATH_MAX = 108


class CountingScheduler:
    def __init__(self) -> None:
        self.flushes = 0
        self.forgotten: list[QueueId] = []

    def flush(self) -> int:
        self.flushes += 1
        return 3

    def forget(self, queue_id: QueueId) -> None:
        self.forgotten.append(queue_id)

    def enqueue(self, entry: QueueEntry) -> None:
        pass


def long_spool(base: Path) -> Path:
    return base / ("s" * 60) / ("p" * 60) / "spool"


class LongSpoolPathTests(TestCase):
    timeout = 30

    def scratch(self) -> Path:
        """Not self.mktemp(): under pytest that writes into the working directory."""
        directory = Path(tempfile.mkdtemp()).resolve()
        self.addCleanup(shutil.rmtree, directory, True)
        return directory

    async def start(self) -> tuple[Spool, CountingScheduler, IListeningPort]:
        directory = long_spool(self.scratch())
        assert len(str(directory / control.SOCKET_NAME)) > SUN_PATH_MAX
        clock = Clock()
        clock.advance(1_700_000_000)
        spool, _ = Spool.open(directory, clock=clock, run_blocking=maybeDeferred)
        self.addCleanup(spool.close)
        scheduler = CountingScheduler()
        commands = control.ControlCommands(spool, cast(Scheduler, scheduler), MailLog(reactor))
        port = await control.listen_control(reactor, spool.directory, commands)
        return spool, scheduler, port

    async def test_flush_and_delete_over_a_long_path(self) -> None:
        spool, scheduler, port = await self.start()
        message = spool.receive()
        message.write(b"Subject: hi\r\n\r\nhello\r\n")
        entry = await message.commit(Envelope("a@example.test", (Recipient("b@example.net"),)))
        assert (os.stat(Path(spool.directory) / control.SOCKET_NAME).st_mode & 0o777) == 0o600

        def admin() -> tuple[dict[str, Any], dict[str, list[str]]]:
            client = control.ControlClient.connect(spool.directory)
            assert client is not None, "no daemon found"
            with client:
                return client.call(control.Flush), client.each_chunk(
                    control.Delete, [str(entry.queue_id)]
                )

        flushed, deleted = await deferToThread(admin)
        assert flushed == {"count": 3} and scheduler.flushes == 1
        assert deleted[control.DONE] == [str(entry.queue_id)]
        assert spool.queue_ids() == []
        stopped = port.stopListening()
        assert stopped is not None
        await stopped
        # Gone with the daemon: the socket file, and so the answer "no daemon".
        assert not (Path(spool.directory) / control.SOCKET_NAME).exists()
        assert await deferToThread(control.ControlClient.connect, spool.directory) is None

    async def test_a_stale_socket_means_no_daemon(self) -> None:
        directory = long_spool(self.scratch())
        directory.mkdir(parents=True)
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
        try:
            stale = socket.socket(socket.AF_UNIX)
            stale.bind(f"/proc/self/fd/{fd}/{control.SOCKET_NAME}")  # bound, never listening
            stale.close()
        finally:
            os.close(fd)
        assert (directory / control.SOCKET_NAME).exists()
        assert await deferToThread(control.ControlClient.connect, str(directory)) is None

    async def test_no_spool_directory_fails_saying_why(self) -> None:
        missing = self.scratch() / "nowhere"
        commands = control.ControlCommands(
            cast(Spool, None), cast(Scheduler, CountingScheduler()), MailLog(reactor)
        )
        try:
            await control.listen_control(reactor, str(missing), commands)
        except control.ControlError as e:
            assert str(e) == os.strerror(errno.ENOENT)  # services.py names the socket and key
        else:
            raise AssertionError("listened without a spool directory")

    async def test_a_bind_failure_says_why_without_the_proc_path(self) -> None:
        directory = self.scratch()
        (directory / control.SOCKET_NAME).mkdir()  # in the way
        commands = control.ControlCommands(
            cast(Spool, None), cast(Scheduler, CountingScheduler()), MailLog(reactor)
        )
        try:
            await control.listen_control(reactor, str(directory), commands)
        except control.ControlError as e:
            assert str(e) == os.strerror(errno.EADDRINUSE)
        else:
            raise AssertionError("listened where a directory is in the way")
