"""systemd's readiness protocol (``sd_notify(3)``): one datagram per state change to the unix
socket named by ``$NOTIFY_SOCKET``, so a ``Type=notify`` (or ``notify-reload``) unit knows when
the daemon is ready, reloading or stopping.

Written here rather than taken from a library: the protocol is a few ``KEY=VALUE`` lines in a
datagram, and the daemon needs four of them. A name starting with ``@`` is a socket in the
abstract namespace (the ``@`` stands for a leading NUL byte).

A worker process (``[server] workers`` > 1) tells its master the same things the same way,
through the pipe at descriptor ``$SMARTHOST_NOTIFY_FD`` instead of a datagram socket: one
``KEY=VALUE`` field per line (a pipe keeps no message boundaries; ``STATUS`` is already one
line). The master, not the worker, is what systemd supervises.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

NOTIFY_FD_VARIABLE = "SMARTHOST_NOTIFY_FD"  # a worker's pipe to its master
_PIPE_BUF = 4096  # POSIX: a write of at most this many bytes to a pipe is never split


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SystemdNotify:
    """Sends state changes to systemd; does nothing when the daemon was not started by a
    unit that asked for them (no ``NOTIFY_SOCKET``).

    A notification that cannot be sent is reported through ``warn`` and otherwise ignored:
    systemd then times the unit out, which says more than a daemon that stops itself would.
    """

    def __init__(
        self,
        address: str | None,
        warn: Callable[[str], None],
        monotonic: Callable[[], int] = monotonic_usec,
        pipe: int | None = None,
    ) -> None:
        self._address = _socket_address(address) if address else None
        self._pipe = pipe
        self._warn = warn
        self._monotonic = monotonic

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str], warn: Callable[[str], None]
    ) -> SystemdNotify:
        fd = environ.get(NOTIFY_FD_VARIABLE, "")
        if fd.isdigit():
            # Never block the reactor on a master that does not read: a lost line is reported.
            os.set_blocking(int(fd), False)
            return cls(None, warn, pipe=int(fd))
        return cls(environ.get("NOTIFY_SOCKET") or None, warn)

    @property
    def enabled(self) -> bool:
        return self._address is not None or self._pipe is not None

    def ready(self) -> None:
        self.send("READY=1")

    def reloading(self) -> None:
        # systemd 253+ (Type=notify-reload) wants the time the reload began, to tell this
        # reload's READY=1 from an earlier one's; older versions ignore the field.
        self.send("RELOADING=1", f"MONOTONIC_USEC={self._monotonic()}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        """A one-line status ``systemctl status`` shows."""
        self.send("STATUS=" + " ".join(text.splitlines()))

    def send(self, *fields: str) -> None:
        if self._pipe is not None:
            self._write_pipe(self._pipe, fields)
            return
        if self._address is None:
            return
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                # Never block the reactor on a full socket buffer: a lost datagram is reported.
                s.setblocking(False)
                s.sendto(data, self._address)
        except OSError as e:
            self._warn(f"cannot notify systemd ({fields[0]}) at NOTIFY_SOCKET: {e}")

    def _write_pipe(self, fd: int, fields: tuple[str, ...]) -> None:
        # One write of less than PIPE_BUF bytes: the master never reads half a field.
        data = "".join(field + "\n" for field in fields).encode("utf-8", "replace")
        if len(data) > _PIPE_BUF:
            data = data[:_PIPE_BUF - 1] + b"\n"
        try:
            os.write(fd, data)
        except OSError as e:
            self._warn(f"cannot notify the master ({fields[0]}): {e}")


def _socket_address(name: str) -> str:
    return "\0" + name[1:] if name.startswith("@") else name
