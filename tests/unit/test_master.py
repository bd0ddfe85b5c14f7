"""The master of worker processes without processes: the restart schedule, all-or-nothing
start, signals and stop in virtual time (task.Clock), the configuration a worker derives,
the line relay of worker logs and the sd_notify pipe. tests/e2e/test_workers_e2e.py runs the
real processes."""

from __future__ import annotations

import io
import os
import signal
import socket
from pathlib import Path

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, formatTime
from twisted.python.failure import Failure

from smarthost.app import master, workerconfig, workerproc
from smarthost.app.config import Config, ConfigError, parse_config
from smarthost.app.master import STABLE_AFTER, STOP_TIMEOUT, Supervisor, restart_delay
from smarthost.app.notify import NOTIFY_FD_VARIABLE, SystemdNotify
from smarthost.app.services import ACCEPT_PAUSE, share_accepts
from smarthost.app.textlog import BatchedLogFile
from smarthost.app.worker import CPU_VARIABLE
from smarthost.app.workerconfig import WorkerSpec, WorkerSpecError
from smarthost.app.workerlog import FileSink, LineRelay, PublisherSink, worker_observer
from smarthost.core.maillog import MailLog


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.signals: list[int] = []

    def signalProcess(self, signal: str | int) -> None:
        assert isinstance(signal, int)
        self.signals.append(signal)


class FakeStartup:
    def __init__(self) -> None:
        self.ready = False
        self.failed = False
        self.done_steps: list[str] = []
        self.failures: list[tuple[str, str]] = []

    def done(self, step: str) -> None:
        self.done_steps.append(step)
        self.ready = True

    def fail(self, key: str, problem: str) -> None:
        self.failed = True
        self.failures.append((key, problem))


class Notes(SystemdNotify):
    def __init__(self) -> None:
        super().__init__(None, lambda text: None)
        self.sent: list[str] = []

    def send(self, *fields: str) -> None:
        self.sent.append(fields[0])


class World:
    def __init__(self, count: int = 2) -> None:
        self.clock = Clock()
        self.launched: list[tuple[float, int, FakeProcess]] = []
        self.startup = FakeStartup()
        self.notify = Notes()
        self.supervisor = Supervisor(self.clock, count, self.launch, MailLog(self.clock),
                                     self.startup, self.notify)

    def launch(self, index: int) -> FakeProcess:
        process = FakeProcess(1000 + len(self.launched))
        self.launched.append((self.clock.seconds(), index, process))
        return process

    def start_all_ready(self) -> None:
        self.supervisor.start()
        for slot in self.supervisor.slots:
            self.supervisor.notified(slot.index, "READY=1")

    def process(self, index: int) -> FakeProcess:
        return [p for _, i, p in self.launched if i == index][-1]


