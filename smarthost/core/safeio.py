"""Small file-system primitives every durable write here is built from."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries durable: a rename or create is only on disk once its
    directory is fsynced (Postfix and chasquid do the same)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Replace the file at ``path`` with ``data`` so that a crash leaves either the old file
    or the new one, never a mix or nothing (Postfix's commit: write, fsync, rename, fsync
    the directory).

    The temporary file lives in the same directory (a rename never crosses file systems),
    gets ``mode`` whatever the umask says (0600: secrets are the common case), and keeps the
    owner of the file it replaces when we may set it: a tool run as root must not leave a
    file the daemon's user can no longer read. ``path`` itself is replaced, so a symlink
    there becomes a file; callers that mean the link's target resolve it first.
    """
    target = os.fspath(path)
    directory = os.path.dirname(target) or "."
    try:
        old: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                               dir=directory)
    try:
        with open(fd, "wb") as f:
            os.fchmod(fd, mode)
            if old is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, old.st_uid, old.st_gid)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:
        fsync_dir(directory)
    except OSError as e:  # some file systems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
