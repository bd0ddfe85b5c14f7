"""The command a master runs for each worker: ``python -m smarthost.app.worker --config PATH
--worker I [--auth ...]``, which becomes ``twistd -n --pidfile= --logfile=- smarthost ...``
in the same process.

Why not run ``twistd`` directly: the inherited listening sockets are found through systemd's
variables, and Twisted believes ``LISTEN_FDS`` only when ``LISTEN_PID`` is the pid of the
process that reads it, which nobody knows before the fork. So this module, before anything
imports Twisted (``twisted.internet.endpoints`` reads the variables once, at import), sets
``LISTEN_PID`` to its own pid, and asks the kernel for SIGTERM when the master dies (a master
killed with SIGKILL must not leave workers serving its sockets). Everything else is twistd's
and :mod:`smarthost.app.tap`'s: the worker is the single-process daemon.

Nothing but the standard library is imported at module level, on purpose.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def main(argv: list[str] | None = None) -> None:
    os.environ["LISTEN_PID"] = str(os.getpid())
    _die_with_master(os.getppid())
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "-n", "--pidfile=", "--logfile=-", "smarthost",
                *(sys.argv[1:] if argv is None else argv)]
    run()  # type: ignore[no-untyped-call]


def _die_with_master(master: int) -> None:
    """SIGTERM when the master ends (Linux); the worker then stops as it would on any
    SIGTERM. Elsewhere, or where prctl fails, the master's own stop is all there is."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != master:  # the master died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    main()
