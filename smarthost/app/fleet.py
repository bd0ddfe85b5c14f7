"""The limit counters a process shares with the rest of the fleet (``[fleet] redis``).

Without ``[fleet] redis`` every process counts on its own, as a single node always has. With
it, :class:`FleetCounts` is the :class:`~smarthost.smtpd.limits.SharedCounts` of the limits:
each event (an accepted message, a failed AUTH) is also counted in Redis by one atomic Lua
script over a sliding window (a sorted set of event times per key, trimmed to the window and
capped), whose answer, the fleet's count, is kept here and read by the synchronous checks.
How far behind the fleet a check may be is said in :mod:`smarthost.smtpd.limits`.

Redis is never in the way of mail: every exchange is given ``TIMEOUT`` (250 ms) and runs in
the background; the first failure or silence starts an outage, logged once ("fleet: redis
unreachable, counting locally"), during which nothing is sent to Redis and the limits count
locally; a probe reconnects in the background with a growing delay and ends the outage,
logged once too ("fleet: redis back"). Events counted during an outage stay local.

Keys are ``smarthost:<limit>:{<blake2b of the user or address>}`` (and ``...:block``): of
bounded length whatever a client sends, and one Redis Cluster slot per key pair.
"""

from __future__ import annotations

import hashlib
import secrets
import urllib.parse
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import txredisapi
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from smarthost.app.config import Config
from smarthost.app.live import Generation
from smarthost.smtpd.limits import Known, Limits, LimitSettings, SharedCounts, Tally

TIMEOUT = 0.25  # seconds for any one exchange with Redis: then counted locally
CONNECT_TIMEOUT = 2.0  # a background probe's connect, AUTH/SELECT and PING
PROBE_FIRST, PROBE_MAX = 0.5, 8.0  # the probe's delays after an outage starts: doubling
PRUNE_AT = 10000  # keys learnt before the stale ones are swept (then twice the live count)

PROBE = Tally("probe", 1.0, 1)  # the key the probe counts (nothing) under

_log = Logger(namespace="smarthost.fleet")

# KEYS[1]: the window, a sorted set of event times (ms); KEYS[2]: the block flag.
# ARGV: now (ms), span (ms), the event's unique member ("": only count), cap, block_at (0:
# never). Returns {count, when the oldest counted event leaves the window (ms, 0: none), the
# block's remaining time (ms, negative: none)}.
SCRIPT = """
local now, span = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - span)
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
  if over > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, over - 1) end
  redis.call('PEXPIRE', KEYS[1], span)
end
local n = redis.call('ZCARD', KEYS[1])
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local leaves = 0
if oldest[2] then leaves = tonumber(oldest[2]) + span end
local block_at = tonumber(ARGV[5])
if ARGV[3] ~= '' and block_at > 0 and n >= block_at then
  redis.call('SET', KEYS[2], '1', 'PX', span)
  redis.call('DEL', KEYS[1])
end
return {n, leaves, redis.call('PTTL', KEYS[2])}
"""


