"""``smarthost queue salvage``: put back into the queue the messages that can be read back from
``corrupt/``.

A message is read back from a copy of damaged bytes when its record checks out, as it is or
after one flipped bit is undone with the CRC that caught it (:mod:`smarthost.queue.crcfix`):
in the header (magic, nonce, lengths, id, JSON, either CRC field) or in the body. Records are
only looked for where the spool wrote one: from the copy's start (the place a record was due),
then where each one ends, and in a format-2 copy at the segment's nonce; never by searching
for ``MAGIC``, which a sender can put in a body.

What recovery noted in ``corrupt/ledger.jsonl`` decides what is put back, so that running it
twice, or after the message was delivered, never queues anything twice: a message is restored
under its own id, with the newest entry recovery saw, only when it is not queued, its note
says ``lost`` (or, for copies an older version made, there is no note at all), and no earlier
salvage restored it. Each restored id is noted ``salvaged``.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator

import attrs

from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.core.errors import CorruptEntry
from smarthost.core.types import RunBlocking
from smarthost.queue.corrupt import GAP_COPY, LEDGER, Ledger
from smarthost.queue.crcfix import single_bit
from smarthost.queue.segment import (
    CORRUPT,
    FORMAT,
    MESSAGE,
    REMOVED,
    SEGMENT_HEADER_SIZE,
    STATE,
    Marker,
    Record,
    SpoolPaths,
    decode_entry,
    detect,
    parse_at,
    parse_id,
    repair_header,
    resync,
)
from smarthost.queue.spool import Spool

MAX_REPAIRED_BODY = 16 * 1024 * 1024  # ~3 s of syndrome walking; larger bodies are not fixed


@attrs.frozen
class Find:
    """A message read back from a copy."""

    entry: QueueEntry
    body: bytes
    copy: str  # corrupt/...
    repair: str  # what was undone; "" when the record checked out as it was


@attrs.frozen
class ReadBack:
    finds: tuple[Find, ...]
    unreadable: tuple[tuple[str, str], ...]  # (copy or id, why)
    noted: frozenset[str]  # copies recovery wrote notes for
    notes: dict[QueueId, dict[str, object]]


@attrs.frozen
class SalvageReport:
    restored: tuple[Find, ...]
    skipped: tuple[tuple[str, str], ...]  # (queue id or copy, why)


async def salvage(spool: Spool, run_blocking: RunBlocking) -> SalvageReport:
    """Reads in a thread (``run_blocking``), restores through ``spool`` (the daemon's, or the
    admin tool's, which takes the lock for it)."""
    found: ReadBack = await run_blocking(read_back, spool.paths)
    ledger = Ledger(spool.paths)
    restored: list[Find] = []
    skipped = list(found.unreadable)
    queued = set(spool.queue_ids())
    for find in found.finds:
        queue_id = find.entry.queue_id
        reason = _refusal(queued, find, found)
        if reason is None:
            try:
                await spool.restore(find.entry, find.body)
            except ValueError as e:
                reason = str(e)
        if reason is not None:
            skipped.append((str(queue_id), reason))
            continue
        ledger.append([{"id": queue_id.value, "fate": "salvaged", "copy": find.copy}])
        restored.append(find)
    return SalvageReport(tuple(restored), tuple(skipped))


def _refusal(queued: set[QueueId], find: Find, found: ReadBack) -> str | None:
    queue_id = find.entry.queue_id
    if queue_id in queued:
        return "queued already"
    fate = found.notes.get(queue_id, {}).get("fate")
    if fate == "salvaged":
        return "restored by an earlier salvage"
    if fate == "done":
        return "removed after the damage (delivered or deleted): nothing to restore"
    if fate == "kept":
        return "an intact copy was in force when the damage was found"
    if fate is None and find.copy in found.noted:
        return "recovery did not name it in this copy: check it by hand"
    return None


def read_back(paths: SpoolPaths) -> ReadBack:
    """Every message that can be read back, each id once, with its newest entry."""
    notes = Ledger(paths).read()
    noted = frozenset(str(n["copy"]) for n in notes.values() if "copy" in n)
    finds: dict[QueueId, Find] = {}
    unreadable: list[tuple[str, str]] = []
    directory = paths.dir(CORRUPT)
    for name in sorted(os.listdir(directory)):
        copy = f"{CORRUPT}/{name}"
        if GAP_COPY.match(name) is None:
            if name != LEDGER and parse_id(name.split(".")[0]) is not None:
                unreadable.append((copy, "an entry that does not parse: deliver it by hand"))
            continue
        with open(os.path.join(directory, name), "rb") as f:
            data = bytearray(f.read())
        for find in _messages(data, copy, unreadable):
            finds.setdefault(find.entry.queue_id, find)
    for queue_id, find in list(finds.items()):
        newer = notes.get(queue_id, {}).get("entry")
        if isinstance(newer, dict):
            try:
                entry = QueueEntry.from_json(newer)
            except Exception as e:
                unreadable.append((str(queue_id), f"its noted entry does not parse: {e}"))
                continue
            if entry.queue_id == queue_id and entry.size == find.entry.size:
                finds[queue_id] = attrs.evolve(find, entry=entry)
    return ReadBack(tuple(finds.values()), tuple(unreadable), noted, notes)


def _messages(data: bytearray, copy: str, unreadable: list[tuple[str, str]]) -> Iterator[Find]:
    """The messages of one copy, each with the last entry the copy itself gives it."""
    fmt, nonce, pos = detect(bytes(data[:SEGMENT_HEADER_SIZE]))
    if fmt != FORMAT or nonce is None or pos != SEGMENT_HEADER_SIZE:
        nonce, pos = None, 0  # the raw bytes of a format-1 segment
    found: dict[QueueId, Find] = {}
    for record, repair in _records(data, nonce, pos, copy, unreadable):
        raw = bytes(data[record.entry_offset : record.entry_offset + record.entry_length])
        queue_id = record.queue_id
        try:
            if record.kind == MESSAGE:
                body = bytes(data[record.body_offset : record.end])
                entry = decode_entry(queue_id, raw)
                if entry.size != len(body):
                    raise CorruptEntry(f"{queue_id}: body is {len(body)} bytes, entry says "
                                       f"{entry.size}")
                found[queue_id] = Find(entry, body, copy, repair)
            elif record.kind == STATE and queue_id in found:
                found[queue_id] = attrs.evolve(found[queue_id], entry=decode_entry(queue_id, raw))
            elif record.kind == REMOVED:
                found.pop(queue_id, None)
        except CorruptEntry as e:
            unreadable.append((str(queue_id), f"in {copy}: {e}"))
    yield from found.values()


def _records(data: bytearray, nonce: bytes | None, pos: int, copy: str,
             unreadable: list[tuple[str, str]]) -> Iterator[tuple[Record, str]]:
    ids: dict[bytes, QueueId] = {}
    while pos < len(data):
        item = parse_at(data, pos, nonce, ids)
        repair = ""
        if item is None:
            repair = repair_header(data, pos, nonce) or ""
            item = parse_at(data, pos, nonce, ids) if repair else None
        if item is None:
            following = resync(data, pos + 1, nonce, ids) if nonce is not None else None
            if following is None:
                unreadable.append((copy, f"no record can be read from byte {pos} on"))
                return
            unreadable.append((copy, f"bytes {pos}-{following} are not a record"))
            pos = following
            continue
        pos = item.end
        if isinstance(item, Marker):
            continue
        body = memoryview(data)[item.body_offset : item.end]
        if item.body_length and zlib.crc32(body) != item.body_crc:
            if item.body_length > MAX_REPAIRED_BODY:
                unreadable.append((str(item.queue_id), f"in {copy}: damaged body too large "
                                   "to repair"))
                continue
            fixes = single_bit(body, item.body_crc)
            if len(fixes) != 1:
                unreadable.append((str(item.queue_id), f"in {copy}: body damaged beyond one "
                                   "bit"))
                continue
            byte, bit = fixes[0]
            data[item.body_offset + byte] ^= 1 << bit
            repair = ", ".join(filter(None, [repair, f"body byte {byte} bit {bit} undone"]))
        yield item, repair
