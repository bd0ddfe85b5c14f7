"""The users file, its atomic rewrite, and the twisted.cred checker and realm."""
# trial's assertion methods carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from smarthost.auth import derived
from smarthost.auth.cred import (
    BcryptChecker,
    IUser,
    PortalLogin,
    User,
    UserRealm,
    build_portal,
    login,
)
from smarthost.auth.users import (
    DEFAULT_ROUNDS,
    PasswordError,
    UserNameError,
    UsersFile,
    delete_user,
    parse_users,
    set_password,
    users_file_is_insecure,
    validate_name,
)
from smarthost.core.types import RunBlocking

_P = ParamSpec("_P")
_R = TypeVar("_R")

ROUNDS = 4  # fast in tests; production default is 12


def hash_pw(password: bytes, rounds: int = ROUNDS) -> bytes:
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds))


class SyncRunBlocking:
    """The reactor-free stand-in for deferToThread: runs inline, remembers what it ran."""

    def __init__(self) -> None:
        self.calls: list[Callable[..., Any]] = []

    def __call__(
        self, f: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs
    ) -> Deferred[_R]:
        self.calls.append(f)
        try:
            return succeed(f(*args, **kwargs))
        except Exception:
            return fail(Failure())


class TempDirMixin:
    def make_dir(self) -> str:
        d = tempfile.mkdtemp(prefix="smarthost-auth-")
        self.addCleanup(shutil.rmtree, d)  # type: ignore[attr-defined]
        return d

    def write(self, path: str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)


