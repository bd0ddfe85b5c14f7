"""Start-up recovery: read every segment, checking every record, and decide what each stretch
of unreadable bytes meant.

**Torn writes.** Only the last batch a process wrote can be unfinished: each batch starts
after the previous one's ``fdatasync`` returned, and every batch ends with a marker. So bytes
that cannot be read at the end of the newest segment, after its last marker, are the one
unfinished batch: never acknowledged, cut off and not copied (the ids they name are logged).

**Damage.** Everything else that cannot be read is synced data that went bad: it is copied to
``corrupt/``, the reader resynchronises at the next record (format 2), and every queue id it
held is named, from the manifest of the batch marker that follows it (or, where that is lost
too, from the damaged headers). For each named record recovery decides what the loss means:
a message whose only copy it was is ``lost`` (``smarthost queue salvage`` may restore it); a
lost ``STATE`` of a still queued message means it would be delivered again with an older
state, so the message is ``held``; a lost ``REMOVED`` is applied. Format-1 segments keep their
old rule (nothing after a bad header is read), and ids found by searching their bytes are only
named, never acted on: a body could have planted them.

An entry that passes its CRC but does not parse is copied to ``corrupt/<id>`` and removed.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator

import attrs

from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.queue.corrupt import Ledger, Quarantine
from smarthost.queue.index import Index, read_entries, segment_numbers
from smarthost.queue.segment import (
    FORMAT,
    HEADER_SIZE,
    HEADER_SIZE_V1,
    KIND_NAMES,
    MAGIC,
    MESSAGE,
    REMOVED,
    SEGMENT_HEADER_SIZE,
    STATE,
    Gap,
    Record,
    Scan,
    SpoolPaths,
    decode_entry,
    decode_manifest,
    parse_at,
    parse_id,
    read_range,
    repair_header,
    scan_bytes,
)


class Fate(enum.StrEnum):
    """What a record in a damaged stretch means for its message."""

    LOST = "lost"  # its only copy: not queued any more (salvage may restore it)
    DONE = "done"  # the message was removed after this record was written: nothing is lost
    KEPT = "kept"  # another copy of the message is in force
    SUPERSEDED = "superseded"  # a later record says what this one said, or more
    HELD = "held"  # a newer state was lost: held until an operator releases it
    REMOVED = "removed"  # its removal record was lost: removed now
    STALE = "maybe stale"  # format 1: a newer state may have been lost; nothing was done
    UNFINISHED = "unfinished"  # in the unfinished last batch: never acknowledged


@attrs.frozen
class Affected:
    queue_id: QueueId
    kind: str  # "message", "state", "removed", or "record" when the damage hides which
    offset: int  # where the record started in its segment
    fate: Fate


@attrs.frozen
class Damage:
    """Bytes of a segment start-up could not read as records (or an entry that does not parse)."""

    segment: str  # e.g. "log/00000003.seg"
    start: int
    end: int
    moved_to: str | None  # the copy in corrupt/ (None: a torn tail, never acknowledged)
    reason: str
    affected: tuple[Affected, ...] = ()


@attrs.frozen
class RecoveryReport:
    """What start-up recovery found and did, for the operator log."""

    queued: int  # committed messages found intact
    removed_tmp: tuple[str, ...] = ()  # names in tmp/: receptions never acknowledged
    torn: tuple[Damage, ...] = ()  # the unfinished last batch: never acknowledged
    corrupt: tuple[Damage, ...] = ()  # damage to synced data, and entries that do not parse

    @property
    def clean(self) -> bool:
        return not (self.removed_tmp or self.torn or self.corrupt)

    @property
    def lost(self) -> tuple[QueueId, ...]:
        return tuple(a.queue_id for d in self.corrupt for a in d.affected if a.fate == Fate.LOST)


@attrs.frozen
class Recovered:
    """What start-up read from the segments, every record checked."""

    index: Index
    newest: int  # the newest segment's number; 0 when there is none
    intact: dict[QueueId, QueueEntry]  # every queued message whose entry reads
    damaged: list[QueueId]  # entries copied aside but still indexed: the spool removes them
    held: dict[QueueId, QueueEntry]  # entries to write back held (a newer state was lost)
    dropped: list[QueueId]  # messages whose lost REMOVED record the spool writes again
    torn: tuple[Damage, ...]
    corrupt: tuple[Damage, ...]


# How far a name read from damaged bytes can be trusted: from a batch manifest; from a header
# at a place only the spool writes (a record boundary, or MAGIC + nonce); found by searching.
SURE, ANCHORED, LOOSE = 2, 1, 0


@attrs.frozen(order=True)
class _Named:
    offset: int
    kind: int  # 0 when unknown
    queue_id: QueueId = attrs.field(order=False)
    trust: int = attrs.field(order=False)


@attrs.frozen
class _Finding:
    number: int
    found: Scan
    gap: Gap
    named: tuple[_Named, ...]
    torn: bool


@attrs.define
class _Later:
    """Records after the damage that name a message no longer indexed: a ``REMOVED`` says it
    was done with, a ``STATE`` holds its newest entry."""

    removed: dict[QueueId, tuple[int, int]] = attrs.Factory(dict)
    states: dict[QueueId, tuple[int, Record]] = attrs.Factory(dict)

    def note(self, number: int, record: Record) -> None:
        if record.kind == REMOVED:
            self.removed[record.queue_id] = (number, record.start)
        elif record.kind == STATE:
            self.states[record.queue_id] = (number, record)


def recover_index(paths: SpoolPaths) -> Recovered:
    """Replay every segment, then judge and quarantine what could not be read."""
    index, later = Index(), _Later()
    numbers = segment_numbers(paths)
    newest = numbers[-1] if numbers else 0
    findings: list[_Finding] = []
    watched: set[QueueId] = set()
    for number in numbers:
        with open(paths.segment(number), "rb") as f:
            buf = f.read()
        found = scan_bytes(buf)
        mark = max((m.end for m in found.markers()), default=0)
        for gap in found.items:
            if isinstance(gap, Gap):
                named = tuple(_names(buf, found, gap))
                torn = number == newest and gap.tail and gap.start >= mark and (
                    found.format != 0 or found.size < SEGMENT_HEADER_SIZE + HEADER_SIZE)
                findings.append(_Finding(number, found, gap, named, torn))
                watched.update(n.queue_id for n in named)
        for record in index.replay(number, found):
            if record.queue_id in watched:
                later.note(number, record)
    judge = _Judge(paths, index, later)
    for finding in findings:
        judge.finding(finding)
    for number in list(index.segments):
        if index.sizes.get(number) == 0:  # holds nothing (an unfinished first batch, cut off)
            os.unlink(paths.segment(number))
            index.forget_segment(number)

    intact: dict[QueueId, QueueEntry] = {}
    damaged: list[QueueId] = []
    for queue_id, entry, error in read_entries(paths, index, index.slots):
        if entry is not None:
            intact[queue_id] = entry
            continue
        slot = index.slots[queue_id]
        moved_to = judge.quarantine.copy_entry(slot, queue_id)
        judge.corrupt.append(Damage(
            judge.rel(slot.entry_segment), slot.entry_offset,
            slot.entry_offset + slot.entry_length, moved_to, str(error),
            (Affected(queue_id, "message", slot.entry_offset, Fate.LOST),),
        ))
        damaged.append(queue_id)
    held = {
        queue_id: attrs.evolve(e, envelope=attrs.evolve(e.envelope, held=True))
        for queue_id in judge.hold if (e := intact.get(queue_id)) is not None
    }
    return Recovered(index, newest, intact, damaged, held,
                     [i for i in judge.drop if i in intact], tuple(judge.torn),
                     tuple(judge.corrupt))


def _names(buf: bytes, found: Scan, gap: Gap) -> Iterator[_Named]:
    """Every record the gap held, as far as it can be told: from the batch markers first."""
    named: dict[int, _Named] = {}
    for marker in found.markers():
        raw = buf[marker.manifest_offset : marker.manifest_offset + marker.manifest_length]
        for kind, queue_id, offset in decode_manifest(raw):
            if gap.start <= offset < gap.end:
                named[offset] = _Named(offset, kind, queue_id, SURE)
    repaired = _repaired(buf, found, gap)
    if repaired is not None:
        named.setdefault(repaired.offset, repaired)
    for named_here in _headers(buf, found, gap):
        named.setdefault(named_here.offset, named_here)
    return iter(sorted(named.values()))


def _repaired(buf: bytes, found: Scan, gap: Gap) -> _Named | None:
    """The record due at the gap's start, read as it is (a damaged body) or once one flipped
    bit of its header is undone: its kind and id are then certain."""
    if found.format == 0 or (found.format == FORMAT and gap.start < SEGMENT_HEADER_SIZE):
        return None
    nonce = found.nonce if found.format == FORMAT else None
    data = bytearray(buf[gap.start : gap.end])
    item = parse_at(data, 0, nonce, {})
    if item is None and repair_header(data, 0, nonce) is not None:
        item = parse_at(data, 0, nonce, {})
    return _Named(gap.start, item.kind, item.queue_id, ANCHORED) if isinstance(
        item, Record) else None


def _headers(buf: bytes, found: Scan, gap: Gap) -> Iterator[_Named]:
    """Ids in damaged headers: at the gap's start (where a record was due), and wherever the
    segment's nonce marks one; in format 1 (and unreadable segments) wherever MAGIC is, which
    only names, since a body can hold such bytes."""
    if found.format == FORMAT and found.nonce is not None:
        pattern, trust, layout = MAGIC + found.nonce, ANCHORED, (20, 21, HEADER_SIZE)
    else:
        pattern, trust, layout = MAGIC, LOOSE, (4, 5, HEADER_SIZE_V1)
    places: dict[int, int] = {}
    if found.format == 1 or (gap.start >= SEGMENT_HEADER_SIZE and found.format == FORMAT):
        places[gap.start] = ANCHORED  # where the spool wrote a record
    at = buf.find(pattern, gap.start, gap.end)
    while at != -1:
        places.setdefault(at, trust)
        at = buf.find(pattern, at + 1, gap.end)
    kind_at, length_at, id_at = layout
    for offset, how in places.items():
        if offset + id_at > len(buf):
            continue
        ident = buf[offset + id_at : offset + id_at + buf[offset + length_at]]
        queue_id = parse_id(ident.decode("ascii", "replace"))
        if queue_id is not None:
            kind = buf[offset + kind_at]
            yield _Named(offset, kind if kind in (MESSAGE, STATE, REMOVED) else 0, queue_id, how)


class _Judge:
    """Decides each finding's meaning, copies it aside, and collects what the spool must do."""

    def __init__(self, paths: SpoolPaths, index: Index, later: _Later) -> None:
        self._paths, self._index, self._later = paths, index, later
        self.quarantine = Quarantine(paths)
        self._ledger = Ledger(paths)
        self.torn: list[Damage] = []
        self.corrupt: list[Damage] = []
        self.hold: list[QueueId] = []
        self.drop: list[QueueId] = []

    def rel(self, number: int) -> str:
        return os.path.relpath(self._paths.segment(number), self._paths.root)

    def finding(self, finding: _Finding) -> None:
        number, gap, found = finding.number, finding.gap, finding.found
        if finding.torn and found.format != 1:
            self.torn.append(Damage(self.rel(number), gap.start, gap.end, None,
                                    "unfinished write at the end of the log",
                                    self._affected(finding, Fate.UNFINISHED)))
            self._cut(number, gap.start)
            return
        affected = self._affected(finding)
        for a in affected if not finding.torn else ():  # a torn write changes nothing
            if a.fate == Fate.HELD and a.queue_id not in self.hold:
                self.hold.append(a.queue_id)
            elif a.fate == Fate.REMOVED and a.queue_id not in self.drop:
                self.drop.append(a.queue_id)
        moved_to = self.quarantine.copied(number, gap)
        acted = any(a.fate in (Fate.HELD, Fate.REMOVED) for a in affected)
        if moved_to is not None and not acted:
            return  # reported at the start that copied it
        if moved_to is None:
            # The notes first: a crash before the copy makes this start's work happen again.
            self._ledger.append(self._notes(finding, affected, gap))
            moved_to = self.quarantine.copy_gap(number, gap, found.format, found.nonce)
        damage = Damage(self.rel(number), gap.start, gap.end, moved_to,
                        self._reason(finding), affected)
        (self.torn if finding.torn else self.corrupt).append(damage)
        if gap.tail:
            self._cut(number, gap.start)

    def _reason(self, finding: _Finding) -> str:
        if finding.torn:  # format 1 has no markers: the end might have been synced
            return "unfinished write at the end of the log (old format: copied all the same)"
        if finding.found.format == 0:
            return "unreadable segment (neither its header nor a record checks out)"
        if finding.gap.start == 0:
            return "damaged segment header"
        return "unreadable bytes at the end" if finding.gap.tail else "unreadable bytes"

    def _cut(self, number: int, size: int) -> None:
        self.quarantine.truncate(number, size)
        self._index.sizes[number] = size

    def _affected(self, finding: _Finding, fate: Fate | None = None) -> tuple[Affected, ...]:
        return tuple(
            Affected(n.queue_id, KIND_NAMES.get(n.kind, "record"), n.offset,
                     fate or self._fate(finding.number, n))
            for n in finding.named
        )

    def _fate(self, number: int, named: _Named) -> Fate:
        here = (number, named.offset)
        slot = self._index.slots.get(named.queue_id)
        if slot is not None:
            if named.kind == MESSAGE:
                return Fate.KEPT
            if max((slot.body_segment, slot.body_offset),
                   (slot.entry_segment, slot.entry_offset)) > here:
                return Fate.SUPERSEDED
            if named.trust == LOOSE:
                return Fate.STALE
            return Fate.REMOVED if named.kind == REMOVED and named.trust == SURE else Fate.HELD
        if named.kind in (STATE, REMOVED):
            return Fate.SUPERSEDED  # the message is not queued whatever it said
        removed = self._later.removed.get(named.queue_id)
        return Fate.DONE if removed is not None and removed > here else Fate.LOST

    def _notes(self, finding: _Finding, affected: tuple[Affected, ...],
               gap: Gap) -> Iterator[dict[str, object]]:
        """For salvage: which messages are lost, and the newest entry a later record kept."""
        copy = f"corrupt/{finding.number:08d}.{gap.start}-{gap.end}"
        for a in affected:
            if a.fate not in (Fate.LOST, Fate.DONE, Fate.KEPT) or a.kind == "state":
                continue
            note: dict[str, object] = {"id": a.queue_id.value, "fate": str(a.fate), "copy": copy}
            number, record = self._later.states.get(a.queue_id, (0, None))
            if a.fate == Fate.LOST and record is not None and (number, record.start) > (
                    finding.number, a.offset):
                raw = read_range(self._paths.segment(number), record.entry_offset,
                                 record.entry_length)
                note["entry"] = decode_entry(a.queue_id, raw).to_json()
            yield note
