"""The durable spool's queue API: receive, spill, prepend, commit, abort, read back, update,
remove, per-message ordering, and the group commit (one fdatasync per batch, nothing
acknowledged before it, a failed batch acknowledges nothing). The log on disk (recovery,
rotation, compaction, the admin path) is tested in test_spool_log.py, with these helpers."""
# trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smarthost.api import IIncomingMessage, ISpool
from smarthost.core.envelope import (
    DELIVERED,
    Envelope,
    QueueEntry,
    QueueId,
    Recipient,
    RecipientState,
)
from smarthost.core.errors import CorruptEntry, SpoolFull
from smarthost.queue import incoming as incoming_module
from smarthost.queue import index as spoolindex
from smarthost.queue import segment as spoolfile
from smarthost.queue import writer as spoolwriter
from smarthost.queue.incoming import IncomingMessage
from smarthost.queue.recovery import RecoveryReport
from smarthost.queue.segment import (
    MAGIC,
    MESSAGE,
    PREFIX_V1,
    STATE,
    Gap,
    Marker,
    Record,
    scan,
)
from smarthost.queue.spool import Spool


def run_now(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args, **kwargs)


class Jobs:
    """A run_blocking that holds each job until the test lets it run, as a busy thread would."""

    def __init__(self) -> None:
        self.pending: list[Deferred[Any]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d.addCallback(lambda _: f(*args))

    def run_next(self) -> None:
        self.pending.pop(0).callback(None)


class FaultyOS:
    """Stands in for ``os`` inside :mod:`smarthost.queue.writer` only, replacing a few calls."""

    def __init__(self, **replace: Callable[..., Any]) -> None:
        self._replace = replace

    def __getattr__(self, name: str) -> Any:
        return self._replace.get(name) or getattr(os, name)


def envelope() -> Envelope:
    return Envelope(sender="alice@example.test", recipients=(Recipient("bob@example.net"),),
                    client_address="192.0.2.7", user="alice", received_at=1_700_000_000.0)


BODY = b"Subject: hi\r\n\r\nhello\r\nsecond line\r\n"
FILLER = b"Subject: filler\r\n\r\n" + b"x" * 900 + b"\r\n"


def spilled(message: IIncomingMessage) -> bool:
    assert isinstance(message, IncomingMessage)
    return message.spilled


def record_start(record: Record) -> int:
    return record.start


def encode_v1_header(kind: int, queue_id: QueueId, raw: bytes, body_length: int,
                     body_crc: int) -> bytes:
    """A record as the spool wrote it before segment headers and nonces (format 1), which it
    still reads."""
    ident = queue_id.value.encode("ascii")
    prefix = PREFIX_V1.pack(MAGIC, kind, len(ident), len(raw), body_length, body_crc)
    return prefix + struct.pack(">I", zlib.crc32(raw, zlib.crc32(ident, zlib.crc32(prefix)))) \
        + ident + raw


class SpoolTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="spool-test-")
        self.addCleanup(shutil.rmtree, self.root)
        self.directory = os.path.join(self.root, "spool")
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.spool, self.last_report = self.open()

    def open(self, run_blocking: Callable[..., Deferred[Any]] = run_now,
             **kw: Any) -> tuple[Spool, RecoveryReport]:
        spool, report = Spool.open(
            self.directory, clock=self.clock, run_blocking=run_blocking, **kw
        )
        self.addCleanup(spool.close)
        return spool, report

    def reopen(self, run_blocking: Callable[..., Deferred[Any]] = run_now, **kw: Any) -> Spool:
        self.spool.close()
        self.spool, self.last_report = self.open(run_blocking, **kw)
        return self.spool

    def admin(self) -> Spool:
        """What the admin CLI makes: no recovery, no lock until it changes something."""
        spool = Spool(self.directory, clock=self.clock, run_blocking=run_now)
        self.addCleanup(spool.close)
        return spool

    def path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def listing(self, name: str) -> list[str]:
        return sorted(os.listdir(self.path(name)))

    def segments(self) -> list[str]:
        return self.listing("log")

    def records(self, segment: str) -> list[Record | Gap]:
        """Records and gaps; the batch markers between them are left out."""
        return [i for i in scan(self.path("log", segment)).items if not isinstance(i, Marker)]

    def markers(self, segment: str) -> list[Marker]:
        return scan(self.path("log", segment)).markers()

    def message_record(self, queue_id: QueueId) -> tuple[str, Record]:
        for name in self.segments():
            for item in self.records(name):
                if isinstance(item, Record) and item.kind == MESSAGE and item.queue_id == queue_id:
                    return name, item
        raise AssertionError(f"no MESSAGE record for {queue_id}")

    def read(self, relative: str) -> bytes:
        with open(self.path(relative), "rb") as f:
            return f.read()

    def flip(self, segment: str, offset: int) -> None:
        with open(self.path("log", segment), "r+b") as f:
            byte = os.pread(f.fileno(), 1, offset)
            os.pwrite(f.fileno(), bytes([byte[0] ^ 0xFF]), offset)

    def commit(self, body: bytes = BODY, spool: Spool | None = None,
               env: Envelope | None = None) -> QueueEntry:
        self.clock.advance(0.01)  # ids sort by time: keep them in commit order
        message = (spool or self.spool).receive()
        message.write(body)
        entry: QueueEntry = self.successResultOf(message.commit(env or envelope()))
        return entry

    def start(self, spool: Spool, body: bytes = BODY) -> tuple[IIncomingMessage,
                                                                 Deferred[QueueEntry]]:
        """A commit left to the test's run_blocking."""
        message = spool.receive()
        message.write(body)
        return message, message.commit(envelope())

    def body(self, queue_id: QueueId, spool: Spool | None = None) -> bytes:
        with (spool or self.spool).open_body(queue_id) as f:
            return f.read()


