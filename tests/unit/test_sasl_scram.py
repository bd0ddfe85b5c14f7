"""SCRAM-SHA-256 and SCRAM-SHA-1 (RFC 5802, RFC 7677) on the server side: the RFC example
exchanges, the scramp client library, the GS2 header rules, and decoys for unknown names."""
# trial's assertion methods carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import bcrypt
from hypothesis import given, settings
from hypothesis import strategies as st
from scramp import ScramClient
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smarthost.auth.cred import (
    IVerifiedUser,
    PortalLogin,
    VerifiedUser,
    VerifiedUserChecker,
    build_portal,
)
from smarthost.auth.derived import (
    ScramSecret,
    derive_scram,
    prepare_password,
    saslprep,
)
from smarthost.auth.sasl import (
    Challenge,
    Credentials,
    ISASLExchange,
    ISASLMechanism,
    PlainMechanism,
    Rejected,
    ScramMechanism,
    Step,
)
from smarthost.auth.users import UsersFile, delete_user, set_password

_P = ParamSpec("_P")
_R = TypeVar("_R")

# RFC 7677 3 and RFC 5802 5: user "user", password "pencil".
RFC = {
    "SCRAM-SHA-256": {
        "hash": "sha256",
        "salt": "W22ZaJ0SNY7soEsUEjb6gQ==",
        "client_nonce": "rOprNGfwEbeRWgbNEkqO",
        "server_nonce": "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        "proof": "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        "verifier": "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
    },
    "SCRAM-SHA-1": {
        "hash": "sha1",
        "salt": "QSXCR+Q6sek8bf92",
        "client_nonce": "fyko+d2lbbFgONRv9qkxdawL",
        "server_nonce": "3rfcNHYJY1ZVvWVs7j",
        "proof": "v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        "verifier": "rmF9pqV8S7suAoZWja4dJRkFsKQ=",
    },
}
MECHANISMS = list(RFC)


def run_now(f: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> Deferred[_R]:
    return succeed(f(*args, **kwargs))


def rfc_line(name: str = "user") -> bytes:
    """A users-file line holding RFC 5802/7677's secrets for "pencil" with their salts."""
    fields = [name, bcrypt.hashpw(b"pencil", bcrypt.gensalt(4)).decode()]
    for mechanism, v in RFC.items():
        secret = derive_scram(b"pencil", v["hash"], base64.b64decode(v["salt"]))
        fields.append(f"{mechanism.lower()}={secret.field()}")
    return ":".join(fields).encode() + b"\n"


class ScramTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="smarthost-scram-")
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "users")
        with open(self.path, "wb") as f:
            f.write(rfc_line())
        set_password(self.path, "alice", "correct horse", rounds=4)
        set_password(self.path, "a,b=c", "commas", rounds=4)
        with open(self.path, "ab") as f:
            f.write(b"old:" + bcrypt.hashpw(b"pencil", bcrypt.gensalt(4)) + b"\n")
        self.users = UsersFile(self.path)

    def exchange(self, mechanism: str, nonce: str = "servernonce") -> ISASLExchange:
        return ScramMechanism(mechanism, self.users, nonce=lambda: nonce).new()

    def run_scramp(
        self, mechanism: str, name: str, password: str, exchange: ISASLExchange | None = None
    ) -> Step:
        """Drive an exchange with scramp's client; returns the last step."""
        client = ScramClient([mechanism], name, password)
        exchange = exchange or ScramMechanism(mechanism, self.users).new()
        server_first = exchange.step(client.get_client_first().encode())
        assert isinstance(server_first, Challenge), server_first
        client.set_server_first(server_first.data.decode())
        server_final = exchange.step(client.get_client_final().encode())
        if not isinstance(server_final, Challenge):
            return server_final
        client.set_server_final(server_final.data.decode())  # raises on a bad v=
        return exchange.step(b"")


