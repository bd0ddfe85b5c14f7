"""How the master runs one worker process: its command line and environment
(:class:`WorkerCommand`), and what it hears from it (:class:`WorkerProtocol`): log lines on
its standard output and error, sd_notify fields on a pipe of their own, and its end.

The worker is :mod:`smarthost.app.worker` run by the same interpreter; what the master
decided (the sockets, N, the spool root) travels in the environment
(:mod:`smarthost.app.workerconfig`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from smarthost.app.notify import NOTIFY_FD_VARIABLE
from smarthost.app.worker import CPU_VARIABLE
from smarthost.app.workerconfig import SPEC_VARIABLE, WorkerSpec, listen_environment
from smarthost.app.workerlog import LineRelay, Sink

LOG_BATCH = 0.05  # seconds between two reads of a worker's log pipe (WorkerProtocol._pause)
PIPE_SIZE = 1 << 20  # bytes: a worker's log pipe
_SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")


class Reports(Protocol):
    """Where a worker's notifications and end go (the master's Supervisor)."""

    def notified(self, index: int, field: str) -> None: ...

    def ended(self, index: int, how: str) -> None: ...


def describe_end(reason: Failure) -> str:
    """How a worker ended, for the log: its exit status or the signal that killed it."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = str(value.signal)
            return f"was killed by signal {value.signal} ({name})"
        return f"exited with status {value.exitCode}"
    return f"ended: {reason.getErrorMessage()}"


class WorkerProtocol(ProcessProtocol):
    """One worker process: its log lines (standard output and error) and its sd_notify pipe
    to the master, and its end."""

    def __init__(self, index: int, supervisor: Reports, sink: Sink, notify_fd: int,
                 clock: Any) -> None:
        self._index = index
        self._supervisor = supervisor
        self._notify_fd = notify_fd
        self._clock = clock
        self._relays = {1: LineRelay(index, sink), 2: LineRelay(index, sink, raw=True)}
        self._notes = b""

    def connectionMade(self) -> None:
        # Room for LOG_BATCH seconds of lines at any rate: a worker whose log pipe is full
        # would block in its next write (1 MiB is Linux's default pipe-max-size).
        for fd in self._relays:
            pipe = getattr(self.transport, "pipes", {}).get(fd)
            if pipe is not None:
                with contextlib.suppress(OSError, AttributeError):
                    fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        relay = self._relays.get(childFD)
        if relay is not None:
            relay.feed(data)
            self._take_waiting(childFD)
            self._pause(childFD)
        elif childFD == self._notify_fd:
            *fields, self._notes = (self._notes + data).split(b"\n")
            for field in fields:
                self._supervisor.notified(self._index, field.decode("utf-8", "replace"))

    def _pause(self, fd: int) -> None:
        """Leave the log pipe for :data:`LOG_BATCH` seconds after a read: what the worker
        writes meanwhile waits in the pipe (64 KiB, hundreds of lines) and is read, and
        written into the log, in one go. Reading as each line came woke the master for every
        message, which cost it a twentieth of the server's CPU (bench/run --workers 2)."""
        pipe = getattr(self.transport, "pipes", {}).get(fd)
        if pipe is not None:
            pipe.stopReading()
            self._clock.callLater(LOG_BATCH, self._resume, pipe)

    def _take_waiting(self, fd: int) -> None:
        """Read all the pipe holds now, not just what Twisted reads per wakeup (8 KiB): at
        one 8 KiB read per :data:`LOG_BATCH` the master took 160 KB/s from a worker, less
        than two workers log while accepting and delivering ~1,000 msg/s, and each worker
        then waited in its log writes (it drained ~500 msg/s, its CPU idle)."""
        pipe = getattr(self.transport, "pipes", {}).get(fd)
        if pipe is None:
            return
        while True:
            try:
                chunk = os.read(pipe.fileno(), PIPE_SIZE)
            except OSError:  # EAGAIN: nothing more now (or closed: doRead sees to that)
                return
            if not chunk:
                return  # the end: the next doRead sees it and closes the pipe
            self._relays[fd].feed(chunk)

    def _resume(self, pipe: Any) -> None:
        if pipe.connected and not pipe.disconnecting:  # not closed meanwhile
            pipe.startReading()

    def processEnded(self, reason: Failure) -> None:
        for relay in self._relays.values():
            relay.flush()
        self._supervisor.ended(self._index, describe_end(reason))


@attrs.frozen
class WorkerCommand:
    """How the master starts worker i: the command line and the environment around the
    inherited descriptors."""

    config_path: str | None  # the master's --config, absolute
    auth: Sequence[str]  # the master's --auth options, passed on
    directory: Path  # the master's [queue] directory
    count: int
    cpus: tuple[int, ...] = ()  # [server] cpu_affinity: worker i runs on cpus[(i-1) % len]

    def argv(self, index: int) -> list[str]:
        args = [sys.executable, "-m", "smarthost.app.worker"]
        if self.config_path is not None:
            args += ["--config", self.config_path]
        for description in self.auth:
            args += ["--auth", description]
        return [*args, "--worker", str(index)]

    def environment(self, index: int, listen: Mapping[str, tuple[str, ...]], names: list[str],
                    notify_fd: int, environ: Mapping[str, str],
                    orphans: Sequence[Path] = ()) -> dict[str, str]:
        spec = WorkerSpec(index=index, workers=self.count, directory=self.directory,
                          listen=listen, orphans=tuple(orphans))
        env = {k: v for k, v in environ.items() if k not in _SYSTEMD_VARIABLES}
        env.update(listen_environment(len(names), names))
        env[NOTIFY_FD_VARIABLE] = str(notify_fd)
        env[SPEC_VARIABLE] = spec.to_environment()
        env.pop(CPU_VARIABLE, None)
        if self.cpus:
            env[CPU_VARIABLE] = str(self.cpus[(index - 1) % len(self.cpus)])
        return env


def usable_cpus() -> tuple[int, ...]:
    """The CPUs the master may run on (a cpuset or ``taskset`` narrows them), in order: what
    ``[server] cpu_affinity`` deals out to the workers."""
    return tuple(sorted(os.sched_getaffinity(0)))
