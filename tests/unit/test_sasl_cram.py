"""CRAM-MD5 (RFC 2195) without the password: the resumable MD5 (RFC 1321), the HMAC states
stored in the users file, and the server exchange, checked against the RFC example, hmac,
and smtplib's client."""
# trial's assertion methods carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import hashlib
import hmac
import os
import re
import shutil
import smtplib
import tempfile

import bcrypt
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smarthost.auth.cred import VerifiedUser
from smarthost.auth.derived import CramMD5Secret
from smarthost.auth.md5state import MD5_IV, md5_compress, md5_resume
from smarthost.auth.sasl import (
    Challenge,
    CramMD5Mechanism,
    Credentials,
    ISASLExchange,
    ISASLMechanism,
    Rejected,
)
from smarthost.auth.sasl.cram import CramMD5Exchange
from smarthost.auth.users import UsersFile, parse_users, set_password

# RFC 2195 2, the worked example.
RFC_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC_RESPONSE = b"tim b913a602c7eda7a495b4e6e7334d3890"
RFC_PASSWORD = b"tanstaaftanstaaf"


class MD5Tests(SynchronousTestCase):
    def test_rfc_1321_test_suite(self) -> None:
        suite = {
            b"": "d41d8cd98f00b204e9800998ecf8427e",
            b"a": "0cc175b9c0f1b6a831c399e269772661",
            b"abc": "900150983cd24fb0d6963f7d28e17f72",
            b"message digest": "f96b697d7cb7938d525a2f31aaf161d0",
            b"abcdefghijklmnopqrstuvwxyz": "c3fcd3d76192e4007dfb496cca67e13b",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789":
                "d174ab98d277d9f5a5611c2c9f419d9f",
            b"1234567890" * 8: "57edf4a22be3c955ac49da2e2107b67a",
        }
        for message, digest in suite.items():
            self.assertEqual(md5_resume(MD5_IV, 0, message).hex(), digest)

    @given(st.binary(max_size=300))
    def test_matches_hashlib(self, message: bytes) -> None:
        self.assertEqual(md5_resume(MD5_IV, 0, message), hashlib.md5(message).digest())

    @given(st.binary(min_size=64, max_size=64), st.binary(max_size=200))
    def test_resumes_after_a_block(self, block: bytes, rest: bytes) -> None:
        state = md5_compress(MD5_IV, block)
        self.assertEqual(md5_resume(state, 64, rest), hashlib.md5(block + rest).digest())

    def test_resumes_only_at_block_boundaries(self) -> None:
        self.assertRaises(ValueError, md5_resume, MD5_IV, 63, b"")


class HMACStateTests(SynchronousTestCase):
    def test_rfc_2195_example(self) -> None:
        secret = CramMD5Secret.derive(RFC_PASSWORD)
        self.assertEqual(b"tim " + secret.hmac(RFC_CHALLENGE).hex().encode(), RFC_RESPONSE)

    @given(st.binary(max_size=100), st.binary(max_size=200))
    def test_matches_hmac_module(self, key: bytes, message: bytes) -> None:
        # Keys over 64 octets are hashed first (RFC 2104 2); max_size covers both sides.
        self.assertEqual(CramMD5Secret.derive(key).hmac(message),
                         hmac.new(key, message, "md5").digest())

    def test_field_round_trips_in_dovecot_order(self) -> None:
        secret = CramMD5Secret.derive(RFC_PASSWORD)
        field = secret.field()
        self.assertRegex(field, r"\A[0-9a-f]{64}\Z")
        # Dovecot's hmac_md5_get_cram_context writes the outer state, then the inner one.
        self.assertEqual(field, (secret.outer + secret.inner).hex())
        self.assertEqual(CramMD5Secret.parse(field), secret)
        for bad in ("", "zz" * 32, field[:-1], field + "00"):
            self.assertIsNone(CramMD5Secret.parse(bad))

    def test_repr_shows_no_state(self) -> None:
        secret = CramMD5Secret.derive(RFC_PASSWORD)
        self.assertNotIn(secret.inner.hex()[:8], repr(secret))
        self.assertNotIn(secret.field()[:8], repr(secret))


class FixedChallenge(CramMD5Mechanism):
    """The mechanism with RFC 2195's challenge instead of a fresh one."""

    def new(self) -> ISASLExchange:
        return CramMD5Exchange(self._users, RFC_CHALLENGE)


class ExchangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="smarthost-cram-")
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "users")
        set_password(self.path, "tim", RFC_PASSWORD, rounds=4)
        self.users = UsersFile(self.path)
        self.clock = Clock()
        self.clock.advance(697170952)

    def mechanism(self) -> CramMD5Mechanism:
        return CramMD5Mechanism(self.users, "mx.smarthost.test", self.clock)

    def test_interfaces(self) -> None:
        verifyObject(ISASLMechanism, self.mechanism())
        verifyObject(ISASLExchange, self.mechanism().new())

    def test_rfc_2195_example(self) -> None:
        exchange = FixedChallenge(self.users, "postoffice.reston.mci.net").new()
        self.assertEqual(exchange.step(None), Challenge(RFC_CHALLENGE))
        step = exchange.step(RFC_RESPONSE)
        assert isinstance(step, Credentials), step
        self.assertEqual(step.username, "tim")
        self.assertEqual(step.credentials, VerifiedUser("tim", "CRAM-MD5", self.users))
        self.assertIs(step.credentials.issuer, self.users)  # type: ignore[attr-defined]
        self.assertIsInstance(exchange.step(b""), Rejected)  # finished

    def test_challenge_is_random_timestamp_at_hostname_and_fresh(self) -> None:
        first = self.mechanism().new().step(None)
        second = self.mechanism().new().step(None)
        assert isinstance(first, Challenge) and isinstance(second, Challenge)
        self.assertRegex(first.data, rb"\A<\d+\.697170952@mx\.smarthost\.test>\Z")
        self.assertNotEqual(first.data, second.data)

    def test_smtplib_client(self) -> None:
        exchange = self.mechanism().new()
        challenge = exchange.step(None)
        assert isinstance(challenge, Challenge)
        client = smtplib.SMTP()
        client.user, client.password = "tim", RFC_PASSWORD.decode()
        answer = client.auth_cram_md5(challenge.data)
        step = exchange.step(answer.encode("ascii"))
        assert isinstance(step, Credentials), step
        self.assertEqual(step.username, "tim")

    def test_uppercase_hex_is_accepted(self) -> None:
        exchange = FixedChallenge(self.users, "x").new()
        exchange.step(None)
        self.assertIsInstance(exchange.step(RFC_RESPONSE.upper().replace(b"TIM", b"tim")),
                              Credentials)

    def test_wrong_password_names_the_user(self) -> None:
        exchange = FixedChallenge(self.users, "x").new()
        exchange.step(None)
        wrong = CramMD5Secret.derive(b"guess").hmac(RFC_CHALLENGE).hex().encode()
        step = exchange.step(b"tim " + wrong)
        self.assertEqual(step, Rejected("wrong CRAM-MD5 digest", username="tim"))

    def test_unknown_users_fail_like_a_wrong_digest_and_bcrypt_only_ones_have_no_secret(
        self,
    ) -> None:
        """Issue 11, finding 7: an htpasswd -B user tried with CRAM-MD5 is no guess."""
        with open(self.path, "ab") as f:
            f.write(b"old:" + bcrypt.hashpw(RFC_PASSWORD, bcrypt.gensalt(4)) + b"\n")
        digest = CramMD5Secret.derive(RFC_PASSWORD).hmac(RFC_CHALLENGE).hex().encode()
        expected = {
            b"nobody": Rejected("wrong CRAM-MD5 digest", username="nobody"),
            b"old": Rejected("no CRAM-MD5 secret for this user", username="old",
                             no_secret=True),
        }
        for name, rejected in expected.items():
            exchange = FixedChallenge(self.users, "x").new()
            exchange.step(None)
            self.assertEqual(exchange.step(name + b" " + digest), rejected)

    def test_a_decoy_never_passes_even_when_its_digest_is_sent(self) -> None:
        secret = self.users.cram_md5("nobody")
        self.assertFalse(secret.known)
        self.assertEqual(secret, self.users.cram_md5("nobody"))  # stable per name
        exchange = FixedChallenge(self.users, "x").new()
        exchange.step(None)
        digest = secret.value.hmac(RFC_CHALLENGE).hex().encode()
        self.assertIsInstance(exchange.step(b"nobody " + digest), Rejected)

    def test_names_with_spaces(self) -> None:
        set_password(self.path, "tim@example.test", RFC_PASSWORD, rounds=4)
        exchange = FixedChallenge(self.users, "x").new()
        exchange.step(None)
        digest = CramMD5Secret.derive(RFC_PASSWORD).hmac(RFC_CHALLENGE).hex().encode()
        step = exchange.step(b"a b " + digest)
        self.assertEqual(step, Rejected("wrong CRAM-MD5 digest", username="a b"))

    def test_initial_response_is_refused(self) -> None:
        for initial in (b"", RFC_RESPONSE):
            step = self.mechanism().new().step(initial)
            assert isinstance(step, Rejected)
            self.assertTrue(step.malformed)

    def test_malformed_responses(self) -> None:
        for response in (b"", b"tim", b"tim ", b" b913a602c7eda7a495b4e6e7334d3890",
                         b"tim b913a602c7eda7a495b4e6e7334d389", b"tim \xff" * 3,
                         b"\xfftim b913a602c7eda7a495b4e6e7334d3890",
                         b"tim b913a602c7eda7a495b4e6e7334d3890 ", b"tim " + b"g" * 32):
            exchange = self.mechanism().new()
            exchange.step(None)
            step = exchange.step(response)
            assert isinstance(step, Rejected), response
            self.assertTrue(step.malformed, response)

    @given(st.lists(st.one_of(st.none(), st.binary(max_size=80)), max_size=4))
    def test_steps_never_raise(self, responses: list[bytes | None]) -> None:
        exchange = self.mechanism().new()
        for response in responses:
            self.assertIsInstance(exchange.step(response), (Challenge, Credentials, Rejected))


class UsersFileTests(SynchronousTestCase):
    def test_stored_field_is_the_hmac_states_never_the_password(self) -> None:
        directory = tempfile.mkdtemp(prefix="smarthost-cram-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "users")
        set_password(path, "tim", RFC_PASSWORD, rounds=4)
        with open(path, "rb") as f:
            data = f.read()
        self.assertNotIn(RFC_PASSWORD, data)
        [field] = re.findall(rb"cram-md5=([0-9a-f]+)", data)
        self.assertEqual(field.decode(), CramMD5Secret.derive(RFC_PASSWORD).field())
        self.assertEqual(parse_users(data).users["tim"].cram_md5,
                         CramMD5Secret.derive(RFC_PASSWORD))
