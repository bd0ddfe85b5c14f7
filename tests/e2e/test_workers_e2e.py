"""``[server] workers`` end to end: ``twistd -n smarthost`` as a master of real worker
processes on loopback, delivering to a test MX (tests/mxpeer.py).

Both workers accept on the master's sockets and deliver from their own spools; a worker
killed with SIGKILL under load is restarted and nothing it answered 250 is lost or sent
twice; SIGTERM stops every process; SIGHUP reaches every worker; ``workers = 0`` is one per
core; a worker that cannot start fails the master's start; mail in a spool no worker serves
is named at start.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_service_e2e import DirectoryWatch
from test_systemd_socket_e2e import FAKE_SYSTEMD, SNIPPET

import daemon
from daemon import AdoptedSMTP, Daemon, client_tls, connect_burst, mx_config
from mxpeer import MXPeer

STARTED = re.compile(r"worker-(\d+) started \(pid (\d+)\)")
ACCEPTED = re.compile(r"\[worker-(\d+) smarthost#info\] (\w+): accepted from")
DELIVERED = re.compile(r"\[worker-(\d+) smarthost#info\] (\w+): to=<.*?> .*result=delivered")
QUEUED_AS = re.compile(rb"queued as (\w+)")
LISTENING = re.compile(r"\[smarthost#info\] submission listening on 127.0.0.1:(\d+)")
TOKEN = re.compile(rb"^X-Token: (\S+)\r?$", re.M)


def config(mx_port: int, workers: int = 2) -> str:
    return mx_config(mx_port, workers)


def message(token: str) -> str:
    return (f"From: a@client.test\r\nTo: b@remote.test\r\nSubject: {token}\r\n"
            f"X-Token: {token}\r\n\r\nbody of {token}\r\n")


def send(port: int, token: str, sock: socket.socket | None = None) -> str:
    """One message on its own connection (so the kernel picks a worker for each); its id."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) if sock is None else AdoptedSMTP(
            sock) as client:
        client.ehlo("client.test")
        client.mail("a@client.test")
        client.rcpt("b@remote.test")
        code, reply = client.data(message(token))
        assert code == 250, reply
    found = QUEUED_AS.search(reply)
    assert found is not None, reply
    return found.group(1).decode()


def worker_pids(d: Daemon) -> dict[int, int]:
    """Worker index -> pid of its newest start, from the master's log."""
    pids: dict[int, int] = {}
    for line in d.log:
        m = STARTED.search(line)
        if m:
            pids[int(m.group(1))] = int(m.group(2))
    return pids


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap it counts as ended)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat_line.rpartition(")")[2].split()[0] != "Z"


def wait_mx(mx: MXPeer, count: int, timeout: float = 60.0) -> None:
    """Until the MX has accepted ``count`` messages (its condition is the event)."""
    with mx._cond:
        arrived = mx._cond.wait_for(lambda: len(mx.messages) >= count, timeout)
    assert arrived, f"{len(mx.messages)} of {count} messages arrived"


def tokens(mx: MXPeer) -> list[str]:
    return [m.group(1).decode() for r in mx.messages if (m := TOKEN.search(r.data))]


@pytest.fixture
def mx() -> Iterator[MXPeer]:
    peer = MXPeer("127.0.0.1", name="mx.remote.test")
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture
def two(tmp_path: Path, mx: MXPeer) -> Iterator[Daemon]:
    d = Daemon(tmp_path, config(mx.port))
    try:
        d.start()
        yield d
    finally:
        d.stop()


