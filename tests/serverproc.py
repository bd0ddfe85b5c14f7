"""Starting and stopping the private servers the tests run (slapd, krb5kdc): neither gives a
readiness signal, so we wait until its port accepts a connection, bounded by a deadline."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, name: str, output: Callable[[], str],
    timeout: float,
) -> None:
    """Return once 127.0.0.1:``port`` accepts a connection; raise with the server's last
    output if it exits first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {output()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # no readiness signal to wait on; bounded by the deadline
    raise RuntimeError(f"{name} did not listen in time")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """TERM, then KILL after 10 s; nothing when it already ended."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
