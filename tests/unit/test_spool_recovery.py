"""Damage to synced spool records found at start-up (issue 18, finding 6): never deleted, never
mistaken for the unfinished last batch, copied to corrupt/ with every queue id it held named,
read past (resynchronised on the segment's nonce, never on bytes a sender wrote), and lost
updates and removals made safe (held, or applied)."""
# trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable

import attrs
from test_spool import BODY, SpoolTestCase, encode_v1_header, envelope

from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.queue.recovery import Affected, Fate, RecoveryReport
from smarthost.queue.segment import (
    MAGIC,
    MESSAGE,
    REMOVED,
    SEGMENT_HEADER_SIZE,
    STATE,
    Marker,
    Record,
    encode_entry,
    encode_header,
    encode_segment_header,
    scan,
)


class DamageTestCase(SpoolTestCase):
    def record(self, queue_id: QueueId, kind: int, index: int = -1) -> tuple[str, Record]:
        """The ``index``-th record of that kind for that id, in log order."""
        found = [(name, r) for name in self.segments() for r in self.records(name)
                 if isinstance(r, Record) and r.kind == kind and r.queue_id == queue_id]
        return found[index]

    def flip_bit(self, segment: str, offset: int, bit: int = 0) -> None:
        with open(self.path("log", segment), "r+b") as f:
            byte = os.pread(f.fileno(), 1, offset)
            os.pwrite(f.fileno(), bytes([byte[0] ^ (1 << bit)]), offset)

    def ledger(self) -> list[dict[str, object]]:
        with open(self.path("corrupt", "ledger.jsonl"), "rb") as f:
            return [json.loads(line) for line in f]

    def fates(self) -> dict[QueueId, Fate]:
        return {a.queue_id: a.fate for d in self.last_report.corrupt for a in d.affected}


