"""The spool's log on disk: records survive a reopen, torn tails dropped at start-up, bad
entries quarantined, the lock, the previous layout refused, segment rotation and compaction,
and the admin tool changing a spool no daemon runs on. Damage to synced records is in
test_spool_recovery.py."""
# trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import shutil
import stat
import zlib
from typing import Any, BinaryIO

import attrs
from test_spool import (
    BODY,
    FILLER,
    Jobs,
    SpoolTestCase,
    encode_v1_header,
    envelope,
    record_start,
)
from twisted.internet.defer import Deferred

from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.queue import segment as spoolfile
from smarthost.queue import spool as spool_module
from smarthost.queue.directory import SpoolLocked
from smarthost.queue.index import Index
from smarthost.queue.recovery import Affected, Damage, Fate, RecoveryReport
from smarthost.queue.segment import (
    MESSAGE,
    REMOVED,
    Record,
    encode_entry,
)
from smarthost.queue.spool import COMPACT_AFTER
from smarthost.queue.writer import Slot


class RecoveryTests(SpoolTestCase):
    def test_records_survive_a_reopen(self) -> None:
        spool = self.reopen(spill_threshold=1000)
        big = os.urandom(50_000)
        small, spilled_entry, updated, removed = (
            self.commit(), self.commit(big), self.commit(b"u"), self.commit(b"r")
        )
        updated = attrs.evolve(updated, attempts=7, last_error="451 later")
        self.successResultOf(spool.update(updated))
        self.successResultOf(spool.remove(removed.queue_id))
        before = list(spool.entries())
        self.assertEqual(before, [small, spilled_entry, updated])
        spool = self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(queued=3))
        self.assertTrue(self.last_report.clean)
        self.assertEqual(list(spool.entries()), before)  # from recovery's memory
        self.assertEqual(list(spool.entries()), before)  # from disk
        for entry, body in ((small, BODY), (spilled_entry, big), (updated, b"u")):
            self.assertEqual(self.body(entry.queue_id), body)
        self.assertRaises(KeyError, spool.load, removed.queue_id)
        self.assertEqual(self.segments(), ["00000001.seg"])  # nothing written since

    def test_tmp_leftovers_removed(self) -> None:
        entry = self.commit()
        unfinished = self.reopen(spill_threshold=4).receive()
        unfinished.write(b"never acknowledged")
        with open(self.path("tmp", "junk.new"), "wb") as f:
            f.write(b"half a prepend")
        self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(
            queued=1, removed_tmp=tuple(sorted([str(unfinished.queue_id), "junk.new"])),
        ))
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.spool.load(entry.queue_id), entry)

    def test_second_spool_is_locked_out(self) -> None:
        entry = self.commit()
        self.assertRaises(SpoolLocked, self.open)
        self.failureResultOf(self.admin().remove(entry.queue_id), SpoolLocked)
        self.assertEqual(self.spool.queue_ids(), [entry.queue_id])
        self.reopen()  # close() released it
        self.assertEqual(self.last_report, RecoveryReport(queued=1))

    def test_legacy_layout_refused(self) -> None:
        self.spool.close()
        for name in ("data", "state"):
            os.mkdir(self.path(name))  # empty: harmless
        self.reopen()
        self.spool.close()
        for name in ("data", "state"):
            with open(self.path(name, "0123456789ABCDEF"), "wb") as f:
                f.write(b"an old message")
            with self.assertRaises(OSError) as e:
                self.open()
            self.assertIn(self.path(name), str(e.exception))
            os.unlink(self.path(name, "0123456789ABCDEF"))
        self.assertEqual(self.listing("log"), [])  # nothing was touched

    def test_torn_tail_mid_record_is_dropped(self) -> None:
        entries = [self.commit(b"message %d\r\n" % n) for n in range(3)]
        segment, last = self.message_record(entries[2].queue_id)
        start = record_start(last)
        os.truncate(self.path("log", segment), last.body_offset + 4)  # cut in the body
        spool = self.reopen()
        self.assertEqual(self.last_report.queued, 2)
        self.assertEqual(self.last_report.torn, (
            Damage(f"log/{segment}", start, last.body_offset + 4, None,
                   "unfinished write at the end of the log",
                   (Affected(entries[2].queue_id, "message", start, Fate.UNFINISHED),)),
        ))
        self.assertEqual(self.last_report.corrupt, ())
        self.assertEqual(os.path.getsize(self.path("log", segment)), start)
        self.assertEqual(spool.queue_ids(), [e.queue_id for e in entries[:2]])
        self.assertEqual(self.body(entries[1].queue_id), b"message 1\r\n")
        self.assertRaises(KeyError, spool.load, entries[2].queue_id)
        self.assertEqual(self.listing("corrupt"), [])
        self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(queued=2))

    def test_torn_tail_of_garbage_is_dropped(self) -> None:
        entries = [self.commit(b"message %d\r\n" % n) for n in range(3)]
        (segment,) = self.segments()
        size = os.path.getsize(self.path("log", segment))
        garbage = b"\x89SQR\x01 half a header" + b"\x00" * 100
        with open(self.path("log", segment), "ab") as f:
            f.write(garbage)
        spool = self.reopen()
        self.assertEqual(self.last_report.queued, 3)
        (torn,) = self.last_report.torn
        self.assertEqual((torn.start, torn.end), (size, size + len(garbage)))
        self.assertEqual(os.path.getsize(self.path("log", segment)), size)
        self.assertEqual(list(spool.entries()), entries)
        self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(queued=3))

    def test_unreadable_entry_is_quarantined(self) -> None:
        good = self.commit()
        self.spool.close()
        bad_id, other_id, short_id = (QueueId.new(1_700_000_001 + n) for n in range(3))
        body = b"the body\r\n"
        crc = zlib.crc32(body)
        other = QueueEntry.new(other_id, envelope(), len(body))
        with open(self.path("log", "00000002.seg"), "wb") as f:
            for queue_id, raw in (
                (bad_id, b"{not json"),
                (other_id, encode_entry(attrs.evolve(other, queue_id=bad_id))),
                (short_id, encode_entry(attrs.evolve(other, queue_id=short_id, size=3))),
            ):
                f.write(encode_v1_header(MESSAGE, queue_id, raw, len(body), crc) + body)
        spool = self.reopen()
        self.assertEqual(self.last_report.queued, 1)
        reasons = {d.moved_to: d.reason for d in self.last_report.corrupt}
        self.assertEqual(sorted(reasons), sorted(f"corrupt/{i}" for i in (bad_id, other_id,
                                                                            short_id)))
        self.assertIn("unreadable entry", reasons[f"corrupt/{bad_id}"])
        self.assertIn("names another message", reasons[f"corrupt/{other_id}"])
        self.assertIn("body is 10 bytes, entry says 3", reasons[f"corrupt/{short_id}"])
        self.assertEqual(self.read(f"corrupt/{bad_id}"), b"{not json\n\n" + body)
        self.assertEqual(list(spool.entries()), [good])
        # Each got a REMOVED record, in a new segment: never read again.
        removed = [r for r in self.records("00000003.seg") if isinstance(r, Record)]
        self.assertEqual({(r.kind, r.queue_id) for r in removed},
                         {(REMOVED, i) for i in (bad_id, other_id, short_id)})
        self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(queued=1))
        self.assertEqual(len(self.listing("corrupt")), 3)

    def test_permissions(self) -> None:
        old = os.umask(0)  # prove the modes are chosen, not inherited from the umask
        self.addCleanup(os.umask, old)
        self.spool.close()
        shutil.rmtree(self.directory)
        spool = self.reopen(spill_threshold=4)
        message = spool.receive()
        message.write(b"spilled")
        self.assertEqual(
            stat.S_IMODE(os.stat(self.path("tmp", str(message.queue_id))).st_mode), 0o600
        )
        self.successResultOf(message.commit(envelope()))
        for relative in ("log/00000001.seg", "lock"):
            self.assertEqual(stat.S_IMODE(os.stat(self.path(relative)).st_mode), 0o600, relative)
        for relative in ("", "tmp", "log", "corrupt"):
            self.assertEqual(stat.S_IMODE(os.stat(self.path(relative)).st_mode), 0o700, relative)


