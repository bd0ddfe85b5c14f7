"""smarthost against Postfix on this machine: ``bench/run [--quick]`` (see bench/README.md).

Every server listens on 127.0.0.1 only, every run starts a fresh server with an empty queue,
and everything this script starts is stopped (and its directories removed) on the way out,
also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import pstats
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import servers
from report import areas, report, summary
from servers import LOOPBACK, Postfix, Smarthost, SmtpSink

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

Server = Smarthost | Postfix


# -- setup ------------------------------------------------------------------------------------


def ensure_tools(install: bool) -> None:
    """Postfix, smtp-source and smtp-sink from Debian; the venv from `make install`."""
    if not servers.TWISTD.exists():
        sys.exit(f"bench: {servers.TWISTD} is missing; run `make install` first")
    tools = (servers.POSTFIX, servers.POSTCONF, servers.SMTP_SOURCE, servers.SMTP_SINK)
    if all(os.access(t, os.X_OK) for t in tools):
        return
    if not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit("bench: needs Postfix and its test tools: "
                 "sudo apt-get install postfix (smtp-source and smtp-sink come with it)")
    print("installing postfix (no configuration; nothing of the system's is started)...",
          flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["debconf-set-selections"], check=True, text=True, env=env,
                   input="postfix postfix/main_mailer_type select No configuration\n")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "postfix"], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def use_source(run: Run, rev: str) -> None:
    """smarthost from ``rev`` (``git archive`` into the run's directory), or from a directory
    holding a copy of the tree (a patched one, say), not the work tree."""
    if os.path.isdir(rev):
        servers.SOURCE = Path(rev).resolve()
        return
    source = run.root / "source"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(servers.REPO), "archive", rev],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    servers.SOURCE = source


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        sys.exit(f"bench: needs {need} open files, the hard limit is {soft}")


class Run:
    """The temporary directory and every server started in it; :meth:`close` stops them."""

    def __init__(self, keep: bool) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="smarthost-bench-"))
        os.chmod(self.root, 0o755)  # Postfix's own user must reach its data directory
        self.keep = keep
        self.started: list[Server | SmtpSink] = []
        self.certs = self.root / "certs"  # one self-signed pair, made by the first start
        self._n = 0

    def directory(self, name: str) -> Path:
        self._n += 1
        return self.root / f"{self._n:03d}-{name}"

    @contextmanager
    def server(self, kind: str, *, deliver: bool, profile: Path | None = None,
               workers: int = 1) -> Iterator[tuple[Server, SmtpSink | None]]:
        """A fresh server (and, when it delivers, a fresh smtp-sink behind it)."""
        directory = self.directory(kind)
        sink = None
        if deliver:
            sink = SmtpSink(directory / "sink")
            self.started.append(sink)
            sink.start()
            next_hop = sink.port
        else:
            next_hop = servers.free_port()  # closed: smarthost's attempts defer at once
        server: Server
        if kind == "smarthost":
            server = Smarthost(directory / "smarthost", next_hop, certs=self.certs,
                               profile=profile, workers=workers)
        else:
            server = Postfix(directory / "postfix", next_hop, deliver=deliver)
        self.started.append(server)
        try:
            server.start()
            yield server, sink
        finally:
            server.stop()
            if sink is not None:
                sink.stop()
            if not self.keep:
                servers.remove_tree(directory)

    def close(self) -> None:
        for thing in reversed(self.started):
            try:
                thing.stop()
            except Exception as e:  # keep stopping the others
                print(f"bench: stopping {thing}: {e}", file=sys.stderr)
        if self.keep:
            print(f"kept {self.root}")
        else:
            servers.remove_tree(self.root)


# -- load -------------------------------------------------------------------------------------


def smtp_source(port: int, messages: int, sessions: int, size: int) -> tuple[float, float]:
    """Postfix's load generator: ``sessions`` parallel sessions, each sending message after
    message (-d) until ``messages`` are sent. Returns the wall-clock seconds and the CPU
    seconds ``smtp-source`` itself used (on the same cores as the server)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    argv = [servers.SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-d", "-M", "bench.test", "-f", "bench@src.test", "-t", "rcpt@dst.test",
            f"{LOOPBACK}:{port}"]
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True,
                            timeout=max(120, messages / 5))
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({result.returncode}): "
                           f"{result.stdout[-500:]}{result.stderr[-500:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    return elapsed, cpu


