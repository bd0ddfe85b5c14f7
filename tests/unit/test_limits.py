"""Abuse limits: the counters in virtual time, IPv6 clients per prefix, and the open-files limit
(the connection limits over real sockets are in tests/e2e/test_limits_e2e.py and
tests/e2e/test_hardening_e2e.py)."""

from __future__ import annotations

import resource

import pytest
from twisted.internet.task import Clock

from smarthost.core.replies import TOO_MANY_CONNECTIONS, TOO_MANY_FROM_YOU
from smarthost.smtpd.limits import (
    AUTH_WINDOW,
    HOUR,
    PRUNE_AT,
    AnonymousRate,
    AuthThrottle,
    ConnectionLimiter,
    Limits,
    LimitSettings,
    SendingRate,
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