class ParseTests(SynchronousTestCase):
    def test_2b_and_2y_hashes_verify(self) -> None:
        b_hash = hash_pw(b"secret one")
        # htpasswd -B writes $2y$ (the PHP/crypt_blowfish name of the same algorithm).
        y_hash = b"$2y$" + hash_pw(b"secret two")[4:]
        a_hash = b"$2a$" + hash_pw(b"secret three")[4:]
        data = b"alice:" + b_hash + b"\nbob:" + y_hash + b"\ncarol:" + a_hash + b"\n"
        parsed = parse_users(data)
        self.assertEqual(parsed.problems, ())
        self.assertEqual(sorted(parsed.users), ["alice", "bob", "carol"])
        self.assertTrue(bcrypt.checkpw(b"secret one", parsed.users["alice"].password_hash))
        self.assertTrue(bcrypt.checkpw(b"secret two", parsed.users["bob"].password_hash))
        self.assertTrue(bcrypt.checkpw(b"secret three", parsed.users["carol"].password_hash))
        self.assertFalse(bcrypt.checkpw(b"secret one", parsed.users["bob"].password_hash))

    def test_real_htpasswd_output(self) -> None:
        htpasswd = shutil.which("htpasswd")
        if htpasswd is None:
            # apache2-utils is not installed here; test_2b_and_2y_hashes_verify covers the
            # same $2y$ format built by hand.
            self.skipTest("htpasswd binary not installed (apache2-utils)")
        out = subprocess.run([htpasswd, "-nbB", "-C", str(ROUNDS), "printer", "pa55 word"],
                             check=True, capture_output=True).stdout
        parsed = parse_users(out)
        self.assertEqual(parsed.problems, ())
        self.assertTrue(bcrypt.checkpw(b"pa55 word", parsed.users["printer"].password_hash))

    def test_comments_blank_lines_and_crlf_ignored(self) -> None:
        h = hash_pw(b"pw")
        data = b"# users\n\n   \r\n  # indented comment\r\nalice:" + h + b"\r\n"
        parsed = parse_users(data)
        self.assertEqual(parsed.problems, ())
        self.assertEqual(list(parsed.users), ["alice"])

    def test_unknown_extra_fields_are_kept_and_ignored(self) -> None:
        h = hash_pw(b"pw")
        line = b"alice:" + h + b":future-thing=1:another\n"
        parsed = parse_users(line)
        entry = parsed.users["alice"]
        self.assertEqual(parsed.problems, ())
        self.assertEqual(entry.password_hash, h)
        self.assertEqual(entry.extras, ("future-thing=1", "another"))
        self.assertEqual((dict(entry.scram), entry.cram_md5), ({}, None))
        self.assertNotIn(h.decode(), repr(entry))

    def test_derived_secrets_are_parsed_and_kept_out_of_repr(self) -> None:
        h = hash_pw(b"pw")
        fields = derived.derive_secrets(b"pw")
        self.assertEqual([f.split("=", 1)[0] for f in fields],
                         ["scram-sha-256", "scram-sha-1", "cram-md5"])
        parsed = parse_users(b"alice:" + h + b":" + ":".join(fields).encode() + b"\n")
        entry = parsed.users["alice"]
        self.assertEqual(parsed.problems, ())
        self.assertEqual(sorted(entry.scram), ["SCRAM-SHA-1", "SCRAM-SHA-256"])
        self.assertEqual(entry.cram_md5, derived.CramMD5Secret.derive(b"pw"))
        for field in fields:
            self.assertNotIn(field.split("=", 1)[1][:12], repr(entry))
            self.assertNotIn(field.split("=", 1)[1][-12:], repr(parsed))

    def test_malformed_secret_fields_are_reported_and_the_user_kept(self) -> None:
        h = hash_pw(b"pw")
        line = b"alice:" + h + b":scram-sha-256=abc:cram-md5=zz:scram-sha-1=1,2\n"
        parsed = parse_users(line)
        entry = parsed.users["alice"]
        self.assertEqual((dict(entry.scram), entry.cram_md5), ({}, None))
        self.assertEqual(len(parsed.problems), 3)
        self.assertIn("line 1: user 'alice' has a malformed scram-sha-256 field",
                      parsed.problems[0])
        self.assertTrue(bcrypt.checkpw(b"pw", entry.password_hash))  # PLAIN still works

    def test_bad_lines_are_skipped_and_reported_without_secrets(self) -> None:
        h = hash_pw(b"pw")
        data = b"\n".join([
            b"plain:hunter2",                                   # plaintext: never accepted
            b"md5:$apr1$abc$0123456789012345678901",             # htpasswd -m
            b"sha:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",            # htpasswd -s
            b"nohash",
            b"empty:",
            b"short:" + h[:-1],                                  # truncated bcrypt
            b"cost:$2b$03$" + h[7:],                             # cost out of range
            b"bad name:" + h,
            b"\xff\xfe:" + h,
            b"alice:" + h,
            b"alice:" + hash_pw(b"other"),                       # duplicate: first wins
        ])
        parsed = parse_users(data)
        self.assertEqual(list(parsed.users), ["alice"])
        self.assertTrue(bcrypt.checkpw(b"pw", parsed.users["alice"].password_hash))
        self.assertEqual(len(parsed.problems), 10)
        self.assertTrue(parsed.problems[0].startswith("line 1:"))
        joined = "\n".join(parsed.problems)
        self.assertNotIn("hunter2", joined)
        self.assertNotIn(h.decode()[7:], joined)


class ValidateNameTests(SynchronousTestCase):
    def test_ordinary_names_accepted(self) -> None:
        for name in ["alice", "alice@example.test", "printer-3", "jürgen@bücher.test",
                     "a" * 255, "ü" * 127]:
            validate_name(name)

    def test_invalid_names_refused(self) -> None:
        for name in ["", "a:b", "a b", "a\tb", "a\nb", "a\rb", "a\x00b", "a\x7fb",
                     "a\u200bb", "a\u00a0b", "a\u2028b", "#alice", "a" * 256, "ü" * 128]:
            with self.subTest(name=name):
                self.assertRaises(UserNameError, validate_name, name)


