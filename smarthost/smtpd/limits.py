"""Abuse control: every limit answers, never hangs, and never locks out the real user.

All counters are in memory, keyed by client address or user, on the injected clock. They are
shared by every listener of one daemon (one :class:`Limits` per process).
"""

from __future__ import annotations

from collections import deque

import attrs
from twisted.internet.interfaces import IReactorTime

from smarthost.core.replies import TOO_MANY_CONNECTIONS, TOO_MANY_FROM_YOU, Reply

AUTH_WINDOW = 600.0  # SPEC: failures counted over 10 minutes, then 10 minutes of 454
HOUR = 3600.0


@attrs.frozen
class LimitSettings:
    connections: int = 1000
    connections_per_ip: int = 50
    auth_failures_per_ip: int = 10
    messages_per_user_per_hour: int = 1000
    hold_user_after_per_hour: int = 5000
    auth_failures_per_connection: int = 3
    soft_errors: int = 10  # Postfix smtpd_soft_error_limit: from here, replies slow down
    hard_errors: int = 20  # Postfix smtpd_hard_error_limit: then 421 and close


class ConnectionLimiter:
    """Concurrent connections, whole server and per client address."""

    def __init__(self, total: int, per_address: int) -> None:
        self._total, self._per_address = total, per_address
        self._count = 0
        self._by_address: dict[str, int] = {}

    def admit(self, address: str) -> Reply | None:
        if self._count >= self._total:
            return TOO_MANY_CONNECTIONS
        if self._by_address.get(address, 0) >= self._per_address:
            return TOO_MANY_FROM_YOU
        self._count += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1
        return None

    def release(self, address: str) -> None:
        self._count -= 1
        left = self._by_address.get(address, 1) - 1
        if left:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)


class _Window:
    """Event times in a sliding window, capped so memory stays bounded per key."""

    def __init__(self, span: float, cap: int) -> None:
        self._span, self._times = span, deque[float](maxlen=cap)

    def add(self, now: float) -> None:
        self._times.append(now)

    def count(self, now: float) -> int:
        while self._times and self._times[0] <= now - self._span:
            self._times.popleft()
        return len(self._times)


class AuthThrottle:
    """Per-address failed AUTH counting: a growing delay, then 454 for a while.

    Keyed by address only, so an attacker elsewhere never locks the real user out.
    """

    def __init__(self, clock: IReactorTime, limit: int) -> None:
        self._clock, self._limit = clock, limit
        self._failures: dict[str, _Window] = {}
        self._blocked_until: dict[str, float] = {}

    def blocked(self, address: str) -> bool:
        until = self._blocked_until.get(address)
        if until is None:
            return False
        if self._clock.seconds() >= until:
            del self._blocked_until[address]
            self._failures.pop(address, None)
            return False
        return True

    def failed(self, address: str) -> float:
        """Record a failure; the delay (seconds) before answering it."""
        now = self._clock.seconds()
        window = self._failures.setdefault(address, _Window(AUTH_WINDOW, self._limit + 1))
        window.add(now)
        failures = window.count(now)
        if failures >= self._limit:
            self._blocked_until[address] = now + AUTH_WINDOW
        self._prune(now)
        return float(min(failures, 5))  # 1 s, 2 s, ... capped: slows guessing, not users

    def _prune(self, now: float) -> None:
        if len(self._failures) > 10000:
            for address in [a for a, w in self._failures.items() if w.count(now) == 0]:
                del self._failures[address]


class SendingRate:
    """Messages per user (or trusted address) per hour: the rate limit and the brake."""

    def __init__(self, clock: IReactorTime, limit: int, hold_after: int) -> None:
        self._clock, self._limit, self._hold_after = clock, limit, hold_after
        self._windows: dict[str, _Window] = {}

    def _window(self, key: str) -> _Window:
        cap = max(self._limit, self._hold_after) + 1
        return self._windows.setdefault(key, _Window(HOUR, cap))

    def allowed(self, key: str) -> bool:
        return self._window(key).count(self._clock.seconds()) < self._limit

    def accepted(self, key: str) -> bool:
        """Count one accepted message; True when it is past the hold threshold."""
        now = self._clock.seconds()
        window = self._window(key)
        window.add(now)
        return window.count(now) > self._hold_after


class Limits:
    """The per-process limit state every session shares."""

    def __init__(self, clock: IReactorTime, settings: LimitSettings) -> None:
        self.settings = settings
        self.connections = ConnectionLimiter(settings.connections, settings.connections_per_ip)
        self.auth = AuthThrottle(clock, settings.auth_failures_per_ip)
        self.rate = SendingRate(
            clock, settings.messages_per_user_per_hour, settings.hold_user_after_per_hour
        )
