"""SASLprep (RFC 4013) in one place for every mechanism: the password and the name as
``smarthost passwd`` stores them, and as PLAIN, LOGIN, CRAM-MD5 and SCRAM look them up, with
users added before (whose lines were not prepared) still working."""
# trial's assertion methods carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import bcrypt
from twisted.trial.unittest import SynchronousTestCase

from smarthost.auth.derived import prepare_name, prepare_password, saslprep
from smarthost.auth.users import (
    UserNameError,
    UsersFile,
    delete_user,
    parse_users,
    set_password,
)

NFC = "caf\u00e9"
NFD = "cafe\u0301"
UNASSIGNED = "\u0221"  # assigned in Unicode 4.0, so not in stringprep's 3.2


class PrepareTests(SynchronousTestCase):
    def test_rfc_4013_examples(self) -> None:
        # RFC 4013 3: SOFT HYPHEN maps to nothing, NFKC, prohibited and bidi examples.
        self.assertEqual(saslprep("I\u00adX"), "IX")
        self.assertEqual(saslprep("user"), "user")
        self.assertEqual(saslprep("USER"), "USER")
        self.assertEqual(saslprep("\u00aa"), "a")
        self.assertEqual(saslprep("\u2168"), "IX")
        self.assertRaises(ValueError, saslprep, "\u0007")
        self.assertRaises(ValueError, saslprep, "\u0627\u0031")

    def test_stored_strings_refuse_unassigned_code_points_queries_keep_them(self) -> None:
        self.assertRaises(ValueError, saslprep, f"a{UNASSIGNED}")
        self.assertEqual(saslprep(f"a{UNASSIGNED}", query=True), f"a{UNASSIGNED}")

    def test_passwords(self) -> None:
        self.assertEqual(prepare_password(NFD.encode()), NFC.encode())
        self.assertEqual(prepare_password("a\u00a0b".encode()), b"a b")  # non-ASCII space
        self.assertEqual(prepare_password(b"correct horse"), b"correct horse")
        self.assertEqual(prepare_password(b"\xff\xfe"), b"\xff\xfe")  # not text: as given
        self.assertEqual(prepare_password(b"a\x07"), b"a\x07")  # refused: as given
        self.assertEqual(prepare_password("\u00ad".encode()), "\u00ad".encode())  # never empty
        self.assertEqual(prepare_password(f"x{UNASSIGNED}".encode()), f"x{UNASSIGNED}".encode())
        self.assertEqual(prepare_password(f"\u00aa{UNASSIGNED}".encode(), query=True),
                         f"a{UNASSIGNED}".encode())

    def test_names(self) -> None:
        self.assertEqual(prepare_name(f"j{NFD}"), f"j{NFC}")
        self.assertEqual(prepare_name("alice@example.test"), "alice@example.test")
        self.assertEqual(prepare_name("a\x07"), "a\x07")  # refused: only the exact name


class UsersFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        self.path = directory / "users"
        self.users = UsersFile(self.path)

    def append(self, name: str, password: str) -> None:
        """A line written before passwords and names were prepared (or by htpasswd -B)."""
        with open(self.path, "ab") as f:
            f.write(name.encode() + b":" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(4))
                    + b"\n")

    def test_a_password_set_in_one_form_works_in_the_others(self) -> None:
        set_password(self.path, "alice", NFD, rounds=4)
        for typed in (NFC, NFD, "cafe\u0301\u00ad"):
            self.assertEqual(self.users.verify("alice", typed.encode()), "alice", typed)
        self.assertIsNone(self.users.verify("alice", b"cafe"))
        # What bcrypt hashed is the prepared form.
        entry = self.users.lookup("alice")
        assert entry is not None
        self.assertTrue(bcrypt.checkpw(NFC.encode(), entry.password_hash))

    def test_users_added_before_keep_working(self) -> None:
        self.append("old-nfc", NFC)  # already in normal form: every form works now
        self.append("old-nfd", NFD)  # not: the form typed then still works
        for typed in (NFC, NFD):
            self.assertEqual(self.users.verify("old-nfc", typed.encode()), "old-nfc")
        self.assertEqual(self.users.verify("old-nfd", NFD.encode()), "old-nfd")
        self.append("plain", "correct horse")
        self.assertEqual(self.users.verify("plain", b"correct horse"), "plain")

    def test_an_unprepared_password_costs_the_same_for_unknown_names(self) -> None:
        set_password(self.path, "alice", NFC, rounds=4)
        checks: list[bytes] = []
        real = bcrypt.checkpw

        def spy(password: bytes, hashed: bytes) -> bool:
            checks.append(password)
            return real(password, hashed)

        self.patch(bcrypt, "checkpw", spy)
        self.assertIsNone(self.users.verify("alice", b"wrong\xcc\x81"))
        self.assertIsNone(self.users.verify("nobody", b"wrong\xcc\x81"))
        self.assertEqual(len(checks), 4)  # prepared, then as typed, for both
        checks.clear()
        self.assertIsNone(self.users.verify("nobody", b"wrong"))
        self.assertEqual(len(checks), 1)  # ASCII is its own prepared form

    def test_names_are_stored_and_found_prepared(self) -> None:
        set_password(self.path, f"j{NFD}", "pw", rounds=4)
        self.assertEqual(list(parse_users(self.path.read_bytes()).users), [f"j{NFC}"])
        for typed in (f"j{NFC}", f"j{NFD}"):
            self.assertEqual(self.users.verify(typed, b"pw"), f"j{NFC}")  # the stored name
            entry = self.users.lookup(typed)
            self.assertEqual(entry.name if entry else None, f"j{NFC}")
            self.assertTrue(self.users.scram(typed, "SCRAM-SHA-256").known)
            self.assertTrue(self.users.cram_md5(typed).known)
        self.assertTrue(delete_user(self.path, f"j{NFD}"))
        self.assertIsNone(self.users.lookup(f"j{NFC}"))

    def test_an_old_unprepared_name_is_found_exactly_and_replaced(self) -> None:
        self.append(f"j{NFD}", "old")
        self.assertEqual(self.users.verify(f"j{NFD}", b"old"), f"j{NFD}")
        set_password(self.path, f"j{NFD}", "new", rounds=4)
        self.assertEqual(list(parse_users(self.path.read_bytes()).users), [f"j{NFC}"])
        self.assertEqual(self.users.verify(f"j{NFD}", b"new"), f"j{NFC}")

    def test_a_name_saslprep_refuses_is_refused(self) -> None:
        self.assertRaises(UserNameError, set_password, self.path, f"a{UNASSIGNED}", "pw",
                          rounds=4)

    def test_two_spellings_of_an_unknown_name_get_one_decoy(self) -> None:
        """A real user's two spellings share one salt; so must an unknown name's, or the
        salts would tell them apart."""
        self.assertEqual(self.users.scram(f"j{NFD}", "SCRAM-SHA-256"),
                         self.users.scram(f"j{NFC}", "SCRAM-SHA-256"))
        self.assertEqual(self.users.cram_md5(f"j{NFD}"), self.users.cram_md5(f"j{NFC}"))

    def test_a_user_without_a_secret_is_told_apart_from_an_unknown_name(self) -> None:
        self.append("carol", "pw")
        for secret in (self.users.scram("carol", "SCRAM-SHA-1"), self.users.cram_md5("carol")):
            self.assertEqual((secret.known, secret.user_without_secret), (False, True))
        for secret in (self.users.scram("nobody", "SCRAM-SHA-1"), self.users.cram_md5("nobody")):
            self.assertEqual((secret.known, secret.user_without_secret), (False, False))