class UsersFileTests(TempDirMixin, SynchronousTestCase):
    def test_missing_file_means_no_users_until_created(self) -> None:
        path = os.path.join(self.make_dir(), "users")
        users = UsersFile(path)
        self.assertIsNone(users.lookup("alice"))
        self.assertFalse(users.verify("alice", b"pw"))
        set_password(path, "alice", "pw", rounds=ROUNDS)
        self.assertIsNotNone(users.lookup("alice"))

    def test_reloads_after_atomic_rewrite(self) -> None:
        path = os.path.join(self.make_dir(), "users")
        set_password(path, "alice", "old", rounds=ROUNDS)
        users = UsersFile(path)
        self.assertTrue(users.verify("alice", b"old"))
        set_password(path, "alice", "new", rounds=ROUNDS)
        self.assertFalse(users.verify("alice", b"old"))
        self.assertTrue(users.verify("alice", b"new"))
        delete_user(path, "alice")
        self.assertIsNone(users.lookup("alice"))

    def test_reloads_after_same_size_edit_in_place(self) -> None:
        path = os.path.join(self.make_dir(), "users")
        h = hash_pw(b"pw")
        self.write(path, b"alice:" + h + b"\n")
        users = UsersFile(path)
        self.assertIsNotNone(users.lookup("alice"))
        before = os.stat(path)
        with open(path, "r+b") as f:  # same inode, same size: only the times differ
            f.write(b"alica")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        self.assertIsNone(users.lookup("alice"))
        self.assertIsNotNone(users.lookup("alica"))

    def test_unchanged_file_is_not_parsed_again(self) -> None:
        path = os.path.join(self.make_dir(), "users")
        set_password(path, "alice", "pw", rounds=ROUNDS)
        users = UsersFile(path)
        first = users.reload()
        self.assertIs(users.reload(), first)

    def test_unreadable_file_is_an_error_not_an_empty_file(self) -> None:
        path = self.make_dir()  # a directory where the file should be: even root cannot read
        self.assertRaises(OSError, UsersFile(path).lookup, "alice")

    def test_problems_are_exposed_for_startup_warnings(self) -> None:
        path = os.path.join(self.make_dir(), "users")
        self.write(path, b"alice:plaintext\n")
        users = UsersFile(path)
        users.reload()
        self.assertEqual(len(users.problems), 1)

    def test_password_over_72_octets_is_checked_on_its_first_72(self) -> None:
        # bcrypt >= 5 raises for longer passwords; htpasswd and older bcrypt truncated, so
        # truncating keeps their files working and a client cannot make the check crash.
        path = os.path.join(self.make_dir(), "users")
        self.write(path, b"alice:" + hash_pw(b"x" * 72) + b"\n")
        users = UsersFile(path)
        self.assertTrue(users.verify("alice", b"x" * 100))
        self.assertFalse(users.verify("alice", b"y" * 100))
        self.assertFalse(users.verify("nobody", b"y" * 100))


