"""The durable spool: commit, read back, update, remove, recovery, and the fsync ordering that
makes "250 after DATA" true."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smarthost.envelope import (
    DELIVERED,
    Envelope,
    QueueEntry,
    QueueId,
    Recipient,
    RecipientState,
)
from smarthost.interfaces import IIncomingMessage, ISpool
from smarthost.spool import CorruptEntry, CorruptFile, RecoveryReport, Spool


def run_now(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args, **kwargs)


def envelope(received_at: float = 1_700_000_000.0, *rcpts: str) -> Envelope:
    return Envelope(
        sender="alice@example.test",
        recipients=tuple(Recipient(r) for r in (rcpts or ("bob@example.net",))),
        client_address="192.0.2.7",
        user="alice",
        received_at=received_at,
    )


class SpoolTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="spool-test-")
        self.addCleanup(shutil.rmtree, self.root)
        self.directory = os.path.join(self.root, "spool")
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.spool = self.open()

    def open(self, run_blocking: Callable[..., Deferred[Any]] = run_now) -> Spool:
        spool, report = Spool.open(self.directory, clock=self.clock, run_blocking=run_blocking)
        self.last_report = report
        return spool

    def path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def listing(self, name: str) -> list[str]:
        return sorted(os.listdir(self.path(name)))

    def commit(
        self,
        body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
        spool: Spool | None = None,
        env: Envelope | None = None,
    ) -> QueueEntry:
        message = (spool or self.spool).receive()
        message.write(body)
        entry: QueueEntry = self.successResultOf(message.commit(env or envelope()))
        return entry

    def body(self, queue_id: QueueId) -> bytes:
        with self.spool.open_body(queue_id) as f:
            return f.read()


class CommitTests(SpoolTestCase):
    def test_provides_interfaces(self) -> None:
        self.assertTrue(verifyObject(ISpool, self.spool))
        message = self.spool.receive()
        self.assertTrue(verifyObject(IIncomingMessage, message))
        message.abort()

    def test_round_trip(self) -> None:
        body = b"Subject: hi\r\n\r\nhello\r\n"
        entry = self.commit(body)
        self.assertEqual(entry.size, len(body))
        self.assertEqual(entry.envelope, envelope())
        self.assertEqual(self.spool.load(entry.queue_id), entry)
        self.assertEqual(self.body(entry.queue_id), body)
        self.assertEqual(list(self.spool.entries()), [entry])
        self.assertEqual(self.listing("tmp"), [])

    def test_large_body_written_in_chunks(self) -> None:
        body = os.urandom(5 * 1024 * 1024)
        message = self.spool.receive()
        for i in range(0, len(body), 65536):
            message.write(body[i : i + 65536])
        entry = self.successResultOf(message.commit(envelope()))
        self.assertEqual(entry.size, len(body))
        self.assertEqual(self.body(entry.queue_id), body)

    def test_queue_id_comes_from_the_clock(self) -> None:
        message = self.spool.receive()
        self.assertTrue(message.queue_id.value.startswith(f"{1_700_000_000_000:012X}"))
        message.abort()

    def test_fires_only_when_blocking_work_is_done(self) -> None:
        pending: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

        def later(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append((f, args))
            return d.addCallback(lambda _: f(*args))

        spool = Spool(self.directory, clock=self.clock, run_blocking=later)
        message = spool.receive()
        message.write(b"x\r\n")
        d = message.commit(envelope())
        self.assertNoResult(d)
        self.assertEqual(self.listing("state"), [])
        self.assertEqual(len(pending), 1)
        d.callback(None)  # what deferToThread does once the thread finishes
        self.assertEqual(self.successResultOf(d).queue_id, message.queue_id)
        self.assertEqual(self.listing("state"), [f"{message.queue_id}.json"])

    def test_held_is_just_envelope_state(self) -> None:
        entry = self.commit(env=attrs.evolve(envelope(), held=True))
        self.assertTrue(self.spool.load(entry.queue_id).envelope.held)

    def test_utf8_envelope_round_trips(self) -> None:
        env = attrs.evolve(envelope(), sender="jörg@exämple.test", smtputf8=True)
        entry = self.commit(env=env)
        self.assertEqual(self.open().load(entry.queue_id).envelope, env)

    def test_failed_commit_leaves_nothing(self) -> None:
        def broken_rename(src: str, dst: str) -> None:
            if dst.endswith(".json"):
                raise OSError(28, "No space left on device")
            original(src, dst)

        original = os.rename
        self.patch(os, "rename", broken_rename)
        message = self.spool.receive()
        message.write(b"x\r\n")
        self.failureResultOf(message.commit(envelope()), OSError)
        for name in ("tmp", "data", "state"):
            self.assertEqual(self.listing(name), [], name)
        message.abort()  # harmless afterwards


class AbortTests(SpoolTestCase):
    def test_abort_leaves_nothing(self) -> None:
        message = self.spool.receive()
        message.write(b"partial")
        message.abort()
        message.abort()
        for name in ("tmp", "data", "state", "corrupt"):
            self.assertEqual(self.listing(name), [], name)
        self.assertEqual(list(self.spool.entries()), [])

    def test_write_after_abort_is_a_bug(self) -> None:
        message = self.spool.receive()
        message.abort()
        self.assertRaises(RuntimeError, message.write, b"x")
        self.assertRaises(RuntimeError, message.commit, envelope())

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
        self.assertEqual([e.queue_id for e in self.spool.entries()], ids)
        self.assertEqual(self.spool.queue_ids(), ids)

    def test_entries_skip_damage_and_load_names_it(self) -> None:
        good = self.commit()
        bad = self.commit()
        with open(self.path("state", f"{bad.queue_id}.json"), "wb") as f:
            f.write(b'{"id": "truncated')
        self.assertEqual(list(self.spool.entries()), [good])
        self.assertRaises(CorruptEntry, self.spool.load, bad.queue_id)

    def test_state_missing_a_field_is_corrupt_not_missing(self) -> None:
        entry = self.commit()
        with open(self.path("state", f"{entry.queue_id}.json"), "w") as f:
            f.write(f'{{"id": "{entry.queue_id}"}}')
        self.assertRaises(CorruptEntry, self.spool.load, entry.queue_id)

    def test_reader_needs_no_recovery(self) -> None:
        # The admin CLI: reads a live spool without touching tmp/.
        entry = self.commit()
        in_flight = self.spool.receive()
        in_flight.write(b"still arriving")
        reader = Spool(self.directory, clock=self.clock, run_blocking=run_now)
        self.assertEqual(list(reader.entries()), [entry])
        self.assertEqual(self.listing("tmp"), [str(in_flight.queue_id)])


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
        self.assertEqual(self.open().load(entry.queue_id), changed)
        self.assertEqual(self.last_report, RecoveryReport(queued=1))
        self.assertEqual(self.listing("tmp"), [])

    def test_update_of_removed_message_refused(self) -> None:
        entry = self.commit()
        self.successResultOf(self.spool.remove(entry.queue_id))
        self.failureResultOf(self.spool.update(entry), KeyError)
        self.assertEqual(self.listing("state"), [])
        self.assertEqual(self.listing("tmp"), [])

    def test_remove(self) -> None:
        keep, gone = self.commit(), self.commit()
        self.assertIsNone(self.successResultOf(self.spool.remove(gone.queue_id)))
        self.assertRaises(KeyError, self.spool.load, gone.queue_id)
        self.assertRaises(KeyError, self.spool.open_body, gone.queue_id)
        self.assertEqual(list(self.spool.entries()), [keep])
        self.assertEqual(self.listing("data"), [str(keep.queue_id)])
        self.failureResultOf(self.spool.remove(gone.queue_id), KeyError)

    def test_operations_on_one_message_run_in_call_order(self) -> None:
        calls: list[Deferred[None]] = []

        def later(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            calls.append(d)
            return d.addCallback(lambda _: f(*args))

        entry = self.commit()
        spool = Spool(self.directory, clock=self.clock, run_blocking=later)
        first = spool.update(attrs.evolve(entry, attempts=1))
        second = spool.update(attrs.evolve(entry, attempts=2))
        removed = spool.remove(entry.queue_id)
        self.assertEqual(len(calls), 1)  # the second waits for the first to finish
        calls[0].callback(None)
        self.successResultOf(first)
        self.assertEqual(len(calls), 2)
        calls[1].callback(None)
        self.successResultOf(second)
        self.assertEqual(spool.load(entry.queue_id).attempts, 2)
        calls[2].callback(None)
        self.successResultOf(removed)
        self.assertEqual(spool._locks, {})


class RecoveryTests(SpoolTestCase):
    def write(self, relative: str, data: bytes) -> None:
        with open(self.path(relative), "wb") as f:
            f.write(data)

    def test_clean_spool(self) -> None:
        entry = self.commit()
        self.open()
        self.assertEqual(self.last_report, RecoveryReport(queued=1))
        self.assertTrue(self.last_report.clean)
        self.assertEqual(self.spool.load(entry.queue_id), entry)

    def test_tmp_leftovers_removed(self) -> None:
        entry = self.commit()
        unfinished = self.spool.receive()
        unfinished.write(b"never acknowledged")
        self.write(f"tmp/{entry.queue_id}.0badc0de.json", b"{")
        self.open()
        self.assertEqual(
            self.last_report,
            RecoveryReport(
                queued=1,
                removed_tmp=tuple(
                    sorted([str(unfinished.queue_id), f"{entry.queue_id}.0badc0de.json"])
                ),
            ),
        )
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.spool.load(entry.queue_id), entry)

    def test_data_without_state_removed(self) -> None:
        # A crash between the body rename and the state rename: never acknowledged.
        entry = self.commit()
        orphan = QueueId.new(self.clock.seconds())
        self.write(f"data/{orphan}", b"orphan")
        self.open()
        self.assertEqual(self.last_report.removed_orphans, (str(orphan),))
        self.assertEqual(self.last_report.corrupt, ())
        self.assertEqual(self.listing("data"), [str(entry.queue_id)])

    def test_garbage_state_moved_to_corrupt_rest_still_loads(self) -> None:
        good, bad = self.commit(b"good"), self.commit(b"bad")
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
        with open(self.path("corrupt", str(bad.queue_id)), "rb") as f:
            self.assertEqual(f.read(), b"bad")  # kept for the operator, never deleted

    def test_state_without_data_moved_to_corrupt(self) -> None:
        entry = self.commit()
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

    def test_truncated_data_moved_to_corrupt(self) -> None:
        entry = self.commit(b"0123456789")
        self.write(f"data/{entry.queue_id}", b"01234")
        self.open()
        self.assertEqual(len(self.last_report.corrupt), 2)
        self.assertIn("5 bytes", self.last_report.corrupt[0].reason)

    def test_state_naming_another_message_is_corrupt(self) -> None:
        a, b = self.commit(b"same"), self.commit(b"same")
        os.replace(
            self.path("state", f"{a.queue_id}.json"), self.path("state", f"{b.queue_id}.json")
        )
        self.write(f"state/{a.queue_id}.json", b"{}")
        self.open()
        self.assertEqual(self.last_report.queued, 0)
        self.assertEqual(len(self.last_report.corrupt), 4)
        self.assertEqual(self.listing("state"), [])
        self.assertEqual(self.listing("data"), [])

    def test_stray_names_moved_to_corrupt_without_overwriting(self) -> None:
        self.write("state/notes.txt", b"1")
        self.write("data/notes.txt", b"2")
        self.write("corrupt/notes.txt", b"0")
        self.open()
        self.assertEqual(
            [(c.path, c.moved_to) for c in self.last_report.corrupt],
            [("state/notes.txt", "corrupt/notes.txt.1"), ("data/notes.txt", "corrupt/notes.txt.2")],
        )
        self.assertEqual(self.listing("corrupt"), ["notes.txt", "notes.txt.1", "notes.txt.2"])

    def test_permissions(self) -> None:
        old = os.umask(0)  # prove the modes are chosen, not inherited from the umask
        self.addCleanup(os.umask, old)
        shutil.rmtree(self.directory)
        spool = self.open()
        message = spool.receive()
        self.assertEqual(
            stat.S_IMODE(os.stat(self.path("tmp", str(message.queue_id))).st_mode), 0o600
        )
        message.write(b"x")
        entry = self.successResultOf(message.commit(envelope()))
        self.successResultOf(spool.update(attrs.evolve(entry, attempts=1)))
        for relative in (f"data/{entry.queue_id}", f"state/{entry.queue_id}.json"):
            self.assertEqual(stat.S_IMODE(os.stat(self.path(relative)).st_mode), 0o600, relative)
        for relative in ("", "tmp", "data", "state", "corrupt"):
            self.assertEqual(stat.S_IMODE(os.stat(self.path(relative)).st_mode), 0o700, relative)


class DurabilityOrderTests(SpoolTestCase):
    """The order of fsyncs and renames is the whole guarantee; record it."""

    def setUp(self) -> None:
        super().setUp()
        self.events: list[tuple[str, str]] = []
        real_fsync, real_rename, real_replace, real_unlink = (
            os.fsync,
            os.rename,
            os.replace,
            os.unlink,
        )

        def fsync(fd: int) -> None:
            self.events.append(("fsync", self.relative(os.readlink(f"/proc/self/fd/{fd}"))))
            real_fsync(fd)

        def rename(src: str, dst: str) -> None:
            self.events.append(("rename", self.relative(dst)))
            real_rename(src, dst)

        def replace(src: str, dst: str) -> None:
            self.events.append(("rename", self.relative(dst)))
            real_replace(src, dst)

        def unlink(path: str) -> None:
            self.events.append(("unlink", self.relative(path)))
            real_unlink(path)

        self.patch(os, "fsync", fsync)
        self.patch(os, "rename", rename)
        self.patch(os, "replace", replace)
        self.patch(os, "unlink", unlink)

    def relative(self, path: str) -> str:
        path = os.path.relpath(path, self.directory)
        if path.startswith("tmp/") and path.endswith(".json"):
            return "tmp/STATE.json"  # the random part of the temporary state name
        return path

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
                ("fsync", f"tmp/{qid}"),
                ("rename", f"data/{qid}"),
                ("fsync", "data"),
                ("fsync", "tmp/STATE.json"),
                ("rename", f"state/{qid}.json"),  # the commit point
                ("fsync", "state"),
                ("fired", ""),  # only now may the session answer 250
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

    def test_remove_drops_state_durably_before_data(self) -> None:
        entry = self.commit()
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


CHILD = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread
    from smarthost.envelope import Envelope, Recipient
    from smarthost.spool import Spool

    spool, _ = Spool.open(sys.argv[1], clock=reactor, run_blocking=deferToThread)

    def body(n):
        return b"Subject: %d\\r\\n\\r\\n" % n + b"x" * 100000 + b"\\r\\n"

    def one(n):
        message = spool.receive()
        message.write(body(n))
        env = Envelope(sender="a@example.test", recipients=(Recipient("b@example.test"),))
        d = message.commit(env)
        def done(entry):
            sys.stdout.write("%s %d\\n" % (entry.queue_id, n))
            sys.stdout.flush()
            one(n + 1)  # keep committing: the kill lands in the middle of one
        d.addCallback(done)
        d.addErrback(lambda f: (f.printTraceback(), reactor.stop()))

    reactor.callWhenRunning(one, 0)
    reactor.run()
    """
)


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
            lines = read_lines(child, 20, timeout=60)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        spool = self.open()
        acknowledged = [line.split() for line in lines]
        for queue_id, n in acknowledged:
            with spool.open_body(QueueId(queue_id.decode())) as f:
                self.assertEqual(f.read(), b"Subject: %s\r\n\r\n" % n + b"x" * 100000 + b"\r\n")
        self.assertGreaterEqual(self.last_report.queued, len(acknowledged))
        self.assertEqual(self.last_report.corrupt, ())
        self.assertEqual(self.listing("tmp"), [])


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