def test_both_workers_accept_and_deliver_from_their_spools(two: Daemon, mx: MXPeer) -> None:
    pids = worker_pids(two)
    assert sorted(pids) == [1, 2] and len(set(pids.values())) == 2
    ids: list[str] = []
    # The kernel gives each connection to whichever worker accepts first, and a worker that
    # accepted leaves the socket to the others for a moment: bursts of connections spread
    # over both (sessions one after another may all go to one). Bounded.
    port = two.ports["submission"]
    for burst in range(25):
        for n, sock in enumerate(connect_burst(port, 8)):
            ids.append(send(port, f"t{burst}-{n}", sock))
            two.wait_for(re.compile(rf"{ids[-1]}: accepted from"))
        served = {m.group(1) for line in two.log if (m := ACCEPTED.search(line))}
        if served == {"1", "2"} and len(ids) >= 10:
            break
    assert served == {"1", "2"}, "one worker took every connection"
    wait_mx(mx, len(ids))
    two.wait_for(DELIVERED, count=len(ids))
    delivered = {m.group(2): m.group(1) for line in two.log if (m := DELIVERED.search(line))}
    assert set(delivered) == set(ids)
    assert set(delivered.values()) == {"1", "2"}  # each worker delivers from its own spool
    tokens = Counter(TOKEN.search(r.data).group(1) for r in mx.messages)  # type: ignore[union-attr]
    assert sorted(tokens.values()) == [1] * len(ids)
    for i in (1, 2):
        assert (two.directory / "var" / "spool" / f"worker-{i}" / "log").is_dir()


def test_the_master_serves_http_for_all_workers(two: Daemon) -> None:
    listening = re.compile(r"\[smarthost#info\] http listening on 127.0.0.1:(\d+)")
    port = int(listening.search(two.wait_for(listening)).group(1))  # type: ignore[union-attr]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as answer:
        assert answer.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        metrics = answer.read().decode()
    assert 'smarthost_workers{state="running"} 2.0' in metrics, metrics


def _accepted(port: int) -> tuple[float, str]:
    """The master's count of accepted messages, every listener, and its whole text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "smarthost_messages_accepted_total"), text


def test_the_masters_counters_do_not_go_down_when_a_worker_is_killed(two: Daemon) -> None:
    """Prometheus reads a lower counter as a reset (rate() would count the node's whole
    total again): the restarted worker's count adds to what its killed process had."""
    listening = re.compile(r"\[smarthost#info\] http listening on 127.0.0.1:(\d+)")
    port = int(listening.search(two.wait_for(listening)).group(1))  # type: ignore[union-attr]
    by_one = re.compile(r"\[worker-1 smarthost#info\] \w+: accepted from")
    sent = 0
    while not any(by_one.search(line) for line in two.log):
        assert sent < 100, "the kernel gave worker-1 no connection"
        sent += 1
        send(two.ports["submission"], f"c{sent}")
        two.wait_for(ACCEPTED, count=sent)
    before, _ = _accepted(port)
    assert before == sent
    os.kill(worker_pids(two)[1], signal.SIGKILL)
    two.wait_for(re.compile(r"worker-1 was killed by signal 9 \(SIGKILL\); restarting"))
    two.wait_for("worker-1 is back")
    after, text = _accepted(port)
    assert after == sent, text
    # The new process answered (its count, 0, is on top of the old one's), none was skipped.
    assert 'smarthost_workers{state="running"} 2.0' in text, text
    assert "smarthost_workers_scrape_failed 0.0" in text, text
    send(two.ports["submission"], "one more")
    two.wait_for(ACCEPTED, count=sent + 1)
    assert _accepted(port)[0] == sent + 1


def test_sighup_and_sigusr1_reach_every_worker(two: Daemon) -> None:
    # A change of the worker count is only for a restart of the master: said, not applied.
    two.config_path.write_text(two.config_path.read_text().replace("workers = 2",
                                                                    "workers = 3"))
    two.send_signal(signal.SIGHUP)
    two.wait_for("reload: server.workers changed; it needs a restart of the master")
    for i in (1, 2):
        two.wait_for(re.compile(rf"\[worker-{i} smarthost#info\] reloaded the configuration"))
    two.send_signal(signal.SIGUSR1)
    two.wait_for(re.compile(r"\[smarthost#info\] reopened the log files"))
    for i in (1, 2):
        two.wait_for(re.compile(rf"\[worker-{i} smarthost#info\] reopened the log files"))
    assert sorted(worker_pids(two)) == [1, 2]


