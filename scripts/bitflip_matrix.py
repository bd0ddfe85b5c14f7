"""The bit-flip matrix: flip one bit of a spool, recover it, count what was lost, and salvage.

SPEC: "Damage found in the spool at start-up is never deleted: it is copied to corrupt/ and
logged with every queue id it affects; only the last unsynced batch may be dropped as a torn
write." This script checks that promise one bit at a time. It builds a reference spool with the
real :class:`~smarthost.queue.spool.Spool`: an old-format segment (as the version before the
nonce wrote it), an older segment and the newest one, holding every record kind (messages in
memory and streamed from tmp/, updates, removals, batch markers, several records per batch).
Then, for every chosen position, it copies the spool, flips one bit there, starts the spool
(recovery), logs what the daemon logs at start (``smarthost.app.recoverylog``), compares the
queue with what was acknowledged, runs ``salvage``, and starts once more::

    .venv/bin/python scripts/bitflip_matrix.py            # every byte, one bit each
    .venv/bin/python scripts/bitflip_matrix.py --all-bits # every bit (eight times longer)
    .venv/bin/python scripts/bitflip_matrix.py --fields   # each field of each record (seconds)

Counted per flip, summed: acknowledged messages lost with a log line naming them as lost, lost
without one (must be 0), duplicates (a removed message back in the queue, or one sent on with
an older state: recipients would get it twice), held (an older state kept back for the
operator), damaged bodies served (must be 0), messages nobody sent (must be 0), files in
corrupt/, messages salvaged, damage reported again at the next start (must be 0). fsync is
skipped unless ``--sync``: this matrix checks what recovery reads and decides; durability is
``scripts/crash_matrix.py``'s. Exit status 0 when the
must-be-zero counts are zero, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher

from smarthost.app.recoverylog import log_recovery
from smarthost.core.envelope import Envelope, QueueEntry, QueueId, Recipient
from smarthost.core.errors import CorruptEntry
from smarthost.core.maillog import MailLog
from smarthost.queue.corrupt import LEDGER
from smarthost.queue.salvage import salvage
from smarthost.queue.segment import (
    HEADER_SIZE,
    HEADER_SIZE_V1,
    MAGIC,
    MESSAGE,
    PREFIX_V1,
    REMOVED,
    SEGMENT_HEADER_SIZE,
    STATE,
    Gap,
    Marker,
    encode_entry,
    scan,
)
from smarthost.queue.spool import Spool

Flip = tuple[str, int, int]  # segment file name, byte offset, bit


def run_now(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args, **kwargs)


class Later:
    """A run_blocking that holds jobs until ``pump``: operations submitted meanwhile share the
    next batch, as they do under load."""

    def __init__(self) -> None:
        self.jobs: list[Deferred[Any]] = []

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append(d)
        return d.addCallback(lambda _: f(*args, **kwargs))

    def pump(self) -> None:
        while self.jobs:
            self.jobs.pop(0).callback(None)


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    if not out:
        raise RuntimeError("a spool operation did not finish")
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def _envelope(n: int) -> Envelope:
    return Envelope(sender=f"sender{n}@example.test",
                    recipients=(Recipient(f"rcpt{n}@example.net"),),
                    client_address="192.0.2.7", user="alice", received_at=1_700_000_000.0)


def _body(n: int, size: int) -> bytes:
    head = f"Subject: message {n}\r\nReceived: by matrix; queue id looks like 0123456789AB\r\n\r\n"
    return (head.encode() + b"line of the body\r\n" * (size // 18 + 1))[:size]


@attrs.frozen
class Expected:
    queued: dict[QueueId, tuple[QueueEntry, bytes]]
    removed: frozenset[QueueId]


def _v1_record(kind: int, queue_id: QueueId, raw: bytes, body: bytes) -> bytes:
    ident = queue_id.value.encode()
    prefix = PREFIX_V1.pack(MAGIC, kind, len(ident), len(raw), len(body), zlib.crc32(body))
    crc = zlib.crc32(raw, zlib.crc32(ident, zlib.crc32(prefix)))
    return prefix + struct.pack(">I", crc) + ident + raw + body


def build(directory: Path, old_format: bool = True) -> Expected:
    """The reference spool; returns what was acknowledged and is queued, and what was
    removed."""
    clock = Clock()
    clock.advance(1_700_000_000)
    queued: dict[QueueId, tuple[QueueEntry, bytes]] = {}
    removed: set[QueueId] = set()
    if old_format:
        (directory / "log").mkdir(parents=True)
        records = b""
        old = [QueueEntry.new(QueueId.new(1_600_000_000 + n), _envelope(n), 300) for n in range(3)]
        for n, entry in enumerate(old):
            records += _v1_record(MESSAGE, entry.queue_id, encode_entry(entry), _body(n, 300))
            queued[entry.queue_id] = (entry, _body(n, 300))
        updated = attrs.evolve(old[0], attempts=1, last_error="451 4.4.1 later")
        records += _v1_record(STATE, old[0].queue_id, encode_entry(updated), b"")
        records += _v1_record(REMOVED, old[2].queue_id, b"", b"")
        queued[old[0].queue_id] = (updated, queued[old[0].queue_id][1])
        del queued[old[2].queue_id]
        removed.add(old[2].queue_id)
        (directory / "log" / "00000001.seg").write_bytes(records)
    later = Later()

    def commit(spool: Spool, n: int, size: int = 400) -> Deferred[Any]:
        clock.advance(0.01)
        message = spool.receive()
        body = _body(n, size)
        message.write(body)
        def acknowledged(entry: QueueEntry) -> QueueEntry:
            queued[entry.queue_id] = (entry, body)
            return entry

        return message.commit(_envelope(n)).addCallback(acknowledged)

    def update(spool: Spool, queue_id: QueueId, attempts: int) -> Deferred[Any]:
        entry = attrs.evolve(queued[queue_id][0], attempts=attempts, last_error="451 later")
        queued[queue_id] = (entry, queued[queue_id][1])
        return spool.update(entry)

    def remove(spool: Spool, queue_id: QueueId) -> Deferred[Any]:
        del queued[queue_id]
        removed.add(queue_id)
        return spool.remove(queue_id)

    spool, _ = Spool.open(directory, clock=clock, run_blocking=later, spill_threshold=1000)
    first = commit(spool, 10)  # a batch of its own; the rest wait for the next
    group = [commit(spool, 11), commit(spool, 12, 3000)]  # 12 is spilled: streamed
    later.pump()
    m10 = _result(first).queue_id
    m11, m12 = (_result(d).queue_id for d in group)
    group = [remove(spool, m10), update(spool, m11, 1)]
    if old_format:  # the oldest message: its body stays in the old-format segment
        group.append(update(spool, min(queued, key=str), 2))
    later.pump()
    for d in group:
        _result(d)
    spool.close()
    spool, _ = Spool.open(directory, clock=clock, run_blocking=later, spill_threshold=1000)
    first = commit(spool, 20)
    group = [commit(spool, 21), update(spool, m12, 1), update(spool, m11, 2)]
    later.pump()
    group.append(commit(spool, 22))
    later.pump()
    _result(first)
    for d in group:
        _result(d)
    spool.close()
    return Expected(queued, frozenset(removed))


# -- where to flip -------------------------------------------------------------------------------


def _fields(found: Any, name: str) -> Iterator[tuple[str, int]]:
    """(what, offset) for each field of each record of one scanned segment."""
    v2 = found.format == 2
    if v2:
        for what, at in (("segment magic", 0), ("segment format", 4), ("segment nonce", 12),
                         ("segment header crc", 25)):
            yield what, at
    header = HEADER_SIZE if v2 else HEADER_SIZE_V1
    layout = ({"magic": 1, "nonce": 9, "kind": 20, "id length": 21, "json length": 27,
               "body length": 35, "body crc": 38, "header crc": 42} if v2 else
              {"magic": 2, "kind": 4, "id length": 5, "json length": 11, "body length": 19,
               "body crc": 22, "header crc": 26})
    for item in found.items:
        if isinstance(item, Gap):
            continue
        kind = "marker" if isinstance(item, Marker) else {
            MESSAGE: "message", STATE: "state", REMOVED: "removed"}[item.kind]
        for what, at in layout.items():
            if kind == "marker" or what != "nonce" or v2:
                yield f"{kind} {what}", item.start + at
        if isinstance(item, Marker):
            yield "marker manifest", item.manifest_offset + item.manifest_length // 2
            continue
        yield f"{kind} id", item.start + header + 3
        if item.entry_length:
            yield f"{kind} json", item.entry_offset + item.entry_length // 2
        if item.body_length:
            yield f"{kind} body", item.body_offset
            yield f"{kind} body", item.end - 1


def positions(reference: Path, every_byte: bool, all_bits: bool) -> Iterator[tuple[str, Flip]]:
    """(what the bit is in, the flip), segment by segment."""
    names = sorted(os.listdir(reference / "log"))
    for index, name in enumerate(names):
        path = reference / "log" / name
        found = scan(str(path))
        role = ("newest" if index == len(names) - 1 else "older") + (
            " (old format)" if found.format == 1 else "")
        if every_byte:
            spots = [(_what(found, offset), offset) for offset in range(found.size)]
        else:
            spots = list(_fields(found, name))
        for n, (what, offset) in enumerate(spots):
            for bit in range(8) if all_bits else ((offset + n) % 8,):
                yield f"{role}: {what}", (name, offset, bit)


def _what(found: Any, offset: int) -> str:
    if found.format == 2 and offset < SEGMENT_HEADER_SIZE:
        return "segment header"
    for item in found.items:
        if item.start <= offset < item.end:
            if isinstance(item, Marker):
                return "marker"
            kind = {MESSAGE: "message", STATE: "state", REMOVED: "removed"}[item.kind]
            if offset < item.entry_offset:
                return f"{kind} header"
            return f"{kind} json" if offset < item.body_offset else f"{kind} body"
    return "gap"


# -- one flip ------------------------------------------------------------------------------------


@attrs.define
class Counts:
    flips: int = 0
    lost_named: int = 0
    lost_silent: int = 0
    duplicates: int = 0
    held: int = 0
    damaged_served: int = 0
    unknown: int = 0
    corrupt_files: int = 0
    salvaged: int = 0
    salvaged_wrong: int = 0
    reported_again: int = 0

    def add(self, other: Counts) -> None:
        for field in attrs.fields(Counts):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    @property
    def ok(self) -> bool:
        return not (self.lost_silent or self.damaged_served or self.unknown
                    or self.salvaged_wrong or self.reported_again)


class Lines:
    """The daemon's log lines (namespace ``smarthost``) while one flip is recovered."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._observer = cast(ILogObserver, self._seen)  # any callable of one event is one

    def _seen(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "smarthost":
            self.lines.append(formatEvent(event))

    def __enter__(self) -> Lines:
        globalLogPublisher.addObserver(self._observer)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self._observer)