class RFCExampleTests(ScramTestCase):
    def test_rfc_examples(self) -> None:
        for mechanism, v in RFC.items():
            with self.subTest(mechanism):
                exchange = self.exchange(mechanism, v["server_nonce"])
                nonce = v["client_nonce"] + v["server_nonce"]
                step = exchange.step(f"n,,n=user,r={v['client_nonce']}".encode())
                self.assertEqual(step, Challenge(f"r={nonce},s={v['salt']},i=4096".encode()))
                step = exchange.step(f"c=biws,r={nonce},p={v['proof']}".encode())
                self.assertEqual(step, Challenge(f"v={v['verifier']}".encode()))
                step = exchange.step(b"")
                self.assertEqual(step, Credentials(VerifiedUser("user", mechanism, self.users),
                                                   "user"))
                self.assertIsInstance(exchange.step(b""), Rejected)  # finished

    def test_empty_challenge_when_there_is_no_initial_response(self) -> None:
        v = RFC["SCRAM-SHA-256"]
        exchange = self.exchange("SCRAM-SHA-256", v["server_nonce"])
        self.assertEqual(exchange.step(None), Challenge(b""))
        step = exchange.step(f"n,,n=user,r={v['client_nonce']}".encode())
        self.assertIsInstance(step, Challenge)

    def test_interfaces(self) -> None:
        for mechanism in MECHANISMS:
            m = ScramMechanism(mechanism, self.users)
            verifyObject(ISASLMechanism, m)
            verifyObject(ISASLExchange, m.new())
            self.assertEqual(m.name, mechanism)
        self.assertRaises(ValueError, ScramMechanism, "SCRAM-MD5", self.users)


class ScrampClientTests(ScramTestCase):
    def test_scramp_logs_in_and_verifies_the_server(self) -> None:
        for mechanism in MECHANISMS:
            with self.subTest(mechanism):
                step = self.run_scramp(mechanism, "alice", "correct horse")
                assert isinstance(step, Credentials), step
                self.assertEqual(step.credentials,
                                 VerifiedUser("alice", mechanism, self.users))

    def test_wrong_password_is_refused_before_any_server_signature(self) -> None:
        for mechanism in MECHANISMS:
            step = self.run_scramp(mechanism, "alice", "battery staple")
            self.assertEqual(step, Rejected("wrong SCRAM proof", username="alice"))

    def test_escaped_names(self) -> None:
        # scramp escapes "," and "=" as =2C and =3D (RFC 5802 5.1).
        step = self.run_scramp("SCRAM-SHA-256", "a,b=c", "commas")
        assert isinstance(step, Credentials), step
        self.assertEqual(step.username, "a,b=c")

    def test_nonce_is_fresh_and_long(self) -> None:
        mechanism = ScramMechanism("SCRAM-SHA-256", self.users)
        nonces = set()
        for _ in range(2):
            step = mechanism.new().step(b"n,,n=alice,r=abc")
            assert isinstance(step, Challenge)
            nonces.add(step.data.split(b",")[0])
        self.assertEqual(len(nonces), 2)
        self.assertGreaterEqual(min(len(n) for n in nonces), len("r=abc") + 24)

    def test_password_is_saslprepped(self) -> None:
        # RFC 4013 3: SOFT HYPHEN maps to nothing, so "I<SHY>X" is "IX" for both sides.
        set_password(self.path, "prep", "I\u00adX", rounds=4)
        step = self.run_scramp("SCRAM-SHA-256", "prep", "IX")
        self.assertIsInstance(step, Credentials)
        self.assertEqual(saslprep("\u2168"), "IX")
        self.assertEqual(prepare_password(b"\xff\xfe"), b"\xff\xfe")  # not text: as given
        self.assertEqual(prepare_password("a\u0007".encode()), "a\u0007".encode())
        self.assertRaises(ValueError, saslprep, "a\u0007")


