"""A real HAProxy (the Debian package's /usr/sbin/haproxy) in front of smarthost nodes, for
end-to-end tests of a fleet.

HAProxy runs in the foreground (``-db``) with a generated configuration: one TCP frontend on
127.0.0.1, ``balance roundrobin`` over the nodes, PROXY protocol v2 to each node
(``send-proxy-v2``), and an HTTP health check of each node's ``/healthz`` on its ``[http]``
port. The frontend's socket is opened here and inherited (``bind fd@N``), so its port is known
before HAProxy starts and no other process can take it in between. A stats socket (unix, in a
short private directory: a socket path holds at most 107 bytes) lets the test read each
server's state. ``retries`` with ``option redispatch`` send a connection that a stopping node
refuses (its listeners close before HAProxy's checks mark it DOWN) on to another node, as a
production configuration would. Checks run every 200 ms, but a node slow to answer on a busy
machine gets 2 s (``timeout check``) before the check counts as failed. Usage::

    with haproxy(tmp_path, {"a": Node(port_a, http_a), "b": Node(port_b, http_b)}) as lb:
        lb.wait_servers({"a": "UP", "b": "UP"})
        smtplib.SMTP("127.0.0.1", lb.port, source_address=("127.0.0.2", 0))
        ...
"""

from __future__ import annotations

import csv
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import attrs

HAPROXY = "/usr/sbin/haproxy"
BACKEND = "nodes"
TICK = 0.1  # seconds between two reads of the stats when HAProxy prints nothing

CONFIG = """\
global
    stats socket {stats} mode 600 level admin
    log stderr format short local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 2s
    retries 2
    option redispatch 1

frontend smtp
    bind fd@{fd}
    default_backend {backend}

backend {backend}
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    default-server send-proxy-v2 check inter 200ms fall 2 rise 1
{servers}
"""


@attrs.frozen
class Node:
    """One backend server: its PROXY-protocol listener and its ``[http]`` port."""

    port: int
    http_port: int
    address: str = "127.0.0.1"


class HAProxy:
    """One HAProxy process; ``start`` returns once its stats socket answers."""

    def __init__(self, directory: Path, nodes: Mapping[str, Node]) -> None:
        self.directory = directory
        self.nodes = dict(nodes)
        self.config_path = directory / "haproxy.cfg"
        self.log: list[str] = []  # HAProxy's stderr: warnings, server state changes, tcplog
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._socket_dir = Path(tempfile.mkdtemp(prefix="haproxy-"))
        self.stats_path = self._socket_dir / "stats.sock"
        self._cond = threading.Condition()
        self._ended = False  # HAProxy's output ended: it exited
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> HAProxy:
        frontend = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            frontend.bind(("127.0.0.1", 0))
            frontend.listen(511)
            self.port = frontend.getsockname()[1]
            servers = "\n".join(
                f"    server {name} {n.address}:{n.port} check port {n.http_port}"
                for name, n in self.nodes.items()
            )
            self.config_path.write_text(CONFIG.format(
                stats=self.stats_path, fd=frontend.fileno(), backend=BACKEND, servers=servers
            ))
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config_path)],
                pass_fds=[frontend.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        finally:
            frontend.close()  # HAProxy holds its own copy
        assert self.proc.stdout is not None
        self._thread = threading.Thread(target=self._reader, args=(self.proc.stdout,),
                                        name="haproxy-output", daemon=True)
        self._thread.start()
        self._wait_stats(timeout)
        return self

    def _wait_stats(self, timeout: float) -> None:
        # HAProxy says nothing when its start-up is done: ask the stats socket until it
        # answers (a bounded poll; an exit meanwhile, e.g. a config error, fails at once).
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.command("show info")
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise TimeoutError("HAProxy's stats socket never answered:\n"
                                       + self.text()) from e
                self._wait_output(TICK)

    def command(self, line: str) -> str:
        """One command on the stats socket (non-interactive: HAProxy closes after it)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.stats_path))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` for the backend's servers: name -> column -> value (``status`` is
        UP, DOWN, "UP 1/2" going down...; ``check_status`` L7OK, L7STS, L4CON...)."""
        text = self.command("show stat").removeprefix("# ")
        rows = csv.DictReader(line for line in text.splitlines() if line)
        return {
            row["svname"]: row for row in rows
            if row["pxname"] == BACKEND and row["svname"] in self.nodes
        }

    def move(self, name: str, node: Node) -> None:
        """Point server ``name`` at the node's new ports (a node restarted on port 0), as
        an orchestrator does through the runtime API."""
        for line in (f"set server {BACKEND}/{name} addr {node.address} port {node.port}",
                     f"set server {BACKEND}/{name} check-port {node.http_port}"):
            answer = self.command(line)
            assert "rror" not in answer and "nknown" not in answer, (line, answer)
        self.nodes[name] = node

    def wait_servers(self, states: Mapping[str, str], timeout: float = 15.0) -> None:
        """Until every named server is in its state: "UP" (with its last check passed:
        L7OK) or "DOWN". HAProxy prints each change of state, so the wait wakes on that; the
        first passing check prints nothing, hence a read of the stats every TICK too."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.servers()
            if all(_in_state(current[name], state) for name, state in states.items()):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = {n: (r["status"], r["check_status"]) for n, r in current.items()}
                raise TimeoutError(f"servers not {dict(states)} but {seen}:\n" + self.text())
            self._wait_output(min(TICK, remaining))

    def wait_for(self, text: str | re.Pattern[str], timeout: float = 15.0) -> str:
        """The first line HAProxy printed that matches; fail at the deadline."""
        pattern = re.compile(re.escape(text)) if isinstance(text, str) else text

        def found() -> str | None:
            return next((line for line in self.log if pattern.search(line)), None)

        with self._cond:
            line = self._cond.wait_for(lambda: found() or self._ended, timeout)
        if isinstance(line, str):
            return line
        raise TimeoutError(f"no HAProxy line {pattern.pattern!r}:\n" + self.text())

    def _wait_output(self, timeout: float) -> None:
        """Wait until HAProxy prints a line (or ``timeout``); fail if it has exited."""
        with self._cond:
            seen = len(self.log)
            self._cond.wait_for(lambda: len(self.log) > seen or self._ended, timeout)
            if self._ended:
                assert self.proc is not None
                raise RuntimeError(f"HAProxy exited ({self.proc.wait()}):\n" + self.text())

    def _reader(self, stream: IO[bytes]) -> None:
        """Collect HAProxy's output (a thread: a full pipe would block HAProxy itself)."""
        for raw in stream:
            with self._cond:
                self.log.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.log)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop HAProxy (SIGTERM: a hard stop, open sessions are cut) and remove its
        socket directory; safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def _in_state(row: Mapping[str, str], state: str) -> bool:
    if row["status"] != state:
        return False
    return state != "UP" or row["check_status"].lstrip("* ") == "L7OK"


@contextmanager
def haproxy(directory: Path, nodes: Mapping[str, Node]) -> Iterator[HAProxy]:
    """A started HAProxy over ``nodes`` (name -> Node), stopped on the way out."""
    lb = HAProxy(directory, nodes)
    try:
        yield lb.start()
    finally:
        lb.stop()