def one(reference: Path, work: Path, expected: Expected, flip: Flip) -> Counts:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(reference, work)
    name, offset, bit = flip
    with open(work / "log" / name, "r+b") as f:
        byte = os.pread(f.fileno(), 1, offset)
        os.pwrite(f.fileno(), bytes([byte[0] ^ (1 << bit)]), offset)
    clock = Clock()
    clock.advance(1_800_000_000)
    counts = Counts(flips=1)
    with Lines() as log:
        spool, report = Spool.open(work, clock=clock, run_blocking=run_now)
        log_recovery(MailLog(clock), spool.directory, report)
    try:
        lost = _compare(spool, expected, log.lines, counts)
        counts.corrupt_files = len([n for n in os.listdir(work / "corrupt") if n != LEDGER])
        found = _result(Deferred.fromCoroutine(salvage(spool, run_now)))
        for find in found.restored:
            queue_id = find.entry.queue_id
            if queue_id in lost and expected.queued[queue_id] == (find.entry, find.body):
                counts.salvaged += 1
            else:
                counts.salvaged_wrong += 1
    finally:
        spool.close()
    spool, report = Spool.open(work, clock=clock, run_blocking=run_now)
    spool.close()
    counts.reported_again = len(report.corrupt)
    return counts


def _compare(spool: Spool, expected: Expected, lines: list[str], counts: Counts) -> set[QueueId]:
    queued = set(spool.queue_ids())
    lost = set(expected.queued) - queued
    for queue_id in lost:
        if any(line.startswith(f"{queue_id}: LOST") for line in lines):
            counts.lost_named += 1
        else:
            counts.lost_silent += 1
    counts.unknown += len(queued - set(expected.queued) - expected.removed)
    for queue_id in queued & expected.removed:
        if spool.load(queue_id).envelope.held:
            counts.held += 1
        else:
            counts.duplicates += 1  # delivered again
    for queue_id in queued & set(expected.queued):
        entry, body = expected.queued[queue_id]
        found = spool.load(queue_id)
        if found.envelope.held:
            counts.held += 1
        elif found != entry:
            counts.duplicates += 1  # sent on with an older state
        try:
            with spool.open_body(queue_id) as f:
                served = f.read()
        except CorruptEntry:
            served = b""
        counts.damaged_served += served != body
    return lost


