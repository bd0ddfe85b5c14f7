"""Abuse limits: the counters in virtual time, IPv6 clients per prefix, and the open-files limit
(the connection limits over real sockets are in tests/e2e/test_limits_e2e.py and
tests/e2e/test_hardening_e2e.py)."""

from __future__ import annotations

import resource

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from smarthost.core.replies import TOO_MANY_CONNECTIONS, TOO_MANY_FROM_YOU
from smarthost.smtpd.limits import (
    AUTH_WINDOW,
    HOUR,
    PRUNE_AT,
    AnonymousRate,
    AuthThrottle,
    ConnectionLimiter,
    Known,
    Limits,
    LimitSettings,
    SendingRate,
    Tally,
    address_key,
    raise_nofile_limit,
)


def test_connection_limiter_total_and_per_address() -> None:
    limiter = ConnectionLimiter(total=3, per_address=2)
    assert limiter.admit("192.0.2.1") is None
    assert limiter.admit("192.0.2.1") is None
    assert limiter.admit("192.0.2.1") == TOO_MANY_FROM_YOU
    assert limiter.admit("192.0.2.2") is None
    assert limiter.admit("192.0.2.3") == TOO_MANY_CONNECTIONS
    limiter.release("192.0.2.1")
    assert limiter.admit("192.0.2.3") is None


def test_auth_throttle_blocks_one_address_for_ten_minutes_only() -> None:
    clock = Clock()
    throttle = AuthThrottle(clock, limit=3)
    delays = [throttle.failed("192.0.2.1") for _ in range(2)]
    assert delays == [1.0, 2.0]  # growing delay
    assert not throttle.blocked("192.0.2.1")
    throttle.failed("192.0.2.1")
    assert throttle.blocked("192.0.2.1")
    assert not throttle.blocked("192.0.2.2")  # the real user elsewhere is never locked out
    clock.advance(AUTH_WINDOW - 1)
    assert throttle.blocked("192.0.2.1")
    clock.advance(1)
    assert not throttle.blocked("192.0.2.1")


def test_auth_failures_outside_the_window_do_not_count() -> None:
    clock = Clock()
    throttle = AuthThrottle(clock, limit=3)
    throttle.failed("192.0.2.1")
    throttle.failed("192.0.2.1")
    clock.advance(AUTH_WINDOW + 1)
    throttle.failed("192.0.2.1")
    assert not throttle.blocked("192.0.2.1")


def test_sending_rate_slides_over_the_hour() -> None:
    clock = Clock()
    rate = SendingRate(clock, limit=2, hold_after=3)
    assert rate.allowed("alice")
    assert rate.accepted("alice") is False
    clock.advance(1800)
    assert rate.accepted("alice") is False
    assert not rate.allowed("alice")
    assert rate.allowed("bob")
    clock.advance(1801)  # the first message has left the window
    assert rate.allowed("alice")


def test_hold_threshold() -> None:
    rate = SendingRate(Clock(), limit=100, hold_after=2)
    assert [rate.accepted("mallory") for _ in range(4)] == [False, False, True, True]



# -- IPv6 clients are counted per prefix (issue 18, finding 13) ----------------------------------


@pytest.mark.parametrize(("address", "prefix", "key"), [
    ("192.0.2.7", 64, "192.0.2.7"),
    ("::ffff:192.0.2.7", 64, "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"),
    ("2001:db8::1", 128, "2001:db8::1"),
    ("fe80::1%eth0", 64, "fe80::/64"),
    ("", 64, ""),
    ("not an address", 64, "not an address"),
])
def test_address_key(address: str, prefix: int, key: str) -> None:
    assert address_key(address, prefix) == key


def test_connections_from_one_ipv6_64_count_together() -> None:
    limiter = ConnectionLimiter(total=100, per_address=2)
    assert limiter.admit("2001:db8:0:1::a") is None
    assert limiter.admit("2001:db8:0:1::b") is None
    assert limiter.admit("2001:db8:0:1:ffff::c") == TOO_MANY_FROM_YOU
    assert limiter.admit("2001:db8:0:2::a") is None
    limiter.release("2001:db8:0:1::a")
    assert limiter.admit("2001:db8:0:1::c") is None


def test_auth_throttle_counts_an_ipv6_64_as_one_client() -> None:
    throttle = AuthThrottle(Clock(), limit=3)
    for n in range(3):
        throttle.failed(f"2001:db8:0:1::{n + 1}")
    assert throttle.blocked("2001:db8:0:1::99")
    assert not throttle.blocked("2001:db8:0:2::1")