class CommitTests(SpoolTestCase):
    def test_receiving_makes_no_file(self) -> None:
        self.assertTrue(verifyObject(ISpool, self.spool))
        message = self.spool.receive()
        self.assertTrue(verifyObject(IIncomingMessage, message))
        self.assertTrue(message.queue_id.value.startswith(f"{1_700_000_000_000:012X}"))
        message.write(b"x" * 1000)
        self.assertEqual(self.listing("tmp") + self.segments(), [])
        self.assertFalse(spilled(message))
        message.abort()

    def test_round_trip_is_one_message_record(self) -> None:
        entry = self.commit(BODY)
        self.assertEqual((entry.size, entry.envelope), (len(BODY), envelope()))
        self.assertEqual(self.spool.load(entry.queue_id), entry)
        self.assertEqual(self.body(entry.queue_id), BODY)
        self.assertEqual(list(self.spool.entries()), [entry])
        self.assertEqual(self.listing("tmp"), [])
        (segment,) = self.segments()
        (record,) = self.records(segment)
        assert isinstance(record, Record)
        self.assertEqual((record.kind, record.queue_id), (MESSAGE, entry.queue_id))
        self.assertEqual(self.read(f"log/{segment}")[record.body_offset : record.end], BODY)
        self.assertEqual(record.body_crc, zlib.crc32(BODY))

    def test_large_body_spills_and_round_trips(self) -> None:
        spool = self.reopen(spill_threshold=4096)
        body = os.urandom(300 * 1024)
        message = spool.receive()
        for i in range(0, len(body), 8192):
            message.write(body[i : i + 8192])
        self.assertTrue(spilled(message))
        self.assertEqual(self.listing("tmp"), [str(message.queue_id)])
        entry = self.successResultOf(message.commit(envelope()))
        self.assertEqual(entry.size, len(body))
        self.assertEqual(self.body(entry.queue_id), body)
        self.assertEqual(self.listing("tmp"), [])
        spool = self.reopen()
        self.assertEqual(spool.load(entry.queue_id), entry)
        self.assertEqual(self.body(entry.queue_id), body)

    def test_read_and_prepend(self) -> None:
        head, rest = b"Subject: x\r\n\r\n", b"y" * 150 + b"\r\n"
        for threshold in (1000, 100):  # in memory, then spilled to tmp/
            message = self.reopen(spill_threshold=threshold).receive()
            message.write(head)
            self.assertFalse(spilled(message))
            message.write(rest)
            self.assertEqual(spilled(message), threshold == 100)
            self.assertEqual(message.read(), head + rest)
            message.prepend(b"X-Added: 1\r\n")
            self.assertEqual(message.read(), b"X-Added: 1\r\n" + head + rest)
            message.write(b"more\r\n")
            entry = self.successResultOf(message.commit(envelope()))
            expected = b"X-Added: 1\r\n" + head + rest + b"more\r\n"
            self.assertEqual(entry.size, len(expected))
            self.assertEqual(self.body(entry.queue_id), expected)
            self.assertEqual(self.listing("tmp"), [])

    def test_disk_full_while_spilling_raises_from_write(self) -> None:
        spool = self.reopen(spill_threshold=10)

        def full(path: str) -> int:
            raise OSError(28, "No space left on device")

        self.patch(incoming_module, "create_exclusive", full)
        message = spool.receive()
        message.write(b"short")
        self.assertRaises(SpoolFull, message.write, b"pushes it over the threshold")
        message.abort()
        self.assertEqual(self.listing("tmp"), [])

    def test_fires_only_when_blocking_work_is_done(self) -> None:
        jobs = Jobs()
        message, d = self.start(self.reopen(jobs))
        self.assertNoResult(d)
        self.assertEqual(self.segments(), [])
        self.assertEqual(len(jobs.pending), 1)
        jobs.run_next()  # what deferToThread does once the thread finishes
        self.assertEqual(self.successResultOf(d).queue_id, message.queue_id)
        self.assertEqual(self.spool.queue_ids(), [message.queue_id])

    def test_envelope_round_trips(self) -> None:
        env = attrs.evolve(envelope(), sender="jörg@exämple.test", smtputf8=True, held=True)
        entry = self.commit(env=env)
        self.assertEqual(self.reopen().load(entry.queue_id).envelope, env)

    def test_bad_spilled_body_fails_only_its_own_commit(self) -> None:
        jobs = Jobs()
        spool = self.reopen(jobs, spill_threshold=10)
        spool.receive().commit(envelope())  # batch 1: the next three wait together
        messages = [spool.receive() for _ in range(3)]
        for message in messages:
            message.write(b"a body longer than ten bytes\r\n")
        messages[1].read()  # flushed to tmp/; then something else appends to the file
        with open(self.path("tmp", str(messages[1].queue_id)), "ab") as f:
            f.write(b"extra")
        results = [m.commit(envelope()) for m in messages]
        jobs.run_next()
        jobs.run_next()
        self.successResultOf(results[0])
        self.failureResultOf(results[1], CorruptEntry)
        self.successResultOf(results[2])
        self.assertEqual(self.listing("tmp"), [])
        # The half-copied record was cut off: the segment holds only whole records.
        self.assertFalse(any(isinstance(r, Gap) for s in self.segments() for r in self.records(s)))
        self.assertNotIn(messages[1].queue_id, spool.queue_ids())
        self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(queued=3))