class NewestSegmentTests(DamageTestCase):
    def test_one_flipped_header_byte_loses_nothing_else(self) -> None:
        """The issue's reproduction: the 2nd of 3 committed messages damaged in the newest
        segment gave "queued 1, torn 1" and an empty corrupt/ (the rest cut off)."""
        entries = [self.commit(b"message %d\r\n" % n) for n in range(3)]
        segment, record = self.record(entries[1].queue_id, MESSAGE)
        size = os.path.getsize(self.path("log", segment))
        self.flip(segment, record.start + 5)  # the id length
        spool = self.reopen()
        self.assertEqual(self.last_report.queued, 2)
        self.assertEqual(self.last_report.torn, ())
        (damage,) = self.last_report.corrupt
        self.assertEqual((damage.start, damage.end), (record.start, record.end))
        self.assertEqual(damage.affected, (
            Affected(entries[1].queue_id, "message", record.start, Fate.LOST),))
        self.assertEqual(self.last_report.lost, (entries[1].queue_id,))
        self.assertEqual(list(spool.entries()), [entries[0], entries[2]])
        self.assertEqual(self.body(entries[2].queue_id), b"message 2\r\n")
        self.assertEqual(os.path.getsize(self.path("log", segment)), size)  # nothing cut off
        self.assertEqual(self.read(damage.moved_to or "")[SEGMENT_HEADER_SIZE:],
                         self.read(f"log/{segment}")[record.start : record.end])

    def test_last_record_damaged_after_its_sync_is_damage_not_a_torn_write(self) -> None:
        """Its batch marker follows it: the batch was written completely."""
        entry = self.commit(b"0123456789")
        segment, record = self.record(entry.queue_id, MESSAGE)
        with open(self.path("log", segment), "r+b") as f:
            f.seek(record.body_offset)
            f.write(b"9876543210")  # same length, other bytes
        self.assertEqual(self.admin().queue_ids(), [])
        self.reopen()
        self.assertEqual(self.last_report.torn, ())
        self.assertEqual(self.last_report.lost, (entry.queue_id,))
        self.assertEqual(self.listing("corrupt"), [f"00000001.{record.start}-{record.end}",
                                                   "ledger.jsonl"])

    def test_a_damaged_last_marker_is_the_torn_tail_and_loses_nothing(self) -> None:
        entries = [self.commit(), self.commit()]
        (segment,) = self.segments()
        marker = scan(self.path("log", segment)).markers()[-1]
        self.flip_bit(segment, marker.start + 30)
        spool = self.reopen()
        self.assertEqual(list(spool.entries()), entries)
        (torn,) = self.last_report.torn
        self.assertEqual((torn.start, torn.end, torn.affected), (marker.start, marker.end, ()))
        self.assertEqual(self.last_report.corrupt, ())

    def test_the_marker_names_a_record_whose_id_is_damaged(self) -> None:
        entry = self.commit()
        segment, record = self.record(entry.queue_id, MESSAGE)
        self.flip_bit(segment, record.entry_offset - 1)  # the id's last character
        self.reopen()
        self.assertEqual(self.fates(), {entry.queue_id: Fate.LOST})

    def test_records_inside_a_torn_body_are_never_read(self) -> None:
        """A sender can put valid-looking records in a message body (ids are in every
        Received: header): a REMOVED for a queued message, and a MESSAGE with an envelope of
        its own, in the old layout or the new one with a guessed nonce. A write the crash cut
        short must not turn them into real ones, neither at the next start nor for the admin
        tool reading while the write is in flight."""
        victim = self.commit(b"Subject: important\r\n\r\nanswered 250\r\n")
        nonce = scan(self.path("log", "00000001.seg")).nonce
        assert nonce is not None
        forged_id = QueueId.new(1_700_000_002)
        forged_body = b"forged\r\n"
        forged = encode_entry(QueueEntry.new(forged_id, envelope(), len(forged_body)))
        guess = os.urandom(16)
        carrier = b"Subject: x\r\n\r\n"
        for encode in (encode_v1_header,
                       lambda *a: encode_header(*a, nonce=guess)):  # type: ignore[misc]
            carrier += (encode(REMOVED, victim.queue_id, b"", 0, 0)
                        + encode(MESSAGE, forged_id, forged, len(forged_body),
                                 zlib.crc32(forged_body)) + forged_body)
        carrier += b"y" * 5000
        carrier_id = QueueId.new(1_700_000_001)
        raw = encode_entry(QueueEntry.new(carrier_id, envelope(), len(carrier)))
        with open(self.path("log", "00000001.seg"), "ab") as f:  # the write, cut short
            f.write(encode_header(MESSAGE, carrier_id, raw, len(carrier), zlib.crc32(carrier),
                                  nonce) + carrier[:2000])
        self.assertEqual(self.admin().queue_ids(), [victim.queue_id])
        spool = self.reopen()
        self.assertEqual(spool.queue_ids(), [victim.queue_id])
        (torn,) = self.last_report.torn
        self.assertEqual([a.queue_id for a in torn.affected], [carrier_id])
        self.assertEqual(self.body(victim.queue_id),
                         b"Subject: important\r\n\r\nanswered 250\r\n")

    def test_resynchronising_never_lands_in_a_body(self) -> None:
        """Damage just before a message whose body holds forged records (the old layout, and
        the new one with a guessed nonce): the reader skips to the next record the spool wrote,
        and the forged REMOVED and MESSAGE stay bytes of a body."""
        victim = self.commit()
        forged_id = QueueId.new(1_700_000_002)
        forged = encode_entry(QueueEntry.new(forged_id, envelope(), 3))
        body = b"Subject: x\r\n\r\n"
        for nonce in (os.urandom(16), None):
            for kind, queue_id, raw, size in ((REMOVED, victim.queue_id, b"", 0),
                                              (MESSAGE, forged_id, forged, 3)):
                fields = (kind, queue_id, raw, size, zlib.crc32(b"abc") if size else 0)
                body += (encode_header(*fields, nonce) if nonce else encode_v1_header(*fields))
                body += b"abc" if size else b""
        carrier, after = self.commit(body), self.commit(b"after\r\n")
        segment, record = self.record(carrier.queue_id, MESSAGE)
        self.flip(segment, record.start + 10)  # the nonce
        spool = self.reopen()
        self.assertEqual(spool.queue_ids(), [victim.queue_id, after.queue_id])
        self.assertEqual(self.fates(), {carrier.queue_id: Fate.LOST})

    def test_a_damaged_segment_header_is_read_with_its_first_record_nonce(self) -> None:
        entries = [self.commit(), self.commit()]
        self.flip_bit("00000001.seg", 12)  # in the nonce
        spool = self.reopen()
        self.assertEqual(list(spool.entries()), entries)
        (damage,) = self.last_report.corrupt
        self.assertEqual((damage.start, damage.end, damage.reason, damage.affected),
                         (0, SEGMENT_HEADER_SIZE, "damaged segment header", ()))

    def test_empty_segments_are_removed(self) -> None:
        entry = self.commit()
        self.spool.close()
        open(self.path("log", "00000002.seg"), "wb").close()  # created, never written
        spool = self.reopen()
        self.assertEqual(self.segments(), ["00000001.seg"])
        self.assertEqual(self.last_report, RecoveryReport(queued=1))
        self.successResultOf(spool.remove(entry.queue_id))
        self.assertIn("00000003.seg", self.segments())  # numbers never come back


