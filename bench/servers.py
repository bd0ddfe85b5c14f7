"""The servers a benchmark run talks to: a private Postfix instance, smarthost under twistd,
and Postfix's smtp-sink as the next hop. Each lives in its own directory under the run's
temporary directory, listens on 127.0.0.1 only, and is stopped by :meth:`stop` (idempotent)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

SBIN = "/usr/sbin"
POSTFIX = f"{SBIN}/postfix"
POSTCONF = f"{SBIN}/postconf"
POSTQUEUE = f"{SBIN}/postqueue"
SMTP_SOURCE = f"{SBIN}/smtp-source"
SMTP_SINK = f"{SBIN}/smtp-sink"

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
TWISTD = VENV_BIN / "twistd"
SMARTHOST = VENV_BIN / "smarthost"
PYTHON = VENV_BIN / "python"

LOOPBACK = "127.0.0.1"

# Where smarthost's code comes from: the work tree (None) or a copy of one commit
# (bench/run --source REV), put first on PYTHONPATH for every smarthost process.
SOURCE: Path | None = None


def smarthost_env() -> dict[str, str]:
    env = dict(os.environ)
    if SOURCE is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(SOURCE), *filter(None, [env.get("PYTHONPATH")])])
    return env


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_banner(port: int, timeout: float = 30.0) -> None:
    """Until a new connection to ``port`` gets a 220 greeting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=5) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SMTP banner on {LOOPBACK}:{port}")
        time.sleep(0.05)


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may hold spaces.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids``, with that of their reaped children (Postfix's master
    reaps every short-lived daemon it started)."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_by_process(pids: list[int]) -> dict[str, float]:
    """Each process's own user + system CPU seconds so far, keyed ``name[pid]``: shows how
    the work spreads over a master and its workers (or Postfix's daemons)."""
    result = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
        fields = stat[stat.rindex(b")") + 2 :].split()
        result[f"{name}[{pid}]"] = sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")
    return result


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Each process's CPU seconds between two :func:`cpu_by_process` readings (a process
    started in between counts from zero)."""
    return {name: round(seconds - before.get(name, 0.0), 3) for name, seconds in after.items()}


def memory_kib(pids: list[int]) -> dict[str, int]:
    """Summed RSS and PSS (kB) of ``pids``. RSS counts shared pages once per process, which
    overstates a multi-process server; PSS splits each shared page between its sharers."""
    rss = pss = 0
    counted = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            counted += 1
        except OSError:
            continue
    return {"rss_kib": rss, "pss_kib": pss, "processes": counted}


def _worker_of(line: bytes) -> str:
    """``worker-2`` for a line the master re-emitted from worker 2 (``... [worker-2 ...]``),
    ``daemon`` for a single process's own line."""
    start = line.find(b" [worker-")
    if start < 0:
        return "daemon"
    end = line.find(b" ", start + 2)
    return line[start + 2 : end].decode(errors="replace")


class SmtpSink:
    """Postfix's ``smtp-sink``: accepts every message and throws it away."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SmtpSink:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [SMTP_SINK, "-m", "1000", "-t", "60"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # smtp-sink refuses to keep root privileges
        with open(self.directory / "smtp-sink.log", "wb") as log:
            self.proc = subprocess.Popen(
                [*argv, f"{LOOPBACK}:{self.port}", "1024"], stdout=log, stderr=log,
                start_new_session=True,
            )
        wait_banner(self.port)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


class Smarthost:
    """``twistd -n smarthost --config CONF`` with its spool under ``directory``."""

    name = "smarthost"

    @property
    def label(self) -> str:
        return f"smarthost w={self.workers}"

    def __init__(
        self, directory: Path, next_hop: int, *, certs: Path, profile: Path | None = None,
        workers: int = 1,
    ) -> None:
        self.directory = directory
        self.workers = workers
        self.port = free_port()
        self.next_hop = next_hop
        self.certs = certs
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None
        self.config = directory / "smarthost.toml"
        self.logfile = directory / "twistd.log"
        self.spool = directory / "spool"

    def write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # Every limit that would refuse or hold benchmark traffic is raised far beyond it:
        # 5000 messages an hour from one trusted address is the workload, not abuse.
        self.config.write_text(f"""\
