"""The spool when the disk fills up (issue 18, finding 12): SpoolFull to the committers, one log
line, no empty segment left behind, writing again once there is space; a relocation that
fails is tried again later; a body that rotted is never handed out whole."""
# trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
import os
from typing import Any, cast

from test_spool import BODY, FILLER, FaultyOS, SpoolTestCase, envelope, run_now
from twisted.logger import ILogObserver, globalLogPublisher

from smarthost.core.errors import CorruptEntry, SpoolFull
from smarthost.core.maillog import MailLog
from smarthost.queue import segment as spoolfile
from smarthost.queue import spool as spool_module
from smarthost.queue import writer as spoolwriter
from smarthost.queue.recovery import RecoveryReport
from smarthost.queue.spool import Spool


def raising(code: int) -> Any:
    def fail(*args: object) -> Any:
        raise OSError(code, os.strerror(code))

    return fail


class DiskFullTests(SpoolTestCase):
    def test_a_full_disk_on_the_first_write_leaves_no_segment(self) -> None:
        self.patch(spoolfile, "os", FaultyOS(write=raising(errno.ENOSPC)))
        for _ in range(3):
            failure = self.failureResultOf(self.spool.receive().commit(envelope()), SpoolFull)
            self.assertEqual(failure.value.errno, errno.ENOSPC)
            self.assertIsInstance(failure.value, OSError)  # what callers caught so far
            self.assertEqual(self.segments(), [])
        self.assertEqual(self.spool._live, set())
        self.patch(spoolfile, "os", os)
        entry = self.commit()
        self.assertEqual(self.segments(), ["00000001.seg"])  # its number was free again
        spool = self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(queued=1))
        self.assertEqual(list(spool.entries()), [entry])

    def test_a_quota_hit_in_fdatasync_cuts_the_batch_off(self) -> None:
        kept = self.commit()
        size = os.path.getsize(self.path("log", "00000001.seg"))
        self.patch(spoolwriter, "os", FaultyOS(fdatasync=raising(errno.EDQUOT)))
        self.failureResultOf(self.commit_later(), SpoolFull)
        self.assertEqual(os.path.getsize(self.path("log", "00000001.seg")), size)
        self.patch(spoolwriter, "os", os)
        again = self.commit()
        self.assertEqual(self.segments(), ["00000001.seg", "00000002.seg"])  # sealed
        spool = self.reopen()
        self.assertEqual(self.last_report, RecoveryReport(queued=2))
        self.assertEqual(list(spool.entries()), [kept, again])

    def commit_later(self) -> Any:
        message = self.spool.receive()
        message.write(BODY)
        return message.commit(envelope())

    def test_other_errors_stay_what_they_are(self) -> None:
        self.patch(spoolwriter, "os", FaultyOS(fdatasync=raising(errno.EIO)))
        failure = self.failureResultOf(self.commit_later(), OSError)
        self.assertNotIsInstance(failure.value, SpoolFull)

    def test_logged_once_then_once_more_when_space_is_back(self) -> None:
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.spool.close()
        self.spool, _ = Spool.open(self.directory, clock=self.clock, run_blocking=run_now,
                                   maillog=MailLog(self.clock))
        self.addCleanup(self.spool.close)
        self.patch(spoolfile, "os", FaultyOS(write=raising(errno.ENOSPC)))
        for _ in range(3):
            self.failureResultOf(self.commit_later(), SpoolFull)
        self.patch(spoolfile, "os", os)
        self.commit()
        self.commit()
        lines = [e["log_format"] for e in events if e.get("log_namespace") == "smarthost"]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("no space left", lines[0])
        self.assertIn("writing again", lines[1])
        self.assertFalse(any("log_failure" in e for e in events))


class CompactionRetryTests(SpoolTestCase):
    def test_a_failed_relocation_is_tried_again_later(self) -> None:
        """Before: the segment stayed marked as being compacted, and the process compacted
        nothing more until it restarted."""
        spool = self.reopen(segment_bytes=4096)
        deferred = self.commit(BODY)
        real = spoolfile.read_range
        calls: list[int] = []

        def full_once(path: str, offset: int, length: int) -> bytes:
            calls.append(offset)
            if len(calls) == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, offset, length)

        self.patch(spoolwriter, "read_range", full_once)
        for _ in range(20):
            self.successResultOf(spool.remove(self.commit(FILLER).queue_id))
        self.assertEqual(len(calls), 1)  # tried once; not again at every batch
        self.assertIn("00000001.seg", self.segments())
        self.clock.advance(spool_module.COMPACT_RETRY)
        self.successResultOf(spool.remove(self.commit(FILLER).queue_id))
        self.assertEqual(len(calls), 2)
        self.assertNotIn("00000001.seg", self.segments())
        self.assertEqual(self.body(deferred.queue_id), BODY)


class BodyChecksumTests(SpoolTestCase):
    def test_a_body_that_rotted_since_start_up_is_not_handed_out_whole(self) -> None:
        size = 200_000  # more than the reader's buffer
        entry = self.commit(b"z" * size)
        segment, record = self.message_record(entry.queue_id)
        self.flip(segment, record.body_offset + size - 1)
        with self.spool.open_body(entry.queue_id) as f:
            self.assertEqual(f.read(10), b"z" * 10)  # a part is no promise
            self.assertRaises(CorruptEntry, f.read)
            f.seek(0)
            self.assertRaises(CorruptEntry, f.read)
        other = self.commit(b"intact")
        with self.spool.open_body(other.queue_id) as f:
            f.seek(3)
            self.assertEqual(f.read(), b"act")  # read from the middle: not checked