# -- the whole matrix ----------------------------------------------------------------------------


@attrs.define
class Matrix:
    total: Counts = attrs.Factory(Counts)
    by_place: dict[str, Counts] = attrs.Factory(dict)
    seconds: float = 0.0

    def summary(self) -> str:
        t = self.total
        lines = [
            f"flips:                                   {t.flips}",
            f"acknowledged lost, named in the log:     {t.lost_named}",
            f"acknowledged lost, NOT named:            {t.lost_silent}",
            f"duplicates (removed back / older state): {t.duplicates}",
            f"held (older state kept for the operator): {t.held}",
            f"damaged bodies served:                   {t.damaged_served}",
            f"messages nobody sent:                    {t.unknown}",
            f"corrupt/ files:                          {t.corrupt_files}",
            f"salvaged (of those lost):                {t.salvaged}",
            f"salvaged wrong:                          {t.salvaged_wrong}",
            f"damage reported again at the next start: {t.reported_again}",
            f"time:                                    {self.seconds:.1f} s",
            "by place (flips: lost named/not, salvaged, duplicates, held):",
        ]
        for place, c in sorted(self.by_place.items()):
            lines.append(f"  {place:45} {c.flips:5}: {c.lost_named}/{c.lost_silent}, "
                         f"{c.salvaged}, {c.duplicates}, {c.held}")
        return "\n".join(lines)