hostname = "smarthost.bench.test"
[server]
workers = {self.workers}
cpu_affinity = true     # a dedicated node's setting: each worker on a core of its own
[listen]
submission = ["tcp:{self.port}:interface={LOOPBACK}:backlog=1024"]
submissions = []
smtp = []
[tls]
certificate = "{self.certs}/smarthost.pem"
key = "{self.certs}/smarthost.key"
[auth]
users = "users"
[relay]
trusted_networks = ["127.0.0.0/8"]
[queue]
directory = "spool"
retry = [3600]          # a deferred message is not retried during a run
delay_warning = 0
[delivery]
nameservers = ["127.0.0.1:9"]   # never a real resolver: every route below is static
local = "maildir:maildir"
[delivery.routes]
"*" = "smtp:{LOOPBACK}:{self.next_hop}"
[http]
listen = ["tcp:{free_port()}:interface={LOOPBACK}"]   # not the default 2580: may be taken
[limits]
connections = 100000
connections_per_ip = 100000
messages_per_user_per_hour = 1000000000
hold_user_after_per_hour = 1000000000
""")

    def argv(self) -> list[str]:
        # twistd's own profiler wraps reactor.run() (start-up imports stay out of the profile)
        # and writes the pstats file when the reactor stops (on SIGTERM).
        profile = [] if self.profile is None else [
            f"--profile={self.profile}", "--profiler=cprofile", "--savestats"]
        return [str(TWISTD), "-n", "--pidfile=", f"--logfile={self.logfile}", *profile,
                "smarthost", "--config", str(self.config)]

    def start(self, timeout: float = 60.0) -> Smarthost:
        if not self.config.exists():
            self.write_config()
        self._seen: list[tuple[float, bytes]] = []  # (seconds since start, line)
        self._log = None
        self._pending = b""
        self.accepted = self.finished = 0  # messages, from the log (one recipient each)
        self.accepted_by: dict[str, int] = {}  # per worker ("worker-2"), from the log prefix
        self.started_at = time.monotonic()
        with open(self.directory / "stderr", "wb") as stderr:
            self.proc = subprocess.Popen(
                self.argv(), cwd=self.directory, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                env=smarthost_env(),
            )
        # With workers, the master says "ready" once every worker has; the workers' own
        # lines come through its log too, as "[worker-<i> ...] ...".
        self.wait_log("] ready", timeout, skip="[worker-")
        return self

    def wait_log(self, text: str, timeout: float, skip: str | None = None) -> float:
        """Seconds from start until ``text`` first appeared in the log (on a line without
        ``skip``). The log file is polled every 10 ms, so that is the resolution (twistd's own
        timestamps have whole seconds)."""
        assert self.proc is not None
        needle = text.encode()
        unwanted = skip.encode() if skip else None
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for at, line in self._seen[checked:]:
                if needle in line and (unwanted is None or unwanted not in line):
                    return at
            checked = len(self._seen)
            if self._read_log():
                continue
            if self.proc.poll() is not None:
                raise RuntimeError(f"smarthost exited before {text!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"smarthost: no {text!r} in {timeout}s:\n{self.tail()}")
            time.sleep(0.01)

    def _read_log(self) -> bool:
        """New log lines into ``_seen`` and the counters; False when there were none.

        twistd rotates its log at 1 MB (``twistd.log`` becomes ``twistd.log.1``): the open
        handle follows the renamed file to its end, then the new file is opened.
        """
        if self._log is None:
            try:
                self._log = open(self.logfile, "rb")
            except FileNotFoundError:
                return False
        chunk = self._log.read()
        if not chunk:
            try:
                rotated = os.stat(self.logfile).st_ino != os.fstat(self._log.fileno()).st_ino
            except FileNotFoundError:
                rotated = False
            if not rotated:
                return False
            chunk = self._log.read()  # written after our read, before the rename
            self._log.close()
            self._log = None
            if not chunk:
                return True
        now = time.monotonic() - self.started_at
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            self._seen.append((now, line))
            if b": accepted from " in line:
                self.accepted += 1
                by = _worker_of(line)
                self.accepted_by[by] = self.accepted_by.get(by, 0) + 1
            elif b": removed (" in line:  # delivered, bounced or deleted: gone from the spool
                self.finished += 1
        return True

    def tail(self, lines: int = 15) -> str:
        text = []
        for path in (self.logfile, self.directory / "stderr"):
            try:
                text += path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                pass
        return "\n".join(text)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def queue_size(self) -> int:
        """Messages accepted and not yet removed from the spool, counted from the daemon's own
        log lines: the spool is a log, and reading it every 50 ms would load the machine it
        measures."""
        while self._read_log():
            pass
        return self.accepted - self.finished

    def queue_list(self) -> list[object]:
        out = subprocess.run(
            [str(SMARTHOST), "queue", "--config", str(self.config), "list", "--json"],
            capture_output=True, text=True, timeout=300, check=True, env=smarthost_env(),
        ).stdout
        import json

        result: list[object] = json.loads(out)
        return result

    def stop(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)  # a profiled run writes its .prof on the way out
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix instance: its own main.cf/master.cf, queue and data directories under
    ``directory``, started with ``postfix -c DIR start``; nothing under /etc/postfix is used
    or changed. No chroot (Debian's default jails need a prepared copy of /etc)."""

    name = "postfix"
    label = "postfix"

    def __init__(self, directory: Path, next_hop: int, *, deliver: bool) -> None:
        self.directory = directory
        self.port = free_port()
        self.next_hop = next_hop
        self.deliver = deliver
        self.config_dir = directory / "etc"
        self.queue_dir = directory / "queue"
        self.data_dir = directory / "data"
        self.logfile = directory / "maillog"
        self.running = False

    def main_cf(self) -> dict[str, str]:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.logfile),
            "maillog_file_prefixes": str(self.directory),
            "myhostname": "postfix.bench.test",
            "mydomain": "bench.test",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # Permissive for loopback; relaying is still limited to mynetworks.
            "smtpd_client_restrictions": "",
            "smtpd_helo_restrictions": "",
            "smtpd_sender_restrictions": "",
            "smtpd_recipient_restrictions": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # smarthost does no reverse lookup of its clients either.
            "smtpd_peername_lookup": "no",
            "relayhost": f"[{LOOPBACK}]:{self.next_hop}",
            "default_transport": "smtp",
            "smtp_dns_support_level": "disabled",
            # 1000 idle sessions are 1000 smtpd processes (default limit 100).
            "default_process_limit": "1200",
            "biff": "no",
            "smtputf8_enable": "yes",
        }
        if not self.deliver:
            # Accept-only: the queue manager runs as usual (so smtpd's in_flow_delay flow
            # control sees its normal tokens) but moves every message straight to the
            # deferred queue without a delivery attempt.
            settings["defer_transports"] = "smtp"
        return settings

    def _postconf(self, *args: str) -> None:
        subprocess.run([POSTCONF, "-c", str(self.config_dir), *args], check=True,
                       stdout=subprocess.DEVNULL)

    def start(self) -> Postfix:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        # The postfix user must reach data_directory and maillog_file; mkdtemp makes 0700.
        for d in (self.directory, *self.directory.parents):
            if not os.stat(d).st_mode & 0o001:
                os.chmod(d, os.stat(d).st_mode | 0o011)
        (self.config_dir / "main.cf").write_text("")
        (self.config_dir / "master.cf").write_text(
            MASTER_CF.format(listen=f"{LOOPBACK}:{self.port}")
        )
        self._postconf(*(f"{k}={v}" for k, v in self.main_cf().items()))
        for d in (self.queue_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        postfix = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix.pw_uid, postfix.pw_gid)
        self.running = True
        subprocess.run([POSTFIX, "-c", str(self.config_dir), "start"], check=True,
                       capture_output=True)
        wait_banner(self.port)
        return self

    @property
    def pid(self) -> int:
        return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])

    def queue_size(self) -> int:
        """Files in the queues a message lives in until it is delivered."""
        count = 0
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.queue_dir / name):
                count += len(files)
        return count

    def postqueue_json(self) -> list[object]:
        import json

        out = subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-j"],
                             capture_output=True, text=True, timeout=300, check=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        try:
            master = self.pid
        except (OSError, ValueError):
            master = None
        subprocess.run([POSTFIX, "-c", str(self.config_dir), "stop"],
                       capture_output=True, check=False)
        if master is not None:
            # `postfix stop` returns once master has the signal; wait for it to be gone.
            deadline = time.monotonic() + 20
            while _alive(master) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(master):
                for pid in process_tree(master):
                    _kill(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return b") Z " not in f.read()
    except OSError:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit("servers.py is a module of bench/run.py")
