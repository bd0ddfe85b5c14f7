"""The ``dnsbl`` plugin against a real DNS server on loopback (tests/dnsserver.py): listed,
not listed, Spamhaus error codes, IPv6, the allow list, outages (fail open), who is checked,
and settings errors."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from dnsserver import DNSTestServer, Zone, close_client_connections, start
from fakes import PluginSession
from smarthost.api import Context, IConnectCheck, ISmarthostPlugin
from smarthost.app.pluginload import PluginError, available_plugins, build_plugins
from smarthost.core.enums import Role
from smarthost.core.envelope import Client
from smarthost.core.replies import Reply
from smarthost.delivery.dns import make_resolver
from smarthost.plugins.dnsbl import DNSBLPlugin, parse_settings, reverse_name
from smarthost.smtpd.hooks import Hooks

LISTED_V4 = "192.0.2.99"  # 99.2.0.192.<zone>
LISTED_V6 = "2001:db8::1"
ZONE: Mapping[str, Any] = {
    # RFC 5782 5: 127.0.0.2 is every list's test entry.
    "99.2.0.192.zen.dnsbl.test": {"A": ["127.0.0.2", "127.0.0.4"]},
    "99.2.0.192.second.dnsbl.test": {"A": ["127.0.0.10"]},
    "98.2.0.192.second.dnsbl.test": {"A": ["127.0.0.11"]},
    # Spamhaus: "your query came through a public resolver" — not a listing.
    "97.2.0.192.zen.dnsbl.test": {"A": ["127.255.255.254"]},
    # Not in 127/8: a wildcarding (expired, parked) list answers such things.
    "96.2.0.192.zen.dnsbl.test": {"A": ["192.0.2.1"]},
    "95.2.0.192.zen.dnsbl.test": "SERVFAIL",
    "94.2.0.192.zen.dnsbl.test": "TIMEOUT",
    "93.2.0.192.zen.dnsbl.test": "REFUSED",
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.dnsbl.test": {
        "A": ["127.0.0.3"]
    },
}


def inbound(address: str, user: str | None = None, role: Role = Role.SMTP) -> Client:
    return Client(address=address, role=role, user=user)


def run_now(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args, **kwargs)


class DNSBLTests(TestCase):
    timeout = 15

    def setUp(self) -> None:
        self.server: DNSTestServer = start(reactor, Zone.from_dict(ZONE))
        self.addCleanup(self.server.stop)
        self.resolver = make_resolver([self.server.nameserver], reactor)
        self.addCleanup(lambda: Deferred.fromCoroutine(
            close_client_connections(reactor, self.resolver)))
        self.context = Context(reactor, "mx.smarthost.test", self.resolver, run_now)
        self.warnings: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "smarthost.plugins.dnsbl":
                self.warnings.append(event["log_format"].format(**event))

        observer = cast(ILogObserver, observe)  # any callable of one event is one
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def build(self, **settings: Any) -> Any:
        settings.setdefault("zones", ["zen.dnsbl.test"])
        check = DNSBLPlugin().build(settings, self.context)
        verifyObject(IConnectCheck, check)
        return check

    async def test_listed_client_refused_naming_the_zone(self) -> None:
        verdict = await self.build().check_connect(inbound(LISTED_V4))
        self.assertIsInstance(verdict, Reply)
        self.assertEqual((verdict.code, verdict.enhanced), (554, "5.7.1"))
        self.assertIn("zen.dnsbl.test", verdict.text)
        self.assertIn(LISTED_V4, verdict.text)
        self.assertIn(("99.2.0.192.zen.dnsbl.test", "A"), self.server.queries)

    async def test_not_listed_nxdomain(self) -> None:
        self.assertIsNone(await self.build().check_connect(inbound("192.0.2.50")))
        self.assertEqual(self.server.queries, [("50.2.0.192.zen.dnsbl.test", "A")])
        self.assertEqual(self.warnings, [])

    async def test_spamhaus_error_code_is_not_a_listing(self) -> None:
        self.assertIsNone(await self.build().check_connect(inbound("192.0.2.97")))
        self.assertEqual(len(self.warnings), 1)
        self.assertIn("127.255.255.254", self.warnings[0])

    async def test_answer_outside_loopback_is_not_a_listing(self) -> None:
        self.assertIsNone(await self.build().check_connect(inbound("192.0.2.96")))

    async def test_ipv6_nibbles(self) -> None:
        verdict = await self.build().check_connect(inbound(LISTED_V6))
        self.assertEqual(verdict.code, 554)
        self.assertIsNone(await self.build().check_connect(inbound("2001:db8::2")))

    async def test_ipv4_mapped_ipv6_is_looked_up_as_ipv4(self) -> None:
        verdict = await self.build().check_connect(inbound(f"::ffff:{LISTED_V4}"))
        self.assertEqual(verdict.code, 554)

    async def test_allow_list_is_never_looked_up(self) -> None:
        check = self.build(allow=["192.0.2.0/25", "2001:db8::/32"])
        self.assertIsNone(await check.check_connect(inbound(LISTED_V4)))
        self.assertIsNone(await check.check_connect(inbound(LISTED_V6)))
        self.assertIsNone(await check.check_connect(inbound(f"::ffff:{LISTED_V4}")))
        self.assertEqual(self.server.queries, [])

    async def test_submission_and_authenticated_clients_never_checked(self) -> None:
        check = self.build()
        for client in (
            inbound(LISTED_V4, role=Role.SUBMISSION),
            inbound(LISTED_V4, role=Role.SUBMISSIONS),
            inbound(LISTED_V4, user="alice"),
            inbound(LISTED_V4, user="alice", role=Role.SUBMISSION),
        ):
            self.assertIsNone(await check.check_connect(client))
        self.assertEqual(self.server.queries, [])

    async def test_outage_fails_open_with_a_warning(self) -> None:
        # SERVFAIL, REFUSED and no answer at all: not listed (like Postfix), and said so.
        check = self.build(timeout=0.5)
        for address in ("192.0.2.95", "192.0.2.93", "192.0.2.94"):
            self.assertIsNone(await check.check_connect(inbound(address)))
        self.assertEqual(len(self.warnings), 3)
        self.assertIn("DNSServerError", self.warnings[0])
        self.assertIn("DNSQueryRefusedError", self.warnings[1])
        self.assertIn("TimeoutError", self.warnings[2])
        self.assertTrue(all("not listed" in w for w in self.warnings))

    async def test_outage_is_not_a_plugin_failure(self) -> None:
        # Through the core's hooks, a timed-out list must not become 451 4.3.0.
        hooks = Hooks([("dnsbl", self.build(timeout=0.5))], reactor, timeout=5)
        self.assertIsNone(await hooks.check_connect(inbound("192.0.2.94")))

    async def test_first_configured_zone_that_lists_names_the_reply(self) -> None:
        check = self.build(zones=["second.dnsbl.test", "zen.dnsbl.test"])
        verdict = await check.check_connect(inbound(LISTED_V4))
        self.assertIn("second.dnsbl.test", verdict.text)
        # Listed in the second zone only: still refused.
        check = self.build(zones=["zen.dnsbl.test", "second.dnsbl.test"])
        verdict = await check.check_connect(inbound("192.0.2.98"))
        self.assertIn("second.dnsbl.test", verdict.text)

    async def test_reply_template(self) -> None:
        check = self.build(reply="550 5.7.1 {address} is listed by {zone} ({result})")
        verdict = await check.check_connect(inbound(LISTED_V4))
        self.assertEqual((verdict.code, verdict.enhanced), (550, "5.7.1"))
        self.assertEqual(verdict.text, f"{LISTED_V4} is listed by zen.dnsbl.test (127.0.0.2)")

    async def test_found_and_built_by_name(self) -> None:
        self.assertIn("dnsbl", available_plugins())
        verifyObject(ISmarthostPlugin, available_plugins()["dnsbl"])
        [(name, check)] = build_plugins(
            ["dnsbl"], {"dnsbl": {"zones": ["zen.dnsbl.test"]}}, self.context
        )
        self.assertEqual(name, "dnsbl")
        hooks = Hooks([(name, check)], reactor)
        refusal = await hooks.check_connect(inbound(LISTED_V4))
        assert refusal is not None
        self.assertEqual(refusal.code, 554)


class SessionTests(TestCase):
    """Through the real session: a listed MX client gets 554 instead of the banner."""

    timeout = 15

    def setUp(self) -> None:
        self.server = start(reactor, Zone.from_dict(ZONE))
        self.addCleanup(self.server.stop)
        resolver = make_resolver([self.server.nameserver], reactor)
        context = Context(reactor, "mx.smarthost.test", resolver, run_now)
        self.plugins = build_plugins(["dnsbl"], {"dnsbl": {"zones": ["zen.dnsbl.test"]}},
                                     context)

    def tmp(self) -> Path:
        # Not self.mktemp(): under pytest that writes into the working directory.
        path = tempfile.mkdtemp(prefix="smarthost-dnsbl-")
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return Path(path)

    async def first_reply(self, session: PluginSession) -> list[str]:
        for _ in range(500):  # the lookup goes over real UDP: let the reactor run
            if session.transport.value():
                return session.replies()
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("no reply")

    async def test_listed_client_gets_554_and_is_disconnected(self) -> None:
        session = PluginSession(self.tmp(), self.plugins, role="smtp",
                                client=LISTED_V4)
        [line] = await self.first_reply(session)
        self.assertTrue(line.startswith("554 5.7.1 "), line)
        self.assertTrue(session.transport.disconnecting)

    async def test_other_client_gets_the_banner(self) -> None:
        session = PluginSession(self.tmp(), self.plugins, role="smtp",
                                client="192.0.2.50")
        [line] = await self.first_reply(session)
        self.assertTrue(line.startswith("220 "), line)
        session.send("QUIT")


class ReverseNameTests(SynchronousTestCase):
    def test_reverse(self) -> None:
        self.assertEqual(reverse_name("192.0.2.99"), "99.2.0.192")
        self.assertEqual(
            reverse_name("2001:db8:1:2::ab"),
            "b.a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2",
        )
        self.assertEqual(reverse_name("::ffff:192.0.2.1"), "1.2.0.192")
        self.assertIsNone(reverse_name(""))
        self.assertIsNone(reverse_name("/run/socket"))


class SettingsTests(SynchronousTestCase):
    BAD: tuple[tuple[dict[str, Any], str], ...] = (
        ({}, "zones"),
        ({"zones": []}, "zones"),
        ({"zones": "zen.spamhaus.org"}, "zones"),
        ({"zones": [42]}, "zones[0]"),
        ({"zones": ["zen.spamhaus.org", "no spaces.test"]}, "zones[1]"),
        ({"zones": ["localhost"]}, "zones[0]"),
        ({"zones": ["z.test"], "reply": 554}, "reply"),
        ({"zones": ["z.test"], "reply": "250 2.0.0 fine"}, "reply"),
        ({"zones": ["z.test"], "reply": "554 4.7.1 mismatched classes"}, "reply"),
        ({"zones": ["z.test"], "reply": "554 5.7.1 {nope}"}, "reply"),
        ({"zones": ["z.test"], "reply": "554 5.7.1 {zone"}, "reply"),
        ({"zones": ["z.test"], "reply": "554 5.7.1 a\r\n250 b"}, "reply"),
        ({"zones": ["z.test"], "allow": ["10.0.0.0/33"]}, "allow[0]"),
        ({"zones": ["z.test"], "allow": "10.0.0.0/8"}, "allow"),
        ({"zones": ["z.test"], "timeout": 0}, "timeout"),
        ({"zones": ["z.test"], "timeout": 30}, "timeout"),
        ({"zones": ["z.test"], "timeout": True}, "timeout"),
        ({"zones": ["z.test"], "zone": ["typo.test"]}, "zone"),
    )

    def test_errors_name_the_setting(self) -> None:
        for settings, key in self.BAD:
            with self.subTest(settings=settings):
                with self.assertRaises(ValueError) as caught:
                    parse_settings(settings)
                self.assertTrue(str(caught.exception).startswith(f"{key}:"),
                                str(caught.exception))

    def test_defaults(self) -> None:
        parsed = parse_settings({"zones": ["Zen.Spamhaus.org."]})
        self.assertEqual(parsed.zones, ("zen.spamhaus.org",))
        self.assertEqual(parsed.allow, ())
        self.assertEqual(parsed.timeout, 5.0)

    def test_build_plugins_names_the_table(self) -> None:
        context = Context(Clock(), "mx.test", object(), run_now)
        with self.assertRaises(PluginError) as caught:
            build_plugins(["dnsbl"], {"dnsbl": {"zones": ["bad zone"]}}, context)
        self.assertEqual(caught.exception.key, "plugins.dnsbl")
        self.assertIn("zones[0]", str(caught.exception))
