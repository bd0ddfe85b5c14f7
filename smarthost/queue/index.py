"""Where every queued message is: the spool's index, read from the segments.

Per queued id the index holds where its body and its entry in force are (a few dozen bytes;
entries themselves are read from disk when needed). The daemon reads it once, at recovery, and
keeps it up to date from every batch it writes; the admin tool builds the same index by reading
the segments while the daemon appends to them, so a segment may vanish under it (compaction).

**Recovery** (:func:`recover_index`) reads every segment, checking every record's checksums.
A record the crash cut short at the end of the newest segment is dropped: it was never
acknowledged (a last record damaged after its sync would look the same; that cannot be told
apart). Damage anywhere else is copied to ``corrupt/`` (once: a later start finds the copy).
A damaged body is skipped by the length its intact header declares; after a damaged header
the rest of that segment is copied out and cut off, because where the next record starts is
unknown (:func:`smarthost.queue.segment.scan` says why it never searches for one).

The queue API, the lock and the batching are in :mod:`smarthost.queue.spool`; the format of a
segment is in :mod:`smarthost.queue.segment`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import attrs

from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.core.errors import CorruptEntry
from smarthost.core.safeio import fsync_dir
from smarthost.queue.segment import (
    COMMIT,
    CORRUPT,
    LOG,
    MESSAGE,
    RELOCATE,
    REMOVE,
    REMOVED,
    STATE,
    UPDATE,
    Batch,
    Damage,
    Gap,
    Slot,
    SpoolPaths,
    create_exclusive,
    decode_entry,
    file_name,
    open_body,
    scan,
    segment_number,
    write_all,
)


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

    def apply(self, batch: Batch) -> None:
        """What a durable batch did, so the daemon never reads its own segments again."""
        if batch.head:
            self.add_segment(batch.head)
            self.sizes[batch.head] = batch.head_size
        for number in batch.deleted:
            self.segments.remove(number)
            self.bodies.pop(number, None)
            self.sizes.pop(number, None)
        for op in batch.ops:
            if op.error is not None:
                continue
            if op.kind in (COMMIT, RELOCATE) and op.placed is not None:
                self.place(op.queue_id, op.placed)
            elif op.kind == UPDATE and op.entry_at is not None:
                self.restate(op.queue_id, *op.entry_at)
            elif op.kind == REMOVE:
                self.drop(op.queue_id)


@attrs.frozen
class Recovered:
    """What start-up read from the segments, every record checked."""

    index: Index
    newest: int  # the newest segment's number; 0 when there is none
    intact: dict[QueueId, QueueEntry]  # every queued message whose entry reads
    damaged: list[QueueId]  # entries copied aside but still indexed: the spool removes them
    torn: tuple[Damage, ...]
    corrupt: tuple[Damage, ...]


def recover_index(paths: SpoolPaths) -> Recovered:
    """The daemon's start: unlike :func:`read_index`, every gap is damage to set aside, and every
    entry is parsed (the scheduler's start needs them all)."""
    index = Index()
    quarantine = Quarantine(paths)
    numbers = segment_numbers(paths)
    for number in numbers:
        last = number == numbers[-1]
        for gap in replay_segment(paths, index, number):
            quarantine.gap(number, gap, last)

    intact: dict[QueueId, QueueEntry] = {}
    damaged: list[QueueId] = []
    for queue_id, entry, error in read_entries(paths, index, index.slots):
        if entry is not None:
            intact[queue_id] = entry
            continue
        quarantine.entry(index.slots[queue_id], queue_id, str(error))
        damaged.append(queue_id)
    return Recovered(index, (numbers or [0])[-1], intact, damaged, tuple(quarantine.torn),
                     tuple(quarantine.corrupt))


def segment_numbers(paths: SpoolPaths) -> list[int]:
    numbers = []
    for name in os.listdir(paths.dir(LOG)):
        number = segment_number(name)
        if number is not None:
            numbers.append(number)
    return sorted(numbers)


def read_index(paths: SpoolPaths) -> Index:
    index = Index()
    for number in segment_numbers(paths):
        for _ in replay_segment(paths, index, number):
            pass  # a gap seen from outside is a write in progress, or recovery's job
    return index


def replay_segment(paths: SpoolPaths, index: Index, number: int) -> Iterator[Gap]:
    """Apply one segment's records to ``index``; yields the gaps between them."""
    try:
        items = list(scan(paths.segment(number)))
    except FileNotFoundError:  # deleted by the daemon while the admin tool reads
        return
    index.add_segment(number)
    index.sizes[number] = items[-1].end if items else 0
    for item in items:
        if isinstance(item, Gap):
            yield item
        elif item.kind == MESSAGE:
            index.place(item.queue_id, Slot(
                number, item.body_offset, item.body_length, item.body_crc,
                number, item.entry_offset, item.entry_length,
            ))
        elif item.kind == STATE:
            index.restate(item.queue_id, number, item.entry_offset, item.entry_length)
        elif item.kind == REMOVED:
            index.drop(item.queue_id)


def read_entry(paths: SpoolPaths, queue_id: QueueId, slot: Slot) -> QueueEntry:
    """``FileNotFoundError`` when compaction deleted the segment meanwhile: the caller looks up
    the message's new place and tries again."""
    return decode_entry(queue_id, _entry_bytes(paths, slot))


def _entry_bytes(paths: SpoolPaths, slot: Slot) -> bytes:
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


class Quarantine:
    """Recovery's damage: copied to ``corrupt/`` (never deleted: an operator may still deliver
    it by hand) and listed for the report."""

    def __init__(self, paths: SpoolPaths) -> None:
        self._paths = paths
        self.torn: list[Damage] = []
        self.corrupt: list[Damage] = []

    def gap(self, number: int, gap: Gap, last: bool) -> None:
        """A tail torn by the crash at the end of the newest segment was never acknowledged:
        it is only cut off. Any other gap is copied out first (a tail, then cut off too)."""
        if gap.tail and last:
            self.torn.append(Damage(self._rel(number), gap.start, gap.end, None,
                                    "unfinished write at the end of the log"))
        elif (damage := self._copy_out(number, gap)) is not None:
            self.corrupt.append(damage)
        if gap.tail:
            self._truncate(number, gap.start)

    def entry(self, slot: Slot, queue_id: QueueId, reason: str) -> None:
        """The entry's JSON, a blank line, then the body: enough to deliver it by hand."""
        target = self._corrupt_path(file_name(queue_id))
        raw = _entry_bytes(self._paths, slot)
        with open_body(self._paths.segment(slot.body_segment), slot.body_offset,
                       slot.size) as body:
            self._write_corrupt(target, [raw, b"\n\n", body.read()])
        self.corrupt.append(Damage(self._rel(slot.entry_segment), slot.entry_offset,
                                   slot.entry_offset + slot.entry_length,
                                   os.path.relpath(target, self._paths.root), reason))

    def _rel(self, number: int) -> str:
        return os.path.relpath(self._paths.segment(number), self._paths.root)

    def _truncate(self, number: int, size: int) -> None:
        fd = os.open(self._paths.segment(number), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _corrupt_path(self, name: str) -> str:
        # ``name`` is built from a segment number or a validated id; never overwrite earlier finds.
        target, n = name, 0
        while os.path.lexists(os.path.join(self._paths.dir(CORRUPT), target)):
            n += 1
            target = f"{name}.{n}"
        return os.path.join(self._paths.dir(CORRUPT), target)

    def _copy_out(self, number: int, gap: Gap) -> Damage | None:
        """None when an earlier start copied exactly these bytes already (damage in the middle
        of a segment stays there until the segment is deleted)."""
        name = f"{number:08d}.{gap.start}-{gap.end}"
        if os.path.lexists(os.path.join(self._paths.dir(CORRUPT), name)):
            return None
        target = self._corrupt_path(name)
        with open(self._paths.segment(number), "rb") as src:
            src.seek(gap.start)
            data = src.read(gap.end - gap.start)
        self._write_corrupt(target, [data])
        reason = "unreadable bytes at the end" if gap.tail else "unreadable bytes"
        return Damage(self._rel(number), gap.start, gap.end,
                      os.path.relpath(target, self._paths.root), reason)

    @staticmethod
    def _write_corrupt(path: str, parts: list[bytes]) -> None:
        """Durable, directory entry included, before recovery truncates or removes the
        original."""
        fd = create_exclusive(path)
        try:
            for part in parts:
                write_all(fd, part)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(path))
