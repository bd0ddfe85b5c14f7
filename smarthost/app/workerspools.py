"""Where each worker process keeps its spool, for the daemon and for ``smarthost queue``.

With ``[server] workers = 1`` the spool is ``[queue] directory`` itself, as it always was.
With N > 1 every worker owns ``<[queue] directory>/worker-<i>`` (i = 1..N): a spool has one
writer (its ``lock``), so workers cannot share one. The administration side must see every
message that is on disk, so :func:`spool_directories` also names spools nobody serves any
more (``workers`` lowered, or switched from 1 to N with mail still in the root spool): their
mail stays visible and deletable instead of silently waiting forever.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from smarthost.app.config import Config
from smarthost.queue.segment import LOG, SEGMENT_SUFFIX

WORKER_PREFIX = "worker-"
HTTP_SOCKET = "http.sock"  # a worker's /metrics, /healthz and status page, for the master
_WORKER_DIR = re.compile(r"worker-([1-9][0-9]{0,3})")


def worker_count(config: Config) -> int:
    """The number of worker processes: ``[server] workers``, 0 meaning one per CPU core."""
    configured = config.server.workers
    if configured > 0:
        return configured
    return os.cpu_count() or 1


def worker_spool(config: Config, i: int) -> Path:
    """Worker ``i``'s (1-based) spool directory; the root spool when there is one worker."""
    if worker_count(config) == 1:
        return config.queue.directory
    if i < 1:
        raise ValueError(f"worker index starts at 1, got {i}")
    return config.queue.directory / f"{WORKER_PREFIX}{i}"


def http_socket(config: Config, i: int) -> Path:
    """Where worker ``i`` serves its HTTP side for the master (inside its spool: mode 0700)."""
    return worker_spool(config, i) / HTTP_SOCKET


def worker_index(spool: Path) -> int | None:
    """The worker number a spool directory belongs to (``worker-3`` → 3), None for the root."""
    match = _WORKER_DIR.fullmatch(spool.name)
    return int(match.group(1)) if match else None


def id_origin(spool: Path) -> str:
    """What ends every queue id a worker's spool makes (``worker-3`` → ``03``; the root: "").

    Each worker checks new ids only against its own spool; without this two workers could
    draw the same id (40 random bits in the same millisecond), and ``smarthost queue`` would
    not know which message an id means.
    """
    index = worker_index(spool)
    return "" if index is None else f"{index:02X}"


def holds_spool_files(directory: Path) -> bool:
    """Whether ``directory`` has at least one segment (``log/*.seg``): mail may be there."""
    try:
        names = os.listdir(directory / LOG)
    except OSError:
        return False
    return any(name.endswith(SEGMENT_SUFFIX) for name in names)


def spool_directories(config: Config) -> list[Path]:
    """Every spool the operator must see: the configured ones first, then leftovers.

    N = 1: the root, then any existing ``worker-K`` (left by an earlier N > 1). N > 1:
    ``worker-1`` .. ``worker-N`` (whether or not they exist yet), then any existing
    ``worker-K`` with K > N, then the root if it still holds segments (mail written before
    the switch to several workers).
    """
    count = worker_count(config)
    root = config.queue.directory
    if count == 1:
        return [root, *(root / f"{WORKER_PREFIX}{k}" for k in _leftover_indexes(root, 0))]
    result = [worker_spool(config, i) for i in range(1, count + 1)]
    result.extend(root / f"{WORKER_PREFIX}{k}" for k in _leftover_indexes(root, count))
    if holds_spool_files(root):
        result.append(root)
    return result


def _leftover_indexes(root: Path, above: int) -> list[int]:
    """The K of every ``worker-K`` directory under ``root`` with K > ``above``, ascending."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = []
    for name in names:
        match = _WORKER_DIR.fullmatch(name)
        if match and int(match.group(1)) > above and (root / name).is_dir():
            found.append(int(match.group(1)))
    return sorted(found)