def wait_queue(server: Server, predicate: Callable[[int], bool], timeout: float) -> float:
    """Poll the queue size every 50 ms until ``predicate`` holds; returns the monotonic time."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        size = server.queue_size()
        if predicate(size):
            return now
        if now > deadline:
            raise TimeoutError(f"{server.name}: queue still holds {size} after {timeout:.0f}s")
        time.sleep(0.05)


def accept_run(run: Run, kind: str, messages: int, sessions: int, size: int,
               profile: Path | None = None, workers: int = 1) -> dict[str, Any]:
    with run.server(kind, deliver=False, profile=profile, workers=workers) as (server, _):
        pids = servers.process_tree(server.pid)
        cpu, before = servers.cpu_seconds(pids), servers.cpu_by_process(pids)
        seconds, client_cpu = smtp_source(server.port, messages, sessions, size)
        # Every process of the server (master and workers, Postfix's daemons), from /proc.
        pids = servers.process_tree(server.pid)
        cpu = servers.cpu_seconds(pids) - cpu
        per_process = servers.cpu_delta(before, servers.cpu_by_process(pids))
        share = root_share(per_process, server.pid)
        # Both answer 250 only after the message is on disk, so all of it is queued by now
        # (Postfix's queue manager may still be moving files between its queues).
        wait_queue(server, lambda n: n >= messages, 30)
        spread = dict(server.accepted_by) if isinstance(server, Smarthost) else {}
    return {"value": messages / seconds, "seconds": seconds,
            "cpu_ms_per_message": cpu * 1000 / messages, "processes": len(pids),
            "cpu_seconds_by_process": per_process, "root_cpu_share": share,
            "accepted_by_worker": spread,
            "client_cpu_ms_per_message": client_cpu * 1000 / messages}


def deliver_run(run: Run, kind: str, messages: int, sessions: int, size: int,
                workers: int = 1, profile: Path | None = None) -> dict[str, Any]:
    """The production mode: the next hop (smtp-sink) is up from the start, so the server
    delivers while it accepts. Two figures from one run: the accept rate while delivering
    (the ``smtp-source`` wall clock) and the rate until the queue is empty."""
    with run.server(kind, deliver=True, workers=workers, profile=profile) as (server, sink):
        assert sink is not None
        pids = servers.process_tree(server.pid)
        cpu, before = servers.cpu_seconds(pids), servers.cpu_by_process(pids)
        sink_cpu = servers.cpu_seconds([sink.pid])
        started = time.monotonic()
        accepted, client_cpu = smtp_source(server.port, messages, sessions, size)
        emptied = wait_queue(server, lambda n: n == 0, max(120, messages / 10))
        sink_cpu = servers.cpu_seconds([sink.pid]) - sink_cpu
        pids = servers.process_tree(server.pid)
        cpu = servers.cpu_seconds(pids) - cpu
        per_process = servers.cpu_delta(before, servers.cpu_by_process(pids))
        share = root_share(per_process, server.pid)
        spread = dict(server.accepted_by) if isinstance(server, Smarthost) else {}
        seconds = emptied - started
        # Confirm with the operator's own tool that nothing is left (or stuck deferred):
        # `smarthost queue list` reads every worker's spool.
        left = server.queue_list() if isinstance(server, Smarthost) else server.postqueue_json()
        if left:
            raise RuntimeError(f"{kind}: {len(left)} messages still queued")
    return {"value": messages / seconds, "seconds": seconds, "accept_seconds": accepted,
            "accept_rate": messages / accepted, "cpu_ms_per_message": cpu * 1000 / messages,
            "processes": len(pids), "cpu_seconds_by_process": per_process,
            "root_cpu_share": share, "client_cpu_ms_per_message": client_cpu * 1000 / messages,
            "sink_cpu_ms_per_message": sink_cpu * 1000 / messages, "accepted_by_worker": spread}


def root_share(per_process: dict[str, float], root: int) -> float:
    """The share of the server's CPU (reaped children aside) spent in its first process:
    smarthost's master with workers, Postfix's master."""
    total = sum(per_process.values())
    mine = sum(v for k, v in per_process.items() if k.endswith(f"[{root}]"))
    return mine / total if total > 0 else 0.0


def read_banner(sock: socket.socket, buffer: bytearray) -> bool:
    """Reads what is there; True once a complete 220 greeting has arrived."""
    try:
        chunk = sock.recv(4096)
    except BlockingIOError:
        return False
    if not chunk:
        raise ConnectionError("closed before the greeting")
    buffer += chunk
    # Multi-line greetings: the last line is "220 " (no hyphen).
    return any(line.startswith(b"220 ") for line in bytes(buffer).split(b"\r\n"))


def idle_run(run: Run, kind: str, connections: int, workers: int = 1) -> dict[str, Any]:
    """``connections`` clients that read the greeting and then say nothing; the server's
    memory (all its processes) is measured while they sit there."""
    with run.server(kind, deliver=False, workers=workers) as (server, _):
        time.sleep(1)  # let start-up settle (Postfix starts qmgr, pickup... on demand)
        before = servers.memory_kib(servers.process_tree(server.pid))
        socks: list[socket.socket] = []
        sel = selectors.DefaultSelector()
        try:
            started = time.monotonic()
            buffers: dict[int, bytearray] = {}
            waiting = 0
            deadline = started + 120

            def greet(pending: int) -> int:
                """Read greetings until at most ``pending`` clients still wait for one."""
                nonlocal waiting
                while waiting > pending:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{kind}: {waiting} of {connections} idle clients "
                                           "got no greeting in 120 s")
                    for key, _ in sel.select(1.0):
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        if read_banner(sock, buffers[sock.fileno()]):
                            sel.unregister(sock)
                            waiting -= 1
                return waiting

            for _ in range(connections):
                # At most 500 connections not yet greeted: beyond the listen backlog the
                # kernel drops the handshake's last ACK, and a client that then only waits
                # for a greeting (sending nothing) never gets one: a client artefact.
                greet(500)
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex((LOOPBACK, server.port))
                socks.append(s)
                buffers[s.fileno()] = bytearray()
                sel.register(s, selectors.EVENT_READ)
                waiting += 1
            greet(0)
            all_greeted = time.monotonic() - started
            time.sleep(1)  # let the processes settle before reading their memory
            pids = servers.process_tree(server.pid)
            during = servers.memory_kib(pids)
            # The server must still serve: a new client gets a greeting while they all sit.
            t = time.monotonic()
            servers.wait_banner(server.port, timeout=30)
            new_client = time.monotonic() - t
        finally:
            sel.close()
            for s in socks:
                s.close()
    return {
        "value": during["rss_kib"] / 1024,
        "rss_mib": during["rss_kib"] / 1024,
        "pss_mib": during["pss_kib"] / 1024,
        "processes": during["processes"],
        "rss_before_mib": before["rss_kib"] / 1024,
        "pss_before_mib": before["pss_kib"] / 1024,
        "rss_per_connection_kib": (during["rss_kib"] - before["rss_kib"]) / connections,
        "pss_per_connection_kib": (during["pss_kib"] - before["pss_kib"]) / connections,
        "seconds_to_greet_all": all_greeted,
        "new_client_banner_seconds": new_client,
    }


# -- start-up ---------------------------------------------------------------------------------


def startup_run(run: Run, count: int) -> dict[str, Any]:
    """smarthost alone: start with ``count`` deferred messages in its spool."""
    directory = run.directory(f"startup-{count}")
    server = Smarthost(directory / "smarthost", servers.free_port(), certs=run.certs)
    server.write_config()
    t = time.monotonic()
    subprocess.run([str(servers.PYTHON), str(HERE / "genspool.py"), str(server.spool),
                    str(count)], check=True, cwd=servers.SOURCE or servers.REPO,
                   env=servers.smarthost_env())
    generated = time.monotonic() - t
    run.started.append(server)
    try:
        server.start(timeout=600)
        ready = server.wait_log("] ready", 1)
        recovered = server.wait_log(f": {count} queued, ", 1)
        line_at = server.wait_log(f"scheduler started with {count} queued", 1)
        rss = servers.memory_kib([server.pid])["rss_kib"] / 1024
        t = time.monotonic()
        server.stop()
        stopped = time.monotonic() - t
    finally:
        server.stop()
        if not run.keep:
            servers.remove_tree(directory)
    return {"messages": count, "recovered_seconds": recovered,
            "scheduler_started_seconds": line_at, "ready_seconds": ready,
            "rss_mib": rss, "stop_seconds": stopped, "generate_seconds": generated}


# -- profile ----------------------------------------------------------------------------------


def profile_run(run: Run, messages: int, sessions: int, size: int, prof: Path,
                deliver: bool = False) -> dict[str, Any]:
    if deliver:
        result = deliver_run(run, "smarthost", messages, sessions, size, profile=prof)
        result["value"] = result["accept_rate"]
    else:
        result = accept_run(run, "smarthost", messages, sessions, size, profile=prof)
    text = {}
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        stats = pstats.Stats(str(prof), stream=out)
        stats.strip_dirs().sort_stats(order).print_stats(25)
        text[order] = out.getvalue()
    prof.with_suffix(".txt").write_text(
        "\n".join(f"== top 25 by {k} ==\n{v}" for k, v in text.items())
    )
    return {"rate_under_profiler": result["value"], "prof": str(prof),
            "text": str(prof.with_suffix(".txt")), "top": text, "messages": messages,
            "areas": areas(prof), "workload": "accept while delivering" if deliver
            else "accept (deliveries deferred)"}


# -- reporting --------------------------------------------------------------------------------


def machine(source: str | None) -> dict[str, Any]:
    def output(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                  cwd=servers.REPO).stdout.strip()
        except OSError:
            return ""

    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": output(servers.POSTCONF, "-d", "-h", "mail_version"),
        "twisted": output(str(servers.PYTHON), "-c", "import twisted; print(twisted.__version__)"),
        "smarthost_commit": "(a directory)" if source and os.path.isdir(source) else output(
            "git", "rev-parse", "--short", f"{source or 'HEAD'}^{{commit}}"),
        "smarthost_source": source or "work tree",
        "uncommitted_changes": source is None and bool(output(
            "git", "status", "--porcelain", "--untracked-files=no", "smarthost")),
        "tmp_filesystem": output("df", "-T", tempfile.gettempdir()).splitlines()[-1:],
    }


# -- main -------------------------------------------------------------------------------------


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1 round, 1000 messages, start-up with 10,000 (about 2 minutes)")
    p.add_argument("--rounds", type=int, help="runs per server and workload (default 3)")
    p.add_argument("--messages", type=int, help="messages per run (default 5000)")
    p.add_argument("--size", type=int, default=4096, help="message payload bytes (4096)")
    p.add_argument("--sessions", default="1,20,100", help="accept workloads (1,20,100)")
    p.add_argument("--workers", default="1",
                   help="smarthost's [server] workers, one smarthost per value against the "
                        "same Postfix runs (1; e.g. 1,2; 0 is one per core)")
    p.add_argument("--no-postfix", action="store_true",
                   help="smarthost alone (no ratios): for before/after figures of a change")
    p.add_argument("--idle", type=int, default=1000, help="idle connections (1000)")
    p.add_argument("--many-idle", type=int, default=10000,
                   help="idle connections for smarthost alone (10000; Postfix would need as "
                        "many processes)")
    p.add_argument("--startup", help="start-up spool sizes (10000 quick, 10000,100000 full)")
    p.add_argument("--only", default="accept,deliver,idle,many-idle,startup,profile",
                   help="comma-separated subset of accept,deliver,idle,many-idle,startup,"
                        "profile,profile-deliver (deliver gives two rows: accept while "
                        "delivering, and accept + deliver until the queue is empty; "
                        "profile-deliver profiles that production mode)")
    p.add_argument("--source", metavar="REV|DIR",
                   help="run smarthost from a copy of this commit (git archive), or from this "
                        "directory (a copy of the tree), instead of the work tree: a fixed "
                        "version while the tree changes under the run")
    p.add_argument("--no-install", action="store_true", help="never run apt-get")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    a = p.parse_args()
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.messages = a.messages or (1000 if a.quick else 5000)
    a.startup = [int(n) for n in (a.startup or ("10000" if a.quick else "10000,100000"))
                 .split(",") if n]
    a.sessions = [int(n) for n in a.sessions.split(",") if n]
    a.workers = [int(n) for n in a.workers.split(",") if n]
    if not a.workers or min(a.workers) < 0:
        p.error("--workers: one or more counts (0: one per core, as in the config)")
    a.only = set(a.only.split(","))
    return a


def terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"bench: signal {signum}, cleaning up")


# (label, kind, workers): every server a comparative workload runs, in alternating order.
Target = tuple[str, str, int]
Once = Callable[[str, int], dict[str, Any]]


class Bench:
    """The workloads of one invocation and what they measured."""

    def __init__(self, args: argparse.Namespace, run: Run) -> None:
        self.args = args
        self.run = run
        self.workloads: list[dict[str, Any]] = []
        self.targets: list[Target] = [(f"smarthost w={n}", "smarthost", n)
                                      for n in args.workers]
        if not args.no_postfix:
            self.targets.append(("postfix", "postfix", 1))
        self.labels = [label for label, _, _ in self.targets]
        self.failures: list[dict[str, Any]] = []

    def workload(self, row_id: str, name: str, unit: str, better: str, once: Once,
                 also: tuple[tuple[str, str, str, str, str], ...] = ()) -> None:
        """Alternating runs (smarthost w=1, w=2, ..., Postfix, smarthost w=1, ...); ``also``
        adds rows (id, name, unit, better, key) read from the same runs."""
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in self.labels}
        for r in range(self.args.rounds):
            for label, kind, workers in self.targets:
                load = os.getloadavg()
                try:
                    result = once(kind, workers)
                except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
                    # One failed run (a server that did not start, a queue that did not
                    # empty) is reported and left out; the other runs still count.
                    print(f"  {name} round {r + 1} {label}: FAILED: {e}", flush=True)
                    self.failures.append({"workload": name, "round": r + 1, "server": label,
                                          "error": str(e)[-2000:]})
                    continue
                result["loadavg_before"] = load
                result["loadavg_after"] = os.getloadavg()
                runs[label].append(result)
                cpu = result.get("cpu_ms_per_message")
                print(f"  {name} round {r + 1} {label}: {result['value']:.1f} {unit}"
                      + (f" ({cpu:.2f} ms CPU per message)" if cpu is not None else "")
                      + f" [load {load[0]:.2f}]", flush=True)
        for rid, row, row_unit, row_better, key in ((row_id, name, unit, better, "value"),
                                                     *also):
            entry: dict[str, Any] = {"id": rid, "name": row, "unit": row_unit,
                                     "better": row_better, "servers": {}, "ratios": {}}
            for label, values in runs.items():
                if not values:
                    continue
                entry["servers"][label] = {"summary": summary([v[key] for v in values])}
                if key == "value":
                    entry["servers"][label]["runs"] = values
            if "postfix" in entry["servers"]:
                base = entry["servers"]["postfix"]["summary"]["median"]
                for label in entry["servers"]:
                    if label != "postfix":
                        entry["ratios"][label] = (
                            entry["servers"][label]["summary"]["median"] / base)
            self.workloads.append(entry)

    def comparisons(self) -> None:
        args, run, m, size = self.args, self.run, self.args.messages, self.args.size
        if "accept" in args.only:
            for s in args.sessions:
                def accept(kind: str, workers: int, s: int = s) -> dict[str, Any]:
                    return accept_run(run, kind, m, s, size, workers=workers)

                self.workload(f"accept{s}", f"accept {size} B, {s} session{'s' * (s > 1)}",
                              "msg/s", "higher", accept,
                              also=((f"cpu{s}", f"  server CPU per message, {s} sess.", "ms",
                                     "lower", "cpu_ms_per_message"),))
        if "deliver" in args.only:
            self.workload("deliver", "accept+deliver until empty, 20 sess.", "msg/s",
                          "higher", lambda k, w: deliver_run(run, k, m, 20, size, workers=w),
                          also=(("while-delivering", "accept while delivering, 20 sess.",
                                 "msg/s", "higher", "accept_rate"),
                                ("cpu-deliver", "  server CPU per message, deliver", "ms",
                                 "lower", "cpu_ms_per_message")))
        if "idle" in args.only:
            self.workload("idle", f"{args.idle} idle connections, RSS sum", "MiB", "lower",
                          lambda k, w: idle_run(run, k, args.idle, workers=w),
                          also=(("idle-pss", f"{args.idle} idle connections, PSS sum", "MiB",
                                 "lower", "pss_mib"),))


def smarthost_alone(args: argparse.Namespace, run: Run, results: dict[str, Any],
                    stamp: str) -> None:
    """The workloads without a Postfix counterpart: many idle connections, start-up and the
    profile (one worker: twistd's profiler sees one process)."""
    if "many-idle" in args.only:
        r = idle_run(run, "smarthost", args.many_idle)
        results["many_idle"] = {"connections": args.many_idle, **r}
        print(f"  {args.many_idle} idle connections, smarthost: RSS {r['rss_mib']:.1f} MiB, "
              f"PSS {r['pss_mib']:.1f} MiB", flush=True)
    if "startup" in args.only:
        results["startup"] = []
        for count in args.startup:
            rounds = 1 if count > 10000 or args.quick else args.rounds
            for _ in range(rounds):
                r = startup_run(run, count)
                results["startup"].append(r)
                print(f"  start-up with {count} queued: scheduler started "
                      f"{r['scheduler_started_seconds']:.2f} s, ready "
                      f"{r['ready_seconds']:.2f} s, RSS {r['rss_mib']:.0f} MiB", flush=True)
    # 2000 messages give a stable profile; the profiler itself slows the run down.
    if "profile" in args.only:
        prof = RESULTS / f"{stamp}-accept20.prof"
        results["profile"] = profile_run(run, min(args.messages, 2000), 20, args.size, prof)
    if "profile-deliver" in args.only:
        prof = RESULTS / f"{stamp}-deliver20.prof"
        results["profile_deliver"] = profile_run(run, min(args.messages, 2000), 20, args.size,
                                                 prof, deliver=True)


def main() -> None:
    args = parse()
    if os.geteuid() != 0:
        # Postfix's master, postqueue -c and smtp-sink -u all want root here.
        sys.exit("bench: run as root (it starts a private Postfix instance)")
    ensure_tools(install=not args.no_install)
    # The client and the server are separate processes; each inherits this limit.
    raise_fd_limit(max(args.idle * 2, args.many_idle) + 1024)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    began = time.monotonic()
    run = Run(args.keep)
    if args.source:
        use_source(run, args.source)
    bench = Bench(args, run)
    results: dict[str, Any] = {
        "started": stamp, "started_utc": datetime.datetime.now(datetime.UTC)
        .isoformat(timespec="seconds"), "mode": "quick" if args.quick else "full",
        "rounds": args.rounds, "messages": args.messages, "size": args.size,
        "workers": args.workers, "machine": machine(args.source), "loadavg_start": os.getloadavg(),
        "workloads": bench.workloads, "failures": bench.failures,
    }
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"bench: note: load average {load:.1f} on {os.cpu_count()} CPUs before starting; "
              "other work on this machine makes the figures noisy", flush=True)
    try:
        bench.comparisons()
        smarthost_alone(args, run, results, stamp)
    finally:
        run.close()
        results["elapsed_seconds"] = time.monotonic() - began
        results["loadavg_end"] = os.getloadavg()
        out = RESULTS / f"{stamp}.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
    report(results, bench.labels, out)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("bench: interrupted; servers stopped and temporary directories removed")