def test_the_restart_delay_doubles_from_half_a_second_to_thirty() -> None:
    assert [restart_delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_ready_only_when_every_worker_is() -> None:
    world = World(3)
    world.supervisor.start()
    assert [i for _, i, _ in world.launched] == [1, 2, 3]
    for index in (3, 1):
        world.supervisor.notified(index, "READY=1")
    assert world.startup.done_steps == []
    world.supervisor.notified(2, "READY=1")
    assert world.startup.done_steps == [master.WORKERS]


def test_a_worker_that_ends_before_the_start_is_over_fails_it_with_its_cause() -> None:
    world = World()
    world.supervisor.start()
    world.supervisor.notified(1, "READY=1")
    world.supervisor.notified(2, "STATUS=cannot start: tls.key: cannot read key.pem")
    world.supervisor.ended(2, "exited with status 1")
    assert world.startup.failures == [("worker-2", "tls.key: cannot read key.pem")]
    world.clock.advance(60)
    assert len(world.launched) == 2  # no restart: the master stops


def test_without_a_status_the_exit_is_the_cause() -> None:
    world = World()
    world.supervisor.start()
    world.supervisor.ended(1, "was killed by signal 9 (SIGKILL)")
    assert world.startup.failures == [("worker-1", "worker was killed by signal 9 (SIGKILL)")]


def test_a_dead_worker_is_restarted_with_a_growing_delay_then_at_once_when_it_ran() -> None:
    world = World()
    world.start_all_ready()
    restarts: list[float] = []
    for _ in range(4):  # dies at once after each start
        world.supervisor.ended(2, "was killed by signal 9 (SIGKILL)")
        [restart] = world.clock.getDelayedCalls()
        restarts.append(restart.getTime() - world.clock.seconds())
        world.clock.advance(restarts[-1])
        assert world.launched[-1][1] == 2
    assert restarts == [0.5, 1, 2, 4]
    world.supervisor.notified(2, "READY=1")  # the fifth start comes up and stays up
    world.clock.advance(STABLE_AFTER)
    world.supervisor.ended(2, "exited with status 70")
    [restart] = world.clock.getDelayedCalls()
    assert restart.getTime() - world.clock.seconds() == 0.5
    world.clock.advance(0.5)
    assert [i for _, i, _ in world.launched] == [1, 2, 2, 2, 2, 2, 2]


def test_worker_one_keeps_running_while_two_is_restarted() -> None:
    world = World()
    world.start_all_ready()
    world.supervisor.ended(2, "exited with status 1")
    assert world.supervisor.serving() == [1]
    world.clock.advance(0.5)
    world.supervisor.notified(2, "READY=1")
    assert world.supervisor.serving() == [1, 2]


def test_stop_sends_sigterm_and_waits_for_every_worker() -> None:
    world = World()
    world.start_all_ready()
    world.supervisor.ended(1, "exited with status 1")  # a restart is pending
    stopped = world.supervisor.stop()
    assert world.process(2).signals == [signal.SIGTERM]
    assert not stopped.called
    world.clock.advance(restart_delay(1))
    assert len(world.launched) == 2  # no restart during a stop
    world.supervisor.ended(2, "exited with status 0")
    assert stopped.called


def test_a_worker_that_does_not_stop_gets_sigkill() -> None:
    world = World()
    world.start_all_ready()
    stopped = world.supervisor.stop()
    world.supervisor.ended(1, "exited with status 0")
    world.clock.advance(STOP_TIMEOUT)
    assert world.process(2).signals == [signal.SIGTERM, signal.SIGKILL]
    world.supervisor.ended(2, "was killed by signal 9 (SIGKILL)")
    assert stopped.called


def test_reload_is_ready_once_every_worker_reloaded() -> None:
    world = World()
    world.start_all_ready()
    world.supervisor.reload()
    assert [world.process(i).signals for i in (1, 2)] == [[signal.SIGHUP]] * 2
    assert world.notify.sent == ["RELOADING=1"]
    world.supervisor.notified(1, "RELOADING=1")
    world.supervisor.notified(1, "READY=1")
    assert world.notify.sent == ["RELOADING=1"]
    world.supervisor.ended(2, "was killed by signal 9 (SIGKILL)")  # gone: not waited for
    assert world.notify.sent == ["RELOADING=1", "READY=1"]


def test_signals_go_to_running_workers_only() -> None:
    world = World()
    world.start_all_ready()
    world.supervisor.ended(1, "exited with status 1")
    world.supervisor.send(signal.SIGUSR1)
    assert world.process(1).signals == []
    assert world.process(2).signals == [signal.SIGUSR1]


def test_how_a_worker_ended() -> None:
    done = Failure(ProcessDone(0))
    killed = Failure(ProcessTerminated(None, signal.SIGKILL, None))
    failed = Failure(ProcessTerminated(3, None, None))
    assert workerproc.describe_end(done) == "exited with status 0"
    assert workerproc.describe_end(killed) == "was killed by signal 9 (SIGKILL)"
    assert workerproc.describe_end(failed) == "exited with status 3"


# -- the worker's configuration ------------------------------------------------------------


def config(tmp_path: Path, extra: str = "") -> Config:
    return parse_config(
        '[server]\nworkers = 3\n[queue]\ndirectory = "spool"\n[limits]\nconnections = 1000\n'
        '[listen]\nsubmission = ["tcp:587"]\nsubmissions = ["haproxy:tcp:465"]\n'
        'smtp = ["tcp:25", "unix:/run/smtp.sock"]\n' + extra,
        tmp_path,
    )


def spec(tmp_path: Path) -> WorkerSpec:
    return WorkerSpec(index=2, workers=3, directory=tmp_path / "spool", listen={
        "submission": ("systemd:domain=INET:index=0",),
        "submissions": ("haproxy:systemd:domain=INET6:index=1",),
        "smtp": ("systemd:domain=INET:index=2", "systemd:domain=UNIX:index=3"),
    })


def test_listeners_become_the_inherited_sockets() -> None:
    assert (workerconfig.adopted_description("tcp:25", socket.AF_INET, 2)
            == "systemd:domain=INET:index=2")
    assert (workerconfig.adopted_description("haproxy:tcp6:465", socket.AF_INET6, 0)
            == "haproxy:systemd:domain=INET6:index=0")
    assert (workerconfig.adopted_description("unix:/run/s.sock", socket.AF_UNIX, 1)
            == "systemd:domain=UNIX:index=1")


def test_a_worker_runs_with_its_spool_its_sockets_and_its_share(tmp_path: Path) -> None:
    derived = workerconfig.worker_config(config(tmp_path), spec(tmp_path))
    assert derived.queue.directory == tmp_path / "spool" / "worker-2"
    assert derived.listen.submissions == ("haproxy:systemd:domain=INET6:index=1",)
    assert derived.listen.smtp == ("systemd:domain=INET:index=2", "systemd:domain=UNIX:index=3")
    assert derived.server.workers == 1
    assert derived.http.listen == ()
    assert derived.limits.connections == 334  # ceil(1000 / 3)
    assert derived.limits.connections_per_ip == config(tmp_path).limits.connections_per_ip
    assert spec(tmp_path).http_socket(derived) == tmp_path / "spool" / "worker-2" / "http.sock"
    assert workerconfig.state_directory(derived, spec(tmp_path)) == tmp_path


def test_the_spec_travels_in_the_environment(tmp_path: Path) -> None:
    text = spec(tmp_path).to_environment()
    assert WorkerSpec.from_environment({workerconfig.SPEC_VARIABLE: text}) == spec(tmp_path)
    for bad in ({}, {workerconfig.SPEC_VARIABLE: "{"},
                {workerconfig.SPEC_VARIABLE: text.replace('"index": 2', '"index": 4')}):
        with pytest.raises(WorkerSpecError):
            WorkerSpec.from_environment(bad)


def test_share_never_rounds_to_zero() -> None:
    assert [workerconfig.share(c, 4) for c in (1, 4, 5, 1000)] == [1, 1, 2, 250]


def test_only_sockets_a_worker_can_adopt(tmp_path: Path) -> None:
    master.check_listeners(config(tmp_path))  # tcp, haproxy:tcp, unix: all adoptable
    with pytest.raises(ConfigError) as e:
        master.check_listeners(parse_config(
            '[listen]\nsubmissions = ["ssl:465:privateKey=k.pem"]\n', tmp_path))
    assert e.value.key == "listen.submissions[0]"


def test_the_worker_command_line_and_environment(tmp_path: Path) -> None:
    command = workerproc.WorkerCommand(config_path="/etc/smarthost.toml", auth=("file:/x",),
                                   directory=tmp_path, count=2)
    assert command.argv(2)[1:] == ["-m", "smarthost.app.worker", "--config",
                                   "/etc/smarthost.toml", "--auth", "file:/x", "--worker", "2"]
    env = command.environment(2, {"smtp": ("systemd:domain=INET:index=0",)}, ["listen.smtp[0]"],
                              4, {"NOTIFY_SOCKET": "/run/n", "LISTEN_PID": "1", "PATH": "/bin"})
    assert "NOTIFY_SOCKET" not in env and "LISTEN_PID" not in env
    assert env["LISTEN_FDS"] == "1" and env["LISTEN_FDNAMES"] == "listen.smtp[0]"
    assert env[NOTIFY_FD_VARIABLE] == "4" and env["PATH"] == "/bin"
    assert WorkerSpec.from_environment(env).index == 2
    assert CPU_VARIABLE not in env  # [server] cpu_affinity off


def test_cpu_affinity_deals_the_cpus_out_round_robin(tmp_path: Path) -> None:
    command = workerproc.WorkerCommand(config_path=None, auth=(), directory=tmp_path, count=3,
                                       cpus=(2, 5))
    inherited = {CPU_VARIABLE: "7"}  # a master that is itself a pinned worker's child
    assert [command.environment(i, {}, [], 4, inherited)[CPU_VARIABLE] for i in (1, 2, 3)] == [
        "2", "5", "2"]
    unpinned = workerproc.WorkerCommand(config_path=None, auth=(), directory=tmp_path, count=1)
    assert CPU_VARIABLE not in unpinned.environment(1, {}, [], 4, inherited)


# -- the worker's log and notifications ------------------------------------------------------


def test_worker_lines_are_re_emitted_under_the_worker_name() -> None:
    events: list[dict[str, object]] = []
    relay = LineRelay(2, PublisherSink(events.append, Clock(), "worker-2"))
    relay.feed(b"[smarthost#info] rea")
    assert events == []
    relay.feed(b"dy\n[smarthost.delivery#error] it broke\n\tTraceback\n[-] plain\n")
    assert [(e["log_system"], formatEvent(e)) for e in events] == [
        ("worker-2 smarthost#info", "ready"),
        ("worker-2 smarthost.delivery#error", "it broke"),
        ("worker-2 smarthost.delivery#error", "\tTraceback"),
        ("worker-2 -", "plain"),
    ]
    assert events[1]["log_level"] == LogLevel.error
    assert all(e["log_namespace"] == "worker-2" for e in events)  # never [log] events again


def test_standard_error_lines_are_warnings() -> None:
    events: list[dict[str, object]] = []
    relay = LineRelay(1, PublisherSink(events.append, Clock(), "worker-1"), raw=True)
    relay.feed(b"ModuleNotFoundError: x")
    relay.flush()
    assert [(e["log_system"], e["log_level"], formatEvent(e)) for e in events] == [
        ("worker-1 stderr", LogLevel.warn, "ModuleNotFoundError: x")]


def test_a_worker_notifies_its_master_through_a_pipe() -> None:
    read, write = os.pipe()
    try:
        notify = SystemdNotify.from_environment({NOTIFY_FD_VARIABLE: str(write)},
                                                lambda text: None)
        assert notify.enabled
        notify.reloading()
        notify.status("cannot start: x\ny")
        notify.ready()
        fields = os.read(read, 4096).decode().splitlines()
        assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=")
        assert fields[2:] == ["STATUS=cannot start: x y", "READY=1"]
    finally:
        os.close(read)
        os.close(write)


def test_lines_go_straight_into_the_masters_log_file_in_one_write() -> None:
    out = io.StringIO()
    clock = Clock()
    clock.advance(1_700_000_000)
    relay = LineRelay(1, FileSink(out, clock))
    relay.feed(b"[smarthost#info] Q1: accepted\n[smarthost#warn] slow\n")
    stamp = formatTime(clock.seconds())
    assert out.getvalue() == (f"{stamp} [worker-1 smarthost#info] Q1: accepted\n"
                              f"{stamp} [worker-1 smarthost#warn] slow\n")


def test_the_reads_of_one_iteration_go_into_twistds_log_file_in_one_write(
        tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    reactor.advance(1_700_000_000)
    reactor.running = True
    log_file = BatchedLogFile("master.log", str(tmp_path), reactor=reactor,
                              in_reactor_thread=lambda: True)
    sink = FileSink(log_file, reactor)
    LineRelay(1, sink).feed(b"[smarthost#info] Q1: accepted\n")
    LineRelay(2, sink).feed(b"[smarthost#info] Q2: accepted\n")
    assert (tmp_path / "master.log").read_text() == ""
    reactor.advance(0)
    stamp = formatTime(reactor.seconds())
    assert (tmp_path / "master.log").read_text() == (
        f"{stamp} [worker-1 smarthost#info] Q1: accepted\n"
        f"{stamp} [worker-2 smarthost#info] Q2: accepted\n")
    log_file.close()


class IterationReactor(Clock):
    running = True


def test_a_worker_writes_its_lines_once_per_reactor_iteration() -> None:
    out, reactor = io.StringIO(), IterationReactor()
    flushes: list[str] = []
    out.flush = lambda: flushes.append(out.getvalue())  # type: ignore[method-assign]
    observe = worker_observer(out, reactor, in_reactor_thread=lambda: True)
    for text in ("one", "two\nlines"):
        observe({"log_format": text, "log_namespace": "smarthost", "log_level": LogLevel.info})
    assert flushes == []
    reactor.advance(0)
    assert flushes == ["[smarthost#info] one\n[smarthost#info] two\n\tlines\n"]
    reactor.running = False  # stopped: the last lines go out at once
    observe({"log_format": "Server Shut Down.", "log_namespace": "x", "log_level": LogLevel.info})
    assert flushes[-1].endswith("[x#info] Server Shut Down.\n")


class FakePort:
    """What share_accepts uses of Twisted's tcp.Port: doRead accepts up to numberAccepts
    (here: whatever is waiting) and counts them in sessionno."""

    def __init__(self) -> None:
        self.numberAccepts = 100
        self.sessionno = 0
        self.waiting = 0
        self.connected = True
        self.disconnecting = False
        self.reading = True
        self.asked: list[int] = []

    def doRead(self) -> None:
        self.asked.append(self.numberAccepts)
        taken = min(self.waiting, self.numberAccepts)
        self.waiting -= taken
        self.sessionno += taken

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def test_a_worker_takes_one_connection_then_leaves_the_socket_to_the_others() -> None:
    port, clock = FakePort(), Clock()
    share_accepts(port, clock)  # type: ignore[arg-type]
    port.waiting = 20
    port.doRead()
    assert (port.asked, port.sessionno, port.reading) == ([1], 1, False)
    clock.advance(ACCEPT_PAUSE)
    assert port.reading
    port.waiting = 0
    port.doRead()  # another worker took it: no pause
    assert port.reading
    port.waiting = 1
    port.doRead()
    port.connected = False  # stopped listening meanwhile
    clock.advance(ACCEPT_PAUSE)
    assert not port.reading


class _Pipe:
    """The slice of Twisted's process reader WorkerProtocol uses, over a real pipe."""

    def __init__(self, fd: int) -> None:
        self.fd, self.reading = fd, True
        self.connected, self.disconnecting = True, False

    def fileno(self) -> int:
        return self.fd

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class _Process:
    def __init__(self, pipes: dict[int, _Pipe]) -> None:
        self.pipes = pipes


class _Reports:
    def notified(self, index: int, field: str) -> None: ...

    def ended(self, index: int, how: str) -> None: ...


def test_the_master_takes_all_a_worker_wrote_at_each_read_not_one_chunk() -> None:
    """Twisted reads 8 KiB from a process pipe per wakeup, and the master reads a worker's
    log pipe once per LOG_BATCH: the rest must be taken then too, or a busy worker's pipe
    fills and the worker waits in its log writes (two workers drained ~500 msg/s each)."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    try:
        out, clock = io.StringIO(), Clock()
        protocol = workerproc.WorkerProtocol(1, _Reports(), FileSink(out, clock), -1, clock)
        pipe = _Pipe(read)
        protocol.makeConnection(_Process({1: pipe}))
        lines = [b"[smarthost#info] line %d\n" % n for n in range(2000)]  # ~50 KB
        os.write(write, b"".join(lines))
        first = os.read(read, 8192)  # what Twisted's doRead hands over
        protocol.childDataReceived(1, first)
        assert out.getvalue().count("[worker-1 smarthost#info] line ") == 2000
        assert not pipe.reading  # and the pipe is left alone for LOG_BATCH
        clock.advance(workerproc.LOG_BATCH)
        assert pipe.reading
    finally:
        os.close(read)
        os.close(write)
