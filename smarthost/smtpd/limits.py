"""Abuse control: every limit answers, never hangs, and never locks out the real user.

All counters are in memory, keyed by client address or user, on the injected clock. They are
shared by every listener of one daemon (one :class:`Limits` per process).

Every per-address limit counts a client by :func:`address_key`: an IPv4 address alone, an
IPv6 address by its ``/ipv6_prefix`` network (64 by default), because one IPv6 client holds a
whole /64 and would otherwise be a new client at every connection.
"""

from __future__ import annotations

import functools
import ipaddress
import resource
from collections import deque
from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IReactorTime

from smarthost.core.replies import TOO_MANY_CONNECTIONS, TOO_MANY_FROM_YOU, Reply

AUTH_WINDOW = 600.0  # SPEC: failures counted over 10 minutes, then 10 minutes of 454
HOUR = 3600.0
PRUNE_AT = 10000  # keys kept before idle ones are swept (then at twice the live count)


@attrs.frozen
class LimitSettings:
    """The ``[limits]`` table, as the session and the counters use it."""

    connections: int = 1000
    connections_per_ip: int = 50
    auth_failures_per_ip: int = 10
    messages_per_user_per_hour: int = 1000
    hold_user_after_per_hour: int = 5000
    messages_per_ip_per_hour: int = 1000  # anonymous (untrusted, unauthenticated) clients
    ipv6_prefix: int = 64  # the network a per-address limit counts an IPv6 client by
    tls_handshake_timeout: float = 30.0  # seconds; then the connection is aborted
    min_data_rate: float = 500.0  # bytes/s in DATA after the first command_timeout; 0: none
    auth_failures_per_connection: int = 3
    soft_errors: int = 10  # Postfix smtpd_soft_error_limit: from here, replies slow down
    hard_errors: int = 20  # Postfix smtpd_hard_error_limit: then 421 and close


