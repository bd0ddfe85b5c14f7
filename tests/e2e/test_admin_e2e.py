"""The admin half of issue 11 through real processes: ``smarthost queue`` against a running
``twistd -n smarthost`` over the AMP control socket (200 and 5,000 ids; hold and release
reaching the daemon's scheduler; a spool path longer than a unix socket address), and
``smarthost run`` starting the daemon with no twistd on the PATH.

The messages are written into the spool before the daemon starts (5,000 through SMTP would
take longer than the rest of the module); every delivery goes to a closed port on loopback,
so each attempt is deferred and logged, and nothing leaves the machine.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from daemon import SMARTHOST, Daemon
from smarthost.core.envelope import Envelope, Recipient
from smarthost.core.types import RunBlocking
from smarthost.queue.spool import Spool

pytestmark = pytest.mark.timeout(180)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def routed_nowhere() -> str:
    return (f'[delivery.routes]\n"*" = "smtp:127.0.0.1:{closed_port()}"\n'
            "[queue]\nretry = [3600]\n")


def fill(spool_dir: Path, count: int, *, held: bool, sender: str = "a@example.test"
         ) -> list[str]:
    """Queue ``count`` messages directly in the spool, in batches of one fsync each."""
    jobs: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def later(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        jobs.append((d, f, args))
        return d

    clock = Clock()
    clock.advance(time.time())
    spool, _ = Spool.open(spool_dir, clock=clock, run_blocking=cast(RunBlocking, later))
    ids: list[str] = []
    # Received now: an older message would expire at its first attempt.
    envelope = Envelope(sender, (Recipient("b@example.net"),), held=held,
                        received_at=time.time())
    for _ in range(count):
        message = spool.receive()
        message.write(b"Subject: hi\r\n\r\nhello\r\n")
        message.commit(envelope).addCallback(lambda e: ids.append(str(e.queue_id)))
    while jobs:
        d, f, args = jobs.pop(0)
        d.callback(f(*args))
    spool.close()
    assert len(ids) == count
    return ids


def queue(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return d.admin("queue", "--config", str(d.config_path), *args)


REMOVED = re.compile(r": removed \(deleted by the operator\)")


def delete(d: Daemon, *args: str, count: int) -> subprocess.CompletedProcess[str]:
    """``queue delete`` while reading the daemon's log (``count`` removals): the harness reads
    it only when asked, and 5,000 log lines would fill the pipe and stall the daemon."""
    seen = sum(1 for line in d.log if REMOVED.search(line))
    proc = subprocess.Popen([SMARTHOST, "queue", "--config", str(d.config_path), "delete", *args],
                            cwd=d.directory, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        d.wait_for(REMOVED, timeout=120, count=seen + count)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@attrs.frozen
class World:
    daemon: Daemon
    held: list[str]  # 5,200 messages held from the start: never attempted
    active: list[str]  # 2 messages the daemon tries (and defers) at once


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d = Daemon(tmp_path_factory.mktemp("admin"), routed_nowhere())
    spool = d.directory / "var/spool"
    held = fill(spool, 5200, held=True)
    active = fill(spool, 2, held=False)
    try:
        d.start()
        yield World(d, held, active)
    finally:
        d.stop()


def attempts(d: Daemon, queue_id: str) -> int:
    pattern = re.compile(re.escape(queue_id) + r": to=.* result=deferred")
    return sum(1 for line in d.log if pattern.search(line))


def test_delete_200_ids_in_one_command(world: World) -> None:
    """Finding 5: `daemon: error: line too long`."""
    ids = world.held[:200]
    result = delete(world.daemon, *ids, count=200)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["deleted 200"]  # the daemon's log names each one


def test_delete_5000_ids_in_one_command(world: World) -> None:
    ids = world.held[200:]
    assert len(ids) == 5000
    result = delete(world.daemon, *ids, count=5000)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["deleted 5000"]
    listed = queue(world.daemon, "list", "--status", "held")
    assert listed.stdout.splitlines() == ["-- 0 of 2 messages match"], listed.stdout


def test_hold_keeps_the_scheduler_off_until_release(world: World) -> None:
    daemon = world.daemon
    kept, other = world.active
    daemon.wait_for(re.compile(re.escape(kept) + r": to=.* result=deferred"))
    daemon.wait_for(re.compile(re.escape(other) + r": to=.* result=deferred"))
    held = queue(daemon, "hold", kept)
    assert held.returncode == 0 and held.stdout.split() == ["held", "1"], held.stderr
    assert queue(daemon, "list", "--status", "held").stdout.split()[0] == kept
    before, others = attempts(daemon, kept), attempts(daemon, other)
    flushed = queue(daemon, "flush")
    assert flushed.returncode == 0, flushed.stderr
    # The flush retried the other message; the held one stayed out of the schedule.
    daemon.wait_for(re.compile(re.escape(other) + r": to=.* result=deferred"), count=others + 1)
    assert attempts(daemon, kept) == before
    released = queue(daemon, "release", kept)
    assert released.returncode == 0 and released.stdout.split() == ["released", "1"]
    daemon.wait_for(re.compile(re.escape(kept) + r": to=.* result=deferred"), count=before + 1)


def test_queue_ids_are_validated_before_they_reach_the_daemon(world: World) -> None:
    result = queue(world.daemon, "hold", "../../etc/passwd")
    assert result.returncode == 2 and "not a queue id" in result.stderr


def test_delete_by_sender_through_the_daemon(world: World) -> None:
    result = delete(world.daemon, "--sender", "A@example.test", count=2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["deleted 2"]
    assert queue(world.daemon, "list").stdout.splitlines() == ["-- 0 messages in queue"]


def test_flush_and_delete_on_a_spool_path_longer_than_a_socket_address(
    tmp_path: Path,
) -> None:
    """Finding 3: the daemon could not make control.sock, and the admin tool then said that
    no daemon was running."""
    d = Daemon(tmp_path, routed_nowhere() + f'directory = "{"s" * 60}/{"p" * 60}/spool"\n')
    spool = tmp_path / ("s" * 60) / ("p" * 60) / "spool"
    assert len(str(spool / "control.sock")) > 108
    [queued] = fill(spool, 1, held=True)
    try:
        d.start()
        flushed = queue(d, "flush")
        assert flushed.returncode == 0 and "flushed" in flushed.stdout, flushed.stdout
        deleted = delete(d, queued, count=1)
        assert deleted.stdout.split() == ["deleted", "1"], deleted.stdout + deleted.stderr
    finally:
        d.stop()


class RunDaemon(Daemon):
    """The daemon started by ``smarthost run`` with a PATH that has no twistd on it."""

    def start(self, timeout: float = 30.0) -> RunDaemon:
        bin_dir = str(Path(SMARTHOST).parent)
        path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                               if p and os.path.realpath(p) != os.path.realpath(bin_dir))
        self.proc = subprocess.Popen(
            [SMARTHOST, "run", "--config", str(self.config_path), "--pidfile=", "--logfile=-"],
            cwd=self.directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": path or "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
        )
        self.wait_for("ready", timeout)
        return self


def test_smarthost_run_starts_the_daemon_without_twistd_on_the_path(tmp_path: Path) -> None:
    """Finding 10: pipx installs had no way to start the daemon."""
    d = RunDaemon(tmp_path)
    try:
        d.start()
        assert set(d.ports) == {"submission", "submissions", "smtp"}
        with socket.create_connection(("127.0.0.1", d.ports["smtp"]), timeout=10) as s:
            assert s.recv(100).startswith(b"220 ")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(15) == -signal.SIGTERM  # as twistd: it re-raises the signal
    finally:
        d.stop()
