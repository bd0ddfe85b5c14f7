"""Abuse limits: the counters in virtual time (the connection limits over real sockets are in
tests/e2e/test_limits_e2e.py)."""

from __future__ import annotations

from twisted.internet.task import Clock

from smarthost.core.replies import TOO_MANY_CONNECTIONS, TOO_MANY_FROM_YOU
from smarthost.smtpd.limits import (
    AUTH_WINDOW,
    AuthThrottle,
    ConnectionLimiter,
    SendingRate,
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