class AbortTests(SpoolTestCase):
    def test_abort_leaves_nothing(self) -> None:
        message = self.spool.receive()
        message.write(b"partial")
        message.abort()
        message.abort()
        for name in ("tmp", "log", "corrupt"):
            self.assertEqual(self.listing(name), [], name)
        self.assertEqual(list(self.spool.entries()), [])

    def test_abort_of_a_spilled_message_removes_its_file(self) -> None:
        message = self.reopen(spill_threshold=4).receive()
        message.write(b"more than four")
        self.assertEqual(self.listing("tmp"), [str(message.queue_id)])
        message.abort()
        self.assertEqual(self.listing("tmp"), [])

    def test_use_after_abort_or_commit_is_a_bug(self) -> None:
        aborted, committed = self.spool.receive(), self.spool.receive()
        aborted.abort()
        self.successResultOf(committed.commit(envelope()))
        for message in (aborted, committed):
            self.assertRaises(RuntimeError, message.write, b"x")
            self.assertRaises(RuntimeError, message.commit, envelope())
            self.assertRaises(RuntimeError, message.read)
            self.assertRaises(RuntimeError, message.prepend, b"x")

    def test_abort_during_or_after_commit_keeps_the_message(self) -> None:
        jobs = Jobs()
        message, d = self.start(self.reopen(jobs))
        message.abort()  # the client vanished during the fdatasync: too late to recall
        jobs.run_next()
        entry = self.successResultOf(d)
        message.abort()
        self.assertEqual(self.spool.load(entry.queue_id), entry)