class DecoyTests(ScramTestCase):
    """A name without a SCRAM secret must look like one with: probing tells nothing."""

    def server_first(self, name: str, mechanism: str = "SCRAM-SHA-256") -> tuple[str, ...]:
        step = self.exchange(mechanism).step(f"n,,n={name},r=abc".encode())
        assert isinstance(step, Challenge), step
        _, salt, iterations = step.data.decode().split(",")
        return salt, iterations

    def test_unknown_and_bcrypt_only_names_get_a_stable_real_looking_salt(self) -> None:
        real_salt, real_iterations = self.server_first("alice")
        for name in ("nobody", "old"):
            salt, iterations = self.server_first(name)
            self.assertEqual((salt, iterations), self.server_first(name))  # stable
            self.assertEqual(iterations, real_iterations)
            self.assertEqual(len(base64.b64decode(salt[2:])), len(base64.b64decode(real_salt[2:])))
        self.assertNotEqual(self.server_first("nobody"), self.server_first("nobody2"))
        self.assertNotEqual(self.server_first("nobody"),
                            self.server_first("nobody", "SCRAM-SHA-1"))

    def test_decoy_follows_the_most_common_iteration_count(self) -> None:
        for name in ("w", "x", "y", "z"):  # 8 secrets at 5000 against 6 at 4096
            set_password(self.path, name, "pw", rounds=4, iterations=5000)
        self.assertEqual(self.server_first("nobody")[1], "i=5000")

    def test_decoy_salt_depends_on_the_server_key(self) -> None:
        other = UsersFile(self.path, decoy_key=b"k" * 32)
        same = UsersFile(self.path, decoy_key=b"k" * 32)
        self.assertEqual(other.scram("nobody", "SCRAM-SHA-256"),
                         same.scram("nobody", "SCRAM-SHA-256"))
        self.assertNotEqual(other.scram("nobody", "SCRAM-SHA-256").value.salt,
                            self.users.scram("nobody", "SCRAM-SHA-256").value.salt)

    def test_unknown_users_fail_like_a_wrong_password(self) -> None:
        for mechanism in MECHANISMS:
            step = self.run_scramp(mechanism, "nobody", "pencil")
            self.assertEqual(step, Rejected("wrong SCRAM proof", username="nobody"))

    def test_bcrypt_only_users_fail_as_having_no_secret(self) -> None:
        """Issue 11, finding 7: an htpasswd -B user has no SCRAM secret. The exchange runs
        with a decoy as for anyone, then says so, which the session neither counts nor
        delays (it was no guess); before, it failed like a wrong password."""
        for mechanism in MECHANISMS:
            step = self.run_scramp(mechanism, "old", "pencil")
            self.assertEqual(step, Rejected(f"no {mechanism} secret for this user",
                                            username="old", no_secret=True))

    def test_a_decoy_never_passes_even_if_the_proof_compared_equal(self) -> None:
        self.assertFalse(self.users.scram("nobody", "SCRAM-SHA-256").known)
        self.patch(hmac, "compare_digest", lambda a, b: True)
        for name, accepted in (("alice", True), ("nobody", False), ("old", False)):
            client = ScramClient(["SCRAM-SHA-256"], name, "wrong")
            exchange = self.exchange("SCRAM-SHA-256")
            first = exchange.step(client.get_client_first().encode())
            assert isinstance(first, Challenge)
            client.set_server_first(first.data.decode())
            step = exchange.step(client.get_client_final().encode())
            self.assertEqual(isinstance(step, Challenge), accepted, name)