class OlderSegmentTests(DamageTestCase):
    def damage_middle(self, where: Callable[[Record], int]) -> None:
        """a, b, c in segment 1 and d in segment 2, with an update of b: one byte of b's
        record, at ``where``, flipped. Whether the body, the header or the entry (which the
        header CRC covers) is hit, b is lost and named, c is read again past it, and the
        ledger keeps b's newest entry for salvage."""
        a, b, c = self.commit(b"a" * 50), self.commit(b"b" * 50), self.commit(b"c" * 50)
        self.reopen()  # from now on segment 2 is the head
        d = self.commit(b"d")
        newer = attrs.evolve(b, attempts=1)
        self.successResultOf(self.spool.update(newer))
        segment, record = self.record(b.queue_id, MESSAGE)
        self.assertEqual(segment, "00000001.seg")
        raw = self.read(f"log/{segment}")[record.start : record.end]
        self.flip(segment, where(record))
        damaged = self.read(f"log/{segment}")[record.start : record.end]
        self.assertNotEqual(damaged, raw)
        spool = self.reopen()
        self.assertEqual(self.last_report.queued, 3)
        self.assertEqual(self.last_report.torn, ())
        (damage,) = self.last_report.corrupt
        name = f"00000001.{record.start}-{record.end}"
        self.assertEqual((damage.segment, damage.start, damage.end, damage.moved_to),
                         (f"log/{segment}", record.start, record.end, f"corrupt/{name}"))
        self.assertEqual(damage.affected,
                         (Affected(b.queue_id, "message", record.start, Fate.LOST),))
        copy = self.read(f"corrupt/{name}")
        self.assertEqual(copy[SEGMENT_HEADER_SIZE:], damaged)
        self.assertEqual(copy[:4], b"\x89SQS")  # readable on its own, nonce included
        self.assertEqual(list(spool.entries()), [a, c, d])  # b's STATE resurrects nothing
        self.assertEqual(self.body(c.queue_id), b"c" * 50)
        self.assertEqual(self.ledger(), [{"id": b.queue_id.value, "fate": "lost",
                                          "copy": f"corrupt/{name}",
                                          "entry": json.loads(json.dumps(newer.to_json()))}])
        # Reported once: the damage stays in its segment and the next start finds its copy.
        spool = self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(queued=3))
        self.assertEqual(self.listing("corrupt"), [name, "ledger.jsonl"])
        self.assertEqual(list(spool.entries()), [a, c, d])

    def test_damaged_body_is_copied_aside(self) -> None:
        self.damage_middle(lambda r: r.body_offset + 10)

    def test_damaged_header_is_read_past(self) -> None:
        self.damage_middle(lambda r: r.start + 21)  # the id length

    def test_damaged_entry_json_is_read_past(self) -> None:
        self.damage_middle(lambda r: r.entry_offset + 3)

    def test_damaged_marker_is_copied_and_names_nothing(self) -> None:
        entries = [self.commit(), self.commit()]
        marker = scan(self.path("log", "00000001.seg")).markers()[0]
        self.reopen()
        self.flip("00000001.seg", marker.start + 50)
        spool = self.reopen()
        self.assertEqual(list(spool.entries()), entries)
        (damage,) = self.last_report.corrupt
        self.assertEqual((damage.start, damage.end, damage.affected),
                         (marker.start, marker.end, ()))

    def test_lost_update_holds_the_message(self) -> None:
        """Its newer state (delivered recipients, attempts) is gone: sent on with the older
        one, it would reach some recipients twice. Held, it waits for the operator."""
        entry = self.commit()
        first = attrs.evolve(entry, attempts=1)
        self.successResultOf(self.spool.update(first))
        self.reopen()
        self.successResultOf(self.spool.update(attrs.evolve(entry, attempts=2)))
        segment, record = self.record(entry.queue_id, STATE)
        self.assertEqual(segment, "00000002.seg")
        self.flip(segment, record.entry_offset + 2)
        spool = self.reopen()
        self.assertEqual(self.fates(), {entry.queue_id: Fate.HELD})
        held = attrs.evolve(first, envelope=attrs.evolve(first.envelope, held=True))
        self.assertEqual(list(spool.entries()), [held])
        self.assertEqual(spool.load(entry.queue_id), held)
        spool = self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(queued=1))
        self.assertEqual(spool.load(entry.queue_id), held)

    def test_lost_update_that_a_later_one_replaced_changes_nothing(self) -> None:
        entry = self.commit()
        self.successResultOf(self.spool.update(attrs.evolve(entry, attempts=1)))
        last = attrs.evolve(entry, attempts=2)
        self.successResultOf(self.spool.update(last))
        self.reopen()
        segment, record = self.record(entry.queue_id, STATE, 0)
        self.flip(segment, record.entry_offset + 2)
        spool = self.reopen()
        self.assertEqual(self.fates(), {entry.queue_id: Fate.SUPERSEDED})
        self.assertEqual(list(spool.entries()), [last])

    def test_lost_removal_is_applied(self) -> None:
        """Delivered and removed: brought back by the damage, it would be delivered again."""
        gone, kept = self.commit(), self.commit()
        self.reopen()
        self.successResultOf(self.spool.remove(gone.queue_id))
        self.commit()  # keeps segment 2 from being the only one
        segment, record = self.record(gone.queue_id, REMOVED)
        self.reopen()
        self.flip(segment, record.start + 50)
        spool = self.reopen()
        self.assertEqual(self.fates(), {gone.queue_id: Fate.REMOVED})
        self.assertNotIn(gone.queue_id, spool.queue_ids())
        self.assertIn(kept.queue_id, spool.queue_ids())
        self.reopen()
        self.assertEqual(self.last_report.corrupt, ())

    def test_message_removed_after_its_damage_is_done(self) -> None:
        gone, pin = self.commit(), self.commit()  # pin keeps segment 1 on disk
        self.reopen()
        self.successResultOf(self.spool.remove(gone.queue_id))
        segment, record = self.record(gone.queue_id, MESSAGE)
        self.flip(segment, record.body_offset)
        spool = self.reopen()
        self.assertEqual(self.fates(), {gone.queue_id: Fate.DONE})
        self.assertEqual(self.last_report.lost, ())
        self.assertEqual(spool.queue_ids(), [pin.queue_id])
        self.assertEqual([n["fate"] for n in self.ledger()], ["done"])


