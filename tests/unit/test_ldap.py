"""The directory backend's pure parts: which URLs may carry a password, which senders an
entry owns, and the backends asked in order (FirstThatKnows)."""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from smarthost.auth.cred import FirstThatKnows, UnknownName
from smarthost.auth.ldap import (
    DirectorySenders,
    DirectoryUser,
    LdapSettings,
    owned_senders,
    url_problem,
)


class UrlTests(SynchronousTestCase):
    def test_plaintext_ldap_without_starttls_refused(self) -> None:
        self.assertIn("clear", url_problem("ldap://dc1.example.test", False) or "")
        with self.assertRaises(ValueError):
            LdapSettings(url="ldap://dc1", base="dc=x", bind_dn="cn=s", bind_password="p")

    def test_tls_urls_accepted(self) -> None:
        self.assertIsNone(url_problem("ldap://dc1.example.test:389", True))
        self.assertIsNone(url_problem("ldaps://dc1.example.test", False))
        self.assertIsNotNone(url_problem("ldaps://dc1.example.test", True))
        self.assertIsNotNone(url_problem("http://dc1.example.test", True))

    def test_password_not_in_repr(self) -> None:
        s = LdapSettings(url="ldaps://dc1", base="dc=x", bind_dn="cn=s", bind_password="hunter2")
        self.assertNotIn("hunter2", repr(s))
        self.assertEqual((s.host, s.port), ("dc1", 636))


class SendersTests(SynchronousTestCase):
    def test_attributes_and_smtp_proxy_addresses(self) -> None:
        entry = {
            "mail": [b"Alice@Example.test"],
            "proxyAddresses": [b"SMTP:alice@example.test", b"smtp:a.smith@example.test",
                               b"X400:c=US;a= ;p=Example", b"SIP:alice@example.test"],
            "cn": [b"not@an.attribute.asked.for"],
        }
        self.assertEqual(owned_senders(entry, ("mail",)),
                         {"alice@example.test", "a.smith@example.test"})

    def test_learned_senders_add_to_static(self) -> None:
        senders = DirectorySenders({"bob": frozenset({"b@x.test"})})
        senders.learn(DirectoryUser("bob", "uid=bob", frozenset({"bob@x.test"})))
        self.assertEqual(senders.get("bob"), {"b@x.test", "bob@x.test"})
        self.assertIsNone(senders.get("carol"))
        self.assertEqual(len(senders), 1)


@implementer(ICredentialsChecker)
class Answers:
    credentialInterfaces = ()

    def __init__(self, answer: Exception | bytes) -> None:
        self.answer, self.asked = answer, 0

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        self.asked += 1
        return fail(self.answer) if isinstance(self.answer, Exception) else succeed(self.answer)


class FirstThatKnowsTests(SynchronousTestCase):
    creds = UsernamePassword(b"alice", b"pw")

    def test_unknown_asks_the_next(self) -> None:
        first, second = Answers(UnknownName()), Answers(b"alice")
        d = FirstThatKnows([first, second]).requestAvatarId(self.creds)
        self.assertEqual(self.successResultOf(d), b"alice")

    def test_known_wrong_password_stops(self) -> None:
        first, second = Answers(UnauthorizedLogin()), Answers(b"alice")
        d = FirstThatKnows([first, second]).requestAvatarId(self.creds)
        self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(second.asked, 0)

    def test_directory_down_is_not_a_failed_login(self) -> None:
        d = FirstThatKnows([Answers(UnknownName()), Answers(OSError("down"))]).requestAvatarId(
            self.creds)
        f = self.failureResultOf(d)
        self.assertFalse(f.check(UnauthorizedLogin))

    def test_nobody_knows(self) -> None:
        d = FirstThatKnows([Answers(UnknownName())]).requestAvatarId(self.creds)
        self.failureResultOf(d, UnauthorizedLogin)
