"""The fleet's counts in virtual time, against a store whose answers the test gives (the real
Redis is in tests/integration/test_fleet_redis.py): what a check knows before, during and
after an exchange, the timeout, one warning per outage, the probe's backoff, the end; and
make_limits across reloads."""
# MemoryReactorClock carries no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger

from smarthost.app import fleet
from smarthost.app.config import parse_config
from smarthost.app.fleet import PROBE_MAX, TIMEOUT, FleetCounts, RedisStore
from smarthost.app.live import Generation
from smarthost.smtpd.limits import AUTH_WINDOW, HOUR, Known, Limits, LimitSettings, Tally

RATE = Tally("rate", HOUR, 11)
AUTH = Tally("auth", AUTH_WINDOW, 4, 3)


class Store:
    """Records every exchange and leaves it to the test to answer."""

    where = "redis.test:6379/0"

    def __init__(self) -> None:
        self.connects: list[Deferred[None]] = []
        self.exchanges: list[tuple[tuple[Any, ...], Deferred[list[int]]]] = []
        self.lost: Callable[[str], None] = lambda reason: None
        self.dropped = self.closed = 0

    def connect(self, lost: Callable[[str], None]) -> Deferred[None]:
        self.lost = lost
        self.connects.append(Deferred())
        return self.connects[-1]

    def tally(self, *args: Any) -> Deferred[list[int]]:
        self.exchanges.append((args, Deferred()))
        return self.exchanges[-1][1]

    def drop(self) -> None:
        self.dropped += 1

    def close(self) -> None:
        self.closed += 1

    def answer(self, *answer: int) -> None:
        """Answer the oldest exchange not answered yet."""
        for _, d in self.exchanges:
            if not d.called:
                d.callback(list(answer))
                return
        raise AssertionError("no exchange waits for an answer")

    def waiting(self) -> list[tuple[Any, ...]]:
        return [args for args, d in self.exchanges if not d.called]


class Node:
    def __init__(self) -> None:
        self.clock, self.store, self.lines = Clock(), Store(), list[str]()
        observer = cast(ILogObserver, lambda e: self.lines.append(e["log_format"]))
        self.counts = FleetCounts(self.clock, self.store, "redis://redis.test/0",
                                  Logger(observer=observer))
        self.counts.start()

    def up(self) -> None:
        """The pending probe connects and its script runs."""
        self.store.connects[-1].callback(None)
        self.store.answer(0, 0, -2)

    def warnings(self) -> int:
        return sum(line.startswith("fleet: redis unreachable") for line in self.lines)

    def backs(self) -> int:
        return sum(line.startswith("fleet: redis back") for line in self.lines)


@pytest.fixture
def node() -> Node:
    n = Node()
    n.up()
    assert n.counts.state == "up"
    return n


def test_nothing_is_asked_before_the_probe_reaches_redis() -> None:
    n = Node()
    assert n.counts.known(RATE, "alice") == Known()
    assert n.counts.add(RATE, "alice") == Known()
    assert not n.store.waiting()
    n.store.connects[-1].callback(None)
    assert len(n.store.waiting()) == 1  # the probe's own script run
    n.store.answer(0, 0, -2)
    assert n.counts.state == "up" and n.warnings() == 0


def test_an_add_counts_at_once_and_takes_the_fleets_answer(node: Node) -> None:
    node.clock.advance(100)
    assert node.counts.add(RATE, "alice").count == 1  # what is known: nothing, plus this
    (keys, now, span, member, cap, block_at), = node.store.waiting()
    assert keys == fleet.redis_keys(RATE, "alice") and now == 100_000 and span == HOUR * 1000
    assert member and cap == 11 and block_at == 0
    assert node.counts.add(RATE, "alice").count == 2  # two in flight
    node.store.answer(7, 3_700_000, -2)  # the fleet had six before ours
    assert node.counts.known(RATE, "alice").count == 8  # seven, and the second in flight
    node.store.answer(8, 3_700_000, -2)
    node.store.answer(8, 3_700_000, -2)  # the learn the check above sent
    assert node.counts.known(RATE, "alice").count == 8
    members = {args[3] for args, _ in node.store.exchanges if args[3]}
    assert len(members) == 2  # each event its own member in the window


