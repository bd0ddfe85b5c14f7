"""The fleet's limits in a real redis-server: two :class:`Limits` ("nodes") with their own
Redis connections on one server count a user's hourly rate, the brake and an address's AUTH
failures together; a killed or stopped Redis leaves both counting locally, logged once per
outage, with every check answering at once; its return is logged once too.
"""
# trial's TestCase carries no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import TestCase

from redisserver import RedisServer, command, needs_redis
from smarthost.app.fleet import TIMEOUT, FleetCounts, RedisStore, redis_keys
from smarthost.smtpd.limits import Limits, LimitSettings, Tally

USER = "alice@example.test"
ATTACKER = "192.0.2.66"
UNREACHABLE = "fleet: redis unreachable, counting locally"
BACK = "fleet: redis back"


@needs_redis()
class FleetRedisTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="smarthost-redis-"))
        self.addCleanup(shutil.rmtree, directory, True)
        self.redis = RedisServer(directory)
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.lines: list[tuple[float, str]] = []  # (when, the line's format)
        self.counts: list[FleetCounts] = []

    def node(self, settings: LimitSettings) -> Limits:
        """A node: its own connection to the shared Redis, its own log lines."""
        def observe(event: dict[str, Any]) -> None:
            self.lines.append((time.monotonic(), event["log_format"]))

        counts = FleetCounts(reactor, RedisStore(reactor, self.redis.url), self.redis.url,
                             Logger(observer=cast(ILogObserver, observe)))
        self.addCleanup(counts.close)
        counts.start()
        self.counts.append(counts)
        return Limits(reactor, settings, counts)

    def settled(self) -> Deferred[Any]:
        """Every node's exchanges answered (what a session's next round trip gives it)."""
        return gatherResults([c.settled() for c in self.counts])

    def logged(self, text: str) -> list[float]:
        """When each line starting with ``text`` was logged."""
        return [when for when, line in self.lines if line.startswith(text)]

    def outages(self) -> int:
        return len(self.logged(UNREACHABLE))

    @inlineCallbacks
    def message(self, limits: Limits) -> Generator[Deferred[Any], Any, bool | None]:
        """One message as a session sends it: the check at MAIL, the count at commit. None
        when refused at MAIL, else whether it is held (the brake)."""
        if not limits.rate.allowed(USER):
            return None
        yield self.settled()  # RCPT, DATA: the client's round trips
        held = limits.rate.accepted(USER)
        yield self.settled()
        return held

    # -- counted across the fleet ----------------------------------------------------------

    @inlineCallbacks
    def test_hourly_limit_counts_across_both_nodes(self) -> Generator[Deferred[Any], Any, None]:
        a, b = self.node(LimitSettings(messages_per_user_per_hour=3)), self.node(
            LimitSettings(messages_per_user_per_hour=3))
        yield self.settled()
        self.assertEqual([c.state for c in self.counts], ["up", "up"])
        for limits in (a, a, b):
            held = yield self.message(limits)
            self.assertIs(held, False)
        # B's own count answered 3: B refuses; A learns it at AUTH success, then refuses.
        self.assertIsNone((yield self.message(b)))
        a.rate.prefetch(USER)
        yield self.settled()
        self.assertIsNone((yield self.message(a)))
        self.assertTrue(a.rate.allowed("bob@example.test"))
        self.assertTrue(b.rate.allowed("bob@example.test"))
        self.assertEqual(self.outages(), 0)

    @inlineCallbacks
    def test_a_node_behind_the_fleet_overshoots_by_one_message_at_most(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """The documented bound: A learnt the count before B reached the limit, and answers
        its next MAIL before the fresh count arrives; that message's own count brings it."""
        settings = LimitSettings(messages_per_user_per_hour=2)
        a, b = self.node(settings), self.node(settings)
        yield self.settled()
        yield self.message(a)
        yield self.message(b)
        self.assertIs((yield self.message(a)), False)  # the one beyond the limit
        self.assertIsNone((yield self.message(a)))
        self.assertIsNone((yield self.message(b)))

    @inlineCallbacks
    def test_the_brake_holds_across_both_nodes(self) -> Generator[Deferred[Any], Any, None]:
        settings = LimitSettings(messages_per_user_per_hour=100, hold_user_after_per_hour=3)
        a, b = self.node(settings), self.node(settings)
        yield self.settled()
        held = []
        for limits in (a, b, a, b, a):
            held.append((yield self.message(limits)))
        self.assertEqual(held, [False, False, False, True, True])

    @inlineCallbacks
    def test_auth_failures_split_across_nodes_block_on_both(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        settings = LimitSettings(auth_failures_per_ip=4)
        a, b = self.node(settings), self.node(settings)
        yield self.settled()
        for limits in (a, b, a):
            self.assertIsNone(limits.connections.admit(ATTACKER))
            yield self.settled()
            self.assertFalse(limits.auth.blocked(ATTACKER))
            limits.auth.failed(ATTACKER)
            yield self.settled()
            limits.connections.release(ATTACKER)
        # The fourth failure, on a new connection to B: B learnt the fleet's three when the
        # address connected, so its fourth blocks at once...
        self.assertIsNone(b.connections.admit(ATTACKER))
        yield self.settled()
        self.assertFalse(b.auth.blocked(ATTACKER))
        self.assertEqual(b.auth.failed(ATTACKER), 4.0)  # the delay grows with the fleet's count
        self.assertTrue(b.auth.blocked(ATTACKER))
        yield self.settled()
        # ...and A learns the block when the address connects again, before its AUTH.
        self.assertIsNone(a.connections.admit(ATTACKER))
        yield self.settled()
        self.assertTrue(a.auth.blocked(ATTACKER))
        self.assertFalse(a.auth.blocked("192.0.2.1"))  # the real user elsewhere
        window, block = redis_keys(Tally("auth", 600, 5, 4), ATTACKER)
        ttl = int(command(self.redis.port, "PTTL", block).lstrip(b":"))
        self.assertTrue(590_000 < ttl <= 600_000, ttl)
        self.assertEqual(command(self.redis.port, "EXISTS", window), b":0")  # counted afresh

    @inlineCallbacks
    def test_the_script_slides_caps_and_blocks(self) -> Generator[Deferred[Any], Any, None]:
        """The Lua script alone, at chosen times (ms): the window slides, a key keeps at most
        ``cap`` events, and ``block_at`` events block it for the span and start afresh."""
        store = RedisStore(reactor, self.redis.url)
        self.addCleanup(store.close)
        yield store.connect(lambda reason: None)
        keys = redis_keys(Tally("rate", 10, 3), "x")
        answers = []
        for now, member in [(0, "a"), (4000, "b"), (9000, "c"), (9500, "d"), (10000, "")]:
            answers.append((yield store.tally(keys, now, 10_000, member, 3, 0)))
        self.assertEqual(answers, [
            [1, 10_000, -2], [2, 10_000, -2], [3, 10_000, -2],
            [3, 14_000, -2],  # capped: the oldest ("a") made room
            [3, 14_000, -2],  # at 10 s "a" would have left anyway
        ])
        self.assertEqual((yield store.tally(keys, 14_000, 10_000, "", 3, 0)), [2, 19_000, -2])
        keys = redis_keys(Tally("auth", 10, 3, 2), "y")
        yield store.tally(keys, 0, 10_000, "a", 3, 2)
        count, _, block = yield store.tally(keys, 0, 10_000, "b", 3, 2)
        self.assertEqual(count, 2)
        self.assertTrue(9_000 < block <= 10_000)
        self.assertEqual((yield store.tally(keys, 0, 10_000, "", 3, 2))[0], 0)  # afresh

    def test_keys_are_bounded_whatever_the_name(self) -> None:
        odd = "\r\n*3\r\n$3\r\nDEL" + "x" * 10_000 + "\udcff"
        window, block = redis_keys(Tally("rate", 3600, 10), odd)
        self.assertLess(len(block), 80)
        self.assertTrue(window.isascii() and window.isprintable())

    # -- Redis down or slow -----------------------------------------------------------------

    def timed(self, limits: Limits) -> float:
        """Every check and count a session makes, timed: none may wait for Redis."""
        start = time.monotonic()
        limits.connections.admit(ATTACKER)
        limits.auth.blocked(ATTACKER)
        limits.rate.allowed(USER)
        limits.rate.accepted(USER)
        limits.auth.failed(ATTACKER)
        limits.connections.release(ATTACKER)
        return time.monotonic() - start

    @inlineCallbacks
    def outage(self, down: Any, up: Any) -> Generator[Deferred[Any], Any, None]:
        """Both nodes through an outage (``down`` starts it, ``up`` ends it): local counts,
        one warning each, then the return logged once each."""
        settings = LimitSettings(messages_per_user_per_hour=3, auth_failures_per_ip=100)
        a, b = self.node(settings), self.node(settings)
        yield self.settled()
        for limits in (a, b):
            yield self.message(limits)
        down()
        started = time.monotonic()
        slowest = 0.0
        for _ in range(3):
            for limits in (a, b):
                slowest = max(slowest, self.timed(limits))
            yield deferLater(reactor, TIMEOUT, lambda: None)
        yield self.settled()
        # Answers come from memory, never from Redis (a slack for a busy machine, still far
        # below the exchange's timeout).
        self.assertLess(slowest, TIMEOUT / 2)
        self.assertEqual([c.state for c in self.counts], ["down", "down"])
        self.assertEqual(self.outages(), 2)  # one line per node for the whole outage
        # Each node saw the outage at its first exchange after it began: a killed Redis at
        # once (connection lost), a stopped one at that exchange's timeout.
        self.assertLess(max(self.logged(UNREACHABLE)) - started, TIMEOUT + 1)
        # Counting locally: each node's own counts (1 before, 3 during) still apply.
        self.assertFalse(a.rate.allowed(USER))
        up()
        yield self.back()
        self.assertEqual(len(self.logged(BACK)), 2)
        self.assertEqual(self.outages(), 2)

    @inlineCallbacks
    def back(self) -> Generator[Deferred[Any], Any, None]:
        """Wait for both probes to find Redis again (bounded by the test's timeout: no event
        to wait on but the probe's own schedule, at most PROBE_MAX apart)."""
        while any(c.state != "up" for c in self.counts):
            yield deferLater(reactor, 0.1, lambda: None)

    def test_redis_killed_both_count_locally_and_recover(self) -> Deferred[None]:
        return self.outage(self.redis.kill, self.redis.start)

    def test_redis_stopped_both_count_locally_and_recover(self) -> Deferred[None]:
        return self.outage(self.redis.pause, self.redis.resume)

    @inlineCallbacks
    def test_unreachable_at_start_warns_once_and_counts_locally(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        self.redis.kill()
        a = self.node(LimitSettings(messages_per_user_per_hour=1))
        yield self.settled()
        self.assertEqual((self.counts[0].state, self.outages()), ("down", 1))
        self.assertIs((yield self.message(a)), False)
        self.assertIsNone((yield self.message(a)))
        self.redis.start()
        yield self.back()
        self.assertEqual(len(self.logged(BACK)), 1)
