"""The crash matrix: ``kill -9`` the daemon at random moments under load, then count the losses.

SPEC: "250 after DATA means the message is on disk and fsynced: a kill -9 right after loses
nothing". This script checks that promise the way an operator would break it: client threads
submit mail with smtplib to a real ``twistd -n smarthost`` while it delivers everything to an
aiosmtpd MX on loopback, and at a seeded random moment the daemon gets SIGKILL; then it is
restarted on the same spool, N times. After the last cycle the daemon runs until its queue is
empty, and every (token, recipient) whose DATA was answered 250 must have reached the MX::

    .venv/bin/python scripts/crash_matrix.py --cycles 50 --seed 7

Each cycle picks one of two kill moments (seeded; thread scheduling is not, so a rerun with
the same seed is similar, not identical):

``after-ack``  right after the n-th 250 of the cycle reaches a client, n uniform in 1..K*M:
               the exact moment the SPEC names, with other commits and deliveries in flight;
``timed``      a uniform delay after the load starts; when the clients are done by then, the
               kill lands while the daemon is only delivering.

With ``--workers N`` (N > 1) the daemon is a master of N workers, started once; each cycle
kills one worker (seeded) at the chosen moment instead of the whole daemon, and the next cycle
begins once the master has restarted it (``worker-<i> is back``): the SPEC's "a worker that
dies is restarted and its spool recovered; no mail answered 250 is lost".

Exit status: 0 when nothing acknowledged was lost, ``corrupt/`` is empty and every delivered
copy is intact; 1 otherwise; 2 when the queue did not drain before the deadline (nothing can be
concluded then). Duplicates are reported, not failed: delivery is at-least-once, and a kill
between the MX's 250 and our spool update sends the message again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import selectors
import shutil
import signal
import smtplib
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from daemon import Daemon, mx_config  # noqa: E402  (the end-to-end harness lives beside the tests)
from mxpeer import MXPeer  # noqa: E402

SENDER = "crash@client.test"
DOMAINS = ("one.test", "two.test", "three.test")  # all routed to the one MX by "*"
TOKEN_HEADER = re.compile(rb"^X-Crash-Token: (\S+)\r?$", re.M)
RECOVERY = re.compile(
    r"spool .*: (\d+) queued, (\d+) unfinished receptions removed, "
    r"(\d+) unfinished writes dropped, (\d+) damaged places copied to corrupt/"
    r"(?:, (\d+) messages lost)?"  # logged since recoverylog.log_recovery
)
# Lines in the daemon log that deserve a look even when nothing was lost.
DELIVERED_LINE = re.compile(r"(\w+): to=<(.*?)> relay=\S+ result=delivered")
TROUBLE = re.compile(r"Traceback|Unhandled|scheduling error|delivery attempt failed|CRITICAL")
CLIENT_TIMEOUT = 10.0  # seconds, per smtplib operation
MAX_WINDOW = 2.0  # seconds after the load starts: the kill happens by then in every mode


STARTED = re.compile(r"worker-(\d+) started \(pid (\d+)\)")


def config(mx_port: int, workers: int = 1) -> str:
    """Everything goes to the test MX; retries come after 1 s; no limit gets in the way."""
    return mx_config(mx_port, workers)


# -- messages -----------------------------------------------------------------------------------


@attrs.frozen
class Sent:
    """What a client submitted; only a digest of the bytes is kept (a run can be ~100 MB)."""

    token: str
    recipients: tuple[str, ...]
    size: int
    digest: str


def make_message(token: str, recipients: tuple[str, ...], rng: random.Random) -> bytes:
    """A message whose every line is derived from its token, mostly small, sometimes large
    (so some kills land in the middle of a DATA transfer). CRLF ends, no line over 100 octets."""
    size = rng.randint(20_000, 200_000) if rng.random() < 0.2 else rng.randint(200, 4_000)
    head = (
        f"From: Crash <{SENDER}>\r\n"
        f"To: {', '.join(recipients)}\r\n"
        f"Subject: crash matrix {token}\r\n"
        f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        f"Message-ID: <{token}@crash.test>\r\n"
        f"X-Crash-Token: {token}\r\n"
        "\r\n"
    ).encode("ascii")
    lines, length, n = [], 0, 0
    while length < size:
        line = f"{token} line {n:06d} {'x' * 50}\r\n".encode("ascii")
        lines.append(line)
        length += len(line)
        n += 1
    return head + b"".join(lines)


# -- clients ------------------------------------------------------------------------------------


class Client(threading.Thread):
    """Submits ``count`` messages over one SMTP session; stops at the first error (the kill)."""

    def __init__(
        self, port: int, prefix: str, count: int, rng: random.Random, acked: Callable[[], None]
    ) -> None:
        super().__init__(name=f"client-{prefix}", daemon=True)
        self._port, self._prefix, self._count, self._rng = port, prefix, count, rng
        self._on_ack = acked
        self.attempted: list[Sent] = []  # DATA sent, or about to be
        self.acked: list[Sent] = []  # DATA answered 250
        self.error = ""

    def run(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self._port, timeout=CLIENT_TIMEOUT) as smtp:
                for i in range(self._count):
                    token = f"{self._prefix}-m{i}"
                    recipients = tuple(
                        f"{token}@{d}" for d in self._rng.sample(DOMAINS, self._rng.randint(1, 3))
                    )
                    message = make_message(token, recipients, self._rng)
                    digest = hashlib.sha256(message).hexdigest()
                    sent = Sent(token, recipients, len(message), digest)
                    self.attempted.append(sent)
                    refused = smtp.sendmail(SENDER, list(recipients), message)
                    if refused:  # not expected from a trusted client: report it, not ack it
                        self.error = f"{token}: recipients refused: {refused}"
                        return
                    self.acked.append(sent)
                    self._on_ack()
        except (smtplib.SMTPException, OSError) as e:
            self.error = f"{type(e).__name__}: {e}"


class AckPipe:
    """Clients write one byte per 250; the main thread selects on it next to the daemon log,
    so it can kill right after the n-th acknowledgement without polling."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.count = 0

    def ack(self) -> None:
        os.write(self._write_fd, b"+")

    def drain(self) -> None:
        try:
            self.count += len(os.read(self.read_fd, 65536))
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self._write_fd)


