"""Local delivery into Maildirs: the commit protocol, path safety, failures, local recipients."""
# trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, ParamSpec, TypeVar

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from smarthost.core.envelope import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    Address,
    Envelope,
    Outcome,
    Recipient,
)
from smarthost.core.types import RunBlocking
from smarthost.delivery.maildir import (
    LocalRecipients,
    MaildirDelivery,
    mailbox_path,
    recipient_key,
    safe_name,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")

BODY = b"From: alice@remote.test\r\nSubject: hello\r\n\r\nline one\r\nline two\r\n"
NOW = 1_700_000_000.25


def run_now(f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
    """The synchronous stand-in for deferToThread."""
    return maybeDeferred(f, *args, **kwargs)


# Production passes deferToThread: it must fit the same slot.
_production: RunBlocking = deferToThread
_fake: RunBlocking = run_now


def temp_dir(test: SynchronousTestCase) -> Path:
    """A fresh directory outside the checkout (trial's mktemp writes under the cwd)."""
    path = Path(tempfile.mkdtemp(prefix="smarthost-maildir-")).resolve()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


class MaildirTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = temp_dir(self)
        self.root = self.base / "maildir"
        self.clock = Clock()
        self.clock.advance(NOW)
        self.delivery = MaildirDelivery(self.root, run_now, self.clock, "mail.example.test")

    def deliver(self, *addresses: str, sender: str = "alice@remote.test",
                body: bytes = BODY, open_body: Callable[[], BinaryIO] | None = None,
                ) -> list[Outcome]:
        recipients: Sequence[Recipient] = [Recipient(a) for a in addresses]
        env = Envelope(sender=sender, recipients=tuple(recipients))
        opener = open_body or (lambda: io.BytesIO(body))
        return self.successResultOf(
            Deferred.fromCoroutine(self.delivery.deliver(env, recipients, opener))
        )

    def delivered_file(self, mailbox: Path) -> Path:
        (path,) = (mailbox / "new").iterdir()
        return path


class DeliveryTests(MaildirTestCase):
    def test_message_lands_in_new_with_headers(self) -> None:
        (outcome,) = self.deliver("bob@example.test")
        self.assertEqual(outcome.result, DELIVERED)
        self.assertEqual(outcome.status, "2.0.0")
        self.assertEqual(outcome.remote, "maildir")
        self.assertEqual(outcome.recipient, Recipient("bob@example.test"))
        mailbox = self.root / "example.test" / "bob"
        content = self.delivered_file(mailbox).read_bytes()
        self.assertEqual(
            content,
            b"Return-Path: <alice@remote.test>\n"
            b"Delivered-To: bob@example.test\n"
            b"From: alice@remote.test\nSubject: hello\n\nline one\nline two\n",
        )
        self.assertEqual(list((mailbox / "tmp").iterdir()), [])
        self.assertTrue((mailbox / "cur").is_dir())

    def test_null_sender_return_path(self) -> None:
        self.deliver("bob@example.test", sender="")
        path = self.delivered_file(self.root / "example.test" / "bob")
        self.assertTrue(path.read_bytes().startswith(b"Return-Path: <>\n"))

    def test_file_name_is_unique_and_from_injected_clock(self) -> None:
        self.deliver("bob@example.test", "bob@example.test")
        names = [p.name for p in (self.root / "example.test" / "bob" / "new").iterdir()]
        self.assertEqual(len(set(names)), 2)
        for name in names:
            self.assertRegex(name, rf"^1700000000\.M250000P{os.getpid()}R[0-9a-f]{{16}}"
                                   r"\.mail\.example\.test$")

    def test_hostname_escaped_in_file_name(self) -> None:
        delivery = MaildirDelivery(self.root, run_now, self.clock, "odd/host:name")
        env = Envelope(sender="", recipients=(Recipient("bob@example.test"),))
        self.successResultOf(Deferred.fromCoroutine(
            delivery.deliver(env, env.recipients, lambda: io.BytesIO(BODY))))
        name = self.delivered_file(self.root / "example.test" / "bob").name
        self.assertTrue(name.endswith(".odd\\057host\\072name"))

    def test_two_recipients_two_files(self) -> None:
        outcomes = self.deliver("bob@example.test", "carol@other.test")
        self.assertEqual([o.result for o in outcomes], [DELIVERED, DELIVERED])
        bob = self.delivered_file(self.root / "example.test" / "bob").read_bytes()
        carol = self.delivered_file(self.root / "other.test" / "carol").read_bytes()
        self.assertIn(b"Delivered-To: bob@example.test\n", bob)
        self.assertIn(b"Delivered-To: carol@other.test\n", carol)
        self.assertEqual(len(files_under(self.root)), 2)

    def test_case_insensitive_mailbox(self) -> None:
        self.deliver("Bob@Example.TEST", '"bob"@example.test')
        self.assertEqual([p.name for p in self.root.iterdir()], ["example.test"])
        self.assertEqual([p.name for p in (self.root / "example.test").iterdir()], ["bob"])
        self.assertEqual(len(list((self.root / "example.test" / "bob" / "new").iterdir())), 2)

    def test_directories_are_private(self) -> None:
        self.deliver("bob@example.test")
        mailbox = self.root / "example.test" / "bob"
        self.assertEqual((mailbox / "new").stat().st_mode & 0o777, 0o700)
        self.assertEqual(self.delivered_file(mailbox).stat().st_mode & 0o777, 0o600)

    def test_no_header_injection_from_addresses(self) -> None:
        self.deliver("bob@example.test\r\nX-Evil: 1", sender="a@b.test\nX-Evil: 2")
        (path,) = files_under(self.root)
        head = path.read_bytes().split(b"\n\n")[0]
        self.assertNotIn(b"\nX-Evil", head)

    def test_body_opened_per_recipient(self) -> None:
        opened: list[int] = []

        def open_body() -> BinaryIO:
            opened.append(1)
            return io.BytesIO(BODY)

        self.deliver("a@example.test", "b@example.test", open_body=open_body)
        self.assertEqual(len(opened), 2)


class PathSafetyTests(MaildirTestCase):
    """Security requirement: no recipient can make us write outside ROOT/<domain>/."""

    HOSTILE = (
        "../../etc@example.test",
        "..@example.test",
        ".@example.test",
        '".."@example.test',
        '"../.."@example.test',
        '"a/b"@example.test',
        '"/etc/passwd"@example.test',
        '"a\\/b"@example.test',
        '"a\0b"@example.test',
        '"\x1b[31m"@example.test',
        ".hidden@example.test",
        "bob@../../outside",
        "bob@.hidden",
        "bob@example.test/../../x",
        '"x@y/../.."@example.test',
        "%2e%2e@example.test",
    )

    def test_hostile_addresses_stay_inside(self) -> None:
        for address in self.HOSTILE:
            path = mailbox_path(self.root, address)
            domain_dir = path.parent
            self.assertEqual(domain_dir.parent, self.root, address)
            self.assertEqual(path.resolve().parent.parent, self.root.resolve(), address)
            self.assertFalse(path.name.startswith("."), address)
            self.assertFalse(domain_dir.name.startswith("."), address)

    def test_hostile_deliveries_write_only_under_root(self) -> None:
        outcomes = self.deliver(*self.HOSTILE)
        self.assertEqual({o.result for o in outcomes}, {DELIVERED})
        written = files_under(self.base)
        self.assertEqual(len(written), len(self.HOSTILE))
        for path in written:
            self.assertTrue(path.resolve().is_relative_to(self.root.resolve()), path)
            self.assertEqual(path.parent.name, "new")
            self.assertEqual(len(path.relative_to(self.root).parts), 4, path)

    def test_distinct_addresses_never_share_a_mailbox(self) -> None:
        # '".."' and '..' are one mailbox (RFC 5321 4.1.2 quoting), so compare normalized.
        keys = {recipient_key(a) for a in self.HOSTILE}
        paths = {mailbox_path(self.root, a) for a in self.HOSTILE}
        self.assertEqual(len(paths), len(keys))
        self.assertGreater(len(keys), len(self.HOSTILE) - 3)

    def test_escaping_is_readable(self) -> None:
        self.assertEqual(safe_name("a/b"), "a%2Fb")
        self.assertEqual(safe_name(".."), "%2E.")
        self.assertEqual(safe_name("100%"), "100%25")
        self.assertEqual(safe_name("josé"), "josé")
        self.assertEqual(safe_name("first.last+tag"), "first.last+tag")

    @given(st.text(min_size=1, max_size=64))
    def test_safe_name_is_one_safe_component(self, text: str) -> None:
        name = safe_name(text)
        self.assertNotIn("/", name)
        self.assertNotIn("\0", name)
        self.assertFalse(name.startswith("."))
        self.assertEqual(Path(name).name, name)
        self.assertTrue(all(ch.isprintable() for ch in name))

    @given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
    def test_safe_name_is_one_to_one(self, a: str, b: str) -> None:
        if a != b:
            self.assertNotEqual(safe_name(a), safe_name(b))

    def test_unroutable_address_bounces(self) -> None:
        outcomes = self.deliver("no-domain", "bob@", "bob@..", '""@example.test')
        self.assertEqual([o.result for o in outcomes[:3]], [BOUNCED, BOUNCED, BOUNCED])
        self.assertEqual(outcomes[0].status, "5.1.3")
        self.assertEqual(files_under(self.base), files_under(self.root))


class FailureTests(MaildirTestCase):
    def test_file_where_directory_should_be_defers(self) -> None:
        # Fails for root too, unlike permissions.
        (self.root / "example.test").mkdir(parents=True)
        (self.root / "example.test" / "bob").write_bytes(b"not a directory")
        outcomes = self.deliver("bob@example.test", "carol@example.test")
        self.assertEqual([o.result for o in outcomes], [DEFERRED, DELIVERED])
        self.assertEqual(outcomes[0].status, "4.3.0")
        self.assertIn(os.strerror(errno.ENOTDIR), outcomes[0].reply)
        self.assertIn("example.test/bob", outcomes[0].reply)
        self.assertNotIn(str(self.base), outcomes[0].reply)

    def test_read_only_directory_defers(self) -> None:
        if os.geteuid() == 0:
            self.skipTest("root ignores directory permissions; the file-as-directory test "
                          "covers the failure path")
        tmp = self.root / "example.test" / "bob" / "tmp"
        tmp.mkdir(parents=True)
        tmp.chmod(0o500)
        self.addCleanup(tmp.chmod, 0o700)
        (outcome,) = self.deliver("bob@example.test")
        self.assertEqual(outcome.result, DEFERRED)
        self.assertIn(os.strerror(errno.EACCES), outcome.reply)

    def test_disk_full_on_fsync_defers_and_cleans_tmp(self) -> None:
        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(os, "fsync", full)
        (outcome,) = self.deliver("bob@example.test")
        self.assertEqual(outcome.result, DEFERRED)
        self.assertEqual(outcome.status, "4.3.1")
        self.assertIn(os.strerror(errno.ENOSPC), outcome.reply)
        self.assertEqual(files_under(self.root), [])

    def test_failing_body_reader_defers_and_cleans_tmp(self) -> None:
        def broken() -> BinaryIO:
            raise RuntimeError("spool file vanished")

        (outcome,) = self.deliver("bob@example.test", open_body=broken)
        self.assertEqual(outcome.result, DEFERRED)
        self.assertIn("spool file vanished", outcome.reply)
        self.assertEqual(files_under(self.root), [])

    def test_failed_run_blocking_defers(self) -> None:
        def refuse(f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
            raise RuntimeError("thread pool stopped")

        delivery = MaildirDelivery(self.root, refuse, self.clock, "mail.example.test")
        env = Envelope(sender="", recipients=(Recipient("bob@example.test"),))
        (outcome,) = self.successResultOf(Deferred.fromCoroutine(
            delivery.deliver(env, env.recipients, lambda: io.BytesIO(BODY))))
        self.assertEqual(outcome.result, DEFERRED)


class LocalRecipientsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = temp_dir(self) / "local_recipients"
        self.path.write_text(
            "# people\n"
            "\n"
            "  Alice@Example.TEST  \n"
            "bob@example.test OK\n"
            '"carol"@example.test\n'
            "@catchall.test\n"
            "postmaster\n"
            "a#b@example.test\n",
            encoding="utf-8",
        )
        self.recipients = LocalRecipients(self.path)

    def test_lookup(self) -> None:
        r = self.recipients
        self.assertIn("alice@example.test", r)
        self.assertIn("ALICE@example.test.", r)
        self.assertIn("bob@example.test", r)
        self.assertIn("Carol@example.test", r)
        self.assertIn("anyone@catchall.test", r)
        self.assertIn("postmaster@example.test", r)
        self.assertIn("Postmaster@other.test", r)
        self.assertIn("a#b@example.test", r)
        self.assertIn(Address("alice", "example.test"), r)
        self.assertNotIn("mallory@example.test", r)
        self.assertNotIn("alice@other.test", r)
        self.assertNotIn("# people", r)
        self.assertNotIn("OK", r)
        self.assertNotIn(42, r)

    def test_reloads_when_file_changes(self) -> None:
        self.assertNotIn("dave@example.test", self.recipients)
        self.path.write_text("dave@example.test\n", encoding="utf-8")
        # Make the change visible even on file systems with coarse timestamps.
        st = self.path.stat()
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        self.assertIn("dave@example.test", self.recipients)
        self.assertNotIn("alice@example.test", self.recipients)

    def test_keeps_last_list_when_file_vanishes(self) -> None:
        self.path.unlink()
        self.assertIn("alice@example.test", self.recipients)

    def test_missing_file_at_start_is_an_error(self) -> None:
        with self.assertRaises(FileNotFoundError):
            LocalRecipients(temp_dir(self) / "missing")
