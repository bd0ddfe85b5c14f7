"""Where every queued message is: the spool's index, read from the segments.

Per queued id the index holds where its body and its entry in force are (a few dozen bytes;
entries themselves are read from disk when needed). The daemon reads it once, at recovery
(:mod:`smarthost.queue.recovery`), and keeps it up to date from every batch it writes; the
admin tool builds the same index by reading the segments while the daemon appends to them, so
a segment may vanish under it (compaction).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import attrs

from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.core.errors import CorruptEntry
from smarthost.queue.segment import (
    LOG,
    MESSAGE,
    REMOVED,
    STATE,
    Record,
    Scan,
    SpoolPaths,
    decode_entry,
    scan,
    segment_number,
)
from smarthost.queue.writer import COMMIT, RELOCATE, REMOVE, UPDATE, Batch, Slot


@attrs.define
class Index:
    """Where every queued message is, as read from the segments (or kept up to date since)."""

    slots: dict[QueueId, Slot] = attrs.Factory(dict)
    bodies: dict[int, set[QueueId]] = attrs.Factory(dict)  # segment -> ids with their body there
    segments: list[int] = attrs.Factory(list)  # present on disk, oldest first
    sizes: dict[int, int] = attrs.Factory(dict)  # segment -> bytes
    live_bytes: int = 0  # the bodies of queued messages

    def place(self, queue_id: QueueId, slot: Slot) -> None:
        # The new slot replaces the old in one step: a delivery thread looking the message
        # up meanwhile (it is being moved forward) must find one or the other, never none.
        old = self.slots.get(queue_id)
        self.slots[queue_id] = slot
        if old is not None:
            self.bodies[old.body_segment].discard(queue_id)
            self.live_bytes -= old.size
        self.bodies.setdefault(slot.body_segment, set()).add(queue_id)
        self.live_bytes += slot.size

    def restate(self, queue_id: QueueId, segment: int, offset: int, length: int) -> None:
        old = self.slots.get(queue_id)
        if old is not None:
            # A new Slot (a reader thread may hold the old one), built directly: attrs.evolve
            # is five times slower, and start-up restates every deferred message once.
            self.slots[queue_id] = Slot(old.body_segment, old.body_offset, old.size,
                                        old.body_crc, segment, offset, length)

    def drop(self, queue_id: QueueId) -> None:
        old = self.slots.pop(queue_id, None)
        if old is not None:
            self.bodies[old.body_segment].discard(queue_id)
            self.live_bytes -= old.size

    def add_segment(self, number: int) -> None:
        if number not in self.segments:
            self.segments.append(number)
            self.segments.sort()

    def forget_segment(self, number: int) -> None:
        if number in self.segments:
            self.segments.remove(number)
        self.bodies.pop(number, None)
        self.sizes.pop(number, None)

    def apply(self, batch: Batch) -> None:
        """What a durable batch did, so the daemon never reads its own segments again."""
        if batch.head:
            self.add_segment(batch.head)
            self.sizes[batch.head] = batch.head_size
        for number in batch.deleted:
            self.forget_segment(number)
        for op in batch.ops:
            if op.error is not None:
                continue
            if op.kind in (COMMIT, RELOCATE) and op.placed is not None:
                self.place(op.queue_id, op.placed)
            elif op.kind == UPDATE and op.entry_at is not None:
                self.restate(op.queue_id, *op.entry_at)
            elif op.kind == REMOVE:
                self.drop(op.queue_id)

    def replay(self, number: int, found: Scan) -> list[Record]:
        """Apply one segment's records, in file order; returns the ``STATE`` and ``REMOVED``
        records that named no queued message (recovery asks what they say about damage)."""
        self.add_segment(number)
        self.sizes[number] = found.size
        orphans = []
        for item in found.items:
            if not isinstance(item, Record):
                continue
            if item.kind == MESSAGE:
                self.place(item.queue_id, Slot(
                    number, item.body_offset, item.body_length, item.body_crc,
                    number, item.entry_offset, item.entry_length,
                ))
            elif item.queue_id not in self.slots:
                orphans.append(item)
            elif item.kind == STATE:
                self.restate(item.queue_id, number, item.entry_offset, item.entry_length)
            elif item.kind == REMOVED:
                self.drop(item.queue_id)
        return orphans


def segment_numbers(paths: SpoolPaths) -> list[int]:
    numbers = []
    for name in os.listdir(paths.dir(LOG)):
        number = segment_number(name)
        if number is not None:
            numbers.append(number)
    return sorted(numbers)


def read_index(paths: SpoolPaths) -> Index:
    """The admin tool's index: gaps are a write in progress, or recovery's job."""
    index = Index()
    for number in segment_numbers(paths):
        try:
            found = scan(paths.segment(number))
        except FileNotFoundError:  # deleted by the daemon while the admin tool reads
            continue
        index.replay(number, found)
    return index


def read_entry(paths: SpoolPaths, queue_id: QueueId, slot: Slot) -> QueueEntry:
    """``FileNotFoundError`` when compaction deleted the segment meanwhile: the caller looks up
    the message's new place and tries again."""
    return decode_entry(queue_id, entry_bytes(paths, slot))


def entry_bytes(paths: SpoolPaths, slot: Slot) -> bytes:
    with open(paths.segment(slot.entry_segment), "rb") as f:
        f.seek(slot.entry_offset)
        return f.read(slot.entry_length)


def read_entries(
    paths: SpoolPaths, index: Index, ids: Iterable[QueueId]
) -> Iterator[tuple[QueueId, QueueEntry | None, Exception | None]]:
    """Each id's entry in force, reading each segment once (grouped, in file order)."""
    by_segment: dict[int, list[tuple[int, QueueId]]] = {}
    for queue_id in ids:
        slot = index.slots[queue_id]
        by_segment.setdefault(slot.entry_segment, []).append((slot.entry_offset, queue_id))
    for number in sorted(by_segment):
        wanted = sorted(by_segment[number], key=lambda t: t[0])
        try:
            fd = os.open(paths.segment(number), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # compacted away while the admin tool reads
            continue
        try:
            for offset, queue_id in wanted:
                slot = index.slots[queue_id]
                try:
                    # pread, not a map: the daemon may truncate a segment under the admin
                    # tool, and a mapped page past the new end is SIGBUS, not an error.
                    raw = os.pread(fd, slot.entry_length, offset)
                    if len(raw) != slot.entry_length:
                        raise CorruptEntry(f"{queue_id}: entry cut short")
                    entry = decode_entry(queue_id, raw)
                    if entry.size != slot.size:
                        raise CorruptEntry(
                            f"{queue_id}: body is {slot.size} bytes, entry says {entry.size}"
                        )
                except CorruptEntry as e:
                    yield queue_id, None, e
                    continue
                yield queue_id, entry, None
        finally:
            os.close(fd)
