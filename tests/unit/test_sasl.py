"""SASL mechanisms: PLAIN and LOGIN on decoded octets, and the mechanism registry."""
# trial's assertion methods carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smarthost.auth.cred import PortalLogin, build_portal
from smarthost.auth.sasl import (
    MECHANISMS,
    Challenge,
    Credentials,
    ISASLExchange,
    ISASLMechanism,
    LoginMechanism,
    MechanismContext,
    PlainMechanism,
    Rejected,
    Step,
    build_mechanisms,
)
from smarthost.auth.users import UsersFile, set_password

_P = ParamSpec("_P")
_R = TypeVar("_R")


def credentials_of(step: Step) -> tuple[bytes, bytes, str]:
    assert isinstance(step, Credentials), step
    creds = step.credentials
    assert IUsernamePassword.providedBy(creds)
    return creds.username, creds.password, step.username


class InterfaceTests(SynchronousTestCase):
    def test_every_registered_mechanism_provides_the_interfaces(self) -> None:
        for name, factory in MECHANISMS.items():
            mechanism = factory(MechanismContext())
            verifyObject(ISASLMechanism, mechanism)
            verifyObject(ISASLExchange, mechanism.new())
            self.assertEqual(mechanism.name, name)

    def test_credentials_repr_hides_the_password(self) -> None:
        step = PlainMechanism().new().step(b"\0alice\0sekrit")
        self.assertNotIn("sekrit", repr(step))
        self.assertIn("alice", repr(step))


class PlainTests(SynchronousTestCase):
    def test_initial_response(self) -> None:
        step = PlainMechanism().new().step(b"\0alice\0pass word")
        self.assertEqual(credentials_of(step), (b"alice", b"pass word", "alice"))

    def test_without_initial_response_sends_empty_challenge(self) -> None:
        exchange = PlainMechanism().new()
        self.assertEqual(exchange.step(None), Challenge(b""))
        self.assertEqual(credentials_of(exchange.step(b"\0alice\0pw")), (b"alice", b"pw", "alice"))

    def test_authzid_equal_to_authcid_accepted(self) -> None:
        step = PlainMechanism().new().step(b"alice\0alice\0pw")
        self.assertEqual(credentials_of(step), (b"alice", b"pw", "alice"))

    def test_authzid_of_someone_else_refused(self) -> None:
        step = PlainMechanism().new().step(b"bob\0alice\0pw")
        assert isinstance(step, Rejected)
        self.assertFalse(step.malformed)
        self.assertEqual(step.username, "alice")

    def test_utf8_names_and_passwords(self) -> None:
        raw = "jürgen@bücher.test".encode()
        step = PlainMechanism().new().step(b"\0" + raw + b"\0p\xc3\xa4ss")
        self.assertEqual(credentials_of(step), (raw, b"p\xc3\xa4ss", "jürgen@bücher.test"))

    def test_malformed_messages(self) -> None:
        for message in [
            b"",                      # AUTH PLAIN = : an empty initial response
            b"alice",
            b"alice\0pw",
            b"\0alice\0pw\0",
            b"\0\0pw",                # empty user name
            b"\0alice\0",             # empty password
            b"\0al\xffice\0pw",       # bad UTF-8 in each field
            b"\xff\0alice\0pw",
            b"\0alice\0p\xc3",
        ]:
            with self.subTest(message=message):
                step = PlainMechanism().new().step(message)
                assert isinstance(step, Rejected), step
                self.assertTrue(step.malformed)
                self.assertNotIn("pw", step.reason)

    def test_response_after_challenge_may_be_malformed_too(self) -> None:
        exchange = PlainMechanism().new()
        exchange.step(None)
        self.assertIsInstance(exchange.step(b""), Rejected)

    def test_no_steps_after_the_end(self) -> None:
        exchange = PlainMechanism().new()
        exchange.step(b"\0alice\0pw")
        self.assertIsInstance(exchange.step(b"\0alice\0pw"), Rejected)
        self.assertIsInstance(exchange.step(None), Rejected)


class LoginTests(SynchronousTestCase):
    def test_both_challenges(self) -> None:
        exchange = LoginMechanism().new()
        self.assertEqual(exchange.step(None), Challenge(b"Username:"))
        self.assertEqual(exchange.step(b"alice"), Challenge(b"Password:"))
        self.assertEqual(credentials_of(exchange.step(b"pw")), (b"alice", b"pw", "alice"))
        self.assertIsInstance(exchange.step(b"pw"), Rejected)

    def test_initial_response_is_the_user_name(self) -> None:
        exchange = LoginMechanism().new()
        self.assertEqual(exchange.step(b"alice"), Challenge(b"Password:"))
        self.assertEqual(credentials_of(exchange.step(b"pw")), (b"alice", b"pw", "alice"))

    def test_empty_or_bad_user_name(self) -> None:
        for first in [None, b"x"]:
            for name in [b"", b"\xff"]:
                exchange = LoginMechanism().new()
                if first is None:
                    exchange.step(None)
                    step = exchange.step(name)
                else:
                    step = exchange.step(name)  # as the initial response
                with self.subTest(first=first, name=name):
                    assert isinstance(step, Rejected), step
                    self.assertTrue(step.malformed)
                    self.assertIsInstance(exchange.step(b"pw"), Rejected)

    def test_empty_or_bad_password_names_the_user(self) -> None:
        for password in [b"", b"\xc3"]:
            exchange = LoginMechanism().new()
            exchange.step(b"alice")
            step = exchange.step(password)
            with self.subTest(password=password):
                assert isinstance(step, Rejected), step
                self.assertTrue(step.malformed)
                self.assertEqual(step.username, "alice")


