"""What start-up recovery sets aside in ``corrupt/``, never deleted by the code (an operator may
still deliver it by hand, and ``smarthost queue salvage`` reads it back):

``NNNNNNNN.<start>-<end>``  bytes of segment NNNNNNNN that are not records; for a format-2
                            segment preceded by a segment header with its nonce, so the copy
                            can be read like a segment on its own
``<queue id>``              an entry that passed its CRC but does not parse: the JSON, a blank
                            line, then the body
``ledger.jsonl``            one JSON object per line: what recovery knew about each message a
                            damaged stretch held (``lost``, ``done``, ``kept``, with the newest
                            entry a later record gave), and what salvage restored
                            (``salvaged``). The last line for an id is in force.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

from smarthost.core.envelope import QueueId
from smarthost.core.safeio import fsync_dir
from smarthost.queue.index import entry_bytes
from smarthost.queue.segment import (
    CORRUPT,
    FILE_MODE,
    FORMAT,
    Gap,
    SpoolPaths,
    create_exclusive,
    encode_segment_header,
    file_name,
    open_body,
    write_all,
)
from smarthost.queue.writer import Slot

LEDGER = "ledger.jsonl"
GAP_COPY = re.compile(r"(\d{8})\.(\d+)-(\d+)(?:\.\d+)?\Z")


def gap_copy_name(number: int, gap: Gap) -> str:
    return f"{number:08d}.{gap.start}-{gap.end}"


class Quarantine:
    """Copies damage out of the segments into ``corrupt/``, each copy durable (its directory
    entry included) before recovery truncates or removes the original."""

    def __init__(self, paths: SpoolPaths) -> None:
        self._paths = paths

    def copied(self, number: int, gap: Gap) -> str | None:
        """The copy an earlier start made of exactly these bytes, if any (damage in the middle
        of a segment stays there until the segment is deleted)."""
        relative = os.path.join(CORRUPT, gap_copy_name(number, gap))
        return relative if os.path.lexists(os.path.join(self._paths.root, relative)) else None

    def copy_gap(self, number: int, gap: Gap, fmt: int, nonce: bytes | None) -> str:
        with open(self._paths.segment(number), "rb") as src:
            src.seek(gap.start)
            data = src.read(gap.end - gap.start)
        parts = [data]
        if fmt == FORMAT and nonce is not None:
            parts.insert(0, encode_segment_header(nonce))
        return self._write(gap_copy_name(number, gap), parts)

    def copy_entry(self, slot: Slot, queue_id: QueueId) -> str:
        """The entry's JSON, a blank line, then the body: enough to deliver it by hand."""
        raw = entry_bytes(self._paths, slot)
        with open_body(self._paths.segment(slot.body_segment), slot.body_offset, slot.size,
                       slot.body_crc) as body:
            return self._write(file_name(queue_id), [raw, b"\n\n", body.read()])

    def truncate(self, number: int, size: int) -> None:
        fd = os.open(self._paths.segment(number), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write(self, name: str, parts: list[bytes]) -> str:
        # ``name`` is built from a segment number or a validated id; never overwrite earlier
        # finds.
        directory = self._paths.dir(CORRUPT)
        target, n = name, 0
        while os.path.lexists(os.path.join(directory, target)):
            n += 1
            target = f"{name}.{n}"
        path = os.path.join(directory, target)
        fd = create_exclusive(path)
        try:
            for part in parts:
                write_all(fd, part)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(directory)
        return os.path.join(CORRUPT, target)


class Ledger:
    """``corrupt/ledger.jsonl``: appended to under the spool's lock (by recovery, or by salvage
    in the process that holds it), each batch of lines durable before it returns."""

    def __init__(self, paths: SpoolPaths) -> None:
        self._path = os.path.join(paths.dir(CORRUPT), LEDGER)

    def append(self, notes: Iterable[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(n, sort_keys=True, separators=(",", ":")).encode("ascii")
                        + b"\n" for n in notes)
        if not data:
            return
        created = not os.path.lexists(self._path)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NOFOLLOW, FILE_MODE)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(os.path.dirname(self._path))

    def read(self) -> dict[QueueId, dict[str, Any]]:
        """The last note per id; a line that does not parse (a torn append) is skipped."""
        notes: dict[QueueId, dict[str, Any]] = {}
        try:
            with open(self._path, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return notes
        for line in lines:
            try:
                note = json.loads(line)
                notes[QueueId(note["id"])] = note
            except (ValueError, KeyError, TypeError):
                continue
        return notes