@contextlib.contextmanager
def without_sync() -> Iterator[None]:
    """fsync and fdatasync as no-ops: what this matrix checks is what recovery reads and
    decides (durability is the crash matrix's), and thousands of syncs would only slow it."""
    saved = os.fsync, os.fdatasync
    os.fsync = os.fdatasync = lambda fd: None
    try:
        yield
    finally:
        os.fsync, os.fdatasync = saved


def run(workdir: Path, every_byte: bool = False, all_bits: bool = False,
        old_format: bool = True, sync: bool = False) -> Matrix:
    began = time.monotonic()
    reference = workdir / "reference"
    matrix = Matrix()
    with contextlib.nullcontext() if sync else without_sync():
        expected = build(reference, old_format)
        for place, flip in positions(reference, every_byte, all_bits):
            counts = one(reference, workdir / "work", expected, flip)
            matrix.total.add(counts)
            matrix.by_place.setdefault(place, Counts()).add(counts)
    matrix.seconds = time.monotonic() - began
    return matrix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--fields", action="store_true",
                        help="one flip per field of each record instead of every byte")
    parser.add_argument("--all-bits", action="store_true", help="all eight bits per byte")
    parser.add_argument("--no-old-format", action="store_true",
                        help="leave out the segment in the format before the nonce")
    parser.add_argument("--sync", action="store_true", help="keep fsync and fdatasync")
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bitflip-matrix-"))
    try:
        matrix = run(workdir, every_byte=not args.fields, all_bits=args.all_bits,
                     old_format=not args.no_old_format, sync=args.sync)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(matrix.summary())
    return 0 if matrix.total.ok else 1


if __name__ == "__main__":
    sys.exit(main())