def test_kill_9_of_a_worker_under_load_loses_nothing(tmp_path: Path, mx: MXPeer) -> None:
    # The MX answers 451 until the end: nothing is delivered before the kill, so "exactly
    # once" is checkable (a kill between the MX's 250 and our spool update may resend).
    mx.behaviour.tempfail_first = 10**9
    d = Daemon(tmp_path, config(mx.port))
    acked: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                send(d.ports["submission"], f"k{n}")
            except (OSError, smtplib.SMTPException, AssertionError) as e:
                failures.append(repr(e))  # the killed worker's session: not acknowledged
                continue
            acked.append(f"k{n}")

    try:
        d.start()
        victim = worker_pids(d)[1]
        thread = threading.Thread(target=client)
        thread.start()
        try:
            d.wait_for(ACCEPTED, count=20)
            os.kill(victim, signal.SIGKILL)
            d.wait_for(re.compile(r"worker-1 was killed by signal 9 \(SIGKILL\); restarting"))
            d.wait_for("worker-1 is back")
            # Until the restarted worker-1 has accepted mail too (its spool then holds mail
            # from before the kill and after).
            by_one = re.compile(r"\[worker-1 smarthost#info\] \w+: accepted from")
            d.wait_for(by_one, count=1 + sum(1 for line in d.log if by_one.search(line)))
        finally:
            stop.set()
            thread.join(60)
        assert worker_pids(d)[1] != victim
        mx.behaviour.tempfail_first = 0  # now let everything through
        # Every acknowledged token; the MX may get more (a message committed just before the
        # kill whose 250 never reached the client is delivered too, as it should be).
        with mx._cond:
            mx._cond.wait_for(lambda: set(acked) <= set(tokens(mx)), 90)
        received = Counter(tokens(mx))
        assert set(received) >= set(acked), f"lost: {sorted(set(acked) - set(received))}"
        assert all(n == 1 for n in received.values()), "a message was delivered twice"
    finally:
        d.stop()


def test_a_socket_activated_master_hands_systemds_sockets_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrapper = tmp_path / "fake-systemd"
    wrapper.write_text(f"#!{sys.executable}\nTWISTD = {daemon.TWISTD!r}\n{FAKE_SYSTEMD}")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(daemon, "TWISTD", str(wrapper))
    d = Daemon(tmp_path)
    d.config_path.write_text('hostname = "mx.smarthost.test"\n' + SNIPPET.read_text()
                             + '[server]\nworkers = 2\n[http]\nlisten = []\n')
    try:
        d.start()
        assert sorted(worker_pids(d)) == [1, 2]
        with smtplib.SMTP_SSL("127.0.0.1", d.ports["submissions"], timeout=30,
                              context=client_tls()) as client:
            assert client.ehlo("client.test")[0] == 250  # implicit TLS, applied by a worker
        with socket.create_connection(("127.0.0.1", d.ports["smtp"]), timeout=30) as raw:
            assert raw.recv(512).startswith(b"220 mx.smarthost.test")
    finally:
        d.stop()


