"""Runs ``twistd -n smarthost`` as a subprocess for end-to-end tests.

Every listener is bound to port 0 on 127.0.0.1; the real ports are read from the daemon's own
"listening on" log lines, and readiness is its "ready" line: the harness waits on those
events (with a deadline), never on a sleep.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

TWISTD = str(Path(sys.executable).with_name("twistd"))
SMARTHOST = str(Path(sys.executable).with_name("smarthost"))
LISTENING = re.compile(r"(submission|submissions|smtp) listening on ([\d.:a-f]+):(\d+)")
# The daemon's own "ready": with [server] workers > 1 the master's, not a worker's (whose
# lines the master re-emits as "[worker-<i> smarthost#info] ready").
DRAINING = "SIGTERM: draining for"  # [server] drain
READY = re.compile(r"\[smarthost#info\] ready$")

BASE_CONFIG = """\
hostname = "mx.smarthost.test"
[listen]
submission = ["tcp:0:interface=127.0.0.1"]
submissions = ["tcp:0:interface=127.0.0.1"]
smtp = ["tcp:0:interface=127.0.0.1"]
[http]
listen = ["tcp:0:interface=127.0.0.1"]
"""


class Daemon:
    """One smarthost daemon in ``directory`` (config, certs, var/ all live there)."""

    def __init__(self, directory: Path, config: str = "") -> None:
        self.directory = directory
        self.config_path = directory / "smarthost.toml"
        self.config_path.write_text(BASE_CONFIG + config)
        self.ports: dict[str, int] = {}
        self.extra_args: list[str] = []  # twistd options, e.g. --uid/--gid
        self.env: dict[str, str] = {}  # added to the daemon's environment, e.g. NOTIFY_SOCKET
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []  # this run's log lines
        self.history: list[str] = []  # earlier runs' (after a stop or kill9 and start)
        self._pending = b""

    def start(self, timeout: float = 30.0) -> Daemon:
        self.launch()
        self.wait_for(READY, timeout)
        return self

    def launch(self) -> Daemon:
        """Start the process without waiting for ``ready`` (for a start that must fail)."""
        # A restart waits for *this* run's lines: the previous run's go to history.
        self.history += self.log
        self.log = []
        self.ports = {}
        self._pending = b""
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile=-", *self.extra_args, "smarthost",
             "--config", str(self.config_path)],
            cwd=self.directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        return self

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the daemon to end by itself; its exit status (its log is then complete)."""
        assert self.proc is not None
        try:
            self.wait_for(re.compile(r"(?!)"), timeout)  # matches nothing: reads to the end
        except RuntimeError:
            pass  # the end of its output: it exited
        status = self.proc.wait(timeout)
        self._drain()
        return status

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_for(
        self, text: str | re.Pattern[str], timeout: float = 30.0, count: int = 1
    ) -> str:
        """Read the daemon's log until ``count`` lines match (returns the last one); fail on
        exit or deadline."""
        assert self.proc is not None and self.proc.stdout is not None
        pattern = re.compile(re.escape(text)) if isinstance(text, str) else text
        seen = [line for line in self.log if pattern.search(line)]
        if len(seen) >= count:
            return seen[count - 1]
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no log line {pattern.pattern!r}:\n" + self.text())
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"daemon exited waiting for {pattern.pattern!r}:\n"
                                       + self.text())
                self._pending += chunk
                *lines, self._pending = self._pending.split(b"\n")
                # Keep every line (a later wait may want one that came in the same chunk).
                for raw in lines:
                    line = raw.decode("utf-8", "replace")
                    self.log.append(line)
                    m = LISTENING.search(line)
                    if m:
                        self.ports.setdefault(m.group(1), int(m.group(3)))
                    if pattern.search(line):
                        seen.append(line)
                if len(seen) >= count:
                    return seen[count - 1]

    def text(self) -> str:
        return "\n".join(self.log)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        draining = sum(DRAINING in line for line in self.log)
        self.proc.send_signal(signal.SIGTERM)
        if self._drains() and not draining:  # [server] drain: one SIGTERM drains, two stop
            try:
                self.wait_for(DRAINING, timeout)
                self.proc.send_signal(signal.SIGTERM)
            except (RuntimeError, TimeoutError):
                pass  # it stopped anyway (or will be killed below)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        self._drain()

    def _drains(self) -> bool:
        """Whether this run drains on SIGTERM: ``[server] drain`` set, and ready (the
        handler is installed once the daemon runs)."""
        try:
            drain = tomllib.loads(self.config_path.read_text()).get("server", {}).get("drain")
        except (OSError, tomllib.TOMLDecodeError):
            return False
        return bool(drain) and any(READY.search(line) for line in self.log)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(15)
        self._drain()

    def _drain(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            rest = self._pending + self.proc.stdout.read()
            self.log += rest.decode("utf-8", "replace").splitlines()
            self._pending = b""
            self.proc.stdout.close()

    def admin(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the ``smarthost`` admin command against this daemon's config."""
        argv = [SMARTHOST, *args]
        return subprocess.run(
            argv, cwd=self.directory, input=stdin, capture_output=True, text=True, timeout=60
        )

    def add_user(self, name: str, password: str) -> None:
        result = self.admin("passwd", "--users", "var/users", name, stdin=password + "\n")
        assert result.returncode == 0, result.stderr


def client_tls() -> ssl.SSLContext:
    """The tests' TLS client: the daemon's certificate is self-signed, so no verification
    (what is tested is the server side of TLS, not the PKI)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@contextmanager
def dns_server(zone_text: str, directory: Path) -> Iterator[int]:
    """``zone_text`` served by tests/dnsserver.py in its own process; yields its UDP/TCP port
    on 127.0.0.1 (point ``[delivery] nameservers`` at it)."""
    zone = directory / "zone.txt"
    zone.write_text(zone_text)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("dnsserver.py")), "--zone", str(zone),
         "--port", "0"],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(30), "the DNS server printed no port"
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(15)


def connect_burst(port: int, count: int) -> list[socket.socket]:
    """``count`` connections made back to back, before anything is read: what spreads over
    the workers of a master, each of which takes one connection and then leaves the socket to
    the others for a moment. Sequential sessions, one after the other, may all go to
    whichever worker the kernel wakes first."""
    return [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]


class AdoptedSMTP(smtplib.SMTP):
    """smtplib over a socket connected already (one of :func:`connect_burst`'s)."""

    def __init__(self, sock: socket.socket) -> None:
        self._adopted = sock
        super().__init__("127.0.0.1", sock.getpeername()[1], timeout=30)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._adopted


def mx_config(mx_port: int, workers: int = 1, retry: int = 1) -> str:
    """A daemon that relays everything to ``mx_port`` (the test MX, or a closed port to keep
    the mail queued), retrying after ``retry`` seconds, no limit in the way (the crash matrix
    and the workers' tests)."""
    return f"""
[server]
workers = {workers}
[relay]
trusted_networks = ["127.0.0.0/8"]
[queue]
retry = [{retry}]
[delivery]
nameservers = ["127.0.0.1:9"]
[delivery.routes]
"*" = "smtp:127.0.0.1:{mx_port}"
[limits]
connections_per_ip = 1000
messages_per_user_per_hour = 100000000
hold_user_after_per_hour = 100000000
"""


T = TypeVar("T")


def fired(d: Deferred[T]) -> T:
    """The result of a Deferred that has already fired (a spool opened offline, with
    ``run_blocking=maybeDeferred``, runs synchronously); its failure is raised."""
    results: list[T | Failure] = []
    d.addBoth(results.append)
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    assert not isinstance(result, Failure)
    return result