class RewriteTests(TempDirMixin, SynchronousTestCase):
    def test_set_password_stores_derived_secrets_never_the_password(self) -> None:
        path = os.path.join(self.make_dir(), "users")
        set_password(path, "alice", "correct horse", rounds=ROUNDS)
        with open(path, "rb") as f:
            data = f.read()
        self.assertNotIn(b"correct", data)
        self.assertNotIn(b"correct horse".hex().encode(), data)
        fields = data.rstrip(b"\n").split(b":")
        self.assertEqual(fields[0], b"alice")
        self.assertTrue(fields[1].startswith(b"$2b$04$"))
        b64 = rb"[A-Za-z0-9+/]"
        self.assertRegex(fields[2], rb"\Ascram-sha-256=4096,%s{22}==,%s{43}=,%s{43}=\Z"
                         % (b64, b64, b64))
        self.assertRegex(fields[3], rb"\Ascram-sha-1=4096,%s{22}==,%s{27}=,%s{27}=\Z"
                         % (b64, b64, b64))
        self.assertRegex(fields[4], rb"\Acram-md5=[0-9a-f]{64}\Z")
        users = UsersFile(path)
        self.assertTrue(users.scram("alice", "SCRAM-SHA-256").known)
        self.assertTrue(users.cram_md5("alice").known)
        # A fresh salt each time: the same password never stores the same keys twice.
        set_password(path, "alice", "correct horse", rounds=ROUNDS)
        with open(path, "rb") as f:
            self.assertNotEqual(f.read().split(b":")[2], fields[2])

    def test_scram_iterations_below_rfc_7677_refused(self) -> None:
        path = os.path.join(self.make_dir(), "users")
        self.assertRaises(PasswordError, set_password, path, "a", "pw", rounds=ROUNDS,
                          iterations=1000)
        self.assertFalse(os.path.exists(path))

    def test_set_password_creates_parent_and_file_0600_without_plaintext(self) -> None:
        path = os.path.join(self.make_dir(), "var", "sub", "users")
        old_umask = os.umask(0o022)
        self.addCleanup(os.umask, old_umask)
        set_password(path, "alice", "correct horse", rounds=ROUNDS)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as f:
            data = f.read()
        self.assertNotIn(b"correct horse", data)
        self.assertTrue(data.startswith(b"alice:$2b$04$"))
        self.assertTrue(data.endswith(b"\n"))
        self.assertTrue(UsersFile(path).verify("alice", b"correct horse"))

    def test_default_cost_is_12(self) -> None:
        self.assertEqual(DEFAULT_ROUNDS, 12)

    def test_replace_keeps_other_lines_byte_for_byte_and_drops_old_secrets(self) -> None:
        path = os.path.join(self.make_dir(), "users")
        bob = b"bob:" + hash_pw(b"b") + b":scram-sha-256=keep\r\n"
        original = (b"# managed by hand\n\nalice:" + hash_pw(b"old") +
                    b":scram-sha-256=stale\n" + bob + b"alice:" + hash_pw(b"dup") + b"\n"
                    b"carol:" + hash_pw(b"c"))  # no final newline
        self.write(path, original)
        set_password(path, "alice", "new", rounds=ROUNDS)
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        self.assertEqual(lines[0:2], [b"# managed by hand\n", b"\n"])
        self.assertTrue(lines[2].startswith(b"alice:$2b$"))
        self.assertNotIn(b"stale", lines[2])
        self.assertEqual(lines[3], bob)
        self.assertEqual(len(lines), 5)  # the duplicate alice line is gone
        self.assertEqual(lines[4], original.splitlines(keepends=True)[-1])
        self.assertTrue(UsersFile(path).verify("alice", b"new"))

    def test_append_adds_newline_to_unterminated_last_line(self) -> None:
        path = os.path.join(self.make_dir(), "users")
        self.write(path, b"bob:" + hash_pw(b"b"))
        set_password(path, "alice", "a", rounds=ROUNDS)
        users = UsersFile(path)
        self.assertTrue(users.verify("bob", b"b"))
        self.assertTrue(users.verify("alice", b"a"))

    def test_delete_user(self) -> None:
        path = os.path.join(self.make_dir(), "users")
        set_password(path, "alice", "a", rounds=ROUNDS)
        set_password(path, "bob", "b", rounds=ROUNDS)
        self.assertTrue(delete_user(path, "alice"))
        users = UsersFile(path)
        self.assertIsNone(users.lookup("alice"))
        self.assertTrue(users.verify("bob", b"b"))

    def test_delete_unknown_user_leaves_file_untouched(self) -> None:
        directory = self.make_dir()
        path = os.path.join(directory, "users")
        set_password(path, "bob", "b", rounds=ROUNDS)
        before = os.stat(path)
        self.assertFalse(delete_user(path, "alice"))
        self.assertEqual(os.stat(path).st_ino, before.st_ino)
        self.assertFalse(delete_user(os.path.join(directory, "missing"), "alice"))
        self.assertFalse(os.path.exists(os.path.join(directory, "missing")))

    def test_rewrite_is_atomic_and_leaves_no_temp_file_on_failure(self) -> None:
        directory = self.make_dir()
        path = os.path.join(directory, "users")
        set_password(path, "alice", "old", rounds=ROUNDS)
        with open(path, "rb") as f:
            before = f.read()

        def broken_replace(src: str, dst: str) -> None:
            raise OSError("disk on fire")

        self.patch(os, "replace", broken_replace)
        self.assertRaises(OSError, set_password, path, "alice", "new", rounds=ROUNDS)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(os.listdir(directory), ["users"])

    def test_rewrite_uses_rename_and_tightens_mode(self) -> None:
        path = os.path.join(self.make_dir(), "users")
        set_password(path, "alice", "a", rounds=ROUNDS)
        os.chmod(path, 0o644)
        inode = os.stat(path).st_ino
        set_password(path, "bob", "b", rounds=ROUNDS)
        st = os.stat(path)
        self.assertNotEqual(st.st_ino, inode)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)

    def test_symlinked_file_is_rewritten_in_place_of_its_target(self) -> None:
        directory = self.make_dir()
        target = os.path.join(directory, "real-users")
        link = os.path.join(directory, "users")
        set_password(target, "alice", "a", rounds=ROUNDS)
        os.symlink(target, link)
        set_password(link, "bob", "b", rounds=ROUNDS)
        self.assertTrue(os.path.islink(link))
        self.assertTrue(UsersFile(target).verify("bob", b"b"))

    def test_invalid_names_refused_and_nothing_written(self) -> None:
        directory = self.make_dir()
        path = os.path.join(directory, "users")
        for name in ["a:b", "a b", "a\nb", "", "#x", "x" * 256]:
            with self.subTest(name=name):
                self.assertRaises(UserNameError, set_password, path, name, "pw", rounds=ROUNDS)
                self.assertRaises(UserNameError, delete_user, path, name)
        self.assertFalse(os.path.exists(path))

    def test_unusable_passwords_refused(self) -> None:
        path = os.path.join(self.make_dir(), "users")
        for password in ["", "x" * 73, "é" * 37, "a\x00b"]:
            with self.subTest(password=password):
                self.assertRaises(PasswordError, set_password, path, "alice", password,
                                  rounds=ROUNDS)
        set_password(path, "alice", "x" * 72, rounds=ROUNDS)
        set_password(path, "alice", b"bytes too", rounds=ROUNDS)
        self.assertRaises(PasswordError, set_password, path, "alice", "pw", rounds=3)

    def test_users_file_is_insecure(self) -> None:
        directory = self.make_dir()
        path = os.path.join(directory, "users")
        self.assertFalse(users_file_is_insecure(path))  # missing: nothing to warn about
        set_password(path, "alice", "a", rounds=ROUNDS)
        self.assertFalse(users_file_is_insecure(path))
        for mode, insecure in [(0o640, True), (0o604, True), (0o620, True), (0o700, False),
                               (0o711, False), (0o400, False)]:
            os.chmod(path, mode)
            self.assertEqual(users_file_is_insecure(path), insecure, oct(mode))


