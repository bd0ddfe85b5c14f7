"""The durable spool: commit, read back, update, remove, recovery, group commit, the previous
layout, and the fsync ordering that makes "250 after DATA" true."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smarthost import spool as spool_module
from smarthost import spoolfile as spoolfile_module
from smarthost.envelope import (
    DELIVERED,
    Envelope,
    QueueEntry,
    QueueId,
    Recipient,
    RecipientState,
)
from smarthost.interfaces import IIncomingMessage, ISpool
from smarthost.spool import IncomingMessage, Spool
from smarthost.spoolfile import MAGIC, CorruptEntry, CorruptFile, RecoveryReport


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


def envelope(received_at: float = 1_700_000_000.0, *rcpts: str) -> Envelope:
    return Envelope(
        sender="alice@example.test",
        recipients=tuple(Recipient(r) for r in (rcpts or ("bob@example.net",))),
        client_address="192.0.2.7",
        user="alice",
        received_at=received_at,
    )


BODY = b"Subject: hi\r\n\r\nhello\r\n"


def spilled(message: IIncomingMessage) -> bool:
    assert isinstance(message, IncomingMessage)
    return message.spilled


class SpoolTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="spool-test-")
        self.addCleanup(shutil.rmtree, self.root)
        self.directory = os.path.join(self.root, "spool")
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.spool = self.open()

    def open(self, run_blocking: Callable[..., Deferred[Any]] = run_now, **kw: Any) -> Spool:
        spool, report = Spool.open(
            self.directory, clock=self.clock, run_blocking=run_blocking, **kw
        )
        self.last_report = report
        return spool

    def path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def listing(self, name: str) -> list[str]:
        return sorted(os.listdir(self.path(name)))

    def write(self, relative: str, data: bytes) -> None:
        with open(self.path(relative), "wb") as f:
            f.write(data)

    def read(self, relative: str) -> bytes:
        with open(self.path(relative), "rb") as f:
            return f.read()

    def commit(
        self, body: bytes = BODY, spool: Spool | None = None, env: Envelope | None = None
    ) -> QueueEntry:
        self.clock.advance(0.01)  # ids sort by time: keep them in commit order
        message = (spool or self.spool).receive()
        message.write(body)
        entry: QueueEntry = self.successResultOf(message.commit(env or envelope()))
        return entry

    def body(self, queue_id: QueueId, spool: Spool | None = None) -> bytes:
        with (spool or self.spool).open_body(queue_id) as f:
            return f.read()


class CommitTests(SpoolTestCase):
    def test_provides_interfaces(self) -> None:
        self.assertTrue(verifyObject(ISpool, self.spool))
        message = self.spool.receive()
        self.assertTrue(verifyObject(IIncomingMessage, message))
        message.abort()

    def test_round_trip(self) -> None:
        entry = self.commit(BODY)
        self.assertEqual(entry.size, len(BODY))
        self.assertEqual(entry.envelope, envelope())
        self.assertEqual(self.spool.load(entry.queue_id), entry)
        self.assertEqual(self.body(entry.queue_id), BODY)
        self.assertEqual(list(self.spool.entries()), [entry])
        self.assertEqual(self.listing("tmp"), [])
        # One file per message: header record, then the body; no state until an update.
        self.assertEqual(self.listing("state"), [])
        raw = self.read(f"data/{entry.queue_id}")
        self.assertTrue(raw.startswith(MAGIC))
        self.assertTrue(raw.endswith(BODY))

    def test_receiving_makes_no_file(self) -> None:
        message = self.spool.receive()
        message.write(b"x" * 1000)
        self.assertEqual(self.listing("tmp"), [])
        self.assertFalse(spilled(message))
        message.abort()

    def test_large_body_spills_and_round_trips(self) -> None:
        body = os.urandom(5 * 1024 * 1024)
        message = self.spool.receive()
        for i in range(0, len(body), 65536):
            message.write(body[i : i + 65536])
        self.assertTrue(spilled(message))
        self.assertEqual(self.listing("tmp"), [str(message.queue_id)])
        entry = self.successResultOf(message.commit(envelope()))
        self.assertEqual(entry.size, len(body))
        self.assertEqual(self.body(entry.queue_id), body)
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.open().load(entry.queue_id), entry)

    def test_read_and_prepend_in_memory(self) -> None:
        message = self.spool.receive()
        message.write(b"Subject: x\r\n")
        message.write(b"\r\nbody\r\n")
        self.assertEqual(message.read(), b"Subject: x\r\n\r\nbody\r\n")
        message.prepend(b"X-Added: 1\r\n")
        self.assertEqual(message.read(), b"X-Added: 1\r\nSubject: x\r\n\r\nbody\r\n")
        message.write(b"more\r\n")
        entry = self.successResultOf(message.commit(envelope()))
        expected = b"X-Added: 1\r\nSubject: x\r\n\r\nbody\r\nmore\r\n"
        self.assertEqual(entry.size, len(expected))
        self.assertEqual(self.body(entry.queue_id), expected)

    def test_read_and_prepend_spilled(self) -> None:
        spool = self.open(spill_threshold=100)
        message = spool.receive()
        head, rest = b"Subject: x\r\n\r\n", b"y" * 150 + b"\r\n"
        message.write(head)
        self.assertFalse(spilled(message))
        message.write(rest)
        self.assertTrue(spilled(message))
        self.assertEqual(message.read(), head + rest)
        message.prepend(b"X-Added: 1\r\n")
        self.assertEqual(message.read(), b"X-Added: 1\r\n" + head + rest)
        entry = self.successResultOf(message.commit(envelope()))
        self.assertEqual(entry.size, len(b"X-Added: 1\r\n" + head + rest))
        self.assertEqual(self.body(entry.queue_id, spool), b"X-Added: 1\r\n" + head + rest)
        self.assertEqual(self.listing("tmp"), [])

    def test_disk_full_while_spilling_raises_from_write(self) -> None:
        spool = self.open(spill_threshold=10)

        def full(path: str) -> int:
            raise OSError(28, "No space left on device")

        self.patch(spool_module, "create_exclusive", full)
        message = spool.receive()
        message.write(b"short")
        self.assertRaises(OSError, message.write, b"pushes it over the threshold")
        message.abort()
        self.assertEqual(self.listing("tmp"), [])

    def test_queue_id_comes_from_the_clock(self) -> None:
        message = self.spool.receive()
        self.assertTrue(message.queue_id.value.startswith(f"{1_700_000_000_000:012X}"))
        message.abort()

    def test_fires_only_when_blocking_work_is_done(self) -> None:
        jobs = Jobs()
        spool = Spool(self.directory, clock=self.clock, run_blocking=jobs)
        message = spool.receive()
        message.write(b"x\r\n")
        d = message.commit(envelope())
        self.assertNoResult(d)
        self.assertEqual(self.listing("data"), [])
        self.assertEqual(len(jobs.pending), 1)
        jobs.run_next()  # what deferToThread does once the thread finishes
        self.assertEqual(self.successResultOf(d).queue_id, message.queue_id)
        self.assertEqual(self.listing("data"), [str(message.queue_id)])

    def test_held_is_just_envelope_state(self) -> None:
        entry = self.commit(env=attrs.evolve(envelope(), held=True))
        self.assertTrue(self.spool.load(entry.queue_id).envelope.held)

    def test_utf8_envelope_round_trips(self) -> None:
        env = attrs.evolve(envelope(), sender="jörg@exämple.test", smtputf8=True)
        entry = self.commit(env=env)
        self.assertEqual(self.open().load(entry.queue_id).envelope, env)

    def test_failed_rename_leaves_nothing(self) -> None:
        def broken_rename(src: str, dst: str) -> None:
            raise OSError(28, "No space left on device")

        self.patch(os, "rename", broken_rename)
        message = self.spool.receive()
        message.write(b"x\r\n")
        self.failureResultOf(message.commit(envelope()), OSError)
        for name in ("tmp", "data", "state"):
            self.assertEqual(self.listing(name), [], name)
        message.abort()  # harmless afterwards

    def test_failed_directory_fsync_fails_and_undoes_the_commit(self) -> None:
        def broken(path: str) -> None:
            raise OSError(5, "Input/output error")

        self.patch(spoolfile_module, "fsync_dir", broken)
        message = self.spool.receive()
        message.write(b"x\r\n")
        self.failureResultOf(message.commit(envelope()), OSError)
        for name in ("tmp", "data", "state"):
            self.assertEqual(self.listing(name), [], name)

    def test_never_replaces_a_committed_message(self) -> None:
        message = self.spool.receive()
        self.write(f"data/{message.queue_id}", b"already here")
        message.write(b"x\r\n")
        self.failureResultOf(message.commit(envelope()), FileExistsError)
        self.assertEqual(self.read(f"data/{message.queue_id}"), b"already here")
        self.assertEqual(self.listing("tmp"), [])


class GroupCommitTests(SpoolTestCase):
    """Commits that arrive while a batch syncs share the next batch and its one dir fsync."""

    def setUp(self) -> None:
        super().setUp()
        self.events: list[tuple[str, str]] = record_file_system(self, self.directory)
        self.jobs = Jobs()
        self.spool = Spool(self.directory, clock=self.clock, run_blocking=self.jobs)

    def test_concurrent_commits_share_one_directory_fsync(self) -> None:
        first = self.spool.receive()
        first.write(b"first\r\n")
        first.commit(envelope())  # starts batch 1 at once
        messages = []
        for n in range(8):  # arrive while batch 1 syncs
            message = self.spool.receive()
            message.write(b"message %d\r\n" % n)
            messages.append(message)
        done = []
        for message in messages:
            message.commit(envelope()).addCallback(
                lambda e: self.events.append(("fired", str(e.queue_id)))
            ).addCallback(done.append)
        self.assertEqual(self.spool.batches, 1)
        self.jobs.run_next()  # batch 1 ends; batch 2 (the eight) starts
        self.assertEqual(self.spool.batches, 2)
        del self.events[:]
        self.assertEqual(done, [])
        self.jobs.run_next()
        self.assertEqual(len(done), 8)
        ids = [str(m.queue_id) for m in messages]
        kinds = [e for e in self.events if e[0] != "unlink"]
        dir_syncs = [i for i, e in enumerate(kinds) if e == ("fsync", "data")]
        self.assertEqual(len(dir_syncs), 1, kinds)  # once for the whole batch
        (sync,) = dir_syncs
        self.assertEqual(sorted(kinds[:sync]), sorted(
            [("fsync", f"tmp/{i}.q") for i in ids] + [("rename", f"data/{i}") for i in ids]
        ))
        for i in ids:  # each file is fsynced before its rename
            synced = kinds.index(("fsync", f"tmp/{i}.q"))
            self.assertLess(synced, kinds.index(("rename", f"data/{i}")))
        self.assertEqual(kinds[sync + 1 :], [("fired", i) for i in ids])
        committed = {first.queue_id, *[m.queue_id for m in messages]}
        self.assertEqual(set(self.spool.queue_ids()), committed)

    def test_one_failure_does_not_fail_the_batch(self) -> None:
        self.spool.receive().commit(envelope())
        messages = [self.spool.receive() for _ in range(3)]
        self.write(f"data/{messages[1].queue_id}", b"taken")  # its id is in use: refused
        results = [m.commit(envelope()) for m in messages]
        self.jobs.run_next()
        self.jobs.run_next()
        self.successResultOf(results[0])
        self.failureResultOf(results[1], FileExistsError)
        self.successResultOf(results[2])
        self.assertEqual(self.listing("tmp"), [])

    def test_updates_and_removes_are_batched_too(self) -> None:
        spool = Spool(self.directory, clock=self.clock, run_blocking=run_now)
        entries = [self.commit(spool=spool) for _ in range(6)]
        self.spool.receive().commit(envelope())  # keeps batch 1 busy
        updates = [self.spool.update(attrs.evolve(e, attempts=1)) for e in entries[:3]]
        removes = [self.spool.remove(e.queue_id) for e in entries[3:]]
        self.jobs.run_next()
        del self.events[:]
        self.jobs.run_next()
        for d in updates + removes:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.events.count(("fsync", "state")), 1)
        self.assertEqual(self.events.count(("fsync", "data")), 1)
        self.assertEqual(self.spool.batches, 2)
        gone = {e.queue_id for e in entries[3:]}
        self.assertEqual(gone & set(self.spool.queue_ids()), set())
        for e in entries[:3]:
            self.assertEqual(self.spool.load(e.queue_id).attempts, 1)

    def test_a_broken_batch_job_fails_every_operation(self) -> None:
        def broken(batch: object) -> None:
            raise RuntimeError("bug")

        writer = self.spool._writer
        self.patch(writer, "run", broken)
        message = self.spool.receive()
        d = message.commit(envelope())
        self.jobs.run_next()
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(self.spool._live, set())
        # The spool still works afterwards.
        self.patch(writer, "run", type(writer).run.__get__(writer))
        d = self.spool.receive().commit(envelope())
        self.jobs.run_next()
        self.successResultOf(d)


class AbortTests(SpoolTestCase):
    def test_abort_leaves_nothing(self) -> None:
        message = self.spool.receive()
        message.write(b"partial")
        message.abort()
        message.abort()
        for name in ("tmp", "data", "state", "corrupt"):
            self.assertEqual(self.listing(name), [], name)
        self.assertEqual(list(self.spool.entries()), [])

    def test_abort_of_a_spilled_message_removes_its_file(self) -> None:
        spool = self.open(spill_threshold=4)
        message = spool.receive()
        message.write(b"more than four")
        self.assertEqual(self.listing("tmp"), [str(message.queue_id)])
        message.abort()
        self.assertEqual(self.listing("tmp"), [])

    def test_write_after_abort_is_a_bug(self) -> None:
        message = self.spool.receive()
        message.abort()
        self.assertRaises(RuntimeError, message.write, b"x")
        self.assertRaises(RuntimeError, message.commit, envelope())
        self.assertRaises(RuntimeError, message.read)
        self.assertRaises(RuntimeError, message.prepend, b"x")

    def test_write_or_commit_after_commit_is_a_bug(self) -> None:
        message = self.spool.receive()
        self.successResultOf(message.commit(envelope()))
        self.assertRaises(RuntimeError, message.write, b"x")
        self.assertRaises(RuntimeError, message.commit, envelope())

    def test_abort_after_commit_keeps_the_message(self) -> None:
        message = self.spool.receive()
        message.write(b"x\r\n")
        entry = self.successResultOf(message.commit(envelope()))
        message.abort()
        self.assertEqual(self.spool.load(entry.queue_id), entry)


class ReadTests(SpoolTestCase):
    def test_missing_is_key_error(self) -> None:
        missing = QueueId.new(1.0)
        self.assertRaises(KeyError, self.spool.load, missing)
        self.assertRaises(KeyError, self.spool.open_body, missing)

    def test_invalid_ids_refused(self) -> None:
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

    def test_entries_skip_damage_and_load_names_it(self) -> None:
        good, bad, worse = self.commit(), self.commit(), self.commit()
        raw = bytearray(self.read(f"data/{bad.queue_id}"))
        raw[20] ^= 0xFF  # a bit flipped inside the header's JSON
        self.write(f"data/{bad.queue_id}", bytes(raw))
        self.successResultOf(self.spool.update(worse))
        self.write(f"state/{worse.queue_id}.json", b'{"id": "truncated')
        reader = Spool(self.directory, clock=self.clock, run_blocking=run_now)
        self.assertEqual(list(reader.entries()), [good])
        with self.assertRaises(CorruptEntry) as e:
            reader.load(bad.queue_id)
        self.assertIn("checksum", str(e.exception))
        self.assertRaises(CorruptEntry, reader.load, worse.queue_id)

    def test_state_missing_a_field_is_corrupt_not_missing(self) -> None:
        entry = self.commit()
        self.write(f"state/{entry.queue_id}.json", f'{{"id": "{entry.queue_id}"}}'.encode())
        self.assertRaises(CorruptEntry, self.spool.load, entry.queue_id)

    def test_open_body_is_positioned_at_the_body(self) -> None:
        entry = self.commit(BODY)
        with self.spool.open_body(entry.queue_id) as f:
            self.assertEqual(f.read(7), BODY[:7])
            f.seek(0, os.SEEK_END)
            header_length = len(self.read(f"data/{entry.queue_id}")) - len(BODY)
            self.assertEqual(f.tell() - entry.size, header_length)

    def test_reader_needs_no_recovery(self) -> None:
        # The admin CLI: reads a live spool without touching tmp/.
        entry = self.commit()
        spilling = self.open(spill_threshold=4)
        in_flight = spilling.receive()
        in_flight.write(b"still arriving")
        reader = Spool(self.directory, clock=self.clock, run_blocking=run_now)
        self.assertEqual(list(reader.entries()), [entry])
        self.assertEqual(self.listing("tmp"), [str(in_flight.queue_id)])

    def test_entries_after_recovery_come_from_memory_once(self) -> None:
        kept, updated, removed = self.commit(), self.commit(), self.commit()
        reads: list[QueueId] = []
        real = spool_module.read_header

        def counting(queue_id: QueueId, f: Any) -> Any:
            reads.append(queue_id)
            return real(queue_id, f)

        self.patch(spool_module, "read_header", counting)
        spool = self.open()
        self.assertEqual(len(reads), 3)  # recovery read each message once
        # Changes after recovery are seen by the in-memory copy.
        updated = attrs.evolve(updated, attempts=4)
        self.successResultOf(spool.update(updated))
        self.successResultOf(spool.remove(removed.queue_id))
        added = self.commit(spool=spool)
        del reads[:]
        self.assertEqual(list(spool.entries()), [kept, updated, added])
        self.assertEqual(reads, [])  # the scheduler's start parses nothing again
        self.assertEqual(list(spool.entries()), [kept, updated, added])
        self.assertEqual(reads, [kept.queue_id, added.queue_id])  # later calls read the disk


class UpdateRemoveTests(SpoolTestCase):
    def test_update_persists_across_instances(self) -> None:
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
        self.assertEqual(self.listing("state"), [f"{entry.queue_id}.json"])
        self.assertEqual(self.open().load(entry.queue_id), changed)
        self.assertEqual(self.last_report, RecoveryReport(queued=1))
        self.assertEqual(list(self.open().entries()), [changed])
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.body(entry.queue_id), BODY)

    def test_update_of_removed_message_refused(self) -> None:
        entry = self.commit()
        self.successResultOf(self.spool.remove(entry.queue_id))
        self.failureResultOf(self.spool.update(entry), KeyError)
        self.assertEqual(self.listing("state"), [])
        self.assertEqual(self.listing("tmp"), [])

    def test_remove(self) -> None:
        keep, gone, updated = self.commit(), self.commit(), self.commit()
        self.successResultOf(self.spool.update(attrs.evolve(updated, attempts=1)))
        for entry in (gone, updated):
            self.assertIsNone(self.successResultOf(self.spool.remove(entry.queue_id)))
            self.assertRaises(KeyError, self.spool.load, entry.queue_id)
            self.assertRaises(KeyError, self.spool.open_body, entry.queue_id)
            self.failureResultOf(self.spool.remove(entry.queue_id), KeyError)
        self.assertEqual(list(self.spool.entries()), [keep])
        self.assertEqual(self.listing("data"), [str(keep.queue_id)])
        self.assertEqual(self.listing("state"), [])

    def test_operations_on_one_message_run_in_call_order(self) -> None:
        jobs = Jobs()
        entry = self.commit()
        spool = Spool(self.directory, clock=self.clock, run_blocking=jobs)
        first = spool.update(attrs.evolve(entry, attempts=1))
        second = spool.update(attrs.evolve(entry, attempts=2))
        removed = spool.remove(entry.queue_id)
        self.assertEqual(len(jobs.pending), 1)  # the second waits for the first to finish
        jobs.run_next()
        self.successResultOf(first)
        self.assertEqual(len(jobs.pending), 1)
        jobs.run_next()
        self.successResultOf(second)
        self.assertEqual(spool.load(entry.queue_id).attempts, 2)
        jobs.run_next()
        self.successResultOf(removed)
        self.assertEqual(spool._locks, {})
        self.assertEqual(jobs.pending, [])


def write_old_layout(directory: str, entry: QueueEntry, body: bytes, state: bool = True) -> None:
    """What the spool before group commit wrote: the bare body, and an indented state file."""
    with open(os.path.join(directory, "data", str(entry.queue_id)), "wb") as f:
        f.write(body)
    if state:
        with open(os.path.join(directory, "state", f"{entry.queue_id}.json"), "wb") as f:
            f.write(json.dumps(entry.to_json(), indent=2, sort_keys=True).encode() + b"\n")


class OldLayoutTests(SpoolTestCase):
    """A deployment upgrades with messages queued: they load and deliver as they are."""

    def setUp(self) -> None:
        super().setUp()
        self.old = [
            QueueEntry.new(QueueId.new(1_699_999_000 + n), envelope(1_699_999_000 + n), 0)
            for n in range(2)
        ]
        self.bodies = [b"Received: by old\r\nSubject: %d\r\n\r\nold body\r\n" % n for n in range(2)]
        self.old = [
            attrs.evolve(e, size=len(b)) for e, b in zip(self.old, self.bodies, strict=True)
        ]
        self.old[1] = attrs.evolve(self.old[1], attempts=3, last_error="451 later")
        for entry, body in zip(self.old, self.bodies, strict=True):
            write_old_layout(self.directory, entry, body)

    def test_old_messages_load_after_upgrade(self) -> None:
        new = self.commit()
        spool = self.open()
        self.assertEqual(self.last_report, RecoveryReport(queued=3))
        self.assertEqual(list(spool.entries()), [*self.old, new])
        self.assertEqual(list(spool.entries()), [*self.old, new])  # from disk, too
        for entry, body in zip(self.old, self.bodies, strict=True):
            self.assertEqual(spool.load(entry.queue_id), entry)
            self.assertEqual(self.body(entry.queue_id, spool), body)

    def test_old_messages_update_and_remove(self) -> None:
        spool = self.open()
        changed = attrs.evolve(self.old[0], attempts=1)
        self.successResultOf(spool.update(changed))
        spool = self.open()
        self.assertEqual(self.last_report, RecoveryReport(queued=2))
        self.assertEqual(spool.load(changed.queue_id), changed)
        self.assertEqual(self.body(changed.queue_id, spool), self.bodies[0])
        for entry in self.old:
            self.successResultOf(spool.remove(entry.queue_id))
        self.assertEqual(self.listing("data") + self.listing("state"), [])

    def test_old_body_without_state_is_kept_in_corrupt(self) -> None:
        # The previous layout's crash window (body renamed, state not yet): never acknowledged,
        # but a body without header cannot be told from damage here, so it is kept, not deleted.
        orphan = QueueEntry.new(QueueId.new(1_699_999_100), envelope(), 5)
        write_old_layout(self.directory, orphan, b"hello", state=False)
        self.open()
        self.assertEqual(self.last_report.queued, 2)
        (moved,) = self.last_report.corrupt
        self.assertEqual(moved.path, f"data/{orphan.queue_id}")
        self.assertIn("without header", moved.reason)
        self.assertEqual(self.read(moved.moved_to), b"hello")

    def test_old_truncated_body_is_corrupt(self) -> None:
        self.write(f"data/{self.old[0].queue_id}", b"short")
        self.open()
        self.assertEqual(self.last_report.queued, 1)
        self.assertEqual(len(self.last_report.corrupt), 2)
        self.assertIn("5 bytes", self.last_report.corrupt[0].reason)


def header(entry: QueueEntry, crc: int | None = None) -> bytes:
    raw = json.dumps(entry.to_json()).encode()
    return struct.pack(">8sII", MAGIC, len(raw), zlib.crc32(raw) if crc is None else crc) + raw


class RecoveryTests(SpoolTestCase):
    def test_clean_spool(self) -> None:
        entry = self.commit()
        self.open()
        self.assertEqual(self.last_report, RecoveryReport(queued=1))
        self.assertTrue(self.last_report.clean)
        self.assertEqual(self.spool.load(entry.queue_id), entry)

    def test_tmp_leftovers_removed(self) -> None:
        entry = self.commit()
        unfinished = self.open(spill_threshold=4).receive()
        unfinished.write(b"never acknowledged")
        self.write(f"tmp/{entry.queue_id}.0badc0de.json", b"{")
        self.write(f"tmp/{entry.queue_id}.q", b"half a commit")
        self.open()
        self.assertEqual(
            self.last_report,
            RecoveryReport(
                queued=1,
                removed_tmp=tuple(sorted([
                    str(unfinished.queue_id),
                    f"{entry.queue_id}.0badc0de.json",
                    f"{entry.queue_id}.q",
                ])),
            ),
        )
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.spool.load(entry.queue_id), entry)

    def test_damaged_headers_moved_to_corrupt_never_deleted(self) -> None:
        good = self.commit(b"good")
        cases = {
            "bad checksum": lambda e, body: header(e, crc=0) + body,
            "short header": lambda e, body: MAGIC + b"\x00",
            "empty": lambda e, body: b"",
            "body truncated": lambda e, body: header(e) + body[:-2],
            "body too long": lambda e, body: header(e) + body + b"!",
            "length past the end": lambda e, body: header(e)[:-3],
            "not JSON": lambda e, body: struct.pack(">8sII", MAGIC, 3, zlib.crc32(b"{{{"))
            + b"{{{",
        }
        damaged = {}
        for reason, make in cases.items():
            entry = self.commit(b"bad")
            self.write(f"data/{entry.queue_id}", make(entry, b"bad"))
            damaged[str(entry.queue_id)] = (reason, self.read(f"data/{entry.queue_id}"))
        spool = self.open()
        self.assertEqual(self.last_report.queued, 1)
        self.assertEqual(list(spool.entries()), [good])
        moved = {c.path: c for c in self.last_report.corrupt}
        self.assertEqual(sorted(moved), sorted(f"data/{q}" for q in damaged))
        for queue_id, (why, raw) in damaged.items():
            self.assertEqual(self.read(f"corrupt/{queue_id}"), raw, why)  # kept as it was
        reasons = {damaged[c.moved_to.split("/")[1]][0]: c.reason for c in moved.values()}
        self.assertIn("checksum", reasons["bad checksum"])
        self.assertIn("too short", reasons["short header"])
        self.assertIn("body is 1 bytes, header says 3", reasons["body truncated"])
        self.assertIn("unreadable header", reasons["not JSON"])

    def test_header_naming_another_message_is_corrupt(self) -> None:
        a, b = self.commit(b"same"), self.commit(b"same")
        self.write(f"data/{a.queue_id}", self.read(f"data/{b.queue_id}"))
        self.open()
        self.assertEqual(self.last_report.queued, 1)
        (moved,) = self.last_report.corrupt
        self.assertIn("names another message", moved.reason)

    def test_garbage_state_moved_to_corrupt_rest_still_loads(self) -> None:
        good, bad = self.commit(b"good"), self.commit(b"bad")
        self.successResultOf(self.spool.update(attrs.evolve(bad, attempts=1)))
        self.write(f"state/{bad.queue_id}.json", b"\x00\x00garbage")
        spool = self.open()
        (state, data) = self.last_report.corrupt
        self.assertEqual(state.path, f"state/{bad.queue_id}.json")
        self.assertEqual(state.moved_to, f"corrupt/{bad.queue_id}.json")
        self.assertIn("unreadable state", state.reason)
        self.assertEqual(data.path, f"data/{bad.queue_id}")
        self.assertEqual(self.listing("corrupt"), [str(bad.queue_id), f"{bad.queue_id}.json"])
        self.assertEqual(self.last_report.queued, 1)
        self.assertEqual(list(spool.entries()), [good])
        self.assertTrue(self.read(f"corrupt/{bad.queue_id}").endswith(b"bad"))

    def test_state_without_data_moved_to_corrupt(self) -> None:
        entry = self.commit()
        self.successResultOf(self.spool.update(entry))
        os.unlink(self.path("data", str(entry.queue_id)))
        self.open()
        self.assertEqual(
            self.last_report.corrupt,
            (
                CorruptFile(
                    f"state/{entry.queue_id}.json",
                    f"corrupt/{entry.queue_id}.json",
                    "message data missing",
                ),
            ),
        )
        self.assertEqual(self.last_report.queued, 0)

    def test_message_file_shorter_than_its_state_says(self) -> None:
        entry = self.commit(b"0123456789")
        self.successResultOf(self.spool.update(entry))
        raw = self.read(f"data/{entry.queue_id}")
        self.write(f"data/{entry.queue_id}", raw[:-5])
        self.open()
        self.assertEqual(len(self.last_report.corrupt), 2)
        reason = self.last_report.corrupt[0].reason
        self.assertIn(f"{len(raw) - 5} bytes, state says {len(raw)}", reason)

    def test_stray_names_moved_to_corrupt_without_overwriting(self) -> None:
        self.write("state/notes.txt", b"1")
        self.write("data/notes.txt", b"2")
        self.write("corrupt/notes.txt", b"0")
        os.mkdir(self.path("data", str(QueueId.new(1.0))))
        self.open()
        moved = [(c.path, c.moved_to) for c in self.last_report.corrupt]
        self.assertEqual(
            [m for m in moved if "notes" in m[0]],
            [("state/notes.txt", "corrupt/notes.txt.1"), ("data/notes.txt", "corrupt/notes.txt.2")],
        )
        self.assertEqual(len(moved), 3)  # the directory, too
        self.assertEqual(self.listing("data"), [])

    def test_permissions(self) -> None:
        old = os.umask(0)  # prove the modes are chosen, not inherited from the umask
        self.addCleanup(os.umask, old)
        shutil.rmtree(self.directory)
        spool = self.open(spill_threshold=4)
        message = spool.receive()
        message.write(b"spilled")
        self.assertEqual(
            stat.S_IMODE(os.stat(self.path("tmp", str(message.queue_id))).st_mode), 0o600
        )
        entry = self.successResultOf(message.commit(envelope()))
        self.successResultOf(spool.update(attrs.evolve(entry, attempts=1)))
        for relative in (f"data/{entry.queue_id}", f"state/{entry.queue_id}.json"):
            self.assertEqual(stat.S_IMODE(os.stat(self.path(relative)).st_mode), 0o600, relative)
        for relative in ("", "tmp", "data", "state", "corrupt"):
            self.assertEqual(stat.S_IMODE(os.stat(self.path(relative)).st_mode), 0o700, relative)


def record_file_system(case: SynchronousTestCase, directory: str) -> list[tuple[str, str]]:
    """Patch fsync/rename/replace/unlink to log (call, path relative to the spool)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace, real_unlink = os.fsync, os.rename, os.replace, os.unlink

    def relative(path: str) -> str:
        path = os.path.relpath(path, directory)
        if path.startswith("tmp/") and path.endswith(".json"):
            return "tmp/STATE.json"  # the random part of the temporary state name
        return path

    def fsync(fd: int) -> None:
        events.append(("fsync", relative(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        events.append(("rename", relative(dst)))
        real_rename(src, dst)

    def replace(src: str, dst: str) -> None:
        events.append(("rename", relative(dst)))
        real_replace(src, dst)

    def unlink(path: str) -> None:
        events.append(("unlink", relative(path)))
        real_unlink(path)

    case.patch(os, "fsync", fsync)
    case.patch(os, "rename", rename)
    case.patch(os, "replace", replace)
    case.patch(os, "unlink", unlink)
    return events


class DurabilityOrderTests(SpoolTestCase):
    """The order of fsyncs and renames is the whole guarantee; record it."""

    def setUp(self) -> None:
        super().setUp()
        self.events = record_file_system(self, self.directory)

    def test_commit_point_after_everything_it_needs(self) -> None:
        message = self.spool.receive()
        qid = str(message.queue_id)
        message.write(b"Subject: x\r\n\r\nbody\r\n")
        d = message.commit(envelope())
        d.addCallback(lambda entry: self.events.append(("fired", "")))
        self.successResultOf(d)
        self.assertEqual(
            self.events,
            [
                ("fsync", f"tmp/{qid}.q"),
                ("rename", f"data/{qid}"),  # the commit point
                ("fsync", "data"),
                ("fired", ""),  # only now may the session answer 250
            ],
        )

    def test_spilled_commit(self) -> None:
        spool = self.open(spill_threshold=4)
        message = spool.receive()
        qid = str(message.queue_id)
        message.write(b"Subject: x\r\n\r\nbody\r\n")
        self.successResultOf(message.commit(envelope()))
        self.assertEqual(
            self.events,
            [
                ("unlink", f"tmp/{qid}"),  # the spilled body, copied behind the header
                ("fsync", f"tmp/{qid}.q"),
                ("rename", f"data/{qid}"),
                ("fsync", "data"),
            ],
        )

    def test_update_is_atomic_and_durable(self) -> None:
        entry = self.commit()
        del self.events[:]
        self.successResultOf(self.spool.update(attrs.evolve(entry, attempts=1)))
        self.assertEqual(
            self.events,
            [
                ("fsync", "tmp/STATE.json"),
                ("rename", f"state/{entry.queue_id}.json"),
                ("fsync", "state"),
            ],
        )

    def test_remove_of_a_message_never_updated(self) -> None:
        entry = self.commit()
        del self.events[:]
        self.successResultOf(self.spool.remove(entry.queue_id))
        self.assertEqual(self.events, [("unlink", f"data/{entry.queue_id}"), ("fsync", "data")])

    def test_remove_drops_state_durably_before_data(self) -> None:
        entry = self.commit()
        self.successResultOf(self.spool.update(entry))
        del self.events[:]
        self.successResultOf(self.spool.remove(entry.queue_id))
        self.assertEqual(
            self.events,
            [
                ("unlink", f"state/{entry.queue_id}.json"),
                ("fsync", "state"),
                ("unlink", f"data/{entry.queue_id}"),
                ("fsync", "data"),
            ],
        )


# Ten chains of commits at once on a real thread pool, so batches really form; each
# acknowledged message is printed, and the kill lands in the middle of some batch.
CHILD = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread
    from smarthost.envelope import Envelope, Recipient
    from smarthost.spool import Spool

    spool, _ = Spool.open(sys.argv[1], clock=reactor, run_blocking=deferToThread,
                          spill_threshold=64 * 1024)

    def body(n):
        # every third message is spilled to tmp/ while it is received
        size = 100000 if n % 3 == 0 else 3000
        return b"Subject: %d\\r\\n\\r\\n" % n + b"x" * size + b"\\r\\n"

    def one(n):
        message = spool.receive()
        message.write(body(n))
        env = Envelope(sender="a@example.test", recipients=(Recipient("b@example.test"),))
        d = message.commit(env)
        def done(entry):
            sys.stdout.write("%s %d %d\\n" % (entry.queue_id, n, spool.batches))
            sys.stdout.flush()
            one(n + 10)  # keep committing: the kill lands in the middle of one
        d.addCallback(done)
        d.addErrback(lambda f: (f.printTraceback(), reactor.stop()))

    for k in range(10):
        reactor.callWhenRunning(one, k)
    reactor.run()
    """
)


def expected_body(n: int) -> bytes:
    return b"Subject: %d\r\n\r\n" % n + b"x" * (100000 if n % 3 == 0 else 3000) + b"\r\n"


class CrashTests(SpoolTestCase):
    def test_kill_9_after_commit_loses_nothing(self) -> None:
        shutil.rmtree(self.directory)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, self.directory],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(child.stderr.close)  # type: ignore[union-attr]
        self.addCleanup(child.stdout.close)  # type: ignore[union-attr]
        try:
            lines = read_lines(child, 200, timeout=60)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        spool = self.open()
        acknowledged = [line.split() for line in lines]
        for queue_id, n, _ in acknowledged:
            with spool.open_body(QueueId(queue_id.decode())) as f:
                self.assertEqual(f.read(), expected_body(int(n)))
        self.assertGreaterEqual(self.last_report.queued, len(acknowledged))
        self.assertEqual(self.last_report.corrupt, ())
        self.assertEqual(self.listing("tmp"), [])
        # Group commit happened: fewer blocking jobs than messages.
        self.assertLess(int(acknowledged[-1][2]), len(acknowledged))


def read_lines(child: subprocess.Popen[bytes], count: int, timeout: float) -> list[bytes]:
    """The child's first ``count`` stdout lines, waiting on the pipe, never sleeping."""
    assert child.stdout is not None
    fd = child.stdout.fileno()
    deadline = time.monotonic() + timeout
    buffer, lines = b"", list[bytes]()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while len(lines) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"child printed {len(lines)} of {count} lines in time")
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                stderr = child.stderr.read() if child.stderr else b""
                raise AssertionError(f"child exited early: {stderr.decode(errors='replace')}")
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            lines.extend(complete)
    return lines[:count]