@functools.lru_cache(maxsize=8192)
def address_key(address: str, ipv6_prefix: int = 64) -> str:
    """The name a per-address limit counts ``address`` under: an IPv4 address (also when
    IPv4-mapped) as itself, an IPv6 address as its ``/ipv6_prefix`` network; anything else
    (not an IP address) unchanged."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    prefix = min(max(ipv6_prefix, 0), 128)
    if prefix == 128:
        return str(ip)
    return str(ipaddress.IPv6Network((ip, prefix), strict=False))


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit, as far as the system lets us,
    so that ``[limits] connections`` is what refuses clients, not EMFILE at accept(). Returns
    the (soft, hard) limits in force afterwards. For the daemon's start-up, before listening.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass  # e.g. macOS refuses more than OPEN_MAX: keep what we have
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class ConnectionLimiter:
    """Concurrent connections, whole server and per client address (IPv6: per prefix)."""

    def __init__(
        self, total: int, per_address: int, key: Callable[[str], str] = address_key
    ) -> None:
        self._total, self._per_address, self._key = total, per_address, key
        self._count = 0
        self._by_address: dict[str, int] = {}

    def admit(self, address: str) -> Reply | None:
        if self._count >= self._total:
            return TOO_MANY_CONNECTIONS
        key = self._key(address)
        if self._by_address.get(key, 0) >= self._per_address:
            return TOO_MANY_FROM_YOU
        self._count += 1
        self._by_address[key] = self._by_address.get(key, 0) + 1
        return None

    def release(self, address: str) -> None:
        key = self._key(address)
        self._count -= 1
        left = self._by_address.get(key, 1) - 1
        if left:
            self._by_address[key] = left
        else:
            self._by_address.pop(key, None)


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


class _Windows:
    """One :class:`_Window` per key; keys whose window is empty are swept now and then, so
    the memory follows the clients active within ``span``, not every client ever seen."""

    def __init__(self, clock: IReactorTime, span: float, cap: int) -> None:
        self._clock, self._span, self._cap = clock, span, cap
        self._windows: dict[str, _Window] = {}
        self._prune_at = PRUNE_AT

    def count(self, key: str) -> int:
        window = self._windows.get(key)
        return 0 if window is None else window.count(self._clock.seconds())

    def add(self, key: str) -> int:
        """Count one event now; the count in the window, this one included."""
        now = self._clock.seconds()
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= self._prune_at:
                self._prune(now)
            window = self._windows[key] = _Window(self._span, self._cap)
        window.add(now)
        return window.count(now)

    def forget(self, key: str) -> None:
        self._windows.pop(key, None)

    def _prune(self, now: float) -> None:
        for key in [k for k, w in self._windows.items() if w.count(now) == 0]:
            del self._windows[key]
        self._prune_at = max(PRUNE_AT, 2 * len(self._windows))


class AuthThrottle:
    """Per-address failed AUTH counting: a growing delay, then 454 for a while.

    Keyed by address only (IPv6: by prefix), so an attacker elsewhere never locks the real
    user out.
    """

    def __init__(
        self, clock: IReactorTime, limit: int, key: Callable[[str], str] = address_key
    ) -> None:
        self._clock, self._limit, self._key = clock, limit, key
        self._failures = _Windows(clock, AUTH_WINDOW, limit + 1)
        self._blocked_until: dict[str, float] = {}

    def blocked(self, address: str) -> bool:
        key = self._key(address)
        until = self._blocked_until.get(key)
        if until is None:
            return False
        if self._clock.seconds() >= until:
            del self._blocked_until[key]
            self._failures.forget(key)
            return False
        return True

    def failed(self, address: str) -> float:
        """Record a failure; the delay (seconds) before answering it."""
        key = self._key(address)
        failures = self._failures.add(key)
        if failures >= self._limit:
            self._blocked_until[key] = self._clock.seconds() + AUTH_WINDOW
        return float(min(failures, 5))  # 1 s, 2 s, ... capped: slows guessing, not users


class SendingRate:
    """Messages per user (or trusted address) per hour: the rate limit and the brake."""

    def __init__(self, clock: IReactorTime, limit: int, hold_after: int) -> None:
        self._limit, self._hold_after = limit, hold_after
        self._windows = _Windows(clock, HOUR, max(limit, hold_after) + 1)

    def allowed(self, key: str) -> bool:
        return self._windows.count(key) < self._limit

    def accepted(self, key: str) -> bool:
        """Count one accepted message; True when it is past the hold threshold."""
        return self._windows.add(key) > self._hold_after


class AnonymousRate:
    """Messages per hour from one client address (IPv6: prefix) that is neither
    authenticated nor trusted, which can only be mail to our local domains: this bounds the
    disk and delivery work an anonymous client can cause (``451 4.7.1`` beyond)."""

    def __init__(
        self, clock: IReactorTime, limit: int, key: Callable[[str], str] = address_key
    ) -> None:
        self._limit, self._key = limit, key
        self._windows = _Windows(clock, HOUR, limit + 1)

    def allowed(self, address: str) -> bool:
        return self._windows.count(self._key(address)) < self._limit

    def accepted(self, address: str) -> None:
        self._windows.add(self._key(address))


class Limits:
    """The per-process limit state every session shares."""

    def __init__(self, clock: IReactorTime, settings: LimitSettings) -> None:
        self.settings = settings
        key = functools.partial(address_key, ipv6_prefix=settings.ipv6_prefix)
        self.address_key: Callable[[str], str] = key
        self.connections = ConnectionLimiter(
            settings.connections, settings.connections_per_ip, key
        )
        self.auth = AuthThrottle(clock, settings.auth_failures_per_ip, key)
        self.rate = SendingRate(
            clock, settings.messages_per_user_per_hour, settings.hold_user_after_per_hour
        )
        self.anonymous = AnonymousRate(clock, settings.messages_per_ip_per_hour, key)