# -- the daemon ---------------------------------------------------------------------------------


class Smarthost:
    """The :class:`Daemon` harness, plus what a crash loop needs: the log is read while we wait
    (a daemon blocked on a full stdout pipe would stall the run), and each start begins with an
    empty ``log`` (``Daemon.wait_for`` searches the old lines first, so after a restart it
    would find the previous "ready" at once); earlier lines are kept in ``history``."""

    def __init__(self, directory: Path, mx_port: int, workers: int = 1) -> None:
        self.daemon = Daemon(directory, config(mx_port, workers))
        self.history: list[str] = []
        self.starts = 0
        self.recovered = ""  # the recovery line of the latest start

    @property
    def spool(self) -> Path:
        return Path(self.daemon.directory) / "var" / "spool"

    def corrupt(self) -> list[str]:
        """Every spool's ``corrupt/`` (the root's, and each worker's)."""
        return sorted(str(p.relative_to(self.spool)) for d in
                      (self.spool, *sorted(self.spool.glob("worker-*")))
                      for p in (d / "corrupt").glob("*"))

    def kill_worker(self, rng: random.Random) -> int:
        """SIGKILL one worker (seeded choice); its index."""
        pids: dict[int, int] = {}
        for line in self.daemon.log:
            found = STARTED.search(line)
            if found:
                pids[int(found.group(1))] = int(found.group(2))
        index = rng.choice(sorted(pids))
        os.kill(pids[index], signal.SIGKILL)
        return index

    def start(self) -> int:
        """Start (or restart) on the same spool; returns the submission port."""
        self.history += self.daemon.log
        self.daemon.log.clear()
        self.daemon.start()
        self.starts += 1
        for line in self.daemon.log:
            match = RECOVERY.search(line)
            if match:
                self.recovered = line[match.start(1) :]
        port: int = self.daemon.ports["submission"]
        return port

    def kill9(self) -> None:
        self.daemon.kill9()

    def stop(self) -> None:
        self.daemon.stop()
        self.history += self.daemon.log
        self.daemon.log.clear()

    def wait(
        self, deadline: float, pipe: AckPipe, done: Callable[[], bool] = lambda: False
    ) -> None:
        """Read the log (and count the acks) until ``deadline``, or until ``done()``."""
        proc = self.daemon.proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            sel.register(pipe.read_fd, selectors.EVENT_READ)
            while True:
                if done():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                for key, _ in sel.select(remaining):
                    if key.fd == pipe.read_fd:
                        pipe.drain()
                    elif not self._read_log(fd):
                        sel.unregister(fd)  # the daemon died by itself: caught by the caller

    def _read_log(self, fd: int) -> bool:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        # The harness's own line buffer, so its kill9()/stop() drain continues where we left off.
        d = self.daemon
        d._pending += chunk
        *lines, d._pending = d._pending.split(b"\n")
        d.log += [raw.decode("utf-8", "replace") for raw in lines]
        return True

    def queue(self) -> list[dict[str, Any]]:
        result = self.daemon.admin(
            "queue", "--config", str(self.daemon.config_path), "list", "--json"
        )
        if result.returncode != 0:
            raise RuntimeError(f"smarthost queue list failed: {result.stderr}")
        entries: list[dict[str, Any]] = json.loads(result.stdout)
        return entries

    def running(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None


# -- one run ------------------------------------------------------------------------------------


@attrs.frozen
class Settings:
    cycles: int
    seed: int = 1
    clients: int = 4
    messages_per_client: int = 20
    min_delay: float = 0.2  # the "timed" kill moment, seconds after the load starts
    max_delay: float = MAX_WINDOW
    drain_timeout: float = 120.0  # for the queue to empty after the last restart
    workers: int = 1  # > 1: a master of workers, and each cycle kills one worker


@attrs.frozen
class CycleReport:
    number: int
    mode: str  # "after-ack" | "timed"
    moment: float  # seconds from load start to the kill
    target: int  # after-ack: n; timed: 0
    attempted: int
    acked: int
    client_errors: tuple[str, ...]
    recovery: str  # what the spool recovery at this cycle's start logged


@attrs.define
class Result:
    settings: Settings
    cycles: list[CycleReport] = attrs.field(factory=list)
    acknowledged: int = 0  # tokens answered 250
    acknowledged_pairs: int = 0  # (token, recipient)
    lost: list[str] = attrs.field(factory=list)  # "token -> recipient", acked but never received
    duplicates: int = 0  # (token, recipient) pairs received more than once
    extra_copies: int = 0  # copies beyond the first, summed
    # Duplicates whose copies came from one daemon run (no kill in between): at-least-once does
    # not explain those, a double delivery inside the scheduler would.
    same_run_duplicates: list[str] = attrs.field(factory=list)
    unacknowledged: int = 0  # tokens whose DATA was sent but got no 250
    unacknowledged_delivered: int = 0
    unknown: list[str] = attrs.field(factory=list)  # received, never attempted
    damaged: list[str] = attrs.field(factory=list)  # received with other bytes than sent
    bounces: int = 0  # reports to our sender (none are expected)
    corrupt: list[str] = attrs.field(factory=list)  # files in spool/corrupt/
    recovery: dict[str, int] = attrs.field(factory=dict)  # summed over every start
    recovery_lines: list[str] = attrs.field(factory=list)
    trouble: list[str] = attrs.field(factory=list)  # log lines worth a look
    drained: bool = False
    remaining: int = 0  # queue entries left when the drain deadline passed
    seconds: float = 0.0
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return self.drained and not (
            self.lost or self.corrupt or self.damaged or self.unknown or self.same_run_duplicates
        )

    def summary(self) -> str:
        s = self.settings
        modes = Counter(c.mode.split()[0] for c in self.cycles)  # "timed worker-2": timed
        lines = [
            f"crash matrix: seed={s.seed} clients={s.clients} "
            f"messages_per_client={s.messages_per_client} workers={s.workers}",
            f"cycles run:                 {len(self.cycles)} "
            f"({modes['after-ack']} after-ack, {modes['timed']} timed kills)",
            f"acknowledged (250):         {self.acknowledged} messages, "
            f"{self.acknowledged_pairs} recipients",
            f"LOST:                       {len(self.lost)}",
            f"duplicates:                 {self.duplicates} recipients received twice or more "
            f"({self.extra_copies} extra copies)",
            f"  of which within one run:  {len(self.same_run_duplicates)}",
            f"unacknowledged:             {self.unacknowledged} "
            f"(of which delivered: {self.unacknowledged_delivered})",
            f"damaged copies:             {len(self.damaged)}",
            f"unknown tokens received:    {len(self.unknown)}",
            f"bounces to the sender:      {self.bounces}",
            f"corrupt/ files:             {len(self.corrupt)}",
            "recovery over {starts} starts: {queued} queued, {tmp} unfinished receptions "
            "removed, {torn} unfinished writes dropped, {corrupt} damaged places copied to "
            "corrupt/, {lost} messages lost".format(
                **self.recovery
            ),
            f"queue drained:              {'yes' if self.drained else 'NO'}"
            + ("" if self.drained else f" ({self.remaining} left)"),
            f"daemon log lines of note:   {len(self.trouble)}",
            f"total time:                 {self.seconds:.1f} s",
        ]
        lines += [f"  LOST {x}" for x in self.lost[:20]]
        lines += [f"  same-run duplicate {x}" for x in self.same_run_duplicates[:20]]
        lines += [f"  damaged {x}" for x in self.damaged[:20]]
        lines += [f"  unknown {x}" for x in self.unknown[:20]]
        lines += [f"  corrupt/{x}" for x in self.corrupt[:20]]
        lines += [f"  log: {x}" for x in self.trouble[:20]]
        return "\n".join(lines)


def _cycle(
    host: Smarthost, number: int, settings: Settings, rng: random.Random
) -> tuple[CycleReport, list[Client]]:
    port = host.daemon.ports["submission"] if host.running() else host.start()
    total = settings.clients * settings.messages_per_client
    if rng.random() < 0.5:
        mode, target = "after-ack", rng.randint(1, total)
        delay = MAX_WINDOW
    else:
        mode, target = "timed", 0
        delay = rng.uniform(settings.min_delay, settings.max_delay)
    pipe = AckPipe()
    clients = [
        Client(
            port,
            f"s{settings.seed}-c{number}-k{k}",
            settings.messages_per_client,
            random.Random(f"{settings.seed}-{number}-{k}"),  # noqa: S311 (seeded, not secret)
            pipe.ack,
        )
        for k in range(settings.clients)
    ]
    try:
        started = time.monotonic()
        for client in clients:
            client.start()
        host.wait(started + delay, pipe, lambda: mode == "after-ack" and pipe.count >= target)
        moment = time.monotonic() - started
        if not host.running():
            raise RuntimeError(f"cycle {number}: the daemon exited by itself")
        if settings.workers > 1:
            back = sum(" is back" in line for line in host.daemon.log)
            index = host.kill_worker(rng)
            mode = f"{mode} worker-{index}"
        else:
            host.kill9()
        for client in clients:
            client.join(CLIENT_TIMEOUT * 3)
            if client.is_alive():
                raise RuntimeError(f"cycle {number}: {client.name} still running after the kill")
        if settings.workers > 1:  # the master restarts it: the next cycle begins after that
            host.wait(time.monotonic() + 60, pipe,
                      lambda: sum(" is back" in line for line in host.daemon.log) > back)
    finally:
        pipe.close()
    report = CycleReport(
        number=number,
        mode=mode,
        moment=round(moment, 3),
        target=target,
        attempted=sum(len(c.attempted) for c in clients),
        acked=sum(len(c.acked) for c in clients),
        client_errors=tuple(c.error for c in clients if c.error),
        recovery=host.recovered,
    )
    return report, clients


def _drain(host: Smarthost, deadline: float, result: Result) -> None:
    """Run the daemon until ``queue list --json`` is empty; between looks, read the log until
    the next "removed" line (or a second passes: a deferred retry logs nothing until it runs)."""
    if not host.running():
        host.start()
    pipe = AckPipe()
    try:
        while True:
            remaining = host.queue()
            if not remaining:
                result.drained = True
                return
            if time.monotonic() >= deadline:
                result.remaining = len(remaining)
                return
            log: list[str] = host.daemon.log
            seen = len(log)

            def progressed(log: list[str] = log, seen: int = seen) -> bool:
                return any(": removed (" in line for line in log[seen:])

            host.wait(min(deadline, time.monotonic() + 1.0), pipe, progressed)
    finally:
        pipe.close()
        host.stop()


def _count(result: Result, clients: list[Client], mx: MXPeer) -> None:
    attempted = {s.token: s for c in clients for s in c.attempted}
    acked = {s.token: s for c in clients for s in c.acked}
    result.acknowledged = len(acked)
    result.acknowledged_pairs = sum(len(s.recipients) for s in acked.values())
    result.unacknowledged = len(attempted) - len(acked)
    received: Counter[tuple[str, str]] = Counter()
    delivered_tokens: set[str] = set()
    for message in mx.messages:
        if message.mail_from in ("", "<>"):
            result.bounces += 1
            continue
        match = TOKEN_HEADER.search(message.data)
        token = match.group(1).decode("ascii", "replace") if match else "?"
        sent = attempted.get(token)
        if sent is None:
            result.unknown.append(token)
            continue
        delivered_tokens.add(token)
        tail = message.data[-sent.size :]
        if len(message.data) < sent.size or hashlib.sha256(tail).hexdigest() != sent.digest:
            result.damaged.append(f"{token} ({len(message.data)} octets received)")
        for rcpt in message.rcpt_tos:
            received[(token, rcpt)] += 1
    for token, sent in sorted(acked.items()):
        result.lost += [f"{token} -> {r}" for r in sent.recipients if not received[(token, r)]]
    copies = [n for n in received.values() if n > 1]
    result.duplicates, result.extra_copies = len(copies), sum(n - 1 for n in copies)
    result.unacknowledged_delivered = len(delivered_tokens - acked.keys())


def _read_logs(result: Result, host: Smarthost) -> None:
    totals = {"starts": host.starts, "queued": 0, "tmp": 0, "torn": 0, "corrupt": 0, "lost": 0}
    # A delivery the daemon itself logged twice in one run would be a scheduler bug; copies
    # across a kill are at-least-once delivery. The MX's arrival order cannot tell these
    # apart (a message finishing at the MX just after a kill looks like the next run's), so
    # runs are told apart by the daemon's own log: each start logs its recovery line.
    run, delivered = 0, Counter[tuple[int, str, str]]()
    for line in host.history:
        done = DELIVERED_LINE.search(line)
        if done:
            delivered[(run, done.group(1), done.group(2))] += 1
        match = RECOVERY.search(line)
        if match:
            run += 1
            result.recovery_lines.append(line[match.start(1) :])
            for key, value in zip(("queued", "tmp", "torn", "corrupt", "lost"),
                                  match.groups(), strict=True):
                totals[key] += int(value or 0)
        if TROUBLE.search(line):
            result.trouble.append(line)
    result.recovery = totals
    result.same_run_duplicates = sorted(
        f"{qid} -> {rcpt} (run {n})" for (n, qid, rcpt), count in delivered.items() if count > 1
    )
    result.corrupt = host.corrupt()


def run(
    settings: Settings, workdir: Path, progress: Callable[[str], None] | None = None
) -> Result:
    """The whole matrix in ``workdir`` (created if needed); bounded by the cycle count, the
    client timeouts and ``settings.drain_timeout``."""
    began = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    result = Result(settings, workdir=str(workdir))
    rng = random.Random(settings.seed)  # noqa: S311 (reproducible moments, not secrets)
    mx = MXPeer()
    mx.start()
    host = Smarthost(workdir, mx.port, settings.workers)
    clients: list[Client] = []
    try:
        for number in range(settings.cycles):
            report, cycle_clients = _cycle(host, number, settings, rng)
            result.cycles.append(report)
            clients += cycle_clients
            if progress is not None:
                progress(
                    f"cycle {number + 1}/{settings.cycles}: {report.mode} kill at "
                    f"{report.moment:.2f}s, {report.acked}/{report.attempted} acknowledged, "
                    f"MX has {len(mx.messages)}; at start: {report.recovery}"
                )
        _drain(host, time.monotonic() + settings.drain_timeout, result)
    finally:
        if host.running():
            host.kill9()
        mx.stop()
    _count(result, clients, mx)
    _read_logs(result, host)
    result.seconds = time.monotonic() - began
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, required=True, help="kill/restart cycles")
    parser.add_argument("--seed", type=int, default=1, help="picks the kill moments")
    parser.add_argument("--clients", type=int, default=4, help="client threads per cycle")
    parser.add_argument("--messages-per-client", type=int, default=20, help="per cycle")
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="seconds")
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the workdir after success")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-cycle lines")
    parser.add_argument("--workers", type=int, default=1,
                        help="[server] workers; above 1 each cycle kills one worker")
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.clients < 1 or args.messages_per_client < 1:
        parser.error("--cycles, --clients and --messages-per-client must be at least 1")
    settings = Settings(
        cycles=args.cycles,
        seed=args.seed,
        clients=args.clients,
        messages_per_client=args.messages_per_client,
        drain_timeout=args.drain_timeout,
        workers=args.workers,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crash-matrix-"))
    result = run(settings, workdir, None if args.quiet else lambda s: print(s, flush=True))
    print(result.summary())
    if args.json is not None:
        figures = attrs.asdict(result)
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    if result.ok and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work directory kept: {workdir}")
    if not result.drained:
        return 2
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