def redis_keys(tally: Tally, key: str) -> tuple[str, str]:
    """The window's and the block's Redis keys for ``key`` (a user name or an address, as
    the client gave it: hashed, so any text makes a short key of safe characters)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    window = f"smarthost:{tally.name}:{{{digest}}}"
    return window, window + ":block"


class Store(Protocol):
    """Where :class:`FleetCounts` keeps the counts (:class:`RedisStore`)."""

    where: str  # for the log: host, port and database, never a password

    def connect(self, lost: Callable[[str], None]) -> Deferred[None]: ...

    def tally(
        self, keys: tuple[str, str], now: int, span: int, member: str, cap: int, block_at: int
    ) -> Deferred[list[int]]: ...

    def drop(self) -> None: ...

    def close(self) -> None: ...


class RedisStore:
    """One connection to the Redis of ``url``, made only by :meth:`connect` (the probe of
    :class:`FleetCounts`): an exchange without a live connection fails at once rather than
    waiting for one, and nothing reconnects behind the owner's back (or logs while doing so).
    """

    def __init__(self, reactor: Any, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "localhost", parts.port or 6379
        self.where = f"{host}:{port}/{parts.path.strip('/') or 0}"  # never the password
        self._db = int(parts.path.strip("/") or 0)
        self._user = urllib.parse.unquote(parts.username) if parts.username else None
        self._password = urllib.parse.unquote(parts.password) if parts.password else None
        self._endpoint = HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
        self._protocol: Any = None  # the RedisProtocol made last, ready or not

    def connect(self, lost: Callable[[str], None]) -> Deferred[None]:
        """Drop any connection, connect anew, log in, select the database and PING. ``lost``
        is told (with why) if this connection, once made, is lost without :meth:`drop`."""
        self.drop()

        async def connect() -> None:
            factory = Factory.forProtocol(self._made)
            factory.noisy = False  # no "Starting factory" line at each (re)connection
            await self._endpoint.connect(factory)
            protocol = self._protocol
            await protocol.whenConnected()
            if self._password is not None:
                await protocol.auth(self._password, self._user)
            if self._db:
                await protocol.select(self._db)
            await protocol.ping()

            def disconnected(_: object) -> None:
                if self._protocol is protocol:  # not one this store dropped itself
                    self._protocol = None
                    lost("connection lost")

            protocol.whenDisconnected().addCallback(disconnected)

        return Deferred.fromCoroutine(connect())

    def _made(self) -> Any:
        self._protocol = txredisapi.RedisProtocol(convertNumbers=True)
        return self._protocol

    def tally(
        self, keys: tuple[str, str], now: int, span: int, member: str, cap: int, block_at: int
    ) -> Deferred[list[int]]:
        """Run :data:`SCRIPT` (EVALSHA, EVAL when Redis does not know it yet)."""
        protocol = self._protocol
        if protocol is None or not protocol.connected:
            raise txredisapi.ConnectionError("not connected")
        result: Deferred[list[int]] = protocol.eval(
            SCRIPT, list(keys), [now, span, member, cap, block_at]
        )
        return result

    def drop(self) -> None:
        """Close the connection at once (an exchange without an answer leaves its reply owed
        on it: a fresh connection starts clean)."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()

    def close(self) -> None:
        """Close the connection after what was written (the last events) is sent."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()


@attrs.define
class _Entry:
    """What this node knows of one key."""

    count: int = 0  # the fleet's count, as last answered
    counted_until: float = 0.0  # when its oldest event leaves the window: then an overstatement
    blocked_until: float = 0.0
    asking: bool = False  # a learn is in flight
    waiting: list[Deferred[None]] = attrs.Factory(list)  # checks waiting for that learn
    pending: int = 0  # adds sent and not answered yet: not in ``count``

    def known(self, now: float) -> Known:
        count = self.count if now < self.counted_until else 0
        blocked = self.blocked_until if self.blocked_until > now else 0.0
        return Known(count + self.pending, blocked)

    def stale(self, now: float) -> bool:
        return (not self.asking and not self.pending and now >= self.counted_until
                and now >= self.blocked_until)


class FleetCounts:
    """:class:`SharedCounts` in Redis: the cache, the outage and the probe (see the module).

    ``clock`` times the exchanges and stamps the events: the daemon's reactor, whose
    ``seconds()`` is the wall clock every node shares (within NTP's precision).
    """

    STARTING, UP, DOWN, CLOSED = "starting", "up", "down", "closed"

    def __init__(self, clock: IReactorTime, store: Store, url: str, log: Logger = _log) -> None:
        self.url = url
        self._clock, self._store, self._log = clock, store, log
        self._node = secrets.token_hex(6)  # makes each event's member unique in the window
        self._sequence = 0
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._prune_at = PRUNE_AT
        self.state = self.STARTING
        self._delay = PROBE_FIRST
        self._probe_call: IDelayedCall | None = None
        self._probing: Deferred[None] | None = None
        self._in_flight = 0
        self._waiting: list[Deferred[None]] = []
        self.shutdown: object = None  # the reactor's trigger that closes it, if any

    def start(self) -> None:
        """Connect (in the background): until Redis answers, every count is local."""
        if self.state == self.STARTING and self._probing is None:
            self._probe()

    # -- SharedCounts ------------------------------------------------------------------------

    def known(self, tally: Tally, key: str) -> Known:
        now = self._clock.seconds()
        entry = self._entry(tally, key)
        self._learn(tally, key, entry, now)
        return entry.known(now)

    def learn(self, tally: Tally, key: str) -> None:
        self._learn(tally, key, self._entry(tally, key), self._clock.seconds())

    def until_learnt(self, tally: Tally, key: str) -> Deferred[None] | None:
        entry = self._entries.get((tally.name, key))
        if entry is None or not entry.asking:
            return None
        d: Deferred[None] = Deferred()
        entry.waiting.append(d)
        return d

    def add(self, tally: Tally, key: str) -> Known:
        now = self._clock.seconds()
        entry = self._entry(tally, key)
        if self.state == self.UP:
            self._sequence += 1
            entry.pending += 1
            self._send(tally, key, entry, now, f"{self._node}:{self._sequence}")
        return entry.known(now)

    # -- the exchanges -----------------------------------------------------------------------

    def _entry(self, tally: Tally, key: str) -> _Entry:
        entry = self._entries.get((tally.name, key))
        if entry is None:
            if len(self._entries) >= self._prune_at:
                self._prune()
            entry = self._entries[(tally.name, key)] = _Entry()
        return entry

    def _prune(self) -> None:
        now = self._clock.seconds()
        for k in [k for k, entry in self._entries.items() if entry.stale(now)]:
            del self._entries[k]
        self._prune_at = max(PRUNE_AT, 2 * len(self._entries))

    def _learn(self, tally: Tally, key: str, entry: _Entry, now: float) -> None:
        """Ask for ``key``'s count and block, unless that answer is on its way already."""
        if self.state == self.UP and not entry.asking:
            entry.asking = True
            self._send(tally, key, entry, now, "")

    def _send(self, tally: Tally, key: str, entry: _Entry, now: float, member: str) -> None:
        added = bool(member)
        d = maybeDeferred(
            self._store.tally, redis_keys(tally, key), int(now * 1000), int(tally.span * 1000),
            member, tally.cap, tally.block_at,
        )
        d.addTimeout(TIMEOUT, self._clock).addCallback(self._answered, entry, added)
        self._track(d.addErrback(self._failed, entry, added))

    def _answered(self, answer: list[int], entry: _Entry, added: bool) -> None:
        count, leaves, block = (int(x) for x in answer)  # else a failure, as any other
        now = self._clock.seconds()
        entry.count, entry.counted_until = count, leaves / 1000
        entry.blocked_until = now + block / 1000 if block > 0 else 0.0
        self._settle(entry, added)  # last: a check waiting for this answer goes on at once

    def _failed(self, failure: Failure, entry: _Entry, added: bool) -> None:
        self._settle(entry, added)
        self._lost(_reason(failure))

    @staticmethod
    def _settle(entry: _Entry, added: bool) -> None:
        if added:
            entry.pending -= 1
        else:
            entry.asking = False
            waiting, entry.waiting = entry.waiting, []
            for d in waiting:
                d.callback(None)

    # -- the outage --------------------------------------------------------------------------

    def _lost(self, reason: str) -> None:
        if self.state in (self.UP, self.STARTING):
            self._log.warn(
                "fleet: redis unreachable, counting locally ({where}: {reason})",
                where=self._store.where, reason=reason,
            )
            self.state = self.DOWN
            self._store.drop()
            self._delay = PROBE_FIRST
            self._probe_later()

    def _probe_later(self) -> None:
        self._probe_call = self._clock.callLater(self._delay, self._probe)
        self._delay = min(self._delay * 2, PROBE_MAX)

    def _probe(self) -> None:
        """Connect, and run the script once: a Redis that answers PING but cannot run it (a
        replica, Lua disabled) stays an outage rather than flapping at every event."""
        self._probe_call = None

        async def probe() -> None:
            await self._store.connect(self._lost)
            now = int(self._clock.seconds() * 1000)
            await self._store.tally(redis_keys(PROBE, ""), now, 1000, "", 1, 0)

        d = Deferred.fromCoroutine(probe()).addTimeout(CONNECT_TIMEOUT, self._clock)
        self._probing = d
        self._track(d.addCallbacks(self._reached, self._unreached))

    def _reached(self, _: object) -> None:
        self._probing = None
        if self.state == self.CLOSED:
            self._store.close()
            return
        if self.state == self.DOWN:
            self._log.info("fleet: redis back, counting across the fleet ({where})",
                           where=self._store.where)
        else:
            self._log.info("fleet: counting across the fleet in redis at {where}",
                           where=self._store.where)
        self.state = self.UP

    def _unreached(self, failure: Failure) -> None:
        self._probing = None
        self._store.drop()
        if self.state == self.STARTING:
            self._lost(_reason(failure))
        elif self.state == self.DOWN:
            self._probe_later()

    # -- in flight, and the end --------------------------------------------------------------

    def _track(self, d: Deferred[Any]) -> None:
        self._in_flight += 1

        def done(_: object) -> None:
            self._in_flight -= 1
            if not self._in_flight:
                waiting, self._waiting = self._waiting, []
                for w in waiting:
                    w.callback(None)

        d.addBoth(done)

    def settled(self) -> Deferred[None]:
        """Fires when no exchange is in flight (each is bounded by its timeout): every event
        so far has been answered by Redis or given up on. For an orderly close, and tests."""
        if not self._in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def close(self) -> Deferred[None]:
        """Stop probing; once the exchanges in flight are answered (each within TIMEOUT),
        close the connection. Afterwards every answer comes from what was learnt (an old
        generation's limits may still be read by its last sessions)."""
        self.state = self.CLOSED
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe_call = None
        if self._probing is not None:
            self._probing.cancel()
        return self.settled().addCallback(lambda _: self._store.close())


def _reason(failure: Failure) -> str:
    if isinstance(failure.value, TimeoutError):
        return "no answer in time"
    return failure.getErrorMessage() or type(failure.value).__name__


def make_counts(reactor: Any, url: str) -> FleetCounts:
    """The fleet's counts in the Redis of ``url``: connecting once the reactor runs (its
    timeouts mean nothing before), closed when it shuts down."""
    counts = FleetCounts(reactor, RedisStore(reactor, url), url)
    reactor.callWhenRunning(counts.start)
    counts.shutdown = reactor.addSystemEventTrigger("before", "shutdown", counts.close)
    return counts


def make_limits(
    config: Config, settings: LimitSettings, reactor: Any, previous: Generation | None
) -> Limits:
    """The counters carry over a reload that leaves ``[limits]`` alone. New numbers mean new
    counters (the connections already open count against the old ones until they close).
    The fleet's connection is one per process: kept by a reload that leaves ``[fleet] redis``
    alone, replaced (the old one closed) by one that changes it."""
    old = previous.limits if previous is not None else None
    url = config.fleet.redis
    shared: SharedCounts | None = None
    if old is not None and isinstance(old.shared, FleetCounts) and old.shared.url == url:
        shared = old.shared
    elif url:
        shared = make_counts(reactor, url)
    if old is not None and isinstance(old.shared, FleetCounts) and old.shared is not shared:
        reactor.removeSystemEventTrigger(old.shared.shutdown)
        old.shared.close()
    if old is not None and old.settings == settings and old.shared is shared:
        return old
    return Limits(reactor, settings, shared)