class FormatOneTests(DamageTestCase):
    """Segments written before the nonce keep the old rule: nothing after a bad header is read
    (searching for MAGIC would find what senders wrote), but every id found is named."""

    def write_v1(self, number: int, bodies: list[bytes]) -> list[QueueEntry]:
        self.spool.close()
        entries = []
        with open(self.path("log", f"{number:08d}.seg"), "wb") as f:
            for n, body in enumerate(bodies):
                entry = QueueEntry.new(QueueId.new(1_600_000_000 + n), envelope(), len(body))
                f.write(encode_v1_header(MESSAGE, entry.queue_id, encode_entry(entry),
                                         len(body), zlib.crc32(body)) + body)
                entries.append(entry)
        return entries

    def test_old_segments_are_still_read(self) -> None:
        entries = self.write_v1(1, [b"one\r\n", BODY])
        spool = self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(queued=2))
        self.assertEqual(list(spool.entries()), entries)
        self.assertEqual(self.body(entries[1].queue_id), BODY)
        self.commit()
        self.assertEqual(scan(self.path("log", "00000002.seg")).format, 2)

    def test_a_bad_header_ends_an_old_segment_and_names_what_followed(self) -> None:
        a, b, c = self.write_v1(1, [b"a\r\n", b"b\r\n", b"c\r\n"])
        d = self.commit(b"d\r\n", self.reopen())
        segment, record = self.record(b.queue_id, MESSAGE)
        self.flip(segment, record.start + 12)  # the JSON length
        spool = self.reopen()
        self.assertEqual(list(spool.entries()), [a, d])
        (damage,) = self.last_report.corrupt
        self.assertEqual(damage.reason, "unreadable bytes at the end")
        self.assertEqual(self.fates(), {b.queue_id: Fate.LOST, c.queue_id: Fate.LOST})
        self.assertEqual(self.read(damage.moved_to or "")[:4], MAGIC)  # raw, as before
        self.assertEqual(os.path.getsize(self.path("log", segment)), record.start)

    def test_an_old_newest_segment_keeps_its_tail(self) -> None:
        """Without markers a damaged end cannot be told from an unfinished write: copied."""
        (entry,) = self.write_v1(1, [b"a\r\n"])
        with open(self.path("log", "00000001.seg"), "ab") as f:
            f.write(b"\x89SQR\x01 not a whole header")
        spool = self.reopen()
        self.assertEqual(spool.queue_ids(), [entry.queue_id])
        (torn,) = self.last_report.torn
        self.assertIsNotNone(torn.moved_to)


class FormatTests(SpoolTestCase):
    def test_every_batch_ends_with_a_marker_naming_its_records(self) -> None:
        entry = self.commit()
        self.successResultOf(self.spool.update(attrs.evolve(entry, attempts=1)))
        found = scan(self.path("log", "00000001.seg"))
        self.assertEqual(self.read("log/00000001.seg")[:SEGMENT_HEADER_SIZE],
                         encode_segment_header(found.nonce or b""))
        kinds = [(type(i), getattr(i, "kind", None)) for i in found.items]
        self.assertEqual(kinds, [(Record, MESSAGE), (Marker, None), (Record, STATE),
                                 (Marker, None)])
