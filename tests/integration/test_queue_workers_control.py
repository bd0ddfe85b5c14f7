"""`smarthost queue` with `[server] workers = 2` against a real control socket: worker 1
runs (its control channel served on the real reactor, over a spool path longer than a
socket address may be), worker 2 does not. Each change goes to the worker whose spool
holds the message, or straight to the spool of the one not running. The admin tool is
blocking, so it runs in a thread while the reactor serves."""
# trial's methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import cast

import attrs
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from smarthost.app import admin, control
from smarthost.core.envelope import Envelope, QueueEntry, QueueId, Recipient
from smarthost.core.maillog import MailLog
from smarthost.delivery.scheduler import Scheduler
from smarthost.queue.spool import Spool


class HoldingScheduler:
    """What the control commands ask of worker 1's scheduler; hold writes the spool as the
    real one does when no attempt is in flight."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self.flushes = 0

    def flush(self) -> int:
        self.flushes += 1
        return 2

    def forget(self, queue_id: QueueId) -> None:
        pass

    async def hold(self, queue_id: QueueId) -> bool:
        entry = self._spool.load(queue_id)
        await self._spool.update(
            attrs.evolve(entry, envelope=attrs.evolve(entry.envelope, held=True)))
        return True


def queue(spool: Spool, sender: str) -> QueueEntry:
    message = spool.receive()
    message.write(b"Subject: hi\r\n\r\nhello\r\n")
    done: list[QueueEntry] = []
    message.commit(Envelope(sender, (Recipient("b@example.net"),))).addCallback(done.append)
    return done[0]


def admin_tool(config: Path, *args: str) -> tuple[int, list[str]]:
    """In a thread: `smarthost queue --config CONFIG ARGS`, its exit code and output lines."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = admin.main(["queue", "--config", str(config), *args])
    return code, out.getvalue().splitlines()


class QueueOverWorkersTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        base = Path(tempfile.mkdtemp()).resolve()
        self.addCleanup(shutil.rmtree, base, True)
        self.root = base / ("s" * 60) / ("p" * 40) / "spool"
        self.config = base / "smarthost.toml"
        self.config.write_text(f'[server]\nworkers = 2\n[queue]\ndirectory = "{self.root}"\n')

    async def test_each_change_goes_where_the_message_is(self) -> None:
        # Worker 2 is not running: its spool holds one message, and nobody has its lock.
        offline, _ = Spool.open(self.root / "worker-2", clock=reactor, run_blocking=maybeDeferred)
        other = queue(offline, "c@example.test")
        offline.close()
        # Worker 1 runs: it holds its spool's lock and serves control.sock.
        clock = Clock()
        clock.advance(1_700_000_000)
        spool, _ = Spool.open(self.root / "worker-1", clock=clock, run_blocking=maybeDeferred)
        self.addCleanup(spool.close)
        mine = [queue(spool, "a@example.test"), queue(spool, "b@example.test")]
        scheduler = HoldingScheduler(spool)
        commands = control.ControlCommands(spool, cast(Scheduler, scheduler), MailLog(reactor))
        port = await control.listen_control(reactor, spool.directory, commands)
        self.addCleanup(port.stopListening)

        code, lines = await deferToThread(admin_tool, self.config, "list", "--json")
        self.assertEqual(code, 0)
        self.assertEqual([m["id"] for m in json.loads("\n".join(lines))],
                         sorted(str(e.queue_id) for e in [*mine, other]))

        code, lines = await deferToThread(admin_tool, self.config, "hold",
                                          str(mine[0].queue_id), str(other.queue_id))
        self.assertEqual((code, lines), (0, ["held 1", f"held {other.queue_id}"]))
        self.assertTrue(spool.load(mine[0].queue_id).envelope.held)

        code, lines = await deferToThread(admin_tool, self.config, "flush")
        self.assertEqual(code, 0)
        self.assertEqual(lines[0], "flushed: 2 messages will be retried now")
        self.assertEqual(lines[1:], [f"no daemon is running on {self.root / 'worker-2'}; its "
                                     "messages are retried when it starts"])
        self.assertEqual(scheduler.flushes, 1)

        code, lines = await deferToThread(admin_tool, self.config, "delete", "--all")
        self.assertEqual((code, lines), (0, ["deleted 2", f"deleted {other.queue_id}"]))
        self.assertEqual(spool.queue_ids(), [])
        code, lines = await deferToThread(admin_tool, self.config, "list")
        self.assertEqual(lines, ["-- 0 messages in queue"])
