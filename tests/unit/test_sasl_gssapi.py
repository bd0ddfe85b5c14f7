"""AUTH GSSAPI's server side (RFC 4752) against a fake acceptor context: the exchange's
states, the security-layer negotiation, the principal-to-user mapping, the portal's checker,
and the keytab errors. A real KDC and real tickets are in tests/e2e/test_gssapi_e2e.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import attrs
from gssapi.raw.misc import GSSError
from gssapi.raw.named_tuples import UnwrapResult, WrapResult
from twisted.cred.error import UnauthorizedLogin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smarthost.auth.cred import VerifiedPrincipal, VerifiedPrincipalChecker
from smarthost.auth.sasl import ISASLExchange, ISASLMechanism, build_mechanisms
from smarthost.auth.sasl.base import Challenge, Credentials, Rejected
from smarthost.auth.sasl.gssapi import (
    SECURITY_OFFER,
    AcceptContext,
    GssapiMechanism,
    Keytab,
    KeytabError,
    map_principal,
)

SERVICE = "smtp/mx.smarthost.test@EXAMPLE.TEST"


@attrs.define
class FakeContext:
    """Accepts after ``rounds`` tokens; ``b"bad"`` fails as a real acceptor would. Wrapping
    is a visible prefix, so the test can see what went through wrap and unwrap."""

    initiator_name: str = "alice@EXAMPLE.TEST"
    target_name: str = SERVICE
    rounds: int = 1
    last_token: bytes | None = b"mutual"
    complete: bool = False
    seen: list[bytes] = attrs.field(factory=list)

    def step(self, token: bytes) -> bytes | None:
        if token == b"bad":
            raise GSSError(0xD0000, 0)
        self.seen.append(token)
        if len(self.seen) < self.rounds:
            return b"more"
        self.complete = True
        return self.last_token

    def wrap(self, message: bytes, encrypt: bool) -> WrapResult:
        return WrapResult(b"W:" + message, encrypt)

    def unwrap(self, message: bytes) -> UnwrapResult:
        if not message.startswith(b"W:"):
            raise GSSError(0xD0000, 0)
        return UnwrapResult(message[2:], False, 0)


class FakeKeytab:
    def __init__(self, **context: object) -> None:
        self._context = context

    def accept(self) -> AcceptContext:
        return FakeContext(**self._context)  # type: ignore[arg-type]


def run(keytab: FakeKeytab, answer: bytes = b"W:\x01\x00\x00\x00") -> object:
    """A client-first exchange to the end; the last step's answer."""
    exchange = GssapiMechanism(keytab).new()
    step = exchange.step(b"token1")
    while isinstance(step, Challenge) and not step.data.startswith(b"W:"):
        step = exchange.step(b"" if step.data == b"mutual" else b"token")
    if not isinstance(step, Challenge):
        return step
    assert step.data == b"W:" + SECURITY_OFFER
    return exchange.step(answer)


class ExchangeTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        mechanism = GssapiMechanism(FakeKeytab())
        verifyObject(ISASLMechanism, mechanism)
        verifyObject(ISASLExchange, mechanism.new())

    def test_success_hands_the_portal_the_mapped_user(self) -> None:
        keytab = FakeKeytab()
        step = run(keytab)
        assert isinstance(step, Credentials)
        self.assertEqual(step.username, "alice")
        self.assertEqual(step.credentials,
                         VerifiedPrincipal("alice@EXAMPLE.TEST", "alice", keytab))
        self.assertIs(step.credentials.issuer, keytab)  # type: ignore[attr-defined]

    def test_several_context_rounds_and_no_last_token(self) -> None:
        self.assertIsInstance(run(FakeKeytab(rounds=3, last_token=None)), Credentials)

    def test_server_first_asks_for_the_token_with_an_empty_challenge(self) -> None:
        exchange = GssapiMechanism(FakeKeytab(last_token=None)).new()
        self.assertEqual(exchange.step(None), Challenge(b""))
        self.assertEqual(exchange.step(b"t"), Challenge(b"W:" + SECURITY_OFFER))

    def test_authzid_empty_or_the_same_user(self) -> None:
        self.assertIsInstance(run(FakeKeytab(), b"W:\x01\x00\x00\x00alice"), Credentials)
        step = run(FakeKeytab(), b"W:\x01\x00\x00\x00bob")
        assert isinstance(step, Rejected)
        self.assertFalse(step.malformed)  # 535, counted

    def test_a_security_layer_other_than_none_is_refused(self) -> None:
        for answer in (b"W:\x02\x00\x10\x00", b"W:\x07\x00\x00\x00", b"W:\x01", b"W:"):
            step = run(FakeKeytab(), answer)
            assert isinstance(step, Rejected), answer
            self.assertFalse(step.malformed)

    def test_bad_tokens_are_failed_logins_not_exceptions(self) -> None:
        exchange = GssapiMechanism(FakeKeytab()).new()
        step = exchange.step(b"bad")
        assert isinstance(step, Rejected)
        self.assertFalse(step.malformed)
        self.assertIsInstance(run(FakeKeytab(), b"not wrapped"), Rejected)
        self.assertIsInstance(GssapiMechanism(FakeKeytab()).new().step(b""), Rejected)

    def test_other_realm_and_instances_are_refused(self) -> None:
        for principal in ("alice@OTHER.TEST", "alice/admin@EXAMPLE.TEST", "@EXAMPLE.TEST"):
            step = run(FakeKeytab(initiator_name=principal))
            assert isinstance(step, Rejected), principal
            self.assertEqual(step.username, principal)

    def test_finished_exchange_answers_rejected(self) -> None:
        exchange = GssapiMechanism(FakeKeytab(last_token=None)).new()
        exchange.step(b"t")
        self.assertIsInstance(exchange.step(b"W:\x01\x00\x00\x00"), Credentials)
        self.assertIsInstance(exchange.step(b"W:\x01\x00\x00\x00"), Rejected)

    def test_without_a_keytab_nobody_gets_in(self) -> None:
        # check-config builds mechanisms without a keytab.
        [gssapi] = build_mechanisms(["GSSAPI"])
        self.assertEqual(gssapi.name, "GSSAPI")
        self.assertIsInstance(gssapi.new().step(b"token"), Rejected)


class MapPrincipalTests(SynchronousTestCase):
    def test_table(self) -> None:
        table = {
            "alice@EXAMPLE.TEST": "alice",
            "alice@example.test": None,  # realms are case-sensitive
            "alice@OTHER.TEST": None,
            "alice/admin@EXAMPLE.TEST": None,
            "alice": None,
            "@EXAMPLE.TEST": None,
            "al\\@ice@EXAMPLE.TEST": None,
        }
        for principal, user in table.items():
            self.assertEqual(map_principal(principal, SERVICE), user, principal)


class CheckerTests(SynchronousTestCase):
    def test_only_its_own_keytabs_principals(self) -> None:
        mine, other = FakeKeytab(), FakeKeytab()
        checker = VerifiedPrincipalChecker(mine)
        ok = checker.requestAvatarId(VerifiedPrincipal("alice@EXAMPLE.TEST", "alice", mine))
        self.assertEqual(self.successResultOf(ok), b"alice")
        refused = checker.requestAvatarId(
            VerifiedPrincipal("alice@EXAMPLE.TEST", "alice", other))
        self.failureResultOf(refused, UnauthorizedLogin)


class KeytabTests(SynchronousTestCase):
    def test_missing_empty_or_garbage_keytab_is_an_error(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "empty.keytab").write_bytes(b"")
            (root / "garbage.keytab").write_bytes(b"\x05\x02not a keytab")
            for name in ("missing.keytab", "empty.keytab", "garbage.keytab"):
                with self.assertRaises(KeytabError) as cm:
                    Keytab(root / name)
                self.assertIn(name, str(cm.exception))