class ProtocolRuleTests(ScramTestCase):
    def first(self, message: bytes, mechanism: str = "SCRAM-SHA-256") -> Step:
        return self.exchange(mechanism).step(message)

    def test_gs2_n_and_y_accepted_p_refused(self) -> None:
        self.assertIsInstance(self.first(b"n,,n=alice,r=abc"), Challenge)
        self.assertIsInstance(self.first(b"y,,n=alice,r=abc"), Challenge)
        step = self.first(b"p=tls-exporter,,n=alice,r=abc")
        assert isinstance(step, Rejected)
        self.assertFalse(step.malformed)  # well formed, refused: 535
        self.assertIn("PLUS", step.reason)

    def test_y_flag_logs_in_with_c_eSws(self) -> None:
        # "y,," must be repeated in c= as base64("y,,") == "eSws".
        exchange = self.exchange("SCRAM-SHA-256", "S")
        first = exchange.step(b"y,,n=alice,r=C")
        assert isinstance(first, Challenge)
        proof = self.proof("SCRAM-SHA-256", "correct horse", b"y,,n=alice,r=C", first.data,
                           "c=eSws,r=CS")
        self.assertIsInstance(exchange.step(f"c=eSws,r=CS,p={proof}".encode()), Challenge)

    def proof(self, mechanism: str, password: str, client_first: bytes, server_first: bytes,
              without_proof: str) -> str:
        h = RFC[mechanism]["hash"]
        salt = base64.b64decode(server_first.decode().split(",")[1][2:])
        salted = hashlib.pbkdf2_hmac(h, password.encode(), salt, 4096)
        client_key = hmac.digest(salted, b"Client Key", h)
        stored = hashlib.new(h, client_key).digest()
        bare = client_first.decode().split(",", 2)[2]
        auth_message = f"{bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(stored, auth_message, h)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return base64.b64encode(proof).decode()

    def test_channel_binding_must_repeat_the_gs2_header(self) -> None:
        exchange = self.exchange("SCRAM-SHA-256", "S")
        first = exchange.step(b"y,,n=alice,r=C")
        assert isinstance(first, Challenge)
        # A downgrade: the client said "y" but claims "n" in c= (biws = "n,,").
        proof = self.proof("SCRAM-SHA-256", "correct horse", b"y,,n=alice,r=C", first.data,
                           "c=biws,r=CS")
        step = exchange.step(f"c=biws,r=CS,p={proof}".encode())
        assert isinstance(step, Rejected)
        self.assertIn("channel binding", step.reason)

    def test_nonce_must_match(self) -> None:
        exchange = self.exchange("SCRAM-SHA-256", "S")
        first = exchange.step(b"n,,n=alice,r=C")
        assert isinstance(first, Challenge)
        proof = self.proof("SCRAM-SHA-256", "correct horse", b"n,,n=alice,r=C", first.data,
                           "c=biws,r=CX")
        step = exchange.step(f"c=biws,r=CX,p={proof}".encode())
        self.assertEqual(step, Rejected("SCRAM nonce does not match", username="alice"))

    def test_authzid_must_be_the_user(self) -> None:
        self.assertIsInstance(self.first(b"n,a=alice,n=alice,r=abc"), Challenge)
        step = self.first(b"n,a=bob,n=alice,r=abc")
        self.assertEqual(step, Rejected(
            "SCRAM authorization identity differs from the user name", username="alice"))

    def test_malformed_client_first(self) -> None:
        for message in (b"", b"n", b"n,,", b"x,,n=alice,r=abc", b"n,,r=abc,n=alice",
                        b"n,,n=alice", b"n,,n=,r=abc", b"n,,n=a=b,r=abc", b"n,,n=a=2c,r=abc",
                        b"n,,n=alice,r=", b"n,,n=alice,r=a b", b"n,,m=ext,n=alice,r=abc",
                        b"n,b=x,n=alice,r=abc", b"n,a=,n=alice,r=abc", b"\xff,,n=a,r=b"):
            step = self.first(message)
            assert isinstance(step, Rejected), message
            self.assertTrue(step.malformed, message)

    def test_extensions_after_the_nonce_are_ignored(self) -> None:
        self.assertIsInstance(self.first(b"n,,n=alice,r=abc,x=future"), Challenge)

    def test_malformed_client_final(self) -> None:
        for message in (b"", b"c=biws,r=abcS", b"r=abcS,p=AAAA", b"c=biws,r=abcS,p=!!",
                        b"c=biws,r=abcS,p=AAAA", b"c=@@,r=abcS,p=" + b"A" * 44, b"\xff"):
            exchange = self.exchange("SCRAM-SHA-256", "S")
            exchange.step(b"n,,n=alice,r=abc")
            step = exchange.step(message)
            assert isinstance(step, Rejected), message
            self.assertTrue(step.malformed, message)
            self.assertEqual(step.username, "alice")

    def test_answer_to_the_server_signature_must_be_empty(self) -> None:
        client = ScramClient(["SCRAM-SHA-256"], "alice", "correct horse")
        exchange = self.exchange("SCRAM-SHA-256")
        first = exchange.step(client.get_client_first().encode())
        assert isinstance(first, Challenge)
        client.set_server_first(first.data.decode())
        self.assertIsInstance(exchange.step(client.get_client_final().encode()), Challenge)
        step = exchange.step(b"junk")
        assert isinstance(step, Rejected)
        self.assertTrue(step.malformed)

    @settings(max_examples=200)
    @given(st.lists(st.one_of(st.none(), st.binary(max_size=120),
                              st.sampled_from([b"n,,n=alice,r=abc", b"y,,n=nobody,r=x",
                                               b"c=biws,r=abcS,p=" + b"A" * 44, b""])),
                    max_size=5))
    def test_steps_never_raise(self, responses: list[bytes | None]) -> None:
        for mechanism in MECHANISMS:
            exchange = self.exchange(mechanism, "S")
            for response in responses:
                self.assertIsInstance(exchange.step(response),
                                      (Challenge, Credentials, Rejected))


