"""OAUTHBEARER (RFC 7628) and XOAUTH2: message parsing, the token checker, the error-challenge
flow through a real Session on a StringTransport, and the config rule that these mechanisms
need a token verifier plugin."""
# trial's and Twisted's testing helpers carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sasl_session import LineClient
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smarthost.api import Context, ITokenVerifier
from smarthost.app import admin, credfactory
from smarthost.app.config import ConfigError
from smarthost.app.pluginload import build_plugins
from smarthost.auth import oauth, sasl
from smarthost.auth.cred import PortalLogin, build_portal
from smarthost.auth.users import UsersFile, set_password, validate_name
from smarthost.core.enums import Role
from smarthost.core.maillog import MailLog
from smarthost.queue.spool import Spool
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits, LimitSettings
from smarthost.smtpd.policy import RelayPolicy
from smarthost.smtpd.session import Session, SessionSettings

TOKEN = "ya29.a0AfH6SMBx-secret_token~value+/=="
BOB_TOKEN = "bob-token-0123456789"


def run_now(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args, **kwargs)


def oauthbearer(token: str = TOKEN, user: str | None = "alice@example.test") -> bytes:
    authzid = f"a={user}" if user is not None else ""
    pairs = f"host=mx.smarthost.test\x01port=587\x01auth=Bearer {token}\x01"
    return f"n,{authzid},\x01{pairs}\x01".encode()


def xoauth2(token: str = TOKEN, user: str = "alice@example.test") -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


