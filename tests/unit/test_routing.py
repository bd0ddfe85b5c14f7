"""Routing rules in virtual time, on a resolver that answers from an in-memory zone: MX order,
implicit MX, null MX, DNS failures, static routes, the local target, the failed-host
order, and the route texts. What twisted.names itself does on the wire (retransmissions,
TCP after truncation, IDNA, a subprocess server) is tests/integration/test_dns.py's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from random import Random
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns, error
from twisted.trial.unittest import SynchronousTestCase

from dnsserver import TIMEOUT, Zone
from smarthost.delivery.dns import (
    _DefaultTimeout,
    close_resolver,
    make_resolver,
    parse_nameserver,
)
from smarthost.delivery.hostcache import HostCache
from smarthost.delivery.routing import (
    MAILDIR,
    SMTP,
    Credentials,
    Host,
    HostFailure,
    NextHopResolver,
    PermanentRouteError,
    Route,
    RouteError,
    Target,
    TemporaryRouteError,
    parse_target,
)

Sections = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]
_FAILURES: dict[int, type[error.DomainError]] = {
    dns.ENAME: error.DNSNameError,
    dns.ESERVER: error.DNSServerError,
    dns.EREFUSED: error.DNSQueryRefusedError,
}


class ZoneResolver:
    """The DNS client's lookups answered from a test :class:`Zone` in memory: no socket, no
    wait. Names are encoded as twisted.names' client does (IDNA) before the zone sees them;
    a TIMEOUT name fails at once with the error the client gives after its retransmissions."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.queries: list[tuple[str, str]] = []  # (name, type) asked, as the server lists them

    def lookupMailExchange(self, name: str, timeout: Any = None) -> Deferred[Sections]:
        return self._query(name, dns.MX)

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred[Sections]:
        return self._query(name, dns.A)

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Deferred[Sections]:
        return self._query(name, dns.AAAA)

    def _query(self, name: str, rrtype: int) -> Deferred[Sections]:
        encoded = dns.domainString(name)
        self.queries.append((encoded.decode("ascii").lower().rstrip("."),
                             dns.QUERY_TYPES[rrtype]))
        rcode, answers = self.zone.answer(encoded, rrtype)
        if rcode == TIMEOUT:
            return fail(error.DNSQueryTimeoutError(0))
        if rcode != dns.OK:
            assert isinstance(rcode, int)
            return fail(_FAILURES[rcode](name))
        return succeed((answers, [], []))


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
    "relay.test": {"A": ["127.0.0.41"]},
}

CREDENTIALS = Credentials("office@example.test", "s3cret")


class ResolverTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = ZoneResolver(Zone.from_dict(ZONE))  # the queries asked, as "server"
        self.dns = self.server
        self.clock = Clock()
        self.hosts = HostCache(self.clock, first_retry=60)  # the failed-host memory

    def resolver(self, **kwargs: Any) -> NextHopResolver:
        options: dict[str, Any] = {
            "hosts": self.hosts,
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

    def route(self, domain: str, **kwargs: Any) -> Route:
        route: Route = self.successResultOf(self.resolver(**kwargs).resolve(domain))
        return route

    def route_error(self, domain: str, **kwargs: Any) -> RouteError:
        failure = self.failureResultOf(self.resolver(**kwargs).resolve(domain), RouteError)
        assert isinstance(failure.value, RouteError)
        return failure.value

    def addresses(self, route: Route) -> list[str]:
        return [h.address for h in route.hosts]


class MXTests(ResolverTestCase):
    def test_mx_hosts_in_preference_order_ipv4_first(self) -> None:
        route = self.route("example.test")
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

    def test_mx_routes_never_carry_credentials(self) -> None:
        route = self.route("example.test", credentials=CREDENTIALS, tls="verify")
        self.assertIsNone(route.credentials)
        self.assertEqual(route.tls, "verify")
        implicit = self.route("implicit4.test", credentials=CREDENTIALS)
        self.assertIsNone(implicit.credentials)

    def test_mx_hosts_use_the_configured_port(self) -> None:
        route = self.route("example.test", port=2525)
        self.assertEqual({h.port for h in route.hosts}, {2525})

    def test_domain_matching_ignores_case_and_trailing_dot(self) -> None:
        route = self.route("EXAMPLE.Test.")
        self.assertEqual(self.addresses(route)[0], "127.0.0.11")

    def test_equal_preferences_shuffled_deterministically(self) -> None:
        orders = set()
        for seed in range(20):
            first = self.route("equal.test", random=Random(seed))
            again = self.route("equal.test", random=Random(seed))
            self.assertEqual(first, again)
            orders.add(tuple(self.addresses(first)))
        self.assertEqual(orders, {("127.0.0.21", "127.0.0.22"), ("127.0.0.22", "127.0.0.21")})

    def test_implicit_mx_a(self) -> None:
        route = self.route("implicit4.test")
        self.assertEqual(route.hosts, (Host("implicit4.test", "127.0.0.31", 25),))

    def test_implicit_mx_aaaa(self) -> None:
        route = self.route("implicit6.test")
        self.assertEqual(route.hosts, (Host("implicit6.test", "::1", 25),))

    def test_mx_target_through_cname(self) -> None:
        route = self.route("alias.test")
        self.assertEqual(route.hosts, (Host("mxalias.test", "127.0.0.11", 25),))

    def test_null_mx_is_permanent(self) -> None:
        e = self.route_error("nullmx.test")
        self.assertIsInstance(e, PermanentRouteError)
        self.assertEqual(e.status, "5.1.10")

    def test_null_mx_among_real_mx_is_ignored(self) -> None:
        route = self.route("mixednull.test")
        self.assertEqual(self.addresses(route), ["127.0.0.11"])

    def test_nxdomain_is_permanent(self) -> None:
        e = self.route_error("no-such-domain.test")
        self.assertIsInstance(e, PermanentRouteError)
        self.assertEqual(e.status, "5.1.2")

    def test_no_mx_and_no_address_is_permanent(self) -> None:
        e = self.route_error("nodata.test")
        self.assertIsInstance(e, PermanentRouteError)
        self.assertEqual(e.status, "5.4.4")

    def test_unusable_address_is_not_a_next_hop(self) -> None:
        e = self.route_error("unusable.test")
        self.assertIsInstance(e, PermanentRouteError)

    def test_domain_without_dns_form_is_permanent(self) -> None:
        e = self.route_error("a" * 64 + ".test")
        self.assertIsInstance(e, PermanentRouteError)
        self.assertEqual(self.server.queries, [])

    def test_servfail_is_temporary(self) -> None:
        e = self.route_error("broken.test")
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.3")
        self.assertIn("SERVFAIL", e.reply)

    def test_refused_is_temporary(self) -> None:
        e = self.route_error("refused.test")
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.3")

    def test_timeout_is_temporary(self) -> None:
        e = self.route_error("slow.test")
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.3")
        self.assertIn("timeout", e.reply)

    def test_mx_hosts_without_address_defer(self) -> None:
        e = self.route_error("dangling.test")
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.4")

    def test_mx_host_lookup_failure_defers(self) -> None:
        e = self.route_error("mxservfail.test")
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.3")

    def test_ip_address_as_mx_exchange_is_refused(self) -> None:
        e = self.route_error("ipmx.test")
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertNotIn(("127.0.0.1", "A"), self.server.queries)

    def test_failing_mx_host_is_skipped_when_another_works(self) -> None:
        route = self.route("halfbroken.test")
        self.assertEqual(route.hosts, (Host("mx1.example.test", "127.0.0.11", 25),))

    def test_one_address_family_timing_out_is_not_fatal(self) -> None:
        route = self.route("v6slow.test")
        self.assertEqual(self.addresses(route), ["127.0.0.51"])


class StaticRouteTests(ResolverTestCase):
    def test_local_domain_goes_to_maildir_without_dns(self) -> None:
        route = self.route("Example.ORG.")
        self.assertEqual(route, Route(MAILDIR, maildir="/srv/maildir"))
        self.assertEqual(self.server.queries, [])

    def test_local_smtp_target(self) -> None:
        route = self.route("example.org", local="smtp:[::1]:2526")
        self.assertEqual(route.hosts, (Host("::1", "::1", 2526),))
        self.assertIsNone(route.credentials)  # an internal store, not the upstream
        self.assertEqual(self.server.queries, [])

    def test_local_domain_wins_over_routes(self) -> None:
        route = self.route("example.org", routes={"*": "smtp:127.0.0.9:25"})
        self.assertEqual(route.kind, MAILDIR)

    def test_exact_route_with_credentials_requires_tls(self) -> None:
        routes = {"Partner.Test": "smtp:127.0.0.5:587", "*": "smtp:relay.test:465"}
        route = self.route("partner.test.", routes=routes)
        self.assertEqual(route.hosts, (Host("127.0.0.5", "127.0.0.5", 587),))
        self.assertEqual(route.credentials, CREDENTIALS)
        self.assertEqual((route.tls, route.implicit_tls), ("required", False))
        self.assertEqual(self.server.queries, [])  # an IP address needs no lookup

    def test_star_route_on_465_is_implicit_tls(self) -> None:
        routes = {"partner.test": "smtp:127.0.0.5:587", "*": "smtp:relay.test:465"}
        route = self.route("example.test", routes=routes)
        self.assertEqual(route.hosts, (Host("relay.test", "127.0.0.41", 465),))
        self.assertEqual(route.credentials, CREDENTIALS)
        self.assertTrue(route.implicit_tls)
        self.assertNotIn(("example.test", "MX"), self.server.queries)

    def test_route_without_credentials_keeps_tls_policy(self) -> None:
        route = self.route(
            "x.test", routes={"*": "smtp:127.0.0.5:25"}, credentials=None
        )
        self.assertEqual((route.tls, route.credentials), ("opportunistic", None))

    def test_unresolvable_route_host_defers_never_bounces(self) -> None:
        e = self.route_error("x.test", routes={"*": "smtp:missing.test:25"})
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.4")
        e = self.route_error("x.test", routes={"*": "smtp:broken.test:25"})
        self.assertIsInstance(e, TemporaryRouteError)
        self.assertEqual(e.status, "4.4.3")

    def test_address_literal_routes_to_the_address(self) -> None:
        route = self.route("[127.0.0.1]")
        self.assertEqual(route.hosts, (Host("127.0.0.1", "127.0.0.1", 25),))
        self.assertIsNone(route.credentials)
        route = self.route("[IPv6:::1]")
        self.assertEqual(route.hosts, (Host("::1", "::1", 25),))
        self.assertEqual(self.server.queries, [])

    def test_address_literals_can_be_refused(self) -> None:
        e = self.route_error("[127.0.0.1]", address_literals=False)
        self.assertIsInstance(e, PermanentRouteError)
        e = self.route_error("[0.0.0.0]")
        self.assertIsInstance(e, PermanentRouteError)

    def test_tls_policy_overrides_static_routes_with_or_without_a_lookup(self) -> None:
        """[delivery.tls_policy] is the operator's word for a domain whichever way its route
        was found: an IP address (no lookup) or a host name; a route with credentials still
        never goes in the clear."""
        for target in ("smtp:127.0.0.5:25", "smtp:relay.test:25"):
            routes = {"*": target}
            pinned = self.route("x.test", routes=routes, credentials=None,
                                tls_policies={"X.test": "verify"})
            self.assertEqual(pinned.tls, "verify")
            upgraded = self.route("x.test", routes=routes, tls_policies={"x.test": "opportunistic"})
            self.assertEqual((upgraded.tls, upgraded.credentials), ("required", CREDENTIALS))
            other = self.route("y.test", routes=routes, credentials=None,
                               tls_policies={"x.test": "verify"})
            self.assertEqual(other.tls, "opportunistic")

    def test_a_routing_bug_is_the_deferreds_failure_never_raised(self) -> None:
        """Routes known without DNS are answered at once; a bug on that path still fails the
        Deferred (the courier defers that domain) as one on the DNS path does."""

        class BrokenOrder:
            def order(self, hosts: Sequence[Host]) -> tuple[Host, ...]:
                raise ZeroDivisionError("failed-host memory bug")

        for domain, routes in (("x.test", {"*": "smtp:127.0.0.5:25"}), ("[127.0.0.1]", {}),
                               ("x.test", {"*": "smtp:relay.test:25"}), ("example.test", {})):
            resolved = self.resolver(hosts=BrokenOrder(), routes=routes).resolve(domain)
            self.failureResultOf(resolved, ZeroDivisionError)


def refused(host: Host) -> HostFailure:
    return HostFailure(host, f"connection refused by {host}", "4.4.1")


class UnreachableCacheTests(ResolverTestCase):
    def test_unreachable_hosts_move_to_the_end_then_return(self) -> None:
        resolver = self.resolver()
        first = self.successResultOf(resolver.resolve("example.test"))
        self.hosts.failed(refused(first.hosts[0]), since=self.clock.seconds())
        self.assertTrue(self.hosts.remembered(first.hosts[0]))
        moved = self.successResultOf(resolver.resolve("example.test"))
        self.assertEqual(moved.hosts, (*first.hosts[1:], first.hosts[0]))
        self.clock.advance(59)
        still = self.successResultOf(resolver.resolve("example.test"))
        self.assertEqual(still.hosts, moved.hosts)
        self.clock.advance(1)
        back = self.successResultOf(resolver.resolve("example.test"))
        self.assertEqual(back.hosts, first.hosts)
        self.assertFalse(self.hosts.remembered(first.hosts[0]))

    def test_all_unreachable_keeps_order_and_drops_nothing(self) -> None:
        self.hosts = HostCache(self.clock, first_retry=10)
        resolver = self.resolver()
        first = self.successResultOf(resolver.resolve("example.test"))
        for host in first.hosts:
            self.hosts.failed(refused(host), since=self.clock.seconds())
        again = self.successResultOf(resolver.resolve("example.test"))
        self.assertEqual(again.hosts, first.hosts)


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
                ZoneResolver(Zone()), hosts=HostCache(Clock(), first_retry=60),
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
            make_resolver(["127.0.0.1:53", "nameserver.test"], MemoryReactorClock())
        self.assertIn("nameserver.test", str(caught.exception))


def test_a_replaced_system_resolver_leaves_nothing_scheduled() -> None:
    """The system resolver re-reads resolv.conf every minute on the daemon's reactor; once a
    reload replaced it (close_resolver), nothing of it is left on the clock."""
    reactor = MemoryReactorClock()
    resolver = make_resolver([], reactor)
    assert [c for c in reactor.getDelayedCalls() if c.active()]  # the resolv.conf re-read
    close_resolver(resolver)
    assert not [c for c in reactor.getDelayedCalls() if c.active()]
    reactor.advance(3600)
    assert not [c for c in reactor.getDelayedCalls() if c.active()]
    close_resolver(make_resolver(["127.0.0.1:53"], reactor))  # no timers: nothing to do
