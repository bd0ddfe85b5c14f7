"""A configurable test MX on aiosmtpd, for outbound and end-to-end tests.

The server runs in aiosmtpd's own thread (asyncio), so it works beside the Twisted reactor of
a trial test. Usage::

    peer = MXPeer(dsn=True, reject={"nobody@example.test"})
    peer.start()
    self.addCleanup(peer.stop)
    route = Route(SMTP, hosts=(peer.host,))
    ...                                  # deliver
    [message] = await peer.wait_for_messages(1)
    self.assertEqual(message.rcpt_tos, ("alice@example.test",))

Behaviour is an :class:`MXBehaviour`; pass its fields as keywords to :class:`MXPeer`, or change
``peer.behaviour`` between attempts (it is read at each step of each session). Every accepted
message is recorded as a :class:`Received`, with MAIL and RCPT parameters exactly as sent.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import attrs
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from aiosmtpd.smtp import Envelope as _AioEnvelope
from twisted.internet import threads
from twisted.internet.defer import Deferred

from smarthost.app.tlscert import KeyPair, issue
from smarthost.delivery.routing import Host

_DSN_MAIL = ("RET=", "ENVID=")
_DSN_RCPT = ("NOTIFY=", "ORCPT=")
HANG_POINTS = ("greeting", "EHLO", "STARTTLS", "MAIL", "RCPT", "DATA", "data_end")


@attrs.define
class MXBehaviour:
    """What the MX offers and how it misbehaves; every field has the friendly default."""

    starttls: bool = False  # offer STARTTLS (certificate: ``certificate`` or self-signed)
    require_tls: bool = False  # 530 to MAIL before STARTTLS
    implicit_tls: bool = False  # TLS from the first byte, as on port 465
    certificate: KeyPair | None = None  # e.g. tlscert.issue(("mx.test",), ca=ca)
    users: Mapping[str, str] | None = None  # offer AUTH (after TLS only) and require it
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")  # offered when ``users`` is set
    pipelining: bool = True
    dsn: bool = False  # RFC 3461: without it RET/ENVID/NOTIFY/ORCPT get 555
    smtputf8: bool = True
    eightbitmime: bool = True
    tempfail_first: int = 0  # answer 451 4.3.0 at end of DATA for the first K transactions
    reject: frozenset[str] | set[str] = frozenset()  # RCPT answered 550 5.1.1
    hang_at: str | None = None  # one of HANG_POINTS: never answer there (until stopped)
    drop_in_data: bool = False  # close the connection after the first data bytes arrive


@attrs.frozen
class Received:
    """One message the MX accepted (250 after DATA)."""

    mail_from: str  # "<>" for the null sender
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]  # MAIL parameters as sent, case kept ("SIZE=12", "RET=HDRS")
    rcpt_options: tuple[tuple[str, ...], ...]  # per accepted recipient, as sent
    data: bytes  # the message as received, dot-unstuffed, CRLF line ends
    ehlo: str | None  # the last EHLO/HELO name
    tls: bool  # the transaction ran over TLS
    user: str | None  # the AUTH login, if any


class _Envelope(_AioEnvelope):
    def __init__(self) -> None:
        super().__init__()
        self.raw_mail_options: list[str] = []
        self.raw_rcpt_options: list[list[str]] = []


def _split(arg: str, strip: tuple[str, ...]) -> tuple[str, list[str]]:
    """Separate ``FROM:<a@b> X=1 Y=2`` into the argument aiosmtpd should see and the raw
    parameters; parameters starting with ``strip`` are taken out (aiosmtpd refuses DSN)."""
    head, bracket, tail = arg.partition(">")
    if not bracket:
        head, _, tail = arg.partition(" ")
    params = tail.split()
    kept = [p for p in params if not p.upper().startswith(strip)]
    return f"{head}{bracket} {' '.join(kept)}".rstrip(), params


def _encrypted(server: SMTP) -> bool:
    # session.ssl is only set after STARTTLS; implicit TLS shows on the transport alone.
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


class _SMTP(SMTP):
    """aiosmtpd's SMTP with the hooks a misbehaving or DSN-capable MX needs."""

    def __init__(self, peer: MXPeer, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.peer = peer

    def _create_envelope(self) -> _Envelope:
        return _Envelope()

    async def _handle_client(self) -> None:
        if self.peer._armed:
            with self.peer._cond:
                self.peer.connections += 1
        await self.peer._maybe_hang("greeting")
        await super()._handle_client()

    async def smtp_STARTTLS(self, arg: str) -> None:
        await self.peer._maybe_hang("STARTTLS")
        await super().smtp_STARTTLS(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        raw: list[str] = []
        if arg is not None:
            arg, raw = _split(arg, _DSN_MAIL if self.peer.behaviour.dsn else ())
        self.raw_params = raw
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        raw: list[str] = []
        if arg is not None:
            arg, raw = _split(arg, _DSN_RCPT if self.peer.behaviour.dsn else ())
        self.raw_params = raw
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        envelope = self.envelope
        if envelope and envelope.rcpt_tos:
            await self.peer._maybe_hang("DATA")
        if not (self.peer.behaviour.drop_in_data and envelope and envelope.rcpt_tos):
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._reader.read(1024)
        assert self.transport is not None
        self.transport.close()


class _Handler:
    def __init__(self, peer: MXPeer) -> None:
        self.peer = peer

    async def handle_EHLO(
        self, server: _SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        await self.peer._maybe_hang("EHLO")
        session.host_name = hostname
        b = self.peer.behaviour
        drop = set()
        if not b.smtputf8:
            drop.add("250-SMTPUTF8")
        if not b.eightbitmime:
            drop.add("250-8BITMIME")
        lines = [r for r in responses[:-1] if r not in drop]
        if b.pipelining:
            lines.append("250-PIPELINING")
        if b.dsn:
            lines.append("250-DSN")
        lines.append("250-ENHANCEDSTATUSCODES")
        return [*lines, responses[-1]]

    async def handle_MAIL(
        self, server: _SMTP, session: Any, envelope: _Envelope, address: str, options: list[str]
    ) -> str:
        await self.peer._maybe_hang("MAIL")
        if self.peer.behaviour.require_tls and session.ssl is None:
            return "530 5.7.0 Must issue a STARTTLS command first"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.raw_mail_options = server.raw_params
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: _SMTP, session: Any, envelope: _Envelope, address: str, options: list[str]
    ) -> str:
        await self.peer._maybe_hang("RCPT")
        if address in self.peer.behaviour.reject:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        envelope.raw_rcpt_options.append(server.raw_params)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: _SMTP, session: Any, envelope: _Envelope) -> str:
        await self.peer._maybe_hang("data_end")  # all data read, the final reply never comes
        return self.peer._record(server, session, envelope)


class _Controller(Controller):
    def __init__(self, peer: MXPeer, **kwargs: Any) -> None:
        super().__init__(_Handler(peer), **kwargs)
        self.peer = peer

    def factory(self) -> _SMTP:
        return _SMTP(self.peer, self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Port 0 means "any free port": learn it before aiosmtpd's readiness probe uses it.
        assert self.server is not None
        server = cast(asyncio.Server, self.server)
        self.port = server.sockets[0].getsockname()[1]
        super()._trigger_server()


class MXPeer:
    """An SMTP server on ``address``:``port`` (0: a free port) named ``name``."""

    def __init__(
        self,
        address: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str = "mx.test",
        behaviour: MXBehaviour | None = None,
        **options: Any,
    ) -> None:
        self.address, self.name, self._port = address, name, port
        self.behaviour = behaviour or MXBehaviour(**options)
        self.messages: list[Received] = []
        self.transactions = 0  # ends of DATA seen, accepted or not
        self.connections = 0  # sessions opened (greeting sent or hung)
        self._cond = threading.Condition()
        self._armed = False  # the readiness probe of start() must never hang
        self._controller: _Controller | None = None
        self._tmp: Path | None = None

    @property
    def host(self) -> Host:
        """This peer as a next hop, for ``Route(hosts=(peer.host,))``."""
        assert self._controller is not None, "start() first"
        return Host(self.name, self.address, self._controller.port)

    @property
    def port(self) -> int:
        return self.host.port

    def start(self) -> None:
        b = self.behaviour
        context = None
        if b.starttls or b.implicit_tls:
            pair = b.certificate or issue((self.name, self.address))
            self._tmp = Path(tempfile.mkdtemp(prefix="mxpeer-"))
            (self._tmp / "cert.pem").write_bytes(pair.cert_pem)
            (self._tmp / "key.pem").write_bytes(pair.key_pem)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self._tmp / "cert.pem", self._tmp / "key.pem")
        kwargs: dict[str, Any] = {
            "hostname": self.address,
            "port": self._port,
            "server_hostname": self.name,
            "enable_SMTPUTF8": True,  # removed from EHLO by the handler when not wanted
            "data_size_limit": 64 * 1024 * 1024,
        }
        if b.implicit_tls:
            kwargs["ssl_context"] = context
        elif b.starttls:
            kwargs["tls_context"] = context
        if b.users is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_required"] = True
            excluded = {"PLAIN", "LOGIN"} - set(b.auth_mechanisms)
            kwargs["auth_exclude_mechanism"] = excluded
        self._controller = _Controller(self, **kwargs)
        self._controller.start()
        self._armed = True

    def stop(self) -> None:
        """Stop the server, releasing every hung session; safe to call twice."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> Deferred[list[Received]]:
        """Fires with the first ``count`` messages once they arrived; fails after ``timeout``."""

        def wait() -> list[Received]:
            with self._cond:
                if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                    raise TimeoutError(f"{len(self.messages)} of {count} messages arrived")
                return list(self.messages[:count])

        return threads.deferToThread(wait)

    # -- called from the server thread ----------------------------------------------------
    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        users = self.behaviour.users or {}
        if isinstance(data, LoginPassword):
            login, password = data.login.decode(), data.password.decode()
            if users.get(login) == password:
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    async def _maybe_hang(self, point: str) -> None:
        assert point in HANG_POINTS
        if self._armed and self.behaviour.hang_at == point:
            await asyncio.Event().wait()  # cancelled by stop()

    def _record(self, server: _SMTP, session: Any, envelope: _Envelope) -> str:
        with self._cond:
            self.transactions += 1
            if self.transactions <= self.behaviour.tempfail_first:
                return "451 4.3.0 Try again later"
            content = envelope.original_content or b""
            self.messages.append(
                Received(
                    mail_from=envelope.mail_from or "",
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    mail_options=tuple(envelope.raw_mail_options),
                    rcpt_options=tuple(tuple(o) for o in envelope.raw_rcpt_options),
                    data=bytes(content),
                    ehlo=session.host_name,
                    tls=_encrypted(server),
                    user=session.auth_data if isinstance(session.auth_data, str) else None,
                )
            )
            self._cond.notify_all()
        return "250 2.0.0 OK queued"