class ReadTests(SpoolTestCase):
    def test_missing_is_key_error_and_invalid_ids_are_refused(self) -> None:
        missing = QueueId.new(1.0)
        self.assertRaises(KeyError, self.spool.load, missing)
        self.assertRaises(KeyError, self.spool.open_body, missing)
        self.failureResultOf(self.spool.remove(missing), KeyError)
        for text in ("../../etc/passwd", "", "abc", "0123456789ab/..", "0123456789AB\n"):
            self.assertRaises(ValueError, QueueId, text)
        # A plain string never becomes a path, even a well-formed one.
        for call in (self.spool.load, self.spool.open_body, self.spool.remove):
            self.assertRaises(TypeError, call, "../../etc/passwd")
            self.assertRaises(TypeError, call, "0123456789ABCDEF")

    def test_entries_in_arrival_order(self) -> None:
        messages = []
        for _ in range(3):
            message = self.spool.receive()
            message.write(b"x")
            messages.append(message)
            self.clock.advance(1)
        for message in reversed(messages):  # committed in the opposite order
            self.successResultOf(message.commit(envelope()))
        ids = [m.queue_id for m in messages]
        self.assertEqual([e.queue_id for e in self.spool.entries()], ids)  # from memory
        self.assertEqual([e.queue_id for e in self.spool.entries()], ids)  # from disk
        self.assertEqual(self.spool.queue_ids(), ids)
        self.assertEqual([e.queue_id for e in self.admin().entries()], ids)

    def test_entries_skip_bad_entries_and_load_names_them(self) -> None:
        good, bad, partial = self.commit(), self.commit(), self.commit()
        self.spool.close()
        # Records whose checksums are right but whose entry is not one (a writer's bug).
        with open(self.path("log", "00000009.seg"), "wb") as f:
            f.write(encode_v1_header(STATE, bad.queue_id, b'{"id": "truncated', 0, 0))
            f.write(encode_v1_header(STATE, partial.queue_id, b'{"id": "%s"}' % str(
                partial.queue_id).encode(), 0, 0))
        reader = self.admin()
        self.assertEqual(list(reader.entries()), [good])
        self.assertEqual(reader.queue_ids(), [good.queue_id, bad.queue_id, partial.queue_id])
        with self.assertRaises(CorruptEntry) as e:
            reader.load(bad.queue_id)
        self.assertIn("unreadable entry", str(e.exception))
        # A missing field is damage, never "not queued".
        self.assertRaises(CorruptEntry, reader.load, partial.queue_id)

    def test_open_body_is_exactly_the_body(self) -> None:
        first, entry, last = self.commit(b"before\r\n"), self.commit(BODY), self.commit(b"after")
        with self.spool.open_body(entry.queue_id) as f:
            self.assertEqual(f.read(7), BODY[:7])
            self.assertEqual(f.tell(), 7)
            self.assertEqual(f.read(), BODY[7:])
            self.assertEqual(f.read(10), b"")
            self.assertEqual(f.seek(0, os.SEEK_END), entry.size)
            f.seek(-6, os.SEEK_END)
            self.assertEqual(f.read(), BODY[-6:])
            f.seek(0)
            self.assertEqual(list(f), BODY.splitlines(keepends=True))
            f.seek(2)
            f.seek(3, os.SEEK_CUR)
            self.assertEqual(f.readline(), BODY[5:].split(b"\n")[0] + b"\n")
            self.assertRaises(ValueError, f.seek, -1)
        self.assertEqual(self.body(first.queue_id), b"before\r\n")
        self.assertEqual(self.body(last.queue_id), b"after")

    def test_body_cut_short_under_a_reader_is_damage_not_eof(self) -> None:
        entry = self.commit(b"z" * 1000)
        segment, record = self.message_record(entry.queue_id)
        with self.spool.open_body(entry.queue_id) as f:
            os.truncate(self.path("log", segment), record.body_offset + 100)
            self.assertRaises(CorruptEntry, f.read)

    def test_reader_needs_no_recovery_and_no_lock(self) -> None:
        # The admin CLI: reads a live spool without touching tmp/ or taking the lock.
        entry = self.commit()
        spilling = self.reopen(spill_threshold=4)
        in_flight = spilling.receive()
        in_flight.write(b"still arriving")
        reader = self.admin()
        self.assertEqual(list(reader.entries()), [entry])
        self.assertEqual(reader.load(entry.queue_id), entry)
        self.assertEqual(self.body(entry.queue_id, reader), BODY)
        self.assertEqual(self.listing("tmp"), [str(in_flight.queue_id)])
        self.successResultOf(in_flight.commit(envelope()))  # the daemon still appends
        self.assertEqual(len(self.admin().queue_ids()), 2)

    def test_entries_after_recovery_come_from_memory_once(self) -> None:
        kept, updated, removed = self.commit(), self.commit(), self.commit()
        reads: list[QueueId] = []
        real = spoolfile.decode_entry

        def counting(queue_id: QueueId, raw: bytes) -> QueueEntry:
            reads.append(queue_id)
            return real(queue_id, raw)

        self.patch(spoolindex, "decode_entry", counting)
        spool = self.reopen()
        self.assertEqual(sorted(reads, key=str), [kept.queue_id, updated.queue_id,
                                                  removed.queue_id])
        updated = attrs.evolve(updated, attempts=4)
        self.successResultOf(spool.update(updated))
        self.successResultOf(spool.remove(removed.queue_id))
        added = self.commit()
        del reads[:]
        self.assertEqual(list(spool.entries()), [kept, updated, added])
        self.assertEqual(reads, [])  # the scheduler's start parses nothing again
        self.assertEqual(list(spool.entries()), [kept, updated, added])
        self.assertEqual(sorted(reads, key=str), [kept.queue_id, updated.queue_id,
                                                  added.queue_id])


