"""A private ``redis-server`` on loopback for the fleet tests (Debian's, never the system's
instance): no persistence, its files in a temporary directory, a port the kernel chose.

    with redis_server(tmp_path) as url:        # "redis://127.0.0.1:PORT/0"
        ...

or, to stop it, pause it (SIGSTOP: a Redis that accepts connections and never answers) and
bring it back mid-test::

    with RedisServer(tmp_path) as redis:
        redis.url; redis.kill(); redis.start(); redis.pause(); redis.resume()

Readiness is an event: the server's own "Ready to accept connections" line, then a PING
answered on the port, both under one deadline.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
READY = b"Ready to accept connections"


def needs_redis() -> pytest.MarkDecorator:
    """Skip where Debian's redis-server is not installed (``make test-deps`` installs it)."""
    return pytest.mark.skipif(
        not os.access(REDIS_SERVER, os.X_OK),
        reason=f"{REDIS_SERVER} is not installed (make test-deps installs redis-server)",
    )


def free_port() -> int:
    """A port the kernel says is free now (redis-server cannot take port 0 itself: to it, 0
    means no TCP at all); :meth:`RedisServer.start` tries another if it is taken meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(port: int, *words: str, timeout: float = 5.0) -> bytes:
    """Send one command in RESP and return the first reply line."""
    request = f"*{len(words)}\r\n".encode() + b"".join(
        f"${len(w.encode())}\r\n{w}\r\n".encode() for w in words
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply.strip()


class RedisServer:
    """One redis-server process in ``directory``, on the same port across restarts."""

    def __init__(self, directory: Path, timeout: float = 20.0) -> None:
        self.directory = directory
        self.timeout = timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = b""
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start it (again on its port after a kill, else on a free one); its URL."""
        for _ in range(5):
            port = self.port or free_port()
            if self._run(port):
                self.port = port
                return self.url
            if self.port:
                break  # our own port is taken: nothing else to try
        raise RuntimeError("redis-server did not start:\n" + self.output.decode(errors="replace"))

    def _run(self, port: int) -> bool:
        """Run it on ``port``; True once it answers PING, False when it exits first."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.output = b""  # this run's
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
             "--logfile", ""],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.paused = False
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while READY not in self.output:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.kill()
                    raise RuntimeError("redis-server was not ready in time")
                if not sel.select(remaining):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    self.proc.wait(10)
                    self.proc = None
                    return False
                self.output += chunk
        # Its output is not read from here on: at the default log level Redis writes only at
        # start, shutdown and saves (there are none), far from filling the pipe.
        return command(port, "PING") == b"+PONG"

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted (by the kernel) and nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL (a crash: connections reset, its data gone)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self._close_output()
            self.proc = None

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, then SIGKILL if it has not ended within 10 s."""
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        try:
            command(self.port, "SHUTDOWN", "NOSAVE", timeout=5)
        except OSError:
            pass  # gone or not answering: the kill below
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._close_output()
        self.proc = None

    def _close_output(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A redis-server for the block; yields its URL, ``redis://127.0.0.1:PORT/0``."""
    with RedisServer(directory) as server:
        yield server.url