def test_a_check_learns_again_once_at_a_time(node: Node) -> None:
    for _ in range(3):
        assert node.counts.known(RATE, "bob") == Known()
    assert len(node.store.waiting()) == 1
    node.store.answer(4, 1000_000, -2)
    assert node.counts.known(RATE, "bob").count == 4
    assert len(node.store.waiting()) == 1  # that check asked again


def test_a_check_may_wait_for_the_learn_in_flight_never_past_the_timeout(node: Node) -> None:
    assert node.counts.until_learnt(RATE, "mallory") is None  # nothing asked: nothing to wait
    node.counts.learn(RATE, "mallory")  # at AUTH
    first, second = node.counts.until_learnt(RATE, "mallory"), node.counts.until_learnt(
        RATE, "mallory")
    assert first is not None and second is not None and not first.called
    seen: list[int] = []  # what the waiting check sees when it goes on
    first.addCallback(lambda _: seen.append(node.counts.known(RATE, "mallory").count))
    node.store.answer(9, 3_600_000, -2)
    assert second.called and seen == [9]  # MAIL goes on with the fleet's count, not before
    node.store.answer(9, 3_600_000, -2)  # the learn that check sent
    node.counts.learn(RATE, "trudy")
    waiting = node.counts.until_learnt(RATE, "trudy")
    assert waiting is not None
    node.clock.advance(TIMEOUT)  # Redis silent: the wait ends with the timeout, all the same
    assert waiting.called and node.counts.state == "down"
    assert node.counts.until_learnt(RATE, "trudy") is None  # in the outage nothing is asked


def test_a_count_stops_counting_when_its_oldest_event_leaves_the_window(node: Node) -> None:
    node.counts.learn(RATE, "carol")
    node.store.answer(5, 30_000, -2)  # the oldest of the five leaves at t=30 s
    node.clock.advance(29.9)
    assert node.counts.known(RATE, "carol").count == 5
    node.clock.advance(0.1)
    assert node.counts.known(RATE, "carol").count == 0  # unknown: the local count decides


def test_a_block_holds_for_the_time_redis_gives(node: Node) -> None:
    node.counts.learn(AUTH, "192.0.2.9")
    node.store.answer(0, 0, 120_000)
    assert node.counts.known(AUTH, "192.0.2.9").blocked_until == 120.0
    node.clock.advance(120)
    assert node.counts.known(AUTH, "192.0.2.9").blocked_until == 0.0


def test_silence_is_an_outage_logged_once_and_counted_locally(node: Node) -> None:
    node.counts.learn(RATE, "dave")
    node.store.answer(2, 3_600_000, -2)
    node.counts.add(RATE, "dave")
    node.counts.add(RATE, "erin")
    node.clock.advance(TIMEOUT)
    assert node.counts.state == "down" and node.warnings() == 1
    assert node.store.dropped == 1  # a fresh connection for the next probe
    before = len(node.store.exchanges)
    for _ in range(5):
        node.counts.add(RATE, "dave")
        node.counts.known(RATE, "frank")
    assert len(node.store.exchanges) == before  # nothing sent while down
    assert node.counts.known(RATE, "dave").count == 2  # what was learnt still counts
    assert node.warnings() == 1


def test_the_probe_backs_off_and_its_return_is_logged_once(node: Node) -> None:
    node.store.lost("connection lost")
    assert node.counts.state == "down" and node.warnings() == 1
    delays = []
    for _ in range(6):
        connects = len(node.store.connects)
        waited = 0.0
        while len(node.store.connects) == connects:
            node.clock.advance(0.25)
            waited += 0.25
        delays.append(waited)
        node.clock.advance(fleet.CONNECT_TIMEOUT)  # no answer: the next attempt later
    assert delays == [0.5, 1.0, 2.0, 4.0, PROBE_MAX, PROBE_MAX]
    assert node.warnings() == 1
    node.clock.advance(PROBE_MAX)
    node.up()
    assert node.counts.state == "up" and node.backs() == 1
    node.counts.add(RATE, "gina")
    assert len(node.store.waiting()) == 1  # counting in Redis again