class UpdateRemoveTests(SpoolTestCase):
    def test_update_appends_a_state_record_and_persists(self) -> None:
        entry = self.commit()
        changed = attrs.evolve(
            entry,
            attempts=2,
            next_attempt=entry.queued_at + 300,
            last_error="451 4.3.0 try later",
            recipients=(
                RecipientState(entry.envelope.recipients[0], DELIVERED, "250 ok", "mx", 2),
            ),
        )
        self.assertIsNone(self.successResultOf(self.spool.update(changed)))
        self.assertEqual(self.spool.load(entry.queue_id), changed)
        kinds = [r.kind for s in self.segments() for r in self.records(s) if isinstance(r, Record)]
        self.assertEqual(kinds, [MESSAGE, STATE])
        self.assertEqual(self.reopen().load(entry.queue_id), changed)
        self.assertEqual(self.last_report, RecoveryReport(queued=1))
        self.assertEqual(list(self.spool.entries()), [changed])
        self.assertEqual(self.body(entry.queue_id), BODY)

    def test_update_of_removed_message_refused(self) -> None:
        entry = self.commit()
        self.successResultOf(self.spool.remove(entry.queue_id))
        self.failureResultOf(self.spool.update(entry), KeyError)
        self.assertRaises(KeyError, self.spool.load, entry.queue_id)

    def test_remove(self) -> None:
        keep, gone, updated = self.commit(), self.commit(), self.commit()
        self.successResultOf(self.spool.update(attrs.evolve(updated, attempts=1)))
        for entry in (gone, updated):
            self.assertIsNone(self.successResultOf(self.spool.remove(entry.queue_id)))
            self.assertRaises(KeyError, self.spool.load, entry.queue_id)
            self.assertRaises(KeyError, self.spool.open_body, entry.queue_id)
            self.failureResultOf(self.spool.remove(entry.queue_id), KeyError)
            self.failureResultOf(self.spool.update(entry), KeyError)
        self.assertEqual(list(self.spool.entries()), [keep])
        self.assertEqual(list(self.spool.entries()), [keep])
        self.assertEqual(list(self.reopen().entries()), [keep])

    def test_operations_on_one_message_run_in_call_order(self) -> None:
        jobs = Jobs()
        entry = self.commit()
        spool = self.reopen(jobs)
        first = spool.update(attrs.evolve(entry, attempts=1))
        second = spool.update(attrs.evolve(entry, attempts=2))
        removed = spool.remove(entry.queue_id)
        late = spool.update(attrs.evolve(entry, attempts=3))
        self.assertEqual(len(jobs.pending), 1)  # the second waits for the first to finish
        jobs.run_next()
        self.successResultOf(first)
        self.assertEqual(len(jobs.pending), 1)
        jobs.run_next()
        self.successResultOf(second)
        self.assertEqual(spool.load(entry.queue_id).attempts, 2)
        jobs.run_next()
        self.successResultOf(removed)
        self.failureResultOf(late, KeyError)  # it was gone by its turn
        self.assertEqual(spool._locks, {})
        jobs.run_next()  # segment 1 holds nothing live any more: a batch deletes it
        self.assertEqual(jobs.pending, [])
        self.assertEqual(self.segments(), ["00000002.seg"])


