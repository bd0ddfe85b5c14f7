"""Small file-system primitives every durable write here is built from."""

from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries durable: a rename or create is only on disk once its
    directory is fsynced (Postfix and chasquid do the same)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