def test_a_redis_that_fails_the_script_stays_down(node: Node) -> None:
    node.store.lost("connection lost")
    node.clock.advance(0.5)
    node.store.connects[-1].callback(None)
    node.store.exchanges[-1][1].errback(RuntimeError("READONLY You can't write against a replica"))
    assert node.counts.state == "down" and node.backs() == 0 and node.warnings() == 1


def test_unreachable_at_start_is_one_warning() -> None:
    n = Node()
    n.store.connects[-1].errback(ConnectionRefusedError())
    assert n.counts.state == "down" and n.warnings() == 1
    n.clock.advance(0.5)
    n.up()
    assert n.counts.state == "up" and n.backs() == 1


def test_close_waits_for_the_last_answers_then_closes(node: Node) -> None:
    node.counts.add(RATE, "hal")
    closed = node.counts.close()
    assert not closed.called and node.store.closed == 0
    node.store.answer(1, 1, -2)
    assert closed.called and node.store.closed == 1
    node.counts.add(RATE, "hal")
    node.store.lost("connection lost")
    assert not node.store.waiting() and node.warnings() == 0


def test_many_keys_are_swept_when_stale(node: Node) -> None:
    for n in range(fleet.PRUNE_AT):
        node.counts.learn(RATE, f"user{n}")
        node.store.answer(1, 1000, -2)
    node.clock.advance(1)
    node.counts.learn(RATE, "one more")
    assert len(node.counts._entries) == 1


# -- the limits, one process, across reloads ----------------------------------------------------


class Reactor(MemoryReactorClock):
    """Records the shutdown triggers (MemoryReactor cannot remove one)."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[Callable[[], Any]] = []
        self.removed: list[int] = []

    # MemoryReactor's returns no trigger id, which make_limits keeps for the removal.
    def addSystemEventTrigger(  # type: ignore[override]
        self, phase: str, event: str, f: Any, *args: Any, **kw: Any
    ) -> Any:
        assert (phase, event) == ("before", "shutdown")
        self.added.append(f)
        return len(self.added) - 1

    def removeSystemEventTrigger(self, trigger: Any) -> None:
        self.removed.append(trigger)


def generation(limits: Limits) -> Generation:
    return cast(Generation, type("G", (), {"limits": limits})())


def test_make_limits_keeps_shares_and_replaces_the_connection() -> None:
    reactor = Reactor()
    base = 'hostname = "mx.example.test"\n'

    def config(url: str) -> Any:
        return parse_config(base + f'[fleet]\nredis = "{url}"\n', Path("/srv"))

    local = fleet.make_limits(config(""), LimitSettings(), reactor, None)
    assert local.shared is None and not reactor.added
    first = fleet.make_limits(config("redis://127.0.0.1/0"), LimitSettings(), reactor,
                              generation(local))
    assert isinstance(first.shared, FleetCounts) and len(reactor.added) == 1
    assert not reactor.tcpClients  # connecting waits for the reactor to run
    reactor.run()
    assert reactor.tcpClients[-1][:2] == ("127.0.0.1", 6379)
    same = fleet.make_limits(config("redis://127.0.0.1/0"), LimitSettings(), reactor,
                             generation(first))
    assert same is first
    tighter = fleet.make_limits(config("redis://127.0.0.1/0"), LimitSettings(connections=5),
                                reactor, generation(first))
    assert tighter is not first and tighter.shared is first.shared  # one connection
    moved = fleet.make_limits(config("redis://127.0.0.2:6380/1"), LimitSettings(connections=5),
                              reactor, generation(tighter))
    assert isinstance(moved.shared, FleetCounts) and moved.shared is not first.shared
    assert first.shared.state == "closed" and reactor.removed == [0]
    assert first.shared.settled().called  # its probe given up: nothing holds a shutdown
    off = fleet.make_limits(config(""), LimitSettings(connections=5), reactor,
                            generation(moved))
    assert off.shared is None and moved.shared.state == "closed"


def test_the_store_never_logs_the_password() -> None:
    store = RedisStore(MemoryReactorClock(), "redis://user:s3cret@redis.test:6380/2")
    assert store.where == "redis.test:6380/2"
