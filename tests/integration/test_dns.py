"""What twisted.names does on the wire, against the test DNS server on loopback: failures
classified as the routing rules expect (SERVFAIL, REFUSED, timeouts after retransmission),
a truncated answer retried over TCP, IDNA names, and the ``[delivery] nameservers`` client
replacing the system resolver. The rules themselves are tests/unit/test_routing.py's."""

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
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from dnsserver import DNSTestServer, Zone, close_client_connections, start
from smarthost.delivery.dns import make_resolver
from smarthost.delivery.hostcache import HostCache
from smarthost.delivery.routing import (
    Host,
    NextHopResolver,
    PermanentRouteError,
    Route,
    RouteError,
    TemporaryRouteError,
)

ZONE: Mapping[str, Any] = {
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.11"]},
    "implicit4.test": {"A": ["127.0.0.31"]},
    "broken.test": "SERVFAIL",
    "refused.test": "REFUSED",
    "slow.test": "TIMEOUT",
    "v6slow.test": {"MX": [(10, "v6slow-mx.test")]},
    "v6slow-mx.test": {"A": ["127.0.0.51"], "AAAA": "TIMEOUT"},
    "big.test": {"A": [f"127.0.1.{i}" for i in range(1, 41)]},  # > 512 octets: TCP retry
}

SHORT = (0.2, 0.3)  # DNS timeouts for tests that wait for one


class WireTestCase(TestCase):
    timeout = 15  # trial's per-test bound

    def setUp(self) -> None:
        self.server: DNSTestServer = start(reactor, Zone.from_dict(ZONE))
        self.addCleanup(self.server.stop)
        self.dns = make_resolver([self.server.nameserver], reactor, timeout=SHORT)

    def resolver(self) -> NextHopResolver:
        return NextHopResolver(self.dns, hosts=HostCache(Clock(), first_retry=60), random=Random(1))

    async def route(self, domain: str) -> Route:
        return await self.resolver().resolve(domain)

    async def route_error(self, domain: str) -> RouteError:
        try:
            await self.route(domain)
        except RouteError as e:
            return e
        raise AssertionError(f"{domain} resolved")

    def addresses(self, route: Route) -> list[str]:
        return [h.address for h in route.hosts]


class WireTests(WireTestCase):
    async def test_international_domain_is_looked_up_as_a_labels(self) -> None:
        e = await self.route_error("bücher.test")
        self.assertIsInstance(e, PermanentRouteError)
        self.assertIn(("xn--bcher-kva.test", "MX"), self.server.queries)

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

    async def test_one_address_family_timing_out_is_not_fatal(self) -> None:
        route = await self.route("v6slow.test")
        self.assertEqual(self.addresses(route), ["127.0.0.51"])

    async def test_large_answer_is_retried_over_tcp(self) -> None:
        self.addCleanup(close_client_connections, reactor, self.dns)
        route = await self.route("big.test")
        self.assertEqual(len(route.hosts), 40)
        self.assertEqual(self.server.queries.count(("big.test", "A")), 2)  # UDP, then TCP
class ResolverSetupTests(TestCase):
    timeout = 15

    async def test_nameservers_replace_the_system_resolver(self) -> None:
        # createResolver(servers=...) would answer "localhost" from /etc/hosts.
        server = start(reactor, Zone())
        self.addCleanup(server.stop)
        resolver = NextHopResolver(
            make_resolver([server.nameserver], reactor, timeout=SHORT),
            hosts=HostCache(Clock(), first_retry=60),
        )
        with self.assertRaises(PermanentRouteError):
            await resolver.resolve("localhost")
        self.assertIn(("localhost", "MX"), server.queries)

    async def test_ipv6_nameserver(self) -> None:
        server = start(reactor, Zone.from_dict(ZONE), host="::1")
        self.addCleanup(server.stop)
        self.assertEqual(server.nameserver, f"[::1]:{server.port}")
        resolver = NextHopResolver(
            make_resolver([server.nameserver], reactor, timeout=SHORT),
            hosts=HostCache(Clock(), first_retry=60),
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
            make_resolver([f"127.0.0.1:{port}"], reactor, timeout=(1, 2)),
            hosts=HostCache(Clock(), first_retry=60),
        )
        route = await resolver.resolve("sub.test")
        self.assertEqual(route.hosts, (Host("mx.sub.test", "127.0.0.61", 25),))
        with self.assertRaises(PermanentRouteError):
            await resolver.resolve("gone.test")