class FuzzTests(SynchronousTestCase):
    @given(st.lists(st.one_of(st.none(), st.binary(max_size=64)), max_size=5))
    def test_steps_never_raise(self, responses: list[bytes | None]) -> None:
        for factory in MECHANISMS.values():
            exchange = factory(MechanismContext()).new()
            for response in responses:
                self.assertIsInstance(exchange.step(response), (Challenge, Credentials, Rejected))


class RegistryTests(SynchronousTestCase):
    def test_builds_in_the_order_given(self) -> None:
        names = [m.name for m in build_mechanisms(["LOGIN", "plain"])]
        self.assertEqual(names, ["LOGIN", "PLAIN"])
        self.assertEqual(build_mechanisms([]), [])

    def test_unknown_mechanism_is_named(self) -> None:
        with self.assertRaises(ValueError) as cm:
            build_mechanisms(["PLAIN", "XYZZY"])
        self.assertIn("XYZZY", str(cm.exception))
        self.assertIn("SCRAM-SHA-256", str(cm.exception))  # and what is known

    def test_challenge_response_mechanisms_in_the_order_given(self) -> None:
        names = ["SCRAM-SHA-256", "scram-sha-1", "CRAM-MD5", "PLAIN", "LOGIN"]
        built = build_mechanisms(names, users=UsersFile(os.devnull), hostname="h")
        self.assertEqual([m.name for m in built], [n.upper() for n in names])

    def test_without_users_challenge_response_mechanisms_let_nobody_in(self) -> None:
        # check-config builds mechanisms with no users file.
        [cram] = build_mechanisms(["CRAM-MD5"])
        exchange = cram.new()
        exchange.step(None)
        step = exchange.step(b"alice " + b"0" * 32)
        self.assertEqual(step, Rejected("wrong CRAM-MD5 digest", username="alice"))

    def test_historic_and_unsupported_mechanisms_are_refused_with_a_reason(self) -> None:
        reasons = {
            "DIGEST-MD5": "RFC 6331",
            "NTLM": "SCRAM-SHA-256",
            "OAUTH10A": "OAuth 1.0a",
            "SCRAM-SHA-256-PLUS": "channel binding",
            "digest-md5": "historic",
        }
        for name, why in reasons.items():
            with self.assertRaises(ValueError) as cm:
                build_mechanisms(["PLAIN", name])
            self.assertIn(name, str(cm.exception))
            self.assertIn(why, str(cm.exception))

    def test_check_config_names_the_key_and_the_reason(self) -> None:
        from pathlib import Path

        from smarthost.app.config import ConfigError, parse_config

        def validate(name: str) -> None:
            build_mechanisms([name])  # what check-config and the daemon pass

        config = parse_config('[auth]\nmechanisms = ["SCRAM-SHA-256", "CRAM-MD5"]\n',
                              Path("/"), validate_mechanism=validate)
        self.assertEqual(config.auth.mechanisms, ("SCRAM-SHA-256", "CRAM-MD5"))
        with self.assertRaises(ConfigError) as cm:
            parse_config('[auth]\nmechanisms = ["PLAIN", "DIGEST-MD5"]\n', Path("/"),
                         validate_mechanism=validate)
        self.assertEqual(cm.exception.key, "auth.mechanisms[1]")
        self.assertIn("RFC 6331", str(cm.exception))

    def test_duplicate_mechanism_refused(self) -> None:
        self.assertRaises(ValueError, build_mechanisms, ["PLAIN", "plain"])


class PortalIntegrationTests(SynchronousTestCase):
    """What the session does with a mechanism's credentials."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="smarthost-sasl-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "users")
        set_password(path, "alice", "pw", rounds=4)

        def run_blocking(
            f: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs
        ) -> Deferred[_R]:
            return succeed(f(*args, **kwargs))

        self.login = PortalLogin(build_portal(UsersFile(path), run_blocking))

    def login_with(self, step: Step) -> Deferred[str]:
        assert isinstance(step, Credentials), step
        return self.login(step.credentials)

    def test_plain_and_login_log_in(self) -> None:
        plain = PlainMechanism().new().step(b"\0alice\0pw")
        self.assertEqual(self.successResultOf(self.login_with(plain)), "alice")
        exchange = LoginMechanism().new()
        exchange.step(b"alice")
        self.assertEqual(self.successResultOf(self.login_with(exchange.step(b"pw"))), "alice")

    def test_wrong_password_is_unauthorized(self) -> None:
        plain = PlainMechanism().new().step(b"\0alice\0nope")
        self.failureResultOf(self.login_with(plain), UnauthorizedLogin)
