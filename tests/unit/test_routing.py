"""Next-hop resolution against a real DNS server on loopback: MX order, implicit MX, null MX,
DNS failures, static routes, the local target, and the unreachable-host cache."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from random import Random
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dnsserver import DNSTestServer, Zone, close_client_connections, start
from smarthost.delivery.dns import _DefaultTimeout, make_resolver, parse_nameserver
from smarthost.delivery.routing import (
    MAILDIR,
    SMTP,
    Credentials,
    Host,
    NextHopResolver,
    PermanentRouteError,
    Route,
    RouteError,
    Target,
    TemporaryRouteError,
    parse_target,
)

ZONE: Mapping[str, Any] = {
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.11"]},
    "mx2.example.test": {"A": ["127.0.0.12"], "AAAA": ["::1"]},
    "equal.test": {"MX": [(10, "a.equal.test"), (10, "b.equal.test")]},
    "a.equal.test": {"A": ["127.0.0.21"]},
    "b.equal.test": {"A": ["127.0.0.22"]},
    "implicit4.test": {"A": ["127.0.0.31"]},
    "implicit6.test": {"AAAA": ["::1"]},
    "nodata.test": {"TXT": ["no mail here"]},
    "unusable.test": {"A": ["0.0.0.0"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": "SERVFAIL",
    "refused.test": "REFUSED",
    "slow.test": "TIMEOUT",
    "dangling.test": {"MX": [(10, "nowhere.test")]},
    "ipmx.test": {"MX": [(10, "127.0.0.1")]},
    "halfbroken.test": {"MX": [(10, "sf.halfbroken.test"), (20, "mx1.example.test")]},
    "sf.halfbroken.test": "SERVFAIL",
    "mxservfail.test": {"MX": [(10, "sf.halfbroken.test")]},
    "mixednull.test": {"MX": [(0, "."), (10, "mx1.example.test")]},
    "alias.test": {"MX": [(10, "mxalias.test")]},
    "mxalias.test": {"CNAME": ["mx1.example.test"]},
    "v6slow.test": {"MX": [(10, "v6slow-mx.test")]},
    "v6slow-mx.test": {"A": ["127.0.0.51"], "AAAA": "TIMEOUT"},
    "big.test": {"A": [f"127.0.1.{i}" for i in range(1, 41)]},  # > 512 octets: TCP retry
    "relay.test": {"A": ["127.0.0.41"]},
}

CREDENTIALS = Credentials("office@example.test", "s3cret")
SHORT = (0.2, 0.3)  # DNS timeouts for tests that wait for one


class ResolverTestCase(TestCase):
    timeout = 15  # trial's per-test bound

    def setUp(self) -> None:
        self.server: DNSTestServer = start(reactor, Zone.from_dict(ZONE))
        self.addCleanup(self.server.stop)
        self.dns = make_resolver([self.server.nameserver], reactor, timeout=SHORT)
        self.clock = Clock()

    def resolver(self, **kwargs: Any) -> NextHopResolver:
        options: dict[str, Any] = {
            "clock": self.clock,
            "local_domains": frozenset({"example.org"}),
            "local": "maildir:/srv/maildir",
            "routes": {},
            "port": 25,
            "tls": "opportunistic",
            "credentials": CREDENTIALS,
            "random": Random(1),
        }
        options.update(kwargs)
        return NextHopResolver(self.dns, **options)

    async def route(self, domain: str, **kwargs: Any) -> Route:
        return await self.resolver(**kwargs).resolve(domain)

    async def route_error(self, domain: str, **kwargs: Any) -> RouteError:
        try:
            await self.route(domain, **kwargs)
        except RouteError as e:
            return e
        raise AssertionError(f"{domain} resolved")

    def addresses(self, route: Route) -> list[str]:
        return [h.address for h in route.hosts]


class MXTests(ResolverTestCase):
    async def test_mx_hosts_in_preference_order_ipv4_first(self) -> None:
        route = await self.route("example.test")
        self.assertEqual(
            route.hosts,
            (
                Host("mx1.example.test", "127.0.0.11", 25),
                Host("mx2.example.test", "127.0.0.12", 25),
                Host("mx2.example.test", "::1", 25),
            ),
        )
        self.assertEqual(
            (route.kind, route.tls, route.implicit_tls), (SMTP, "opportunistic", False)
        )

    async def test_mx_routes_never_carry_credentials(self) -> None:
        route = await self.route("example.test", credentials=CREDENTIALS, tls="verify")
        self.assertIsNone(route.credentials)
        self.assertEqual(route.tls, "verify")
        implicit = await self.route("implicit4.test", credentials=CREDENTIALS)
        self.assertIsNone(implicit.credentials)

    async def test_mx_hosts_use_the_configured_port(self) -> None:
        route = await self.route("example.test", port=2525)
        self.assertEqual({h.port for h in route.hosts}, {2525})

    async def test_domain_matching_ignores_case_and_trailing_dot(self) -> None:
        route = await self.route("EXAMPLE.Test.")
        self.assertEqual(self.addresses(route)[0], "127.0.0.11")

    async def test_equal_preferences_shuffled_deterministically(self) -> None:
        orders = set()
        for seed in range(20):
            first = await self.route("equal.test", random=Random(seed))
            again = await self.route("equal.test", random=Random(seed))
            self.assertEqual(first, again)
            orders.add(tuple(self.addresses(first)))
        self.assertEqual(orders, {("127.0.0.21", "127.0.0.22"), ("127.0.0.22", "127.0.0.21")})

    async def test_implicit_mx_a(self) -> None:
        route = await self.route("implicit4.test")
        self.assertEqual(route.hosts, (Host("implicit4.test", "127.0.0.31", 25),))

    async def test_implicit_mx_aaaa(self) -> None:
        route = await self.route("implicit6.test")
        self.assertEqual(route.hosts, (Host("implicit6.test", "::1", 25),))

    async def test_mx_target_through_cname(self) -> None:
        route = await self.route("alias.test")
        self.assertEqual(route.hosts, (Host("mxalias.test", "127.0.0.11", 25),))

    async def test_null_mx_is_permanent(self) -> None:
        e = await self.route_error("nullmx.test")
        self.assertIsInstance(e, PermanentRouteError)
        self.assertEqual(e.status, "5.1.10")

    async def test_null_mx_among_real_mx_is_ignored(self) -> None:
        route = await self.route("mixednull.test")
        self.assertEqual(self.addresses(route), ["127.0.0.11"])

    async def test_nxdomain_is_permanent(self) -> None:
        e = await self.route_error("no-such-domain.test")
        self.assertIsInstance(e, PermanentRouteError)
        self.assertEqual(e.status, "5.1.2")

    async def test_no_mx_and_no_address_is_permanent(self) -> None:
        e = await self.route_error("nodata.test")
        self.assertIsInstance(e, PermanentRouteError)
        self.assertEqual(e.status, "5.4.4")

    async def test_unusable_address_is_not_a_next_hop(self) -> None:
        e = await self.route_error("unusable.test")
        self.assertIsInstance(e, PermanentRouteError)

    async def test_international_domain_is_looked_up_as_a_labels(self) -> None:
        e = await self.route_error("bücher.test")
        self.assertIsInstance(e, PermanentRouteError)
        self.assertIn(("xn--bcher-kva.test", "MX"), self.server.queries)

    async def test_domain_without_dns_form_is_permanent(self) -> None:
        e = await self.route_error("a" * 64 + ".test")
        self.assertIsInstance(e, PermanentRouteError)
        self.assertEqual(self.server.queries, [])

    async def test_servfail_is_temporary(self) -> None:
        e = await self.route_error("broken.test")
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.3")
        self.assertIn("SERVFAIL", e.reply)

    async def test_refused_is_temporary(self) -> None:
        e = await self.route_error("refused.test")
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.3")

    async def test_timeout_is_temporary(self) -> None:
        e = await self.route_error("slow.test")
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.3")
        self.assertIn("timeout", e.reply)
        # The client retransmitted once per timeout step before giving up.
        self.assertEqual(self.server.queries.count(("slow.test", "MX")), len(SHORT))

    async def test_mx_hosts_without_address_defer(self) -> None:
        e = await self.route_error("dangling.test")
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.4")

    async def test_mx_host_lookup_failure_defers(self) -> None:
        e = await self.route_error("mxservfail.test")
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.3")

    async def test_ip_address_as_mx_exchange_is_refused(self) -> None:
        e = await self.route_error("ipmx.test")
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertNotIn(("127.0.0.1", "A"), self.server.queries)

    async def test_failing_mx_host_is_skipped_when_another_works(self) -> None:
        route = await self.route("halfbroken.test")
        self.assertEqual(route.hosts, (Host("mx1.example.test", "127.0.0.11", 25),))

    async def test_one_address_family_timing_out_is_not_fatal(self) -> None:
        route = await self.route("v6slow.test")
        self.assertEqual(self.addresses(route), ["127.0.0.51"])

    async def test_large_answer_is_retried_over_tcp(self) -> None:
        self.addCleanup(close_client_connections, reactor, self.dns)
        route = await self.route("big.test")
        self.assertEqual(len(route.hosts), 40)
        self.assertEqual(self.server.queries.count(("big.test", "A")), 2)  # UDP, then TCP


class StaticRouteTests(ResolverTestCase):
    async def test_local_domain_goes_to_maildir_without_dns(self) -> None:
        route = await self.route("Example.ORG.")
        self.assertEqual(route, Route(MAILDIR, maildir="/srv/maildir"))
        self.assertEqual(self.server.queries, [])

    async def test_local_smtp_target(self) -> None:
        route = await self.route("example.org", local="smtp:[::1]:2526")
        self.assertEqual(route.hosts, (Host("::1", "::1", 2526),))
        self.assertIsNone(route.credentials)  # an internal store, not the upstream
        self.assertEqual(self.server.queries, [])

    async def test_local_domain_wins_over_routes(self) -> None:
        route = await self.route("example.org", routes={"*": "smtp:127.0.0.9:25"})
        self.assertEqual(route.kind, MAILDIR)

    async def test_exact_route_with_credentials_requires_tls(self) -> None:
        routes = {"Partner.Test": "smtp:127.0.0.5:587", "*": "smtp:relay.test:465"}
        route = await self.route("partner.test.", routes=routes)
        self.assertEqual(route.hosts, (Host("127.0.0.5", "127.0.0.5", 587),))
        self.assertEqual(route.credentials, CREDENTIALS)
        self.assertEqual((route.tls, route.implicit_tls), ("required", False))
        self.assertEqual(self.server.queries, [])  # an IP address needs no lookup

    async def test_star_route_on_465_is_implicit_tls(self) -> None:
        routes = {"partner.test": "smtp:127.0.0.5:587", "*": "smtp:relay.test:465"}
        route = await self.route("example.test", routes=routes)
        self.assertEqual(route.hosts, (Host("relay.test", "127.0.0.41", 465),))
        self.assertEqual(route.credentials, CREDENTIALS)
        self.assertTrue(route.implicit_tls)
        self.assertNotIn(("example.test", "MX"), self.server.queries)

    async def test_route_without_credentials_keeps_tls_policy(self) -> None:
        route = await self.route(
            "x.test", routes={"*": "smtp:127.0.0.5:25"}, credentials=None
        )
        self.assertEqual((route.tls, route.credentials), ("opportunistic", None))

    async def test_unresolvable_route_host_defers_never_bounces(self) -> None:
        e = await self.route_error("x.test", routes={"*": "smtp:missing.test:25"})
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.4")
        e = await self.route_error("x.test", routes={"*": "smtp:broken.test:25"})
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.3")

    async def test_address_literal_routes_to_the_address(self) -> None:
        route = await self.route("[127.0.0.1]")
        self.assertEqual(route.hosts, (Host("127.0.0.1", "127.0.0.1", 25),))
        self.assertIsNone(route.credentials)
        route = await self.route("[IPv6:::1]")
        self.assertEqual(route.hosts, (Host("::1", "::1", 25),))
        self.assertEqual(self.server.queries, [])

    async def test_address_literals_can_be_refused(self) -> None:
        e = await self.route_error("[127.0.0.1]", address_literals=False)
        self.assertIsInstance(e, PermanentRouteError)
        e = await self.route_error("[0.0.0.0]")
        self.assertIsInstance(e, PermanentRouteError)


class UnreachableCacheTests(ResolverTestCase):
    async def test_unreachable_hosts_move_to_the_end_then_return(self) -> None:
        resolver = self.resolver()
        first = await resolver.resolve("example.test")
        resolver.mark_unreachable(first.hosts[0], now=self.clock.seconds())
        self.assertTrue(resolver.is_unreachable(first.hosts[0]))
        moved = await resolver.resolve("example.test")
        self.assertEqual(moved.hosts, (*first.hosts[1:], first.hosts[0]))
        self.clock.advance(59)
        still = await resolver.resolve("example.test")
        self.assertEqual(still.hosts, moved.hosts)
        self.clock.advance(1)
        back = await resolver.resolve("example.test")
        self.assertEqual(back.hosts, first.hosts)
        self.assertFalse(resolver.is_unreachable(first.hosts[0]))

    async def test_all_unreachable_keeps_order_and_drops_nothing(self) -> None:
        resolver = self.resolver(unreachable_for=10)
        first = await resolver.resolve("example.test")
        for host in first.hosts:
            resolver.mark_unreachable(host)
        again = await resolver.resolve("example.test")
        self.assertEqual(again.hosts, first.hosts)


class ResolverSetupTests(TestCase):
    timeout = 15

    async def test_nameservers_replace_the_system_resolver(self) -> None:
        # createResolver(servers=...) would answer "localhost" from /etc/hosts.
        server = start(reactor, Zone())
        self.addCleanup(server.stop)
        resolver = NextHopResolver(
            make_resolver([server.nameserver], reactor, timeout=SHORT), clock=Clock()
        )
        with self.assertRaises(PermanentRouteError):
            await resolver.resolve("localhost")
        self.assertIn(("localhost", "MX"), server.queries)

    async def test_ipv6_nameserver(self) -> None:
        server = start(reactor, Zone.from_dict(ZONE), host="::1")
        self.addCleanup(server.stop)
        self.assertEqual(server.nameserver, f"[::1]:{server.port}")
        resolver = NextHopResolver(
            make_resolver([server.nameserver], reactor, timeout=SHORT), clock=Clock()
        )
        route = await resolver.resolve("implicit4.test")
        self.assertEqual(route.hosts[0].address, "127.0.0.31")

    async def test_dnsserver_runs_as_a_subprocess(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".zone", delete=False) as f:
            f.write("# test zone\nsub.test MX 10 mx.sub.test\nmx.sub.test A 127.0.0.61\n")
            f.write("gone.test MX 0 .\n")
        self.addCleanup(os.unlink, f.name)
        script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "dnsserver.py")
        proc = subprocess.Popen(
            [sys.executable, script, "--zone", f.name],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.addCleanup(proc.wait, 5)
        self.addCleanup(proc.terminate)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            self.assertTrue(sel.select(timeout=10), "dnsserver.py printed no port")
        port = int(proc.stdout.readline())
        resolver = NextHopResolver(
            make_resolver([f"127.0.0.1:{port}"], reactor, timeout=(1, 2)), clock=Clock()
        )
        route = await resolver.resolve("sub.test")
        self.assertEqual(route.hosts, (Host("mx.sub.test", "127.0.0.61", 25),))
        with self.assertRaises(PermanentRouteError):
            await resolver.resolve("gone.test")


class DefaultTimeoutTests(SynchronousTestCase):
    def test_system_resolver_gets_our_timeouts(self) -> None:
        asked: list[tuple[bytes, int, Any]] = []

        class Inner:
            def query(self, query: dns.Query, timeout: Any) -> Deferred[Any]:
                asked.append((query.name.name, query.type, timeout))
                return succeed(([], [], []))

        wrapped = _DefaultTimeout(Inner(), (1, 2))  # type: ignore[arg-type]
        wrapped.lookupMailExchange("example.test")
        wrapped.lookupAddress("example.test", (7,))
        self.assertEqual(
            asked, [(b"example.test", dns.MX, (1, 2)), (b"example.test", dns.A, (7,))]
        )


class ConstructorTests(SynchronousTestCase):
    def test_bad_values_are_refused_early(self) -> None:
        with self.assertRaises(ValueError):  # routes must be SMTP
            NextHopResolver(
                make_resolver(["127.0.0.1:53"], reactor), clock=Clock(),
                routes={"x.test": "maildir:/tmp/x"},
            )


class ParseTargetTests(SynchronousTestCase):
    def test_valid(self) -> None:
        cases = {
            "smtp:relay.example.test:587": Target(SMTP, host="relay.example.test", port=587),
            "smtp:127.0.0.1:2525": Target(SMTP, host="127.0.0.1", port=2525),
            "smtp:[::1]:25": Target(SMTP, host="::1", port=25),
            "smtp:[2001:db8::1]": Target(SMTP, host="2001:db8::1", port=25),
            "smtp:relay.test": Target(SMTP, host="relay.test", port=25),
            "maildir:/var/mail": Target(MAILDIR, directory="/var/mail"),
            "maildir:var/maildir": Target(MAILDIR, directory="var/maildir"),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_target(text), expected, text)

    def test_errors_say_what_is_wrong(self) -> None:
        cases = {
            "relay.test:25": "expected",
            "lmtp:relay.test:24": "expected",
            "smtp:relay.test:0": "port",
            "smtp:relay.test:70000": "port",
            "smtp:relay.test:smtp": "port",
            "smtp:::1:25": "brackets",
            "smtp:[::1:25": "]",
            "smtp:[127.0.0.1]:25": "IPv6",
            "smtp:[::1]25": "':PORT'",
            "smtp:bad_host!:25": "host name",
            "smtp::25": "host name",
            "smtp:127.0.0.300:25": "host name",
            "smtp:relay.test:\u0663": "port",
            "maildir:": "directory",
        }
        for text, fragment in cases.items():
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_target(text)
            self.assertIn(fragment, str(caught.exception), text)
            self.assertIn(repr(text), str(caught.exception), text)

    def test_kinds_can_be_restricted(self) -> None:
        with self.assertRaises(ValueError) as caught:
            parse_target("maildir:/x", kinds=("smtp",))
        self.assertIn("smtp:HOST:PORT", str(caught.exception))


class ParseNameserverTests(SynchronousTestCase):
    def test_forms(self) -> None:
        cases = {
            "127.0.0.1": ("127.0.0.1", 53),
            "127.0.0.1:5353": ("127.0.0.1", 5353),
            "::1": ("::1", 53),
            "[::1]:5353": ("::1", 5353),
            "[::1]": ("::1", 53),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_nameserver(text), expected, text)

    def test_errors_name_the_entry(self) -> None:
        for text in ["ns.example.test", "ns.example.test:53", "127.0.0.1:0", "[::1]x", "",
                     "127.0.0.1:dns", "[127.0.0.1]:53"]:
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_nameserver(text)
            self.assertIn(repr(text), str(caught.exception))

    def test_make_resolver_rejects_a_bad_entry(self) -> None:
        with self.assertRaises(ValueError) as caught:
            make_resolver(["127.0.0.1:53", "nameserver.test"], reactor)
        self.assertIn("nameserver.test", str(caught.exception))
