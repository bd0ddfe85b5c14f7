"""The control channel, both ends joined in memory: the admin tool's blocking AMP client
feeds the daemon's AMP server directly (no socket, no reactor), over a real spool.

Finding 5 of issue 11: 200 ids failed (`line too long`) with the old line protocol.
"""

# StringTransport's methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import attrs
import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp

from smarthost.app import control
from smarthost.core.envelope import Envelope, QueueEntry, QueueId, Recipient
from smarthost.core.maillog import MailLog
from smarthost.delivery.scheduler import Scheduler
from smarthost.queue.spool import Spool


def with_held(entry: QueueEntry, held: bool) -> QueueEntry:
    return attrs.evolve(entry, envelope=attrs.evolve(entry.envelope, held=held))


class FakeScheduler:
    """What the control commands tell the scheduler; hold and release write the spool as the
    real one does when no attempt is in flight (test_hold_in_flight covers the rest)."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self.forgotten: list[QueueId] = []
        self.held: list[QueueId] = []
        self.enqueued: list[QueueEntry] = []
        self.flushes = 0

    def forget(self, queue_id: QueueId) -> None:
        self.forgotten.append(queue_id)

    async def hold(self, queue_id: QueueId) -> bool:
        entry = self._spool.load(queue_id)
        if entry.envelope.held:
            return False
        self.held.append(queue_id)
        await self._spool.update(with_held(entry, True))
        return True

    async def release(self, queue_id: QueueId) -> bool:
        entry = self._spool.load(queue_id)
        if not entry.envelope.held:
            return False
        entry = with_held(entry, False)
        await self._spool.update(entry)
        self.enqueue(entry)
        return True

    def enqueue(self, entry: QueueEntry) -> None:
        self.enqueued.append(entry)

    def flush(self) -> int:
        self.flushes += 1
        return 7


class Wire:
    """A socket for :class:`control.ControlClient` whose other end is the daemon's AMP
    protocol: what the client sends is fed to the server, what the server writes is read."""

    def __init__(self, server: amp.AMP) -> None:
        self._server = server
        self._out = StringTransport()
        server.makeConnection(self._out)
        self.calls = 0
        self.largest = 0

    def sendall(self, data: bytes) -> None:
        self.calls += 1
        self.largest = max(self.largest, len(data))
        self._server.dataReceived(data)

    def recv(self, size: int) -> bytes:
        data = self._out.value()[:size]
        self._out.clear()
        return bytes(data)

    def close(self) -> None:
        pass


@attrs.define
class Daemon:
    spool: Spool
    scheduler: FakeScheduler
    client: control.ControlClient
    wire: Wire


def make_spool(directory: Path) -> Spool:
    clock = Clock()
    clock.advance(1_700_000_000)
    spool, _ = Spool.open(directory, clock=clock, run_blocking=maybeDeferred)
    return spool


def queue(spool: Spool, count: int, sender: str = "a@example.test") -> list[QueueId]:
    ids = []
    for _ in range(count):
        message = spool.receive()
        message.write(b"Subject: hi\r\n\r\nhello\r\n")
        done: list[QueueEntry] = []
        message.commit(Envelope(sender, (Recipient("b@example.net"),))).addCallback(done.append)
        ids.append(done[0].queue_id)
    return ids


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    spool = make_spool(tmp_path / "spool")
    scheduler = FakeScheduler(spool)
    commands = control.ControlCommands(spool, cast(Scheduler, scheduler), MailLog(Clock()))
    wire = Wire(control.ControlFactory(commands).buildProtocol(None))
    client = control.ControlClient(cast(Any, wire))
    return Daemon(spool, scheduler, client, wire)


def test_delete_200_ids_in_one_command(daemon: Daemon) -> None:
    ids = queue(daemon.spool, 200)
    answer = daemon.client.each_chunk(control.Delete, [str(i) for i in ids])
    assert sorted(answer[control.DONE]) == sorted(str(i) for i in ids)
    assert answer[control.MISSING] == [] and daemon.spool.queue_ids() == []
    assert sorted(daemon.scheduler.forgotten, key=str) == sorted(ids, key=str)


def test_5000_ids_go_in_chunks_under_the_amp_value_limit(daemon: Daemon) -> None:
    kept = queue(daemon.spool, 3)
    ids = [f"{n:016X}" for n in range(5000)]  # well-formed, not queued
    answer = daemon.client.each_chunk(control.Hold, ids)
    assert len(answer[control.MISSING]) == 5000 and answer[control.DONE] == []
    assert daemon.wire.calls == 5 and daemon.wire.largest < amp.MAX_VALUE_LENGTH
    answer = daemon.client.each_chunk(control.Delete, [*ids, *map(str, kept)])
    assert sorted(answer[control.DONE]) == sorted(map(str, kept))


def test_hold_then_release_one_message(daemon: Daemon) -> None:
    held, other = queue(daemon.spool, 2)
    answer = daemon.client.each_chunk(control.Hold, [str(held)])
    assert answer == {control.DONE: [str(held)], control.UNCHANGED: [], control.MISSING: []}
    assert daemon.spool.load(held).envelope.held and not daemon.spool.load(other).envelope.held
    assert daemon.scheduler.held == [held] and daemon.scheduler.forgotten == []
    assert daemon.client.each_chunk(control.Hold, [str(held)])[control.UNCHANGED] == [str(held)]

    assert daemon.client.each_chunk(control.ReleaseIds, [str(other)])[control.UNCHANGED] == [
        str(other)
    ]
    answer = daemon.client.each_chunk(control.ReleaseIds, [str(held)])
    assert answer[control.DONE] == [str(held)]
    assert not daemon.spool.load(held).envelope.held
    [again] = daemon.scheduler.enqueued
    assert again.queue_id == held and not again.envelope.held


def test_a_malformed_id_refuses_the_whole_call(daemon: Daemon) -> None:
    [queued] = queue(daemon.spool, 1)
    with pytest.raises(control.ControlError):
        daemon.client.call(control.Delete, ids=[str(queued), "../../etc/passwd"])
    assert daemon.spool.queue_ids() == [queued]


def test_unknown_commands_are_refused(daemon: Daemon) -> None:
    class Shell(amp.Command):
        arguments = [(b"line", amp.Unicode())]

    with pytest.raises(control.ControlError, match="Unhandled"):
        daemon.client.call(Shell, line="rm -rf /")


def test_flush_and_release_user(daemon: Daemon) -> None:
    assert daemon.client.call(control.Flush) == {"count": 7}
    [queued] = queue(daemon.spool, 1)
    entry = daemon.spool.load(queued)
    daemon.spool.update(attrs.evolve(entry, envelope=attrs.evolve(
        entry.envelope, held=True, client_address="192.0.2.9")))
    [other] = queue(daemon.spool, 1)  # held, for someone else
    daemon.spool.update(with_held(daemon.spool.load(other), True))
    assert daemon.client.call(control.Release, user="192.0.2.9") == {"count": 1}
    assert [e.queue_id for e in daemon.scheduler.enqueued] == [queued]