@implementer(ITokenVerifier)
class FakeVerifier:
    """Knows two tokens; ``boom`` raises (with the token in its message, as a careless plugin
    might), ``hang`` never answers."""

    def __init__(self) -> None:
        self.tokens = {TOKEN: "alice@example.test", BOB_TOKEN: "bob@example.test"}
        self.asked: list[str | None] = []

    def verify(self, token: str, user: str | None) -> Deferred[str | None]:
        self.asked.append(user)
        if token == "boom":
            return fail(RuntimeError(f"authorization server down while checking {token}"))
        if token == "hang":
            return Deferred()
        return succeed(self.tokens.get(token))


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every log event as text, tracebacks included."""
    lines: list[str] = []

    def observe(event: Any) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            text += "\n" + failure.getTraceback()
        lines.append(text)

    observer = cast(ILogObserver, observe)  # any callable of one event is one
    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


# -- parsing --------------------------------------------------------------------------------


def test_oauthbearer_with_user() -> None:
    token = oauth.parse_oauthbearer(oauthbearer())
    assert (token.user, token.token, token.mechanism) == (
        "alice@example.test", TOKEN, "OAUTHBEARER")


def test_oauthbearer_without_user_and_without_extra_keys() -> None:
    token = oauth.parse_oauthbearer(b"n,,\x01auth=Bearer abc\x01\x01")
    assert token.user is None and token.token == "abc"


def test_oauthbearer_y_flag_scheme_case_and_escaped_authzid() -> None:
    token = oauth.parse_oauthbearer(b"y,a=we=2Cird=3Dname,\x01auth=bearer  abc\x01\x01")
    assert token.user == "we,ird=name" and token.token == "abc"


@pytest.mark.parametrize("message", [
    b"",
    b"\x01",  # the answer to an error challenge, not a request
    b"n,a=alice\x01auth=Bearer abc\x01\x01",  # GS2 header not terminated by ","
    b"p=tls-unique,,\x01auth=Bearer abc\x01\x01",  # channel binding
    b"x,,\x01auth=Bearer abc\x01\x01",
    b"n,u=alice,\x01auth=Bearer abc\x01\x01",  # authzid must be a=
    b"n,a=,\x01auth=Bearer abc\x01\x01",  # empty authzid
    b"n,a=al=ice,\x01auth=Bearer abc\x01\x01",  # bad saslname escape
    b"n,a=al ice,\x01auth=Bearer abc\x01\x01",  # not a storable user name
    b"n,,\x01\x01",  # no auth=
    b"n,,\x01host=mx\x01\x01",  # no auth=
    b"n,,\x01auth=Basic abc\x01\x01",
    b"n,,\x01auth=Bearer\x01\x01",  # no token
    b"n,,\x01auth=Bearer a b\x01\x01",  # not a b64token
    b"n,,\x01auth=Bearer abc\x01",  # one %x01 missing at the end
    b"n,,auth=Bearer abc\x01\x01",  # no %x01 after the GS2 header
    b"n,,,auth=Bearer abc,,",  # "," as kvsep
    b"n,,\x02auth=Bearer abc\x02\x02",  # wrong kvsep
    b"n,,\x01auth=Bearer abc\x01auth=Bearer def\x01\x01",  # repeated key
    b"n,,\x01auth Bearer abc\x01\x01",  # no "="
    b"n,,\x01host=m\x00x\x01auth=Bearer abc\x01\x01",  # NUL in a value
    b"n,,\x01auth=Bearer \xff\x01\x01",  # not UTF-8
])
def test_oauthbearer_malformed(message: bytes) -> None:
    with pytest.raises(oauth.MessageError) as e:
        oauth.parse_oauthbearer(message)
    assert "abc" not in str(e.value)


def test_xoauth2() -> None:
    token = oauth.parse_xoauth2(xoauth2())
    assert (token.user, token.token, token.mechanism) == (
        "alice@example.test", TOKEN, "XOAUTH2")


@pytest.mark.parametrize("message", [
    b"",
    b"user=alice\x01auth=Bearer abc\x01",  # one %x01 missing
    b"user=alice\x01auth=Bearer abc",
    b"auth=Bearer abc\x01\x01",  # no user
    b"user=alice\x01\x01",  # no auth
    b"user=\x01auth=Bearer abc\x01\x01",  # empty user
    b"user=alice,auth=Bearer abc,,",  # "," as kvsep
    b"n,a=alice,\x01auth=Bearer abc\x01\x01",  # an OAUTHBEARER message
    b"user=alice\x01auth=abc\x01\x01",  # no scheme
])
def test_xoauth2_malformed(message: bytes) -> None:
    with pytest.raises(oauth.MessageError):
        oauth.parse_xoauth2(message)


def test_token_hidden_from_repr() -> None:
    token = oauth.parse_oauthbearer(oauthbearer())
    assert TOKEN not in repr(token) and "alice@example.test" in repr(token)
    [mechanism] = sasl.build_mechanisms(["OAUTHBEARER"])
    step = mechanism.new().step(oauthbearer())
    assert isinstance(step, sasl.Credentials) and TOKEN not in repr(step)


_PIECES = st.sampled_from(["n", "y", "p=x", ",", "a=", "=2C", "=3D", "=", "\x01", "auth",
                           "user", "Bearer ", "bearer", " ", "SECRETTOKEN", "host", "\x00", "é"])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.text(max_size=4)), max_size=14))
def test_fuzz_parsers_refuse_cleanly_and_never_quote_the_token(pieces: list[str]) -> None:
    message = "".join(pieces).encode("utf-8", "surrogatepass")
    for parse in (oauth.parse_oauthbearer, oauth.parse_xoauth2):
        try:
            token = parse(message)
        except oauth.MessageError as e:
            assert "SECRETTOKEN" not in str(e)
        else:
            assert token.token and "SECRETTOKEN" not in repr(token)
            if token.user is not None:
                validate_name(token.user)  # a name the users file could hold


# -- the exchanges --------------------------------------------------------------------------


def test_mechanisms_are_registered_and_verify() -> None:
    mechanisms = sasl.build_mechanisms(["oauthbearer", "XOAUTH2"])
    assert [m.name for m in mechanisms] == ["OAUTHBEARER", "XOAUTH2"]
    for m in mechanisms:
        verifyObject(sasl.ISASLMechanism, m)
        verifyObject(sasl.ISASLExchange, m.new())


@pytest.mark.parametrize(("name", "message", "error"), [
    ("OAUTHBEARER", oauthbearer(), oauth.OAUTHBEARER_ERROR),
    ("XOAUTH2", xoauth2(), oauth.XOAUTH2_ERROR),
])
def test_exchange_initial_response_or_empty_challenge(
    name: str, message: bytes, error: bytes
) -> None:
    [mechanism] = sasl.build_mechanisms([name])
    exchange = mechanism.new()
    step = exchange.step(message)
    assert isinstance(step, sasl.Credentials)
    assert step.username == "alice@example.test" and step.failure_challenge == error
    assert oauth.IBearerToken.providedBy(step.credentials)
    assert isinstance(exchange.step(b"\x01"), sasl.Rejected)  # finished

    exchange = mechanism.new()
    assert exchange.step(None) == sasl.Challenge(b"")
    assert isinstance(exchange.step(message), sasl.Credentials)


def test_exchange_malformed_is_rejected_as_malformed() -> None:
    [mechanism] = sasl.build_mechanisms(["OAUTHBEARER"])
    step = mechanism.new().step(b"n,,\x01auth=Basic abc\x01\x01")
    assert isinstance(step, sasl.Rejected) and step.malformed


def test_error_challenges_are_rfc7628_json() -> None:
    assert json.loads(oauth.OAUTHBEARER_ERROR)["status"] == "invalid_token"
    assert json.loads(oauth.XOAUTH2_ERROR)["status"] == "401"


# -- the checker ----------------------------------------------------------------------------


def check(
    credentials: oauth.BearerToken, verifiers: list[tuple[str, Any]] | None = None,
    clock: Clock | None = None,
) -> Deferred[bytes | tuple[()]]:
    checker = oauth.BearerTokenChecker(
        verifiers if verifiers is not None else [("fake", FakeVerifier())], clock or Clock())
    return checker.requestAvatarId(credentials)


def result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_fake_verifier_provides_the_interface() -> None:
    verifyObject(ITokenVerifier, FakeVerifier())


def test_checker_the_owner_is_the_user() -> None:
    assert result(check(oauth.BearerToken(None, TOKEN, "OAUTHBEARER"))) == b"alice@example.test"
    assert result(check(oauth.BearerToken("alice@example.test", TOKEN, "XOAUTH2"))) == (
        b"alice@example.test")


def test_checker_user_mismatch_is_refused() -> None:
    failure = result(check(oauth.BearerToken("alice@example.test", BOB_TOKEN, "XOAUTH2")))
    assert isinstance(failure, Failure) and failure.check(UnauthorizedLogin)


def test_checker_unknown_token_is_refused_after_asking_every_verifier() -> None:
    first, second = FakeVerifier(), FakeVerifier()
    second.tokens = {"other": "carol@example.test"}
    failure = result(check(oauth.BearerToken("x", "nope", "XOAUTH2"),
                           [("one", first), ("two", second)]))
    assert failure.check(UnauthorizedLogin)
    assert first.asked == second.asked == ["x"]
    assert result(check(oauth.BearerToken(None, "other", "XOAUTH2"),
                        [("one", first), ("two", second)])) == b"carol@example.test"


def test_checker_verifier_exception_is_a_temporary_failure_without_the_token() -> None:
    failure = result(check(oauth.BearerToken(None, "boom", "OAUTHBEARER")))
    assert failure.check(oauth.VerifierFailed) and not failure.check(UnauthorizedLogin)
    assert "boom" not in str(failure.value) and "[token]" in str(failure.value)


def test_checker_gives_up_on_a_verifier_after_its_time_limit() -> None:
    clock = Clock()
    d = check(oauth.BearerToken(None, "hang", "OAUTHBEARER"), clock=clock)
    assert not d.called
    clock.advance(oauth.DEFAULT_TIMEOUT)
    assert result(d).check(oauth.VerifierFailed)


@pytest.mark.parametrize("answer", [b"alice", "", "al\nice", 42])
def test_checker_broken_verifier_answers_are_temporary_failures(answer: object) -> None:
    @implementer(ITokenVerifier)
    class Broken:
        def verify(self, token: str, user: str | None) -> Deferred[Any]:
            return succeed(answer)

    assert result(check(oauth.BearerToken(None, TOKEN, "XOAUTH2"), [("broken", Broken())])
                  ).check(oauth.VerifierFailed)


def test_checker_accepts_coroutine_verifiers() -> None:
    @implementer(ITokenVerifier)
    class Async:
        async def verify(self, token: str, user: str | None) -> str | None:
            return "dave" if token == "t" else None

    assert result(check(oauth.BearerToken(None, "t", "XOAUTH2"), [("a", Async())])) == b"dave"


# -- through a Session -----------------------------------------------------------------------


class Client(LineClient):
    def __init__(self, tmp: Path, verifier: FakeVerifier) -> None:
        set_password(tmp / "users", "carol", "correct horse", rounds=4)
        self.clock = Clock()
        users = UsersFile(tmp / "users")
        spool, _ = Spool.open(tmp / "spool", clock=self.clock, run_blocking=run_now)
        settings = SessionSettings(
            role=Role.SUBMISSION, hostname="mx.smarthost.test", max_size=10000,
            allow_plaintext_auth=True,
            mechanisms=sasl.build_mechanisms(["OAUTHBEARER", "XOAUTH2", "PLAIN"], users=users),
        )
        hooks = Hooks([("fake", verifier)], self.clock)
        portal = credfactory.with_checkers(
            build_portal(users, run_now),
            [oauth.BearerTokenChecker(hooks.verifiers, self.clock)])
        self.session = Session(
            settings, RelayPolicy(frozenset(), (), {}), PortalLogin(portal), spool,
            MailLog(self.clock), self.clock, Limits(self.clock, LimitSettings()), hooks)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 4321))
        self.session.makeConnection(self.transport)
        self.read()
        self.send("EHLO client.test")
        self.ehlo = self.read()



@pytest.fixture
def verifier() -> FakeVerifier:
    return FakeVerifier()


@pytest.fixture
def client(tmp_path: Path, verifier: FakeVerifier) -> Client:
    return Client(tmp_path, verifier)


def test_session_offers_the_mechanisms(client: Client) -> None:
    assert "250-AUTH OAUTHBEARER XOAUTH2 PLAIN" in client.ehlo


@pytest.mark.parametrize(("name", "message"), [
    ("OAUTHBEARER", oauthbearer()), ("OAUTHBEARER", oauthbearer(user=None)),
    ("XOAUTH2", xoauth2()),
])
def test_session_login(client: Client, logged: list[str], name: str, message: bytes) -> None:
    assert client.step(f"AUTH {name} {b64(message)}")[0] == 235
    assert any(f"AUTH ok from 192.0.2.7 user=alice@example.test mechanism={name}" in line
               for line in logged)
    assert client.step("AUTH PLAIN")[0] == 503  # already authenticated


def test_session_login_without_initial_response(client: Client) -> None:
    assert client.step("AUTH XOAUTH2") == (334, b"")
    assert client.step(b64(xoauth2()))[0] == 235


@pytest.mark.parametrize(("name", "message", "status", "answer"), [
    ("OAUTHBEARER", oauthbearer("expired"), "invalid_token", b"\x01"),
    # Alice's token presented as Bob's: refused like an invalid token.
    ("OAUTHBEARER", oauthbearer(TOKEN, user="bob@example.test"), "invalid_token", b"\x01"),
    ("XOAUTH2", xoauth2(BOB_TOKEN), "401", b""),  # XOAUTH2 clients answer empty
])
def test_session_error_challenge_then_535(
    client: Client, logged: list[str], name: str, message: bytes, status: str, answer: bytes
) -> None:
    code, challenge = client.step(f"AUTH {name} {b64(message)}")
    assert code == 334
    assert json.loads(challenge)["status"] == status
    assert client.step(b64(answer) if answer else "")[0] == 535
    assert any("AUTH failed from 192.0.2.7 user=" in line and f"mechanism={name}" in line
               for line in logged)
    # Not logged in; the next AUTH works.
    assert client.step(f"AUTH XOAUTH2 {b64(xoauth2())}")[0] == 235


def test_session_error_challenge_cancelled_is_501(client: Client) -> None:
    assert client.step(f"AUTH OAUTHBEARER {b64(oauthbearer('expired'))}")[0] == 334
    assert client.step("*")[0] == 501


def test_session_error_challenge_answer_is_not_taken_as_a_command(client: Client) -> None:
    # A pipelining client sends the %x01 and the next command together.
    assert client.step(f"AUTH OAUTHBEARER {b64(oauthbearer('expired'))}")[0] == 334
    client.send(b64(b"\x01") + "\r\nNOOP")
    lines = client.read()
    if len(lines) < 2:
        lines += client.read()
    assert [line[:3] for line in lines] == ["535", "250"]


def test_session_verifier_exception_is_454_and_the_token_is_not_logged(
    client: Client, logged: list[str]
) -> None:
    code, _ = client.step(f"AUTH OAUTHBEARER {b64(oauthbearer('boom'))}")
    assert code == 454
    assert logged and not any("boom" in line for line in logged)
    assert any("VerifierFailed" in line for line in logged)


def test_session_verifier_that_hangs_is_454(client: Client) -> None:
    assert client.step(f"AUTH XOAUTH2 {b64(xoauth2('hang'))}")[0] == 454


def test_session_malformed_is_501(client: Client) -> None:
    assert client.step(f"AUTH OAUTHBEARER {b64(b'n,,auth=Bearer x')}")[0] == 501
    assert client.step(f"AUTH XOAUTH2 {b64(b'user=alice')}")[0] == 501


def test_session_tokens_never_logged(client: Client, logged: list[str]) -> None:
    client.step(f"AUTH OAUTHBEARER {b64(oauthbearer())}")
    client.step("RSET")
    assert not any(TOKEN in line or b64(oauthbearer()) in line for line in logged)


# -- the config rule -------------------------------------------------------------------------


def test_require_verifier() -> None:
    oauth.require_verifier(["PLAIN", "XOAUTH2"], [("fake", FakeVerifier())])
    oauth.require_verifier(["PLAIN", "LOGIN"], [])
    with pytest.raises(ConfigError) as e:
        oauth.require_verifier(["PLAIN", "LOGIN", "xoauth2", "OAUTHBEARER"], [("x", object())])
    assert e.value.key == "auth.mechanisms[2]"


def test_check_config_names_the_mechanism(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "smarthost.toml"
    config.write_text('[auth]\nmechanisms = ["PLAIN", "OAUTHBEARER"]\n')
    assert admin.main(["check-config", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "auth.mechanisms[1]" in err and "token verifier" in err


def test_check_config_accepts_the_mechanisms_with_introspection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    config = tmp_path / "smarthost.toml"
    config.write_text(
        '[auth]\nmechanisms = ["XOAUTH2", "OAUTHBEARER", "PLAIN"]\n'
        '[plugins]\nenabled = ["introspection"]\n'
        '[plugins.introspection]\nurl = "https://auth.example.test/introspect"\n'
        'client_id = "smarthost"\nclient_secret_file = "secret"\n')
    assert admin.main(["check-config", "--config", str(config)]) == 0, capsys.readouterr().err


def test_build_plugins_accepts_a_verifier_only_plugin(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret")
    context = Context(Clock(), "mx.test", None, run_now, tmp_path)
    [(name, plugin)] = build_plugins(["introspection"], {"introspection": {
        "url": "https://auth.example.test/introspect", "client_id": "c",
        "client_secret_file": "secret"}}, context)
    assert name == "introspection" and ITokenVerifier.providedBy(plugin)
    assert Hooks([(name, plugin)], Clock()).verifiers == [(name, plugin)]
