"""The spool directory itself: its layout made on first use, the lock of the one process that
may append, and the receptions a crash left in ``tmp/``."""

from __future__ import annotations

import fcntl
import os

from smarthost.core.safeio import fsync_dir
from smarthost.queue.segment import CORRUPT, DIR_MODE, LOG, TMP, SpoolPaths

LEGACY = ("data", "state")  # the one-file-per-message layout before the log


class SpoolLocked(OSError):
    """Another process (a running daemon) holds the spool's lock."""


def make_directories(paths: SpoolPaths) -> None:
    created = False
    if not os.path.isdir(paths.root):
        os.makedirs(paths.root, mode=DIR_MODE)
        created = True
    for name in LEGACY:
        path = paths.dir(name)
        if os.path.isdir(path) and os.listdir(path):
            # Never silently ignore mail: the operator decides what happens to it.
            raise OSError(
                f"{path} holds messages in the spool layout before the log, which this "
                "version does not read; deliver them with the previous version first"
            )
    for name in (TMP, LOG, CORRUPT):
        path = paths.dir(name)
        if not os.path.isdir(path):
            os.mkdir(path, DIR_MODE)
            created = True
    if created:
        # The first segment's directory fsync does not cover the directories' own entries.
        fsync_dir(paths.root)
        fsync_dir(os.path.dirname(paths.root))


def take_lock(paths: SpoolPaths) -> int:
    """One appender at a time: two daemons on one spool would each lose the other's mail.
    Returns the locked descriptor; closing it releases the lock."""
    fd = os.open(paths.lock(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolLocked(
            f"another process (a running smarthost?) holds {paths.lock()}"
        ) from None
    return fd


def clear_tmp(paths: SpoolPaths) -> list[str]:
    """Unlink every reception a crash left in ``tmp/`` (none was acknowledged); their names."""
    tmp = paths.dir(TMP)
    removed = []
    for name in sorted(os.listdir(tmp)):
        path = os.path.join(tmp, name)
        if os.path.isdir(path) and not os.path.islink(path):
            raise OSError(f"{path}: unexpected directory in the spool")
        os.unlink(path)
        removed.append(name)
    return removed
