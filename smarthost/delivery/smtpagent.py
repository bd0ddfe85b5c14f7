"""One delivery attempt of one message to one SMTP route; returns per-recipient outcomes.

Our own small ESMTP client rather than ``twisted.mail``'s ``ESMTPSender``, whose measured
defects (dot-stuffing per 16 KiB chunk, plaintext replies injected after ``220`` to STARTTLS
read as TLS replies, a result Deferred that never fires when the server hangs up, no
timeouts) all sit in the parts that matter here. What this module guarantees instead:

- every wait is bounded (RFC 5321 4.5.3.2 timeouts, see :class:`Timeouts`) and a dropped
  connection always ends the attempt, so :meth:`SMTPDelivery.deliver` always returns;
- bytes that arrive after the ``220`` to STARTTLS and before the handshake are discarded;
- dot-stuffing tracks the start of line across chunk boundaries;
- credentials are only sent over TLS and never appear in an outcome, log or exception.

Host choice: the route's hosts are tried in order; anything that goes wrong before the host
accepts ``MAIL FROM`` (no connection, timeout, bad greeting, EHLO refused, TLS failure, AUTH
refused) moves on to the next host. Once ``MAIL`` is accepted the host's replies are final for
this attempt. Under "opportunistic" TLS a failed STARTTLS *handshake* is also a host failure
(next host, else deferred) and never falls back to plaintext: SPEC allows plaintext only when
STARTTLS is not offered, and retrying in the clear would let anyone who can break handshakes
read the mail.

Connections are reused through :mod:`smarthost.delivery.conncache`. When a reused connection
fails before ``MAIL`` is accepted (the server hung up while it was parked, or answers ``MAIL``
with a 4xx such as 421), that is not the message's fault: a fresh connection to the same host
is opened instead, transparently.

Hosts that took no connection are reported in the result (:attr:`HopResult.unreachable`),
never remembered here: the courier keeps them in the one failed-host memory
(:mod:`smarthost.delivery.hostcache`), which orders routes and suspends dead next hops.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS

from smarthost.core.enums import TLSPolicy
from smarthost.core.envelope import BOUNCED, DEFERRED, DELIVERED, Envelope, Outcome, Recipient
from smarthost.delivery.conncache import ConnectionCache, Key, Reuse, Session
from smarthost.delivery.routing import Credentials, Host, HostFailure, Route
from smarthost.delivery.smtpclient import (
    CONNECT_FAILED,
    ClientConnection,
    HostError,
    QuietFactory,
    ServerReply,
    extensions_of,
    xtext,
)

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot


@attrs.frozen
class HopResult:
    """One delivery to one route: an outcome per recipient, in order, and the hosts that took
    no connection on the way (whether or not a later host took the message)."""

    outcomes: tuple[Outcome, ...]
    unreachable: tuple[HostFailure, ...] = ()


@attrs.frozen
class Timeouts:
    """Seconds to wait for each reply; RFC 5321 4.5.3.2 values, shortened by tests.

    RFC 5321 names no timeout for EHLO, STARTTLS, the TLS handshake or AUTH; ``command``
    (5 minutes, like MAIL) covers them. ``quit`` bounds the polite goodbye, after which the
    connection is simply closed.
    """

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    quit: float = 30.0
    rset: float = 20.0  # before parking a connection (Postfix's smtp_rset_timeout)


REQUIRETLS_FAILED = "5.7.30"  # RFC 8689 5: REQUIRETLS support required

_REUSE = Reuse()  # Postfix's defaults


class SMTPDelivery:
    """Delivers one message to one route, trying the route's hosts in order.

    ``reactor`` must provide IReactorTCP and IReactorTime (any real reactor, or
    ``MemoryReactorClock`` in unit tests); ``hostname`` is our EHLO name; ``trust_root``
    checks certificates under "verify" (default: the platform's CAs).
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        hostname: str,
        *,
        timeouts: Timeouts = Timeouts(),
        trust_root: IOpenSSLTrustRoot | Certificate | None = None,
        transcript: bool = False,
        reuse: Reuse | None = _REUSE,
    ) -> None:
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._hostname = hostname
        self._timeouts = timeouts
        self._trust_root = trust_root
        # The SMTP dialog line by line at debug level: for debugging a peer, not by default
        # (twistd's log shows debug, and one delivery is a dozen lines).
        self._transcript = transcript
        # reuse None: one connection per delivery, QUIT after it.
        self._cache = ConnectionCache(self._clock, reuse, quit=timeouts.quit, rset=timeouts.rset)

    async def deliver(
        self,
        route: Route,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        open_body: Callable[[], BinaryIO],
        size: int,
    ) -> HopResult:
        """One outcome per recipient, in order; network trouble never raises.

        Only a bug raises, and the caller then defers every recipient: a possible duplicate
        is better than a lost message. The connection is parked for reuse or closed on
        every path.
        """
        if not recipients:
            return HopResult(())
        if envelope.requiretls and route.tls != TLSPolicy.VERIFY:
            # RFC 8689 4.2.1: no verified TLS to offer this message, now or on a retry.
            why = ("REQUIRETLS: no verified TLS to this domain (neither an MTA-STS policy in "
                   "enforce mode nor tls_policy \"verify\")")
            return HopResult(tuple(Outcome(r, BOUNCED, why, "", REQUIRETLS_FAILED)
                                   for r in recipients))
        last, remote = HostError("no SMTP host to try", "4.4.4"), ""
        unreachable: list[HostFailure] = []
        for host in route.hosts:
            try:
                outcomes = await self._attempt(
                    host, route, envelope, recipients, open_body, size
                )
            except HostError as e:
                last, remote = e, host.remote
                if e.status == CONNECT_FAILED:
                    unreachable.append(HostFailure(host, e.reason, e.status))
                continue
            return HopResult(tuple(outcomes), tuple(unreachable))
        deferred = (Outcome(r, DEFERRED, last.reason, remote, last.status) for r in recipients)
        return HopResult(tuple(deferred), tuple(unreachable))

    async def _attempt(
        self,
        host: Host,
        route: Route,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        open_body: Callable[[], BinaryIO],
        size: int,
    ) -> list[Outcome]:
        key: Key = (host, route.tls, route.implicit_tls, route.credentials)
        while (session := self._cache.take(key)) is not None:
            try:
                outcomes = await self._transaction(
                    session.conn, host, envelope, recipients, open_body, size,
                    session.extensions, reused=True,
                )
            except HostError:
                # Before MAIL was accepted, so nothing was delivered: the connection went
                # stale while parked. A fresh one (below) decides, never this failure.
                self._cache.discard(session)
                continue
            except BaseException:
                self._cache.discard(session)
                raise
            await self._cache.release(key, session)
            return outcomes
        conn = await self._connect(host, route)
        try:
            opened = self._clock.seconds()
            extensions = await self._open(conn, host, route)
            session = Session(conn, extensions, opened)
            outcomes = await self._transaction(
                conn, host, envelope, recipients, open_body, size, extensions
            )
        except BaseException:
            await conn.close(self._timeouts.quit)
            raise
        await self._cache.release(key, session)
        return outcomes

    def close_all(self) -> Deferred[None]:
        """For shutdown: QUIT every parked connection and park no more (see
        :meth:`ConnectionCache.close_all`)."""
        return self._cache.close_all()

    # -- connection and session -----------------------------------------------------------
    def _tls_options(
        self, route: Route, host: Host
    ) -> IOpenSSLClientConnectionCreator | CertificateOptions:
        if route.tls == TLSPolicy.VERIFY:
            return optionsForClientTLS(host.name, trustRoot=self._trust_root)
        # Opportunistic and "required" only want encryption: RFC 7435, most MX certificates
        # would fail verification, and failing closed on them would stop mail.
        return CertificateOptions(verify=False)

    async def _connect(self, host: Host, route: Route) -> ClientConnection:
        endpoint: IStreamClientEndpoint
        timeout = self._timeouts.connect
        try:
            family = ipaddress.ip_address(host.address).version
        except ValueError:
            family = 4  # a name: TCP4ClientEndpoint resolves it
        if family == 6:
            endpoint = TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                self._reactor, host.address, host.port, timeout
            )
        else:
            endpoint = TCP4ClientEndpoint(self._reactor, host.address, host.port, timeout)
        if route.implicit_tls:
            options: Any = self._tls_options(route, host)
            endpoint = wrapClientTLS(options, endpoint)
        conn = ClientConnection(self._clock, str(host), self._transcript)
        try:
            await endpoint.connect(QuietFactory(conn))
        except error.ConnectionRefusedError:
            raise HostError(f"connection refused by {host}", CONNECT_FAILED) from None
        except (error.TimeoutError, error.ConnectingCancelledError):
            raise HostError(f"connection to {host} timed out", CONNECT_FAILED) from None
        except (error.ConnectError, OSError) as e:
            raise HostError(f"cannot connect to {host}: {e}", CONNECT_FAILED) from None
        return conn

    async def _open(self, conn: ClientConnection, host: Host, route: Route) -> dict[str, str]:
        """Greeting, EHLO, TLS, AUTH: ready for MAIL, or a HostError."""
        t = self._timeouts
        if route.implicit_tls:
            await conn.handshake(t.command)
        greeting = await conn.read_reply(t.greeting, "greeting")
        if greeting.code != 220:
            raise HostError(f"{host} greeted with: {greeting.text}", greeting.status(DEFERRED))
        extensions = await self._hello(conn, host)
        must_encrypt = route.tls != TLSPolicy.OPPORTUNISTIC or route.credentials is not None
        if not conn.tls:
            if "STARTTLS" in extensions:
                conn.send("STARTTLS")
                reply = await conn.read_reply(t.command, "STARTTLS")
                if reply.code == 220:
                    conn.start_tls(self._tls_options(route, host))
                    await conn.handshake(t.command)
                    extensions = await self._hello(conn, host)  # RFC 3207 4.2: forget it all
                elif must_encrypt:
                    raise HostError(f"{host} refused STARTTLS: {reply.text}", "4.7.4")
            elif must_encrypt:
                why = "credentials are configured" if route.tls == TLSPolicy.OPPORTUNISTIC else (
                    f'delivery.tls is "{route.tls}"'
                )
                raise HostError(f"{host} does not offer STARTTLS and {why}", "4.7.4")
        if route.credentials is not None:
            await self._authenticate(conn, host, route.credentials, extensions)
        return extensions

    async def _hello(self, conn: ClientConnection, host: Host) -> dict[str, str]:
        t = self._timeouts
        conn.send(f"EHLO {self._hostname}")
        reply = await conn.read_reply(t.command, "EHLO")
        if reply.positive:
            return extensions_of(reply)
        if reply.code >= 500:  # RFC 5321 3.2: a pre-ESMTP server; HELO then, no extensions
            conn.send(f"HELO {self._hostname}")
            reply = await conn.read_reply(t.command, "HELO")
            if reply.positive:
                return {}
        raise HostError(f"{host} refused EHLO/HELO: {reply.text}", reply.status(DEFERRED))

    async def _authenticate(
        self,
        conn: ClientConnection,
        host: Host,
        credentials: Credentials,
        extensions: dict[str, str],
    ) -> None:
        """AUTH PLAIN (RFC 4616) or LOGIN; a refusal defers, it never bounces (SPEC)."""
        if not conn.tls:  # _open should have stopped first; never send secrets in the clear
            raise HostError(f"{host} is not encrypted, not sending credentials", "4.7.0")

        def b64(text: str) -> str:
            return base64.b64encode(text.encode("utf-8")).decode("ascii")

        t = self._timeouts
        mechanisms = extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            token = b64(f"\0{credentials.username}\0{credentials.password}")
            conn.send(f"AUTH PLAIN {token}", secret=True)
            reply = await conn.read_reply(t.command, "AUTH")
        elif "LOGIN" in mechanisms:
            conn.send("AUTH LOGIN")
            reply = await conn.read_reply(t.command, "AUTH")
            for secret in (credentials.username, credentials.password):
                if reply.code != 334:
                    break
                conn.send(b64(secret), secret=True)
                reply = await conn.read_reply(t.command, "AUTH")
        else:
            raise HostError(f"{host} offers neither AUTH PLAIN nor AUTH LOGIN", "4.7.0")
        if reply.code == 334:  # a challenge we cannot answer: cancel (RFC 4954 4)
            conn.send("*")
            reply = await conn.read_reply(t.command, "AUTH")
        if reply.code != 235:
            raise HostError(f"{host} refused authentication: {reply.text}", reply.status(DEFERRED))

    # -- the transaction ------------------------------------------------------------------
    def _mail(self, envelope: Envelope, size: int, extensions: dict[str, str]) -> str:
        words = [f"MAIL FROM:<{envelope.sender}>"]
        if "SIZE" in extensions:
            words.append(f"SIZE={size}")
        # An 8-bit body goes out even when 8BITMIME is not offered, as Postfix does: nearly
        # every server takes it, and RFC 6152 conversion to 7 bit would mean rewriting MIME.
        if envelope.body == "8BITMIME" and "8BITMIME" in extensions:
            words.append("BODY=8BITMIME")
        if envelope.smtputf8:
            words.append("SMTPUTF8")
        if envelope.requiretls:
            words.append("REQUIRETLS")
        if "DSN" in extensions:
            if envelope.ret:
                words.append(f"RET={envelope.ret}")
            if envelope.envid:
                words.append(f"ENVID={xtext(envelope.envid)}")
        return " ".join(words)

    def _rcpt(self, recipient: Recipient, extensions: dict[str, str]) -> str:
        words = [f"RCPT TO:<{recipient.address}>"]
        if "DSN" in extensions:
            if recipient.notify:
                words.append(f"NOTIFY={','.join(recipient.notify)}")
            if recipient.orcpt:
                kind, sep, address = recipient.orcpt.partition(";")
                if not sep:
                    kind, address = "rfc822", recipient.orcpt
                words.append(f"ORCPT={kind};{xtext(address)}")
        return " ".join(words)

    async def _transaction(
        self,
        conn: ClientConnection,
        host: Host,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        open_body: Callable[[], BinaryIO],
        size: int,
        extensions: dict[str, str],
        *,
        reused: bool = False,
    ) -> list[Outcome]:
        t, remote = self._timeouts, host.remote

        def outcome(recipient: Recipient, reply: ServerReply) -> Outcome:
            result = DELIVERED if reply.positive else DEFERRED if reply.code < 500 else BOUNCED
            return Outcome(
                recipient,
                result,
                reply.text,
                remote,
                reply.status(result),
                dsn_passed="DSN" in extensions,
            )

        unable = _cannot_carry(host, envelope, extensions)
        if unable is not None:
            why, status = unable
            return [Outcome(r, BOUNCED, why, remote, status) for r in recipients]
        mail = self._mail(envelope, size, extensions)
        rcpts = [self._rcpt(r, extensions) for r in recipients]
        pipelining = "PIPELINING" in extensions
        chunking = "CHUNKING" in extensions  # RFC 3030: BDAT instead of DATA
        conn.between_transactions = False
        if pipelining:  # RFC 2920 3.1: MAIL, RCPTs and DATA in one go, replies in order
            conn.send(mail, *rcpts, *(() if chunking else ("DATA",)))
        else:
            conn.send(mail)
        reply = await conn.read_reply(t.mail, "MAIL FROM")
        if reused and 400 <= reply.code < 500:  # e.g. 421: timed out while parked
            raise HostError(f"{host} answered MAIL on a reused connection with {reply.text}")
        if not reply.positive:
            return [outcome(r, reply) for r in recipients]  # close() reads pipelined replies

        decided: list[Outcome | None] = [None] * len(recipients)
        accepted: list[int] = []
        try:
            for i, (recipient, rcpt) in enumerate(zip(recipients, rcpts, strict=True)):
                if not pipelining:
                    conn.send(rcpt)
                reply = await conn.read_reply(t.rcpt, "RCPT TO")
                if reply.positive:
                    accepted.append(i)
                else:
                    decided[i] = outcome(recipient, reply)
            if not accepted and (chunking or not pipelining):
                return _done(decided)
            if chunking:
                reply = await self._chunks(conn, open_body, pipelining)
                conn.between_transactions = True
            else:
                reply = await self._data(conn, host, open_body, pipelining, bool(accepted))
            for i in accepted:
                decided[i] = outcome(recipients[i], reply)
        except HostError as e:
            for i, recipient in enumerate(recipients):
                if decided[i] is None:
                    decided[i] = Outcome(recipient, DEFERRED, e.reason, remote, e.status)
        return _done(decided)

    async def _data(
        self,
        conn: ClientConnection,
        host: Host,
        open_body: Callable[[], BinaryIO],
        pipelining: bool,
        any_accepted: bool,
    ) -> ServerReply:
        """DATA, the body and its end; the reply that decides the accepted recipients (with
        none accepted, nobody is decided by it). Pipelined, DATA went out with MAIL."""
        t = self._timeouts
        if not pipelining:
            conn.send("DATA")
        reply = await conn.read_reply(t.data_init, "DATA")
        if reply.code != 354:
            if any_accepted and reply.positive:  # a 2xx to DATA is nonsense: not delivered
                conn.reusable = False
                raise HostError(f"{host} answered DATA with {reply.text}")
            return reply
        if not any_accepted:
            # RFC 2920 3.1: DATA was accepted although every RCPT failed; end it empty.
            conn.send(".")
            return reply
        conn.in_data = True
        try:
            with open_body() as body:
                await conn.send_body(body, t.data_block)
        except OSError as e:
            conn.abort()  # never end a message we could not read in full
            raise HostError(f"cannot read the queued message: {e}", "4.3.0") from None
        reply = await conn.read_reply(t.data_end, "end of data")
        conn.between_transactions = True
        return reply

    async def _chunks(
        self, conn: ClientConnection, open_body: Callable[[], BinaryIO], pipelining: bool
    ) -> ServerReply:
        t = self._timeouts
        try:
            with open_body() as body:
                return await conn.send_chunks(body, t.data_block, t.data_end,
                                              pipelining=pipelining)
        except OSError as e:
            conn.abort()  # never end a message we could not read in full
            raise HostError(f"cannot read the queued message: {e}", "4.3.0") from None


def _cannot_carry(host: Host, envelope: Envelope, extensions: Mapping[str, str]
                  ) -> tuple[str, str] | None:
    """Why this next hop cannot take this message at all (the bounce's text and status),
    or None. Other hosts of one MX set are configured alike, so trying them would only delay
    the bounce (Postfix agrees)."""
    if envelope.smtputf8 and "SMTPUTF8" not in extensions:
        # SPEC / RFC 6531 3.2: bounced, not mangled.
        return f"{host} does not offer SMTPUTF8, which this message requires", "5.6.7"
    if envelope.requiretls and "REQUIRETLS" not in extensions:
        # RFC 8689 4.2.1: the next hop must promise to keep requiring TLS.
        return (f"{host} does not offer REQUIRETLS, which this message requires",
                REQUIRETLS_FAILED)
    return None


def _done(decided: list[Outcome | None]) -> list[Outcome]:
    done = [d for d in decided if d is not None]
    assert len(done) == len(decided), "a recipient without an outcome"
    return done