def test_limits_use_the_configured_prefix() -> None:
    limits = Limits(Clock(), LimitSettings(connections_per_ip=1, ipv6_prefix=48))
    assert limits.connections.admit("2001:db8:1:1::1") is None
    assert limits.connections.admit("2001:db8:1:2::1") == TOO_MANY_FROM_YOU
    assert limits.address_key("2001:db8:1:2::1") == "2001:db8:1::/48"


# -- anonymous mail per address and hour (finding 7) ----------------------------------------------


def test_anonymous_rate_per_address_and_hour() -> None:
    clock = Clock()
    rate = AnonymousRate(clock, limit=2)
    for _ in range(2):
        assert rate.allowed("2001:db8:0:7::1")
        rate.accepted("2001:db8:0:7::1")
    assert not rate.allowed("2001:db8:0:7::2")  # the same /64
    assert rate.allowed("192.0.2.1")
    clock.advance(HOUR)
    assert rate.allowed("2001:db8:0:7::2")


def test_idle_keys_are_forgotten() -> None:
    """A flood of addresses cannot grow the counters for ever: windows that are empty are
    swept once there are PRUNE_AT keys."""
    clock = Clock()
    rate = SendingRate(clock, limit=10, hold_after=10)
    for n in range(PRUNE_AT):
        rate.accepted(f"user{n}")
    clock.advance(HOUR)
    rate.accepted("one more")
    assert len(rate._windows._windows) == 1


def test_raise_nofile_limit_reaches_the_hard_limit() -> None:
    soft, hard = raise_nofile_limit()
    assert (soft, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY


# -- counted with the fleet ([fleet] redis; the real Redis in tests/integration/test_fleet_redis.py)


class Fleet:
    """What the rest of the fleet has counted, as this node last learnt it (set by the test),
    and what the limits asked of it."""

    def __init__(self) -> None:
        self.known_: dict[tuple[str, str], Known] = {}
        self.learnt: list[tuple[str, str]] = []
        self.added: list[tuple[str, str]] = []

    def known(self, tally: Tally, key: str) -> Known:
        self.learnt.append((tally.name, key))
        return self.known_.get((tally.name, key), Known())

    def learn(self, tally: Tally, key: str) -> None:
        self.learnt.append((tally.name, key))

    def add(self, tally: Tally, key: str) -> Known:
        self.added.append((tally.name, key))
        known = self.known_.get((tally.name, key), Known())
        known = self.known_[(tally.name, key)] = Known(known.count + 1, known.blocked_until)
        return known

    def until_learnt(self, tally: Tally, key: str) -> Deferred[None] | None:
        return None  # every answer is here at once


def test_the_rate_and_the_brake_take_the_larger_of_local_and_fleet_counts() -> None:
    fleet = Fleet()
    limits = Limits(Clock(), LimitSettings(messages_per_user_per_hour=3,
                                           hold_user_after_per_hour=4), fleet)
    assert limits.rate.allowed("alice") and limits.rate.accepted("alice") is False
    fleet.known_[("rate", "alice")] = Known(3)  # two more elsewhere
    assert not limits.rate.allowed("alice")
    fleet.known_.clear()  # the fleet's count unknown (Redis away): the local one decides
    assert limits.rate.allowed("alice")  # one here
    fleet.known_[("rate", "alice")] = Known(4)
    assert limits.rate.accepted("alice") is True  # the fleet's fifth: held
    limits.rate.prefetch("bob")
    assert ("rate", "bob") in fleet.learnt
    assert fleet.added == [("rate", "alice")] * 2


def test_a_fleet_block_holds_here_and_a_connection_learns_it_first() -> None:
    clock, fleet = Clock(), Fleet()
    limits = Limits(clock, LimitSettings(auth_failures_per_ip=3), fleet)
    assert limits.connections.admit("2001:db8:0:9::1") is None
    assert fleet.learnt == [("auth", "2001:db8:0:9::/64")]  # before the client says AUTH
    fleet.known_[("auth", "2001:db8:0:9::/64")] = Known(0, AUTH_WINDOW)
    assert limits.auth.blocked("2001:db8:0:9::2")
    fleet.known_.clear()
    clock.advance(AUTH_WINDOW)
    assert not limits.auth.blocked("2001:db8:0:9::2")
    fleet.known_[("auth", "192.0.2.5")] = Known(1)  # one failure elsewhere
    assert [limits.auth.failed("192.0.2.5") for _ in range(2)] == [2.0, 3.0]
    assert limits.auth.blocked("192.0.2.5")  # the fleet's third (local: two)


def test_without_the_fleet_nothing_learns_on_connect() -> None:
    limits = Limits(Clock(), LimitSettings())
    assert limits.shared is None
    assert limits.connections.admit("192.0.2.1") is None
