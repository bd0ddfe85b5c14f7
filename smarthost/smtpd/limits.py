"""Abuse control: every limit answers, never hangs, and never locks out the real user.

All counters are in memory, keyed by client address or user, on the injected clock. They are
shared by every listener of one daemon (one :class:`Limits` per process).

With ``[fleet] redis`` the per-user hourly rate, the compromised-account brake and the AUTH
failure throttle are counted across every node as well, through :class:`SharedCounts`. The
checks stay synchronous: each node counts locally as always, tells the fleet of every event
in the background, and checks against the larger of its own count and the fleet's count as
last learnt. Every check also learns that key's count again in the background, and some
learn ahead of need: a new connection learns its address's AUTH state (block included) while
the client reads the greeting and says EHLO, and the session calls
:meth:`SendingRate.prefetch` at AUTH success; its MAIL waits for that answer
(:meth:`SendingRate.learning`: the one wait, bounded by the fleet's timeout and skipped in an
outage), so a user over the limit on other nodes is refused on the first message here. The
brake, judged at the end of DATA, sees the fleet as of the MAIL; the overshoot left is for
AUTH attempts made before the connection's learn came back (one per node at most), and for
transactions open at once, which are counted at their commit, as ever.

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
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred
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


@attrs.frozen
class Tally:
    """What one limit counts with the rest of the fleet. ``name`` keeps its keys apart from
    the other limits'; events count over the last ``span`` seconds; at most ``cap`` are kept
    per key (enough to tell "over the limit", so a flood costs bounded memory); and, when
    ``block_at`` > 0, that many events block the key for ``span`` and start its count afresh,
    as :class:`AuthThrottle` does on its own."""

    name: str
    span: float
    cap: int
    block_at: int = 0


@attrs.frozen
class Known:
    """What a node knows of one key's fleet-wide state now: the count in the window (0 when
    not known) and until when the key is blocked (0.0: it is not)."""

    count: int = 0
    blocked_until: float = 0.0


class SharedCounts(Protocol):
    """Counts shared with the rest of the fleet (``smarthost.app.fleet`` keeps them in
    Redis). Every method answers at once from what this node has learnt; the exchanges with
    the shared store run in the background, and when it does not answer the answers are what
    was learnt before (nothing, after a while), so the limits fall back to the local counts."""

    def known(self, tally: Tally, key: str) -> Known:
        """What is known of ``key``; learnt again in the background when not lately."""

    def learn(self, tally: Tally, key: str) -> None:
        """Learn ``key``'s fleet-wide state again now, ahead of a check that will need it."""

    def add(self, tally: Tally, key: str) -> Known:
        """Count one event under ``key`` fleet-wide; what is known now, this event included
        (the fleet's answer, with the count it reached, comes in the background)."""

    def until_learnt(self, tally: Tally, key: str) -> Deferred[None] | None:
        """None when nothing about ``key`` is being learnt; else what fires once it is
        (answered, failed or timed out: never later than the store's timeout)."""


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
    """Concurrent connections, whole server and per client address (IPv6: per prefix).

    Always counted per process: open connections are this node's resource. ``on_admit`` is
    told of each admitted address (the fleet learns its AUTH state then, see the module)."""

    def __init__(
        self, total: int, per_address: int, key: Callable[[str], str] = address_key,
        on_admit: Callable[[str], None] | None = None,
    ) -> None:
        self._total, self._per_address, self._key = total, per_address, key
        self._on_admit = on_admit
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
        if self._on_admit is not None:
            self._on_admit(address)
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
    user out. With ``shared``, failures count across the fleet, and a block one node decides
    (in Redis, with the count) holds on every node.
    """

    def __init__(
        self, clock: IReactorTime, limit: int, key: Callable[[str], str] = address_key,
        shared: SharedCounts | None = None,
    ) -> None:
        self._clock, self._limit, self._key = clock, limit, key
        self._shared, self._tally = shared, Tally("auth", AUTH_WINDOW, limit + 1, limit)
        self._failures = _Windows(clock, AUTH_WINDOW, limit + 1)
        self._blocked_until: dict[str, float] = {}

    def prefetch(self, address: str) -> None:
        """Learn the fleet's failures and block for ``address`` now (at connect, before the
        client can say AUTH)."""
        if self._shared is not None:
            self._shared.learn(self._tally, self._key(address))

    def blocked(self, address: str) -> bool:
        key = self._key(address)
        if self._shared is not None and key not in self._blocked_until:
            fleet = self._shared.known(self._tally, key).blocked_until
            if fleet > self._clock.seconds():
                self._blocked_until[key] = fleet
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
        if self._shared is not None:
            failures = max(failures, self._shared.add(self._tally, key).count)
        if failures >= self._limit:
            self._blocked_until[key] = self._clock.seconds() + AUTH_WINDOW
        return float(min(failures, 5))  # 1 s, 2 s, ... capped: slows guessing, not users


class SendingRate:
    """Messages per user (or trusted address) per hour: the rate limit and the brake. With
    ``shared``, counted across the fleet (see the module for how far behind it may be)."""

    def __init__(
        self, clock: IReactorTime, limit: int, hold_after: int,
        shared: SharedCounts | None = None,
    ) -> None:
        self._limit, self._hold_after = limit, hold_after
        self._shared, self._tally = shared, Tally("rate", HOUR, max(limit, hold_after) + 1)
        self._windows = _Windows(clock, HOUR, self._tally.cap)

    def prefetch(self, key: str) -> None:
        """Learn the fleet's count for ``key`` now (at AUTH success, before its MAIL)."""
        if self._shared is not None:
            self._shared.learn(self._tally, key)

    def learning(self, key: str | None) -> Deferred[None] | None:
        """What fires once the fleet's count for ``key``, asked for at AUTH, is here; None
        when it is here already (or there is no fleet): MAIL waits for it, so a user who
        went over the limit on another node is refused on the first message here too."""
        if self._shared is None or key is None:
            return None
        return self._shared.until_learnt(self._tally, key)

    def allowed(self, key: str) -> bool:
        count = self._windows.count(key)
        if self._shared is not None:
            count = max(count, self._shared.known(self._tally, key).count)
        return count < self._limit

    def accepted(self, key: str) -> bool:
        """Count one accepted message; True when it is past the hold threshold."""
        count = self._windows.add(key)
        if self._shared is not None:
            count = max(count, self._shared.add(self._tally, key).count)
        return count > self._hold_after


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
    """The per-process limit state every session shares; ``shared``: the fleet's counts
    (``[fleet] redis``), or None to count on this process alone."""

    def __init__(
        self, clock: IReactorTime, settings: LimitSettings, shared: SharedCounts | None = None
    ) -> None:
        self.settings, self.shared = settings, shared
        key = functools.partial(address_key, ipv6_prefix=settings.ipv6_prefix)
        self.address_key: Callable[[str], str] = key
        self.auth = AuthThrottle(clock, settings.auth_failures_per_ip, key, shared)
        self.connections = ConnectionLimiter(
            settings.connections, settings.connections_per_ip, key,
            self.auth.prefetch if shared is not None else None,
        )
        self.rate = SendingRate(
            clock, settings.messages_per_user_per_hour, settings.hold_user_after_per_hour,
            shared,
        )
        # Anonymous mail stays per node: what it bounds is this node's disk and delivery work.
        self.anonymous = AnonymousRate(clock, settings.messages_per_ip_per_hour, key)
