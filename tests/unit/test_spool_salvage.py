"""``smarthost queue salvage`` on the spool: what recovery copied to corrupt/ is read back where
one flipped bit can be undone, restored under its own id with its newest entry, never twice,
never after it was delivered, and never from bytes a sender wrote."""
# trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import zlib
from collections.abc import Callable

import attrs
from test_spool import BODY, encode_v1_header, envelope, run_now
from test_spool_recovery import DamageTestCase
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.queue.crcfix import single_bit
from smarthost.queue.recovery import Fate
from smarthost.queue.salvage import SalvageReport, salvage
from smarthost.queue.segment import MESSAGE, REMOVED, Record, encode_entry, encode_header
from smarthost.queue.spool import Spool


class SalvageTests(DamageTestCase):
    def salvage(self, spool: Spool | None = None) -> SalvageReport:
        report: SalvageReport = self.successResultOf(
            Deferred.fromCoroutine(salvage(spool or self.spool, run_now)))
        return report

    def restored(self, report: SalvageReport) -> list[QueueId]:
        return [f.entry.queue_id for f in report.restored]

    def lose(self, where: Callable[[Record], int], bit: int = 3) -> QueueEntry:
        """A message committed, then one bit of its record (at ``where``) flipped and recovery
        run: the message is lost."""
        entry = self.commit()
        self.commit(b"after\r\n")
        segment, record = self.record(entry.queue_id, MESSAGE)
        self.flip_bit(segment, where(record), bit)
        self.reopen()
        self.assertEqual(self.last_report.lost, (entry.queue_id,))
        return entry

    def test_one_flipped_header_bit_is_undone(self) -> None:
        for where in (0, 10, 20, 21, 26, 30, 38, 41, 50, 200):  # magic .. JSON
            with self.subTest(where=where):
                self.setUp()  # a spool of its own
                entry = self.lose(lambda r: r.start + where)  # noqa: B023 (called at once)
                report = self.salvage()
                self.assertEqual(self.restored(report), [entry.queue_id], report.skipped)
                self.assertIn(f"header byte {where} bit 3 undone", report.restored[0].repair)
                self.assertEqual(self.spool.load(entry.queue_id), entry)
                self.assertEqual(self.body(entry.queue_id), BODY)

    def test_one_flipped_body_bit_is_undone(self) -> None:
        entry = self.lose(lambda r: r.body_offset + 7, bit=6)
        report = self.salvage()
        self.assertEqual(self.restored(report), [entry.queue_id])
        self.assertEqual(report.restored[0].repair, "body byte 7 bit 6 undone")
        self.assertEqual(self.body(entry.queue_id), BODY)

    def test_restored_with_the_newest_entry_and_never_twice(self) -> None:
        entry = self.commit()
        self.reopen()
        newer = attrs.evolve(entry, attempts=3, last_error="451 later")
        self.successResultOf(self.spool.update(newer))
        segment, record = self.record(entry.queue_id, MESSAGE)
        self.flip_bit(segment, record.body_offset + 5)
        spool = self.reopen()
        self.assertEqual(self.restored(self.salvage()), [entry.queue_id])
        self.assertEqual(spool.load(entry.queue_id), newer)
        report = self.salvage()
        self.assertEqual((report.restored, report.skipped),
                         ((), ((entry.queue_id.value, "queued already"),)))
        self.successResultOf(spool.remove(entry.queue_id))  # delivered
        report = self.salvage(self.reopen())
        self.assertEqual(report.skipped, ((entry.queue_id.value,
                                           "restored by an earlier salvage"),))
        self.assertEqual(self.spool.queue_ids(), [])

    def test_a_message_removed_after_its_damage_is_not_restored(self) -> None:
        gone, pin = self.commit(), self.commit()
        self.reopen()
        self.successResultOf(self.spool.remove(gone.queue_id))
        segment, record = self.record(gone.queue_id, MESSAGE)
        self.flip_bit(segment, record.body_offset)
        self.reopen()
        self.assertEqual(self.fates(), {gone.queue_id: Fate.DONE})
        report = self.salvage()
        self.assertEqual(report.restored, ())
        self.assertIn("removed after the damage", dict(report.skipped)[gone.queue_id.value])
        self.assertEqual(self.spool.queue_ids(), [pin.queue_id])

    def test_more_than_one_bit_is_left_alone(self) -> None:
        entry = self.commit()
        self.commit()
        segment, record = self.record(entry.queue_id, MESSAGE)
        self.flip(segment, record.body_offset)  # eight bits
        self.reopen()
        report = self.salvage()
        self.assertEqual(report.restored, ())
        self.assertIn((entry.queue_id.value, f"in corrupt/00000001.{record.start}-{record.end}:"
                       " body damaged beyond one bit"), report.skipped)

    def test_records_a_sender_wrote_are_never_restored(self) -> None:
        """A carrier whose body holds a forged message (old layout, and new with a guessed
        nonce); its header damaged beyond repair: nothing of it comes back."""
        forged_id = QueueId.new(1_700_000_005)
        forged = encode_entry(QueueEntry.new(forged_id, envelope(), 3))
        body = b"Subject: x\r\n\r\n" + encode_v1_header(MESSAGE, forged_id, forged, 3,
                                                       zlib.crc32(b"abc")) + b"abc" + \
            encode_header(MESSAGE, forged_id, forged, 3, zlib.crc32(b"abc"), os.urandom(16)) \
            + b"abc"
        carrier = self.commit(body)
        segment, record = self.record(carrier.queue_id, MESSAGE)
        self.flip(segment, record.start + 22)
        self.flip(segment, record.start + 30)
        self.reopen()
        report = self.salvage()
        self.assertEqual(report.restored, ())
        self.assertNotIn(forged_id, self.spool.queue_ids())

    def test_copies_made_by_the_previous_version_are_read_in_order(self) -> None:
        """Raw format-1 bytes from a damaged header on: one flipped bit in the first header
        is undone, then each record follows where the last ends (a REMOVED drops its
        message). No notes: they are restored as found."""
        a, b, gone = (QueueEntry.new(QueueId.new(1_600_000_000 + n), envelope(), len(BODY))
                      for n in range(3))
        data = b"".join(encode_v1_header(MESSAGE, e.queue_id, encode_entry(e), len(BODY),
                                         zlib.crc32(BODY)) + BODY for e in (a, b, gone))
        data += encode_v1_header(REMOVED, gone.queue_id, b"", 0, 0)
        damaged = bytearray(data)
        damaged[9] ^= 0x10  # a's JSON length
        with open(self.path("corrupt", "00000001.0-999"), "wb") as f:
            f.write(damaged)
        report = self.salvage()
        self.assertEqual(self.restored(report), [a.queue_id, b.queue_id])
        self.assertEqual(report.restored[0].repair, "header byte 9 bit 4 undone")
        self.assertEqual(list(self.spool.entries()), [a, b])


class CrcFixTests(SynchronousTestCase):
    def test_every_single_bit_is_found(self) -> None:
        data = bytes(range(256)) * 3
        crc = zlib.crc32(data)
        for byte in range(0, len(data), 37):
            for bit in range(8):
                damaged = bytearray(data)
                damaged[byte] ^= 1 << bit
                self.assertEqual(single_bit(damaged, crc), [(byte, bit)])
        self.assertEqual(single_bit(data, crc), [])