def _nobody_runs_python() -> bool:
    """Whether user nobody can run this interpreter (the master starts its workers after
    twistd's --uid drop; a virtualenv under a root-only /root cannot be)."""
    if os.geteuid() != 0:
        return False
    nobody = pwd.getpwnam("nobody")
    try:
        subprocess.run([sys.executable, "-c", "0"], user=nobody.pw_uid, group=nobody.pw_gid,
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


@pytest.mark.skipif(not _nobody_runs_python(),
                    reason="needs root, and a Python interpreter user nobody may run")
def test_workers_run_as_the_uid_twistd_drops_to(mx: MXPeer) -> None:
    nobody = pwd.getpwnam("nobody")
    tmp_path = Path(tempfile.mkdtemp(prefix="smarthost-workers-uid-", dir="/tmp"))
    tmp_path.chmod(0o755)
    (tmp_path / "var").mkdir()
    os.chown(tmp_path / "var", nobody.pw_uid, nobody.pw_gid)
    d = Daemon(tmp_path, config(mx.port))
    d.extra_args = ["--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid)]
    try:
        d.start()
        for pid in worker_pids(d).values():
            assert os.stat(f"/proc/{pid}").st_uid == nobody.pw_uid
        for i in (1, 2):
            assert (tmp_path / f"var/spool/worker-{i}/log").stat().st_uid == nobody.pw_uid
    finally:
        d.stop()
        shutil.rmtree(tmp_path)


def test_systemd_hears_the_master_only(tmp_path: Path, mx: MXPeer) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        d = Daemon(tmp_path, config(mx.port))
        d.env = {"NOTIFY_SOCKET": path}
        try:
            d.start()
            assert sock.recv(4096) == b"READY=1"  # once every worker is ready
            d.send_signal(signal.SIGHUP)
            assert sock.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
            assert sock.recv(4096) == b"READY=1"  # once both workers have reloaded
            for i in (1, 2):
                d.wait_for(f"[worker-{i} smarthost#info] reloaded the configuration")
            d.stop()
            assert sock.recv(4096) == b"STOPPING=1"
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):  # the workers never spoke to systemd
                sock.recv(4096)
        finally:
            d.stop()


def test_one_log_file_for_every_process_reopened_on_sigusr1(tmp_path: Path, mx: MXPeer) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log, events = logs / "smarthost.log", logs / "events.jsonl"
    path = str(tmp_path / "notify.sock")
    d = Daemon(tmp_path, config(mx.port) + '[log]\nevents = "logs/events.jsonl"\n')
    d.env = {"NOTIFY_SOCKET": path}
    d.extra_args = ["--logfile", str(log)]  # after the harness's --logfile=-: this one wins
    watch = DirectoryWatch(logs)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        d.launch()
        try:
            assert sock.recv(4096) == b"READY=1"
            watch.wait_for(log, "[worker-2 smarthost#info] ready")
            port = _port(log)
            log.rename(logs / "smarthost.log.1")
            events.rename(logs / "events.jsonl.1")
            d.send_signal(signal.SIGUSR1)
            for i in (1, 2):
                watch.wait_for(log, f"[worker-{i} smarthost#info] reopened the log files")
            watch.wait_for(events, "reopened the log files")
            queue_id = send(port, "after")
            watch.wait_for(log, f"{queue_id}: accepted from")  # a worker's, in the new file
            watch.wait_for(events, f'"queue_id": "{queue_id}"')  # written by that worker
            assert "reopened" not in (logs / "smarthost.log.1").read_text()
        finally:
            watch.close()
            d.stop()
    assert "[smarthost#info] ready" in (logs / "smarthost.log.1").read_text()


def _port(log: Path) -> int:
    found = LISTENING.search(log.read_text())
    assert found is not None
    return int(found.group(1))


def test_sigterm_stops_every_process(tmp_path: Path, mx: MXPeer) -> None:
    d = Daemon(tmp_path, config(mx.port, workers=0)).start()
    try:
        pids = worker_pids(d)
        # workers = 0: one per core (os.cpu_count(), as smarthost.app.workerspools counts).
        assert sorted(pids) == list(range(1, (os.cpu_count() or 1) + 1))
        d.send_signal(signal.SIGTERM)
        # As the single daemon: twistd ends by the signal that stopped it, once everything
        # has stopped (systemd counts a SIGTERM death as a clean stop).
        assert d.wait_exit(60) == -signal.SIGTERM
        assert "Server Shut Down." in d.log[-1]
        assert not [pid for pid in pids.values() if alive(pid)]
    finally:
        d.stop()


def allowed_cpus(pid: int) -> set[frozenset[int]]:
    """The CPU sets of every thread of ``pid``."""
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def test_cpu_affinity_gives_each_worker_its_own_cpu(tmp_path: Path, mx: MXPeer) -> None:
    text = config(mx.port, workers=3).replace("[server]\n", "[server]\ncpu_affinity = true\n")
    d = Daemon(tmp_path, text).start()
    try:
        cpus = sorted(os.sched_getaffinity(0))  # the master inherits ours
        pids = worker_pids(d)
        token = send(d.ports["submission"], "pinned")  # threads exist by the first message
        wait_mx(mx, 1)
        assert token and tokens(mx) == ["pinned"]
        for index, pid in pids.items():  # round robin past the last CPU
            assert allowed_cpus(pid) == {frozenset({cpus[(index - 1) % len(cpus)]})}, index
        assert d.proc is not None
        assert allowed_cpus(d.proc.pid) == {frozenset(cpus)}  # the master is not pinned
    finally:
        d.stop()


def test_workers_end_with_a_master_killed_by_sigkill(tmp_path: Path, mx: MXPeer) -> None:
    d = Daemon(tmp_path, config(mx.port)).start()
    try:
        pids = worker_pids(d)
        d.kill9()
        deadline = time.monotonic() + 30
        # No event reaches the test from a process that is not its child: a bounded poll.
        while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids.values() if alive(pid)]
    finally:
        d.stop()