class CheckerTests(TempDirMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.make_dir(), "users")
        set_password(self.path, "alice", "right", rounds=ROUNDS)
        set_password(self.path, "bob@example.test", "bobs", rounds=ROUNDS)
        self.users = UsersFile(self.path)
        self.run_blocking = SyncRunBlocking()
        self.checker = BcryptChecker(self.users, self.run_blocking)

    def test_provides_interfaces(self) -> None:
        verifyObject(ICredentialsChecker, self.checker)
        verifyObject(IRealm, UserRealm())
        verifyObject(IUser, User("alice"))

    def test_correct_password(self) -> None:
        d = self.checker.requestAvatarId(UsernamePassword(b"alice", b"right"))
        self.assertEqual(self.successResultOf(d), b"alice")
        # bcrypt ran through run_blocking, i.e. off the reactor thread in production.
        self.assertEqual(self.run_blocking.calls, [self.users.verify])

    def test_wrong_password(self) -> None:
        d = self.checker.requestAvatarId(UsernamePassword(b"alice", b"wrong"))
        self.failureResultOf(d, UnauthorizedLogin)

    def test_usernames_are_case_sensitive(self) -> None:
        d = self.checker.requestAvatarId(UsernamePassword(b"Alice", b"right"))
        self.failureResultOf(d, UnauthorizedLogin)

    def test_unknown_user_costs_a_check_of_the_same_cost(self) -> None:
        checked: list[bytes] = []
        real_checkpw = bcrypt.checkpw

        def spy(password: bytes, hashed: bytes) -> bool:
            checked.append(hashed)
            return real_checkpw(password, hashed)

        self.patch(bcrypt, "checkpw", spy)
        self.failureResultOf(
            self.checker.requestAvatarId(UsernamePassword(b"mallory", b"right")),
            UnauthorizedLogin)
        self.failureResultOf(
            self.checker.requestAvatarId(UsernamePassword(b"alice", b"wrong")),
            UnauthorizedLogin)
        self.assertEqual(len(checked), 2)
        self.assertEqual(checked[0][:7], b"$2b$04$")  # the dummy matches the file's cost
        self.assertEqual(checked[0][:7], checked[1][:7])
        self.assertEqual(self.run_blocking.calls, [self.users.verify, self.users.verify])

    def test_unknown_user_fails_even_with_the_dummy_hash_password(self) -> None:
        self.patch(bcrypt, "checkpw", lambda password, hashed: True)
        self.failureResultOf(
            self.checker.requestAvatarId(UsernamePassword(b"mallory", b"x")), UnauthorizedLogin)

    def test_dummy_cost_follows_the_most_common_cost(self) -> None:
        self.write(self.path, b"".join(
            name + b":" + hash_pw(b"pw", rounds) + b"\n"
            for name, rounds in [(b"a", 4), (b"b", 5), (b"c", 5)]))
        checked: list[bytes] = []
        def spy(password: bytes, hashed: bytes) -> bool:
            checked.append(hashed)
            return False

        self.patch(bcrypt, "checkpw", spy)
        self.users.verify("nobody", b"pw")
        self.assertEqual(checked[0][:7], b"$2b$05$")

    def test_invalid_utf8_username_fails_like_an_unknown_user(self) -> None:
        d = self.checker.requestAvatarId(UsernamePassword(b"\xffalice", b"right"))
        self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(self.run_blocking.calls, [self.users.verify])

    def test_unreadable_users_file_is_not_unauthorized(self) -> None:
        os.unlink(self.path)
        os.mkdir(self.path)
        f = self.failureResultOf(self.checker.requestAvatarId(UsernamePassword(b"a", b"b")))
        self.assertFalse(f.check(UnauthorizedLogin))
        self.assertTrue(f.check(OSError))

    def test_portal_login_fires_with_user_name(self) -> None:
        portal_login = PortalLogin(build_portal(self.users, self.run_blocking))
        d = portal_login(UsernamePassword(b"bob@example.test", b"bobs"))
        self.assertEqual(self.successResultOf(d), "bob@example.test")
        self.failureResultOf(portal_login(UsernamePassword(b"bob@example.test", b"x")),
                             UnauthorizedLogin)

    def test_login_fires_with_the_avatar(self) -> None:
        portal = build_portal(self.users, self.run_blocking)
        d = login(portal, UsernamePassword(b"alice", b"right"))
        self.assertEqual(self.successResultOf(d), User("alice"))

    def test_realm_avatar_is_a_frozen_user(self) -> None:
        iface, avatar, logout = UserRealm().requestAvatar(b"alice", None, IUser)
        self.assertIs(iface, IUser)
        self.assertEqual(avatar, User("alice"))
        logout()
        self.assertRaises(NotImplementedError, UserRealm().requestAvatar, (), None, IUser)

    def test_sync_fake_satisfies_run_blocking(self) -> None:
        # Typing check as much as a runtime one: both must be accepted as RunBlocking.
        fakes: list[RunBlocking] = [self.run_blocking, deferToThread]
        self.assertEqual(len(fakes), 2)


class ThreadPoolTests(TempDirMixin, TestCase):
    """The production wiring: bcrypt on the reactor's thread pool."""

    def setUp(self) -> None:
        self.path = os.path.join(self.make_dir(), "users")
        set_password(self.path, "alice", "right", rounds=ROUNDS)

    def test_login_through_deferToThread(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._login())

    async def _login(self) -> None:
        portal_login = PortalLogin(build_portal(UsersFile(self.path), deferToThread))
        self.assertEqual(await portal_login(UsernamePassword(b"alice", b"right")), "alice")
        with self.assertRaises(UnauthorizedLogin):
            await portal_login(UsernamePassword(b"alice", b"wrong"))
        with self.assertRaises(UnauthorizedLogin):
            await portal_login(UsernamePassword(b"nobody", b"right"))