class SecretFieldTests(ScramTestCase):
    def test_field_round_trip_and_repr(self) -> None:
        secret = derive_scram(b"pencil", "sha256", b"salt")
        self.assertEqual(ScramSecret.parse(secret.field(), "sha256"), secret)
        self.assertNotIn(base64.b64encode(secret.stored_key).decode(), repr(secret))
        self.assertNotIn(base64.b64encode(secret.server_key).decode(), repr(secret))

    def test_malformed_fields_are_refused(self) -> None:
        good = derive_scram(b"pencil", "sha256", b"salt").field()
        it, salt, stored, server = good.split(",")
        for bad in ("", good + ",x", f"x,{salt},{stored},{server}", f"0,{salt},{stored},{server}",
                    f"{it},,{stored},{server}", f"{it},{salt},{stored[:-4]},{server}",
                    f"{it},{salt},{stored},!!", f"-1,{salt},{stored},{server}",
                    f"\u0664,{salt},{stored},{server}"):
            self.assertIsNone(ScramSecret.parse(bad, "sha256"), bad)
        self.assertIsNone(ScramSecret.parse(good, "sha1"))  # SHA-256-sized keys


class PortalTests(ScramTestCase):
    """The credentials a SCRAM exchange produces, through the cred portal."""

    def setUp(self) -> None:
        super().setUp()
        self.login = PortalLogin(build_portal(self.users, run_now))

    def test_checker_interface(self) -> None:
        verifyObject(ICredentialsChecker, VerifiedUserChecker(self.users, run_now))

    def test_verified_user_logs_in(self) -> None:
        for mechanism in MECHANISMS:
            step = self.run_scramp(mechanism, "alice", "correct horse")
            assert isinstance(step, Credentials)
            verifyObject(IVerifiedUser, step.credentials)
            self.assertEqual(self.successResultOf(self.login(step.credentials)), "alice")

    def test_a_user_deleted_during_the_exchange_is_refused(self) -> None:
        step = self.run_scramp("SCRAM-SHA-256", "alice", "correct horse")
        assert isinstance(step, Credentials)
        delete_user(self.path, "alice")
        self.failureResultOf(self.login(step.credentials), UnauthorizedLogin)

    def test_only_our_own_users_file_may_vouch(self) -> None:
        elsewhere = UsersFile(self.path)
        self.failureResultOf(self.login(VerifiedUser("alice", "SCRAM-SHA-256", elsewhere)),
                             UnauthorizedLogin)

    def test_plain_can_never_produce_a_verified_user(self) -> None:
        for message in (b"\0alice\0correct horse", b"\0alice\0x", b"alice\0alice\0x"):
            step = PlainMechanism().new().step(message)
            assert isinstance(step, Credentials)
            self.assertFalse(IVerifiedUser.providedBy(step.credentials))
            self.assertIsInstance(step.credentials, UsernamePassword)

    def test_old_users_keep_plain(self) -> None:
        step = PlainMechanism().new().step(b"\0old\0pencil")
        assert isinstance(step, Credentials)
        self.assertEqual(self.successResultOf(self.login(step.credentials)), "old")