def test_a_worker_that_cannot_start_fails_the_master(tmp_path: Path, mx: MXPeer) -> None:
    # Plugins are built by the workers only: the master's start is all or nothing.
    d = Daemon(tmp_path, config(mx.port) + '[plugins]\nenabled = ["no-such-plugin"]\n')
    try:
        d.launch()
        assert d.wait_exit(60) == 1
        line = next(line for line in d.log if "[smarthost#error] cannot start" in line)
        assert re.search(r"cannot start: worker-\d: plugins", line), line
        assert not [pid for pid in worker_pids(d).values() if alive(pid)]
    finally:
        d.stop()


def test_mail_left_by_another_worker_count_is_delivered(tmp_path: Path, mx: MXPeer) -> None:
    # 1 -> 2: the root spool's mail is delivered by worker 1; 2 -> 1: worker-2's by the
    # single daemon.
    mx.behaviour.tempfail_first = 10**9  # the message stays queued in the root spool
    d = Daemon(tmp_path, config(mx.port, workers=1)).start()
    try:
        send(d.ports["submission"], "orphan")
    finally:
        d.stop()
    mx.behaviour.tempfail_first = 0
    d.config_path.write_text(d.config_path.read_text().replace("workers = 1", "workers = 2"))
    try:
        d.start()
        line = d.wait_for("owns; worker-1 delivers them")
        assert f"spool {tmp_path / 'var' / 'spool'} holds 1 messages" in line
        d.wait_for(re.compile(r"\[worker-1 smarthost#info\] \w+: to=<b@remote.test> .*"
                              r"result=delivered"))
        wait_mx(mx, 1)
        assert tokens(mx) == ["orphan"]
        mx.behaviour.tempfail_first = 10**9
        sent = []
        for n in range(200):  # until worker 2 holds one (the kernel picks the worker)
            sent.append(send(d.ports["submission"], f"left{n}"))
            if d.wait_for(re.compile(rf"{sent[-1]}: accepted from")).count("[worker-2 "):
                break
    finally:
        d.stop()
    mx.behaviour.tempfail_first = 0
    d.config_path.write_text(d.config_path.read_text().replace("workers = 2", "workers = 1"))
    try:
        d.start()
        d.wait_for(re.compile(r"spool \S+/worker-2 holds \d+ messages .* this daemon delivers"))
        with mx._cond:
            mx._cond.wait_for(lambda: len(tokens(mx)) == 1 + len(sent), 60)
        assert sorted(tokens(mx)) == sorted(["orphan", *(f"left{n}" for n in range(len(sent)))])
    finally:
        d.stop()
