"""The SMTP agent's connection cache, like Postfix's: connections parked between deliveries.

After a transaction that left the dialog clean the connection is parked, keyed by host (name,
address, port), TLS policy, implicit TLS and credentials, so a connection is never shared across
different credentials or TLS requirements. The reply to the end of data clears the server's
buffers (RFC 5321 4.1.1.4), so no ``RSET`` follows a message; a transaction left open (``MAIL``
accepted, no message sent) gets ``RSET`` first and is parked on its ``250``. The next delivery
with the same key takes it (no connect, EHLO, STARTTLS or AUTH; the extensions it announced are
remembered); one parked too long (:class:`Reuse`) gets ``QUIT``. A parked connection is never
in use, so it carries one transaction at a time.
"""

from __future__ import annotations

from typing import TypeAlias

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from smarthost.delivery.routing import Credentials, Host
from smarthost.delivery.smtpclient import ClientConnection, HostError

_log = Logger(namespace="smarthost.delivery.smtpagent")


@attrs.frozen
class Reuse:
    """Limits of the connection cache, with Postfix's defaults."""

    idle: float = 2.0  # seconds parked before QUIT (smtp_connection_cache_time_limit)
    uses: int = 100  # transactions per connection (smtp_connection_reuse_count_limit)
    age: float = 300.0  # seconds since connecting (smtp_connection_reuse_time_limit)


# A connection may only carry mail for an equal key: same host, TLS policy and credentials.
Key: TypeAlias = tuple[Host, str, bool, Credentials | None]


@attrs.define(eq=False)
class Session:
    """A connection ready for MAIL, with what it announced and how much it was used."""

    conn: ClientConnection
    extensions: dict[str, str]
    opened: float
    uses: int = 0
    timer: IDelayedCall | None = None


class ConnectionCache:
    """Parks sessions by :data:`Key` and hands them out again; ``reuse`` None parks nothing
    (one connection per delivery, QUIT after it). ``quit`` and ``rset`` bound the replies
    waited for when closing and before parking."""

    def __init__(self, clock: IReactorTime, reuse: Reuse | None, *, quit: float,
                 rset: float) -> None:
        self._clock = clock
        self._reuse = reuse
        self._quit = quit
        self._rset = rset
        self._parked: dict[Key, list[Session]] = {}
        self._closing: set[Deferred[None]] = set()
        self._shut = False

    def take(self, key: Key) -> Session | None:
        """The most recently parked connection for ``key`` still fit for a transaction."""
        stack = self._parked.get(key)
        found = None
        while stack and found is None:
            session = stack.pop()
            if session.timer is not None and session.timer.active():
                session.timer.cancel()
            session.timer = None
            if session.conn.idle and not self._too_old(session):
                found = session
            else:  # hung up, or said something unasked while parked
                self.discard(session)
        if not stack:
            self._parked.pop(key, None)
        return found

    def _too_old(self, session: Session) -> bool:
        assert self._reuse is not None
        return (
            session.uses >= self._reuse.uses
            or self._clock.seconds() - session.opened >= self._reuse.age
        )

    async def release(self, key: Key, session: Session) -> None:
        """After a transaction: park the connection (after RSET when the transaction was
        left open: MAIL accepted, no message sent), or QUIT."""
        session.uses += 1
        conn = session.conn
        if self._reuse is None or self._shut or self._too_old(session) or not conn.idle:
            await conn.close(self._quit)
            return
        if not conn.between_transactions:
            try:
                conn.send("RSET")
                reply = await conn.read_reply(self._rset, "RSET")
            except HostError:
                reply = None
            if reply is None or reply.code != 250 or self._shut or not conn.idle:
                await conn.close(self._quit)
                return
            conn.between_transactions = True
        session.timer = self._clock.callLater(self._reuse.idle, self._expire, key, session)
        self._parked.setdefault(key, []).append(session)

    def _expire(self, key: Key, session: Session) -> None:
        session.timer = None
        stack = self._parked.get(key, [])
        if session in stack:
            stack.remove(session)
            if not stack:
                del self._parked[key]
        self.discard(session)

    def discard(self, session: Session) -> None:
        """QUIT (or abort) in the background; :meth:`close_all` waits for it."""
        closing = Deferred.fromCoroutine(session.conn.close(self._quit))
        self._closing.add(closing)

        def done(result: object) -> None:
            self._closing.discard(closing)

        closing.addErrback(lambda f: _log.failure("closing {peer}", f, peer=session.conn.peer))
        closing.addBoth(done)

    def close_all(self) -> Deferred[None]:
        """For shutdown: QUIT every parked connection and park no more; fires when all are
        closed (each close is bounded by the QUIT timeout)."""
        self._shut = True
        parked, self._parked = self._parked, {}
        for stack in parked.values():
            for session in stack:
                if session.timer is not None and session.timer.active():
                    session.timer.cancel()
                session.timer = None
                self.discard(session)
        closing = DeferredList(list(self._closing))
        return closing.addCallback(lambda _: None)
