"""The ``introspection`` plugin against a local RFC 7662 endpoint: twisted.web over real TLS
on 127.0.0.1, with a certificate from a test CA (smarthost.app.tlscert.issue). Active, inactive,
wrong client secret (401), a server that never answers, an untrusted certificate, settings."""
# trial's and twisted.web's methods carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, quote_plus

from twisted.internet import reactor, ssl, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport, ITransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.tcp import Connection
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from smarthost.api import Context, ITokenVerifier
from smarthost.app import tlscert
from smarthost.plugins.introspection import (
    IntrospectionError,
    IntrospectionPlugin,
    IntrospectionVerifier,
    parse_settings,
)

CLIENT_ID = "smart host"  # a space: RFC 6749 2.3.1 form-encodes it inside Basic
SECRET = "s3:cr+t/ü"
TOKENS: dict[str, dict[str, Any]] = {
    "good-token": {"active": True, "username": "alice@example.test", "sub": "u-1",
                   "email": "alice@mail.example.test", "token_type": "Bearer"},
    "expired-token": {"active": False},
    "client-token": {"active": True, "client_id": "machine"},  # no user in it
    "string-active": {"active": "true", "username": "mallory"},
}


def run_now(f: Any, *args: Any) -> Any:
    return f(*args)


class IntrospectionEndpoint(Resource):
    """POST /introspect as an authorization server answers it (RFC 7662 2)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[dict[str, list[str]], str | None, str | None]] = []
        self.hung: list[Request] = []
        self.arrived: Deferred[None] = Deferred()

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        form = parse_qs(request.content.read().decode(), strict_parsing=True)
        self.requests.append((form, request.getHeader("content-type"),
                              request.getHeader("accept")))
        expected = "Basic " + base64.b64encode(
            f"{quote_plus(CLIENT_ID)}:{quote_plus(SECRET)}".encode()).decode()
        if request.getHeader("authorization") != expected:
            request.setResponseCode(401)
            request.setHeader("www-authenticate", 'Basic realm="introspection"')
            return b'{"error": "invalid_client"}'
        token = form["token"][0]
        if token == "hang":
            self.hung.append(request)
            self.arrived.callback(None)
            return NOT_DONE_YET
        if token == "html":
            return b"<html>oops</html>"
        if token == "redirect":
            request.redirect(b"http://127.0.0.1:9/elsewhere")
            return b""
        request.setHeader("content-type", "application/json")
        return json.dumps(TOKENS.get(token, {"active": False})).encode()


class TrackedSite(Site):
    """Keeps its connections so each test can close them and end with a clean reactor."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.channels: set[HTTPChannel] = set()
        site = self

        class Channel(HTTPChannel):
            def connectionMade(self) -> None:
                super().connectionMade()
                site.channels.add(self)

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                site.channels.discard(self)
                super().connectionLost(reason)

        # HTTPFactory types `protocol` as its own factory function; any channel class works.
        self.protocol = Channel  # type: ignore[method-assign, assignment]


async def until(done: Any, limit: float = 5.0) -> None:
    for _ in range(int(limit / 0.005)):
        if done():
            return
        await task.deferLater(reactor, 0.005, lambda: None)
    raise TimeoutError("still waiting")


def abort(transport: ITransport | None) -> None:
    if transport is not None:
        cast(ITCPTransport, transport).abortConnection()  # TLS over TCP, as listenSSL makes


def open_connections() -> list[Any]:
    return [s for s in [*reactor.getReaders(), *reactor.getWriters()]
            if isinstance(s, Connection)]


class IntrospectionTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        ca = tlscert.issue(("Smarthost Test CA",), is_ca=True)
        server = tlscert.issue(("localhost", "127.0.0.1"), ca=ca)
        (self.dir / "ca.pem").write_bytes(ca.cert_pem)
        (self.dir / "other-ca.pem").write_bytes(
            tlscert.issue(("Another CA",), is_ca=True).cert_pem)
        (self.dir / "secret").write_text(SECRET + "\n")
        (self.dir / "wrong-secret").write_text("guess\n")
        self.endpoint = IntrospectionEndpoint()
        self.site = TrackedSite(self.endpoint)
        options = ssl.PrivateCertificate.loadPEM(server.cert_pem + server.key_pem).options()
        self.port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, self.site, options, interface="127.0.0.1")
        self.url = f"https://127.0.0.1:{self.port.getHost().port}/introspect"
        self.addCleanup(self.close)
        self.warnings: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "smarthost.plugins.introspection":
                self.warnings.append(event["log_format"].format(**event))

        observer = cast(ILogObserver, observe)  # any callable of one event is one
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    async def close(self) -> None:
        stopped = self.port.stopListening()
        if stopped is not None:
            await stopped
        for request in self.endpoint.hung:
            if request.channel is not None:
                abort(request.channel.transport)
        for channel in list(self.site.channels):
            abort(channel.transport)
        await until(lambda: not self.site.channels and not open_connections())

    def verifier(self, clock: Clock | None = None, **settings: Any) -> IntrospectionVerifier:
        settings = {"url": self.url, "client_id": CLIENT_ID, "client_secret_file": "secret",
                    "ca": "ca.pem", **settings}
        if clock is not None:
            return IntrospectionVerifier(parse_settings(settings, self.dir), reactor, clock)
        context = Context(reactor, "mx.smarthost.test", None, run_now, self.dir)
        plugin = IntrospectionPlugin().build(settings, context)
        verifyObject(ITokenVerifier, plugin)
        return plugin

    async def test_active_token_names_the_user(self) -> None:
        self.assertEqual(await self.verifier().verify("good-token", None), "alice@example.test")
        [(form, content_type, accept)] = self.endpoint.requests
        self.assertEqual(form, {"token": ["good-token"], "token_type_hint": ["access_token"]})
        self.assertEqual(content_type, "application/x-www-form-urlencoded")
        self.assertEqual(accept, "application/json")

    async def test_user_claim(self) -> None:
        self.assertEqual(await self.verifier(user_claim="sub").verify("good-token", None), "u-1")
        self.assertEqual(await self.verifier(user_claim="email").verify("good-token", "x"),
                         "alice@mail.example.test")

    async def test_inactive_and_unknown_tokens_are_none(self) -> None:
        verifier = self.verifier()
        self.assertIsNone(await verifier.verify("expired-token", "alice@example.test"))
        self.assertIsNone(await verifier.verify("never-issued", None))
        # Only a JSON true is active.
        self.assertIsNone(await verifier.verify("string-active", None))

    async def test_active_token_without_the_claim_is_refused_with_a_warning(self) -> None:
        self.assertIsNone(await self.verifier().verify("client-token", None))
        self.assertEqual(len(self.warnings), 1)
        self.assertIn("username", self.warnings[0])

    async def test_wrong_client_secret_is_an_error(self) -> None:
        verifier = self.verifier(client_secret_file="wrong-secret")
        with self.assertRaises(IntrospectionError) as e:
            await verifier.verify("good-token", None)
        self.assertIn("HTTP 401", str(e.exception))
        self.assertNotIn("good-token", str(e.exception))
        self.assertNotIn("guess", str(e.exception))

    async def test_not_json_is_an_error(self) -> None:
        with self.assertRaises(IntrospectionError):
            await self.verifier().verify("html", None)

    async def test_redirects_are_not_followed(self) -> None:
        with self.assertRaises(IntrospectionError) as e:
            await self.verifier().verify("redirect", None)
        self.assertIn("HTTP 302", str(e.exception))
        self.assertEqual(len(self.endpoint.requests), 1)

    async def test_no_answer_within_timeout_is_an_error(self) -> None:
        clock = Clock()
        d = Deferred.fromCoroutine(self.verifier(clock, timeout=3).verify("hang", None))
        await self.endpoint.arrived  # the request is at the server, which never answers
        self.assertFalse(d.called)
        clock.advance(3)
        with self.assertRaises(IntrospectionError) as e:
            await d
        self.assertIn("no answer within 3 s", str(e.exception))

    async def test_certificate_from_another_ca_is_refused(self) -> None:
        with self.assertRaises(IntrospectionError):
            await self.verifier(ca="other-ca.pem").verify("good-token", None)
        self.assertEqual(self.endpoint.requests, [])  # the token never left

    async def test_system_trust_does_not_know_the_test_ca(self) -> None:
        settings = {"url": self.url, "client_id": CLIENT_ID, "client_secret_file": "secret"}
        verifier = IntrospectionVerifier(parse_settings(settings, self.dir), reactor)
        with self.assertRaises(IntrospectionError):
            await verifier.verify("good-token", None)
        self.assertEqual(self.endpoint.requests, [])

    async def test_nothing_listening_is_an_error(self) -> None:
        await self.port.stopListening()
        with self.assertRaises(IntrospectionError) as e:
            await self.verifier().verify("good-token", None)
        self.assertIn("ConnectionRefused", str(e.exception))

    def test_repr_hides_the_secret(self) -> None:
        verifier = self.verifier()
        self.assertNotIn(SECRET, repr(verifier))
        self.assertNotIn(SECRET, repr(parse_settings(
            {"url": self.url, "client_id": "c", "client_secret_file": "secret"}, self.dir)))


class SettingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        (self.dir / "secret").write_text("s3cret\n")
        (self.dir / "empty").write_text("\n")
        (self.dir / "ca.pem").write_bytes(tlscert.issue(("CA",), is_ca=True).cert_pem)
        (self.dir / "not-pem").write_text("hello\n")

    def parse(self, **settings: Any) -> Any:
        base = {"url": "https://auth.example.test/introspect", "client_id": "c",
                "client_secret_file": "secret"}
        return parse_settings({**base, **settings}, self.dir)

    def error(self, **settings: Any) -> str:
        with self.assertRaises(ValueError) as e:
            self.parse(**settings)
        return str(e.exception)

    def test_defaults(self) -> None:
        s = self.parse()
        self.assertEqual((s.client_secret, s.user_claim, s.ca, s.timeout),
                         ("s3cret", "username", None, 10.0))
        self.assertEqual(len(self.parse(ca="ca.pem").ca), 1)

    def test_errors_name_the_setting(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"url": "http://auth.example.test/introspect"}, "url:"),
            ({"url": "http://127.0.0.1/introspect"}, "url:"),
            ({"url": "https://user:pw@auth.example.test/"}, "url:"),
            ({"url": "https:///introspect"}, "url:"),
            ({"url": "https://auth.example.test:x/"}, "url:"),
            ({"url": 5}, "url:"),
            ({"client_id": ""}, "client_id:"),
            ({"client_secret_file": "missing"}, "client_secret_file:"),
            ({"client_secret_file": "empty"}, "client_secret_file:"),
            ({"user_claim": "user name"}, "user_claim:"),
            ({"ca": "not-pem"}, "ca:"),
            ({"ca": "missing.pem"}, "ca:"),
            ({"timeout": 0}, "timeout:"),
            ({"timeout": 30}, "timeout:"),
            ({"timeout": True}, "timeout:"),
            ({"scope": "mail"}, "scope:"),
        ]
        for settings, key in cases:
            self.assertTrue(self.error(**settings).startswith(key), (settings, key))

    def test_required(self) -> None:
        for key in ("url", "client_id", "client_secret_file"):
            with self.assertRaises(ValueError) as e:
                parse_settings({k: v for k, v in {
                    "url": "https://a.test/", "client_id": "c",
                    "client_secret_file": "secret"}.items() if k != key}, self.dir)
            self.assertEqual(str(e.exception), f"{key}: required")