class IndexTests(SpoolTestCase):
    def test_moving_a_message_never_leaves_it_unindexed(self) -> None:
        """A delivery thread may look a message up while compaction moves it forward."""
        removed: list[QueueId] = []

        class Watched(dict[QueueId, Slot]):
            def pop(self, key: QueueId, *default: Any) -> Any:
                removed.append(key)
                return super().pop(key, *default)

            def __delitem__(self, key: QueueId) -> None:
                removed.append(key)
                super().__delitem__(key)

        entry = self.commit()
        live = self.spool._ensure_index()
        index = Index(slots=Watched(live.slots), bodies={n: set(i) for n, i in live.bodies.items()},
                      live_bytes=live.live_bytes)
        old = index.slots[entry.queue_id]
        moved = Slot(old.body_segment + 1, 0, old.size, old.body_crc, old.body_segment + 1,
                     0, old.entry_length)
        index.place(entry.queue_id, moved)
        self.assertEqual(removed, [])
        self.assertIs(index.slots[entry.queue_id], moved)
        self.assertEqual(index.live_bytes, old.size)


class RotationTests(SpoolTestCase):
    """Tiny segments, so a few messages fill several."""

    def setUp(self) -> None:
        super().setUp()
        self.reopen(segment_bytes=4096)

    def segment_of(self, queue_id: QueueId) -> int:
        return self.spool._ensure_index().slots[queue_id].body_segment

    def churn(self, rounds: int) -> None:
        """Messages that come and go, so the log moves on past the long-deferred ones."""
        for _ in range(rounds):
            self.successResultOf(self.spool.remove(self.commit(FILLER).queue_id))

    def test_segments_rotate_and_dead_ones_are_deleted(self) -> None:
        self.patch(spool_module, "COMPACT_AFTER", 1000)  # rotation alone
        entries = [self.commit(FILLER) for _ in range(15)]
        names = self.segments()
        self.assertGreaterEqual(len(names), 3)
        for name in names[:-1]:
            # Sealed once past segment_bytes: at most one batch (one message here) beyond.
            self.assertLess(os.path.getsize(self.path("log", name)), 4096 + 1500)
        self.assertEqual(list(self.reopen(segment_bytes=4096).entries()), entries)
        for entry in entries:
            self.assertEqual(self.body(entry.queue_id), FILLER)
            self.successResultOf(self.spool.remove(entry.queue_id))
        self.assertEqual(len(self.segments()), 1)  # only the head is left
        self.assertEqual(self.spool._ensure_index().segments,
                         [int(n[:8]) for n in self.segments()])
        self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(queued=0))

    def test_compaction_moves_a_long_deferred_message_forward(self) -> None:
        deferred = self.commit(BODY)
        deferred = attrs.evolve(deferred, attempts=3, last_error="451 4.4.1 no answer")
        self.successResultOf(self.spool.update(deferred))
        self.assertEqual(self.segment_of(deferred.queue_id), 1)
        moves = []
        for _ in range(40):
            before = self.segment_of(deferred.queue_id)
            self.churn(1)
            sealed = len(self.segments()) - 1
            if self.segment_of(deferred.queue_id) == before:
                self.assertLessEqual(sealed, COMPACT_AFTER)  # left alone until then
            else:  # moved into the head; what only it kept alive is gone
                moves.append(before)
                self.assertEqual(sealed, 0)
                self.assertNotIn(f"{before:08d}.seg", self.segments())
        self.assertEqual(moves[0], 1)
        self.assertGreaterEqual(len(moves), 2)
        self.assertEqual(self.spool.load(deferred.queue_id), deferred)  # the STATE went along
        self.assertEqual(self.body(deferred.queue_id), BODY)
        spool = self.reopen(segment_bytes=4096)
        self.assertEqual(self.last_report, RecoveryReport(queued=1))
        self.assertEqual(list(spool.entries()), [deferred])
        self.assertEqual(self.body(deferred.queue_id), BODY)
        self.assertEqual(list(self.admin().entries()), [deferred])

    def test_admin_listing_follows_a_message_compaction_moved(self) -> None:
        kept = self.commit(BODY)
        reader = self.admin()
        self.assertEqual(reader.queue_ids(), [kept.queue_id])  # its index is read now
        self.churn(40)  # the daemon compacts meanwhile: kept's segment is deleted
        self.assertNotIn("00000001.seg", self.segments())
        self.assertEqual(list(reader.entries()), [kept])

    def test_open_body_while_compaction_deletes_its_segment(self) -> None:
        kept = self.commit(BODY)
        real = spoolfile.open_body
        moved: list[str] = []

        def racing(path: str, start: int, length: int, crc: int) -> BinaryIO:
            if not moved:  # the slot was read; now the reactor compacts before the open
                moved.append(path)
                self.churn(40)
            return real(path, start, length, crc)

        self.patch(spool_module, "open_body", racing)
        self.assertEqual(self.body(kept.queue_id), BODY)
        self.assertFalse(os.path.exists(moved[0]))  # the first open missed

    def test_admin_reader_survives_compaction(self) -> None:
        kept = self.commit(BODY)
        reader = self.admin()
        self.assertEqual(reader.queue_ids(), [kept.queue_id])  # index read now
        self.churn(40)
        self.assertEqual(self.body(kept.queue_id, reader), BODY)
        self.assertEqual(reader.load(kept.queue_id), kept)

    def test_compaction_runs_one_batch_at_a_time(self) -> None:
        jobs = Jobs()
        spool = self.reopen(jobs, segment_bytes=4096)
        most = 0

        def step(d: Deferred[Any]) -> Any:
            nonlocal most
            while jobs.pending:
                most = max(most, len(jobs.pending))
                jobs.run_next()
            return self.successResultOf(d)

        for _ in range(2):  # two long-deferred messages in segment 1
            step(self.start(spool)[1])
        for _ in range(40):
            step(spool.remove(step(self.start(spool, FILLER)[1]).queue_id))
        self.assertNotIn("00000001.seg", self.segments())
        self.assertEqual(most, 1)


class AdminTests(SpoolTestCase):
    def test_admin_remove_appends_a_new_segment_and_the_daemon_sees_it(self) -> None:
        gone, kept = self.commit(), self.commit()
        self.spool.close()  # no daemon runs
        admin = self.admin()
        self.assertEqual(list(admin.entries()), [gone, kept])
        self.successResultOf(admin.remove(gone.queue_id))
        self.assertEqual(self.segments(), ["00000001.seg", "00000002.seg"])
        (record,) = self.records("00000002.seg")
        assert isinstance(record, Record)
        self.assertEqual((record.kind, record.queue_id), (REMOVED, gone.queue_id))
        self.assertEqual(admin.queue_ids(), [kept.queue_id])
        self.assertRaises(SpoolLocked, self.open)  # the admin tool holds the lock now
        admin.close()
        spool = self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(queued=1))
        self.assertEqual(list(spool.entries()), [kept])