class GroupCommitTests(SpoolTestCase):
    """Changes that arrive while a batch syncs share the next batch and its one fdatasync."""

    def setUp(self) -> None:
        super().setUp()
        self.events: list[str] = []
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            real(fd)
            self.events.append("fdatasync")

        self.patch(spoolwriter, "os", FaultyOS(fdatasync=fdatasync))
        self.jobs = Jobs()

    def test_commits_fire_only_after_their_batch_fdatasync(self) -> None:
        spool = self.reopen(self.jobs)
        first, _ = self.start(spool)  # starts batch 1 at once
        messages = []
        for n in range(8):  # arrive while batch 1 syncs
            message = spool.receive()
            message.write(b"message %d\r\n" % n)
            messages.append(message)
        for message in messages:
            message.commit(envelope()).addCallback(
                lambda e: self.events.append(f"fired {e.queue_id}")
            )
        self.assertEqual(spool.batches, 1)
        self.jobs.run_next()  # batch 1 ends; batch 2 (the eight) starts
        self.assertEqual(spool.batches, 2)
        self.assertEqual(self.events, ["fdatasync"])
        self.jobs.run_next()
        ids = [str(m.queue_id) for m in messages]
        self.assertEqual(self.events, ["fdatasync", "fdatasync", *[f"fired {i}" for i in ids]])
        self.assertEqual(set(spool.queue_ids()), {first.queue_id, *[m.queue_id for m in messages]})
        self.assertEqual(self.jobs.pending, [])

    def test_the_daemon_gathers_one_turn_of_the_reactor_into_one_batch(self) -> None:
        spool = self.reopen(self.jobs, gather=True)
        first = [self.start(spool)[1] for _ in range(5)]  # five sessions' ends, one turn
        self.assertEqual(spool.batches, 0)  # nothing starts before the turn ends
        self.clock.advance(0)
        self.assertEqual(spool.batches, 1)
        later = [self.start(spool)[1] for _ in range(3)]  # while batch 1 syncs
        self.clock.advance(0)
        self.assertEqual(spool.batches, 1)  # they wait for batch 1, as without gathering
        self.jobs.run_next()  # batch 1 ends and starts batch 2 at once (no extra turn)
        self.assertEqual(spool.batches, 2)
        self.jobs.run_next()
        for d in first + later:
            self.successResultOf(d)
        self.assertEqual(self.events, ["fdatasync", "fdatasync"])
        self.assertEqual(len(spool.queue_ids()), 8)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_batches_are_bounded_and_fewer_than_operations(self) -> None:
        spool = self.reopen(self.jobs)
        results = [self.start(spool)[1] for _ in range(300)]
        while self.jobs.pending:
            self.jobs.run_next()
        for d in results:
            self.successResultOf(d)
        self.assertEqual(spool.batches, 3)  # 1, then 256 (MAX_BATCH), then 43
        self.assertEqual(self.events.count("fdatasync"), 3)
        self.assertEqual(len(spool.queue_ids()), 300)

    def test_updates_and_removes_are_batched_too(self) -> None:
        entries = [self.commit() for _ in range(6)]
        spool = self.reopen(self.jobs)
        spool.receive().commit(envelope())  # keeps batch 1 busy
        updates = [spool.update(attrs.evolve(e, attempts=1)) for e in entries[:3]]
        removes = [spool.remove(e.queue_id) for e in entries[3:]]
        self.jobs.run_next()
        del self.events[:]
        self.jobs.run_next()
        for d in updates + removes:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.events, ["fdatasync"])
        self.assertEqual(spool.batches, 2)
        self.assertEqual(set(spool.queue_ids()) & {e.queue_id for e in entries[3:]}, set())
        for e in entries[:3]:
            self.assertEqual(spool.load(e.queue_id).attempts, 1)

    def fail_batch(self, **replace: Callable[..., Any]) -> None:
        """Commit one message, then a batch of commits (one spilled) and an update that fails
        with ``replace`` in force: every one fails, nothing is acknowledged."""
        spool = self.reopen(self.jobs, spill_threshold=100)
        _, kept_d = self.start(spool)
        self.jobs.run_next()
        entry = self.successResultOf(kept_d)
        blocker = spool.receive().commit(envelope())  # batch 2: the rest wait for batch 3
        messages = [spool.receive() for _ in range(3)]
        for m in messages:
            m.write(b"y" * (200 if m is messages[1] else 20))
        ds: list[Deferred[Any]] = [m.commit(envelope()) for m in messages]
        ds.append(spool.update(attrs.evolve(entry, attempts=5)))
        self.jobs.run_next()
        blocker_entry = self.successResultOf(blocker)
        (segment,) = self.segments()
        size = os.path.getsize(self.path("log", segment))
        self.patch(spoolwriter, "os", FaultyOS(**replace))
        self.patch(spoolfile, "os", FaultyOS(**replace))  # write_all lives there
        self.jobs.run_next()
        for d in ds:
            self.failureResultOf(d, OSError)
        self.assertEqual(set(spool.queue_ids()), {entry.queue_id, blocker_entry.queue_id})
        self.assertEqual(spool.load(entry.queue_id), entry)
        self.assertEqual(spool._live, set())
        self.assertEqual(self.listing("tmp"), [])
        self.patch(spoolwriter, "os", os)
        self.patch(spoolfile, "os", os)
        if "write" in replace:  # the partial append was cut off again
            self.assertEqual(os.path.getsize(self.path("log", segment)), size)
        # The spool still works, in a fresh segment.
        again, d = self.start(spool, b"again\r\n")
        self.jobs.run_next()
        self.successResultOf(d)
        self.assertEqual(self.message_record(again.queue_id)[0], "00000002.seg")
        self.assertEqual(self.body(again.queue_id, spool), b"again\r\n")

    def test_failed_fdatasync_fails_the_whole_batch(self) -> None:
        def broken(fd: int) -> None:
            raise OSError(5, "Input/output error")

        self.fail_batch(fdatasync=broken)

    def test_failed_write_fails_the_whole_batch(self) -> None:
        def full(fd: int, data: Any) -> int:
            raise OSError(28, "No space left on device")

        self.fail_batch(write=full)

    def test_a_broken_batch_job_fails_every_operation(self) -> None:
        spool = self.reopen(self.jobs)

        def broken(batch: object) -> None:
            raise RuntimeError("bug")

        writer = spool._writer
        assert writer is not None
        self.patch(writer, "run", broken)
        d = spool.receive().commit(envelope())
        self.jobs.run_next()
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(spool._live, set())
        self.patch(writer, "run", type(writer).run.__get__(writer))
        d = spool.receive().commit(envelope())
        self.jobs.run_next()
        self.successResultOf(d)

    def test_failed_fdatasync_is_not_retried_in_a_loop(self) -> None:
        gone = self.commit()
        spool = self.reopen(self.jobs)  # segment 2 is the head from now on
        _, kept = self.start(spool)
        self.jobs.run_next()
        self.successResultOf(kept)
        removed = spool.remove(gone.queue_id)
        self.jobs.run_next()
        self.successResultOf(removed)
        self.assertEqual(len(self.jobs.pending), 1)  # the batch that deletes segment 1

        def broken(fd: int) -> None:
            raise OSError(5, "Input/output error")

        self.patch(spoolwriter, "os", FaultyOS(fdatasync=broken))
        for _ in range(3):
            if self.jobs.pending:
                self.jobs.run_next()
        # "A deletion that failed is retried with the next change, not in a loop."
        self.assertEqual(self.jobs.pending, [])
        self.assertLessEqual(len(self.segments()), 3)
