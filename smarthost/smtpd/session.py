"""The ESMTP server protocol: one instance per connection.

Written on ``Protocol`` rather than ``twisted.mail.smtp.ESMTP`` because that one executes
commands pipelined behind STARTTLS after the handshake, accepts bare LF/CR and over-long lines
in DATA, and offers AUTH before TLS (measured on Twisted 26.10).

Replies always go out in command order, even when a check is pending: while one command is
being answered asynchronously (a policy check, a password check, the spool commit), later
pipelined commands wait in the buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from smarthost.api import ISpool
from smarthost.auth.sasl import ISASLMechanism
from smarthost.core import replies as reply
from smarthost.core.enums import Role
from smarthost.core.envelope import (
    AddressError,
    Client,
    QueueEntry,
    Recipient,
    parse_path,
)
from smarthost.core.maillog import MailLog
from smarthost.core.replies import (
    ALREADY_AUTHENTICATED,
    ALREADY_TLS,
    AUTH_IN_TRANSACTION,
    AUTH_NOT_OFFERED,
    BAD_RECIPIENT,
    BAD_SENDER,
    HELP,
    NEED_HELO,
    NEED_MAIL,
    NESTED_MAIL,
    NO_RECIPIENTS,
    NOT_ACCEPTED,
    PROTOCOL_PROBE,
    TOO_MANY_RECIPIENTS,
    UNKNOWN_MECHANISM,
    Reply,
)
from smarthost.smtpd.authdialog import AuthDialog, Login
from smarthost.smtpd.dotreader import DataResult
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits
from smarthost.smtpd.params import mail_params, rcpt_params, split_path
from smarthost.smtpd.policy import RelayPolicy
from smarthost.smtpd.reception import Reception
from smarthost.smtpd.trace import Hop, received_header, tls_details
from smarthost.smtpd.transaction import Transaction

MAX_COMMAND_LINE = 16384  # RFC 5321 says 512; AUTH responses and long parameters need more
MAX_BUFFER = 1 << 20  # pipelined bytes held while a reply is pending, before we stop reading

FORBIDDEN_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"})


@attrs.frozen
class SessionSettings:
    """What a listener's sessions share; one per role."""

    role: Role
    hostname: str
    max_size: int
    max_recipients: int = 1000
    command_timeout: float = 300
    allow_plaintext_auth: bool = False
    tls: Any = None  # server TLS options (for STARTTLS); None: STARTTLS is not offered
    mechanisms: Sequence[ISASLMechanism] = ()

    @property
    def offers_auth(self) -> bool:
        return self.role != Role.SMTP and bool(self.mechanisms)


class Session(Protocol):
    def __init__(
        self,
        settings: SessionSettings,
        policy: RelayPolicy,
        login: Login,
        spool: ISpool,
        maillog: MailLog,
        clock: IReactorTime,
        limits: Limits,
        hooks: Hooks | None = None,
        accepted: Callable[[QueueEntry], None] = lambda entry: None,
    ) -> None:
        self._settings = settings
        self._limits = limits
        self._hooks = hooks if hooks is not None else Hooks((), clock)
        self._accepted = accepted
        self._policy = policy
        self._login = login
        self._spool = spool
        self._log = maillog
        self._clock = clock
        # Per-connection state.
        self._address = ""
        self._helo = ""
        self._esmtp = False
        self._tls = settings.role == Role.SUBMISSIONS
        self._user: str | None = None
        self._buffer = b""
        self._busy = False  # a reply is pending; later pipelined commands wait
        self._closed = False
        self._discard_line = False  # skipping the rest of an over-long command line
        self._auth_step: Callable[[bytes], None] | None = None
        self._reception: Reception | None = None  # in DATA
        self._timeout: IDelayedCall | None = None
        self._paused = False
        self._txn = Transaction()
        self._admitted = False  # counted by the connection limiter
        self._errors = 0
        self._auth: AuthDialog | None = None  # made at the first AUTH
        self._stalled: IDelayedCall | None = None
        self._first_data = True

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        peer = self.transport.getPeer()
        host = getattr(peer, "host", "")
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        self._address = host
        refusal = self._limits.connections.admit(host)
        if refusal is not None:
            self._close(refusal)
            return
        self._admitted = True
        self._reset_timeout()
        client = self._client()
        self._gate(
            "CONNECT", "", self._hooks.connect, lambda: self._hooks.check_connect(client),
            lambda: Reply(220, "", f"{self._settings.hostname} ESMTP smarthost"),
            refused=self._close,  # a client refused at connect gets no session at all
        )

    def connectionLost(self, reason: Failure = Protocol.connectionLost.__defaults__[0]) -> None:  # type: ignore[index]
        self._closed = True
        for call in (self._timeout, self._stalled):
            if call is not None and call.active():
                call.cancel()
        self._timeout = self._stalled = None
        if self._admitted:
            self._admitted = False
            self._limits.connections.release(self._address)
        if self._reception is not None:
            self._reception.incoming.abort()
            self._reception = None

    def _client(self) -> Client:
        return Client(
            address=self._address,
            role=self._settings.role,
            tls=self._tls,
            user=self._user,
            helo=self._helo,
        )

    def _send(self, r: Reply, extra: tuple[str, ...] = ()) -> None:
        if self._closed or self.transport is None:
            return
        self.transport.write(r.to_bytes(extra))
        if r.code == 421:  # RFC 5321 3.8: 421 means the server is closing the channel
            self._close()
        elif r.code >= 400:
            self._count_error()

    def _count_error(self) -> None:
        """Postfix-like error limits: past the soft limit each reply is delayed a little
        longer; at the hard limit the connection is closed."""
        self._errors += 1
        limits = self._limits.settings
        if self._errors >= limits.hard_errors:
            self._close(reply.TOO_MANY_ERRORS)
        elif self._errors > limits.soft_errors:
            self._stall(float(self._errors - limits.soft_errors))

    def _stall(self, seconds: float) -> None:
        """Hold back further replies (and so the client) for a while."""
        self._busy = True

        def resume() -> None:
            self._stalled = None
            self._busy = False
            self._process()

        self._stalled = self._clock.callLater(seconds, resume)

    def _close(self, r: Reply | None = None) -> None:
        if r is not None:
            self._send(r)
        self._closed = True
        self._buffer = b""
        if self._reception is not None:  # a half-received message is never kept
            self._reception.incoming.abort()
            self._reception = None
        if self.transport is not None:
            self.transport.loseConnection()

    def _reset_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = self._clock.callLater(self._settings.command_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timeout = None
        if self._busy:  # we are the slow one (spool, password check): not the client's fault
            self._reset_timeout()
            return
        self._close(reply.TIMEOUT)

    # -- input -----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._first_data:
            self._first_data = False
            if data[:2] == b"\x16\x03":  # a TLS ClientHello on a plaintext port
                self._close(PROTOCOL_PROBE)
                return
        self._reset_timeout()
        self._buffer += data
        self._process()

    def _process(self) -> None:
        """Handle buffered input until it runs out or a reply is pending."""
        while not self._busy and not self._closed and self._buffer:
            if self._reception is not None:
                data, self._buffer = self._buffer, b""
                result = self._reception.feed(data)
                if result is not None:
                    self._end_of_data(result)
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_COMMAND_LINE:
                    self._buffer = b""
                    if not self._discard_line:
                        self._discard_line = True
                        self._send(reply.LINE_TOO_LONG)
                break
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            if self._discard_line:
                self._discard_line = False
                continue
            if len(line) > MAX_COMMAND_LINE:
                self._send(reply.LINE_TOO_LONG)
                continue
            self._line(line.removesuffix(b"\r"))
        self._flow_control()

    def _flow_control(self) -> None:
        """Stop reading from a client that pipelines more than we hold while busy."""
        if self.transport is None:
            return
        want_pause = self._busy and len(self._buffer) > MAX_BUFFER
        if want_pause and not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        elif self._paused and not want_pause:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _line(self, raw: bytes) -> None:
        if self._auth_step is not None:
            step, self._auth_step = self._auth_step, None
            step(raw)
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._send(reply.SYNTAX)
            return
        verb, _, arg = line.partition(" ")
        if verb.upper() in FORBIDDEN_VERBS:
            # Cross-protocol requests (an HTTP proxy or browser pointed at us): answer and
            # close, as Postfix's smtpd_forbidden_commands does.
            self._close(PROTOCOL_PROBE)
            return
        handler = getattr(self, f"smtp_{verb.upper()}", None) if verb.isalpha() else None
        if handler is None:
            self._send(reply.SYNTAX)
            return
        handler(arg.strip())

    def _await(
        self, work: Coroutine[Any, Any, Reply | None], then: Callable[[Reply | None], None]
    ) -> None:
        """Run async work for one command; later commands wait until it has answered."""
        self._busy = True
        outer = True  # still inside the _process loop that called us

        def done(result: Reply | None) -> None:
            self._busy = False
            then(result)
            if not outer:
                self._process()

        def failed(failure: Failure) -> None:
            self._log.failure("session error", failure=failure)
            done(reply.LOCAL_ERROR)

        Deferred.fromCoroutine(work).addCallbacks(done, failed)
        outer = False

    # -- commands --------------------------------------------------------------------------

    def smtp_EHLO(self, arg: str) -> None:
        self._hello(arg, esmtp=True)

    def smtp_HELO(self, arg: str) -> None:
        self._hello(arg, esmtp=False)

    def _hello(self, arg: str, *, esmtp: bool) -> None:
        if not arg:
            self._send(reply.PARAM_SYNTAX)
            return

        def greet() -> None:
            self._helo, self._esmtp = arg, esmtp
            self._txn = Transaction()
            if esmtp:
                self._send(Reply(250, "", self._settings.hostname), self._extensions())
            else:
                self._send(Reply(250, "", self._settings.hostname))

        client = self._client()
        self._gate(
            "HELO", arg, self._hooks.helo, lambda: self._hooks.check_helo(client, arg), greet
        )

    def _extensions(self) -> tuple[str, ...]:
        s = self._settings
        ext = [f"SIZE {s.max_size}", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"]
        if self._can_starttls():
            ext.append("STARTTLS")
        if self._auth_available():
            ext.append("AUTH " + " ".join(m.name for m in s.mechanisms))
        ext += ["SMTPUTF8", "DSN"]
        return tuple(ext)

    def _can_starttls(self) -> bool:
        return (
            not self._tls
            and self._settings.tls is not None
            and ITLSTransport.providedBy(self.transport)
        )

    def _auth_available(self) -> bool:
        s = self._settings
        return s.offers_auth and self._user is None and (self._tls or s.allow_plaintext_auth)

    def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self._send(reply.PARAM_SYNTAX)
        elif self._tls:
            self._send(ALREADY_TLS)
        elif not self._can_starttls():
            self._send(reply.TLS_UNAVAILABLE)
        else:
            self._send(reply.READY_TLS)
            # RFC 3207 4.2 and CVE-2011-0411: nothing sent before the handshake may be
            # acted on, and the client must start over with EHLO.
            self._buffer = b""
            self._helo, self._esmtp, self._user = "", False, None
            self._txn = Transaction()
            self._tls = True
            self.transport.startTLS(self._settings.tls)  # type: ignore[union-attr]

    def smtp_AUTH(self, arg: str) -> None:
        s = self._settings
        if not s.offers_auth:
            self._send(AUTH_NOT_OFFERED)
            return
        if not self._tls and not s.allow_plaintext_auth:
            self._send(reply.AUTH_NEEDS_TLS)
            return
        if not self._esmtp:
            self._send(NEED_HELO)
            return
        if self._user is not None:
            self._send(ALREADY_AUTHENTICATED)
            return
        if self._txn.sender_given:
            self._send(AUTH_IN_TRANSACTION)
            return
        if self._limits.auth.blocked(self._address):
            self._send(reply.AUTH_BLOCKED)
            return
        name, _, initial = arg.partition(" ")
        factory = next((m for m in s.mechanisms if m.name == name.upper()), None)
        if factory is None:
            self._send(UNKNOWN_MECHANISM)
            return
        if self._auth is None:
            self._auth = AuthDialog(
                self, self._login, self._limits, self._log, self._clock, self._address
            )
        self._auth.start(factory, initial)

    # -- what the AUTH dialog asks of us (DialogHost) --

    def send(self, r: Reply) -> None:
        self._send(r)

    def answer_later(self, work: Coroutine[Any, Any, Reply | None]) -> None:
        self._await(work, self._send_reply)

    def next_line(self, handler: Callable[[bytes], None]) -> None:
        self._auth_step = handler

    def authenticated(self, user: str) -> None:
        self._user = user

    def _send_reply(self, r: Reply | None) -> None:
        if r is not None:
            self._send(r)

    def _gate(
        self,
        stage: str,
        subject: str,
        plugins: Sequence[object],
        check: Callable[[], Coroutine[Any, Any, Reply | None]],
        accept: Callable[[], Reply | None],
        refused: Callable[[Reply], None] | None = None,
    ) -> None:
        """Ask the plugins of one stage, then ``accept`` (which may answer).

        With no plugin at this stage the answer goes out at once, with no Deferred in the way;
        otherwise after the plugins, in command order. A refusal is logged and sent instead
        (or handed to ``refused``)."""
        if not plugins:
            self._send_reply(accept())
            return

        async def run() -> Reply | None:
            refusal = await check()
            if refusal is None:
                return accept()
            self._log.refused(self._address, stage, subject, str(refusal))
            if refused is None:
                return refusal
            refused(refusal)
            return None

        self._await(run(), self._send_reply)

    def smtp_MAIL(self, arg: str) -> None:
        if not self._helo:
            self._send(NEED_HELO)
            return
        if self._txn.sender_given:
            self._send(NESTED_MAIL)
            return
        if not arg[:5].upper() == "FROM:":
            self._send(reply.PARAM_SYNTAX)
            return
        path, text = split_path(arg[5:])
        parsed = mail_params(text, self._settings.max_size)
        if isinstance(parsed, Reply):
            self._send(parsed)
            return
        txn = Transaction(
            smtputf8=parsed.smtputf8, body=parsed.body, ret=parsed.ret, envid=parsed.envid
        )
        try:
            sender = parse_path(path, utf8=txn.smtputf8, allow_null=True)
        except AddressError:
            self._send(_address_error(path, txn.smtputf8, BAD_SENDER))
            return
        client = self._client()
        rate_key = self._rate_key()
        if rate_key is not None and not self._limits.rate.allowed(rate_key):
            self._log.refused(self._address, "MAIL", str(sender or ""), "rate limit")
            self._send(reply.RATE_LIMITED)
            return
        refusal = self._policy.check_sender(client, sender)
        if refusal is not None:
            self._log.refused(self._address, "MAIL", str(sender or ""), str(refusal))
            self._send(refusal)
            return

        def accept() -> Reply:
            txn.sender, txn.sender_given = sender, True
            self._txn = txn
            return reply.SENDER_OK

        text = str(sender or "")
        self._gate(
            "MAIL", text, self._hooks.mail, lambda: self._hooks.check_mail(client, text), accept
        )

    def _rate_key(self) -> str | None:
        """Whose hourly sending rate a message counts against: the user, or a trusted
        address relaying without AUTH; anonymous mail (to local domains only) counts for
        nobody."""
        if self._user is not None:
            return self._user
        if self._policy.is_trusted(self._address):
            return self._address
        return None

    def smtp_RCPT(self, arg: str) -> None:
        if not self._txn.sender_given:
            self._send(NEED_MAIL)
            return
        if not arg[:3].upper() == "TO:":
            self._send(reply.PARAM_SYNTAX)
            return
        if len(self._txn.recipients) >= self._settings.max_recipients:
            self._send(TOO_MANY_RECIPIENTS)
            return
        path, text = split_path(arg[3:])
        try:
            notify, orcpt = rcpt_params(text)
        except ValueError:
            self._send(reply.PARAM_SYNTAX)
            return
        try:
            address = parse_path(path, utf8=self._txn.smtputf8)
        except AddressError:
            self._send(_address_error(path, self._txn.smtputf8, BAD_RECIPIENT))
            return
        assert address is not None
        refusal = self._policy.check_recipient(self._client(), address)
        if refusal is not None:
            self._log.refused(self._address, "RCPT", str(address), str(refusal))
            self._send(refusal)
            return
        recipient = Recipient(str(address), notify, orcpt)
        txn = self._txn

        def accept() -> Reply:
            # The same address twice is one recipient: each is delivered once (the 250
            # still goes out, as Postfix's cleanup does).
            if all(r.address.lower() != recipient.address.lower() for r in txn.recipients):
                txn.recipients.append(recipient)
            return reply.RECIPIENT_OK

        client, sender = self._client(), str(txn.sender) if txn.sender is not None else ""
        self._gate(
            "RCPT", recipient.address, self._hooks.rcpt,
            lambda: self._hooks.check_rcpt(client, sender, recipient.address), accept,
        )

    def smtp_DATA(self, arg: str) -> None:
        if arg:
            self._send(reply.PARAM_SYNTAX)
            return
        if not self._txn.sender_given:
            self._send(NEED_MAIL)
            return
        if not self._txn.recipients:
            self._send(NO_RECIPIENTS)
            return
        incoming = self._spool.receive()
        try:
            incoming.write(self._received_header(incoming.queue_id.value))
        except OSError:
            incoming.abort()
            self._send(reply.NO_STORAGE)
            return
        self._reception = Reception(
            incoming, self._settings.max_size, self._log,
            capture_headers=bool(self._hooks.data or self._hooks.headers),
        )
        self._send(reply.START_DATA)

    def _end_of_data(self, result: DataResult) -> None:
        reception, self._reception = self._reception, None
        assert reception is not None
        incoming = reception.incoming
        txn, self._txn = self._txn, Transaction()
        self._buffer = result.leftover + self._buffer
        error = reception.error(result)
        if error is not None:
            incoming.abort()
            if result.fatal:
                self._close(error)
            else:
                self._send(error)
            return
        client = self._client()
        rate_key = self._rate_key()
        envelope = txn.envelope(
            client_address=self._address, client_name=self._helo, user=self._user,
            anonymous=rate_key is None, received_at=self._clock.seconds(),
        )

        async def commit() -> Reply:
            nonlocal envelope
            view = reception.view(envelope, result.size)
            if view is not None:
                refusal = await self._hooks.screen(client, view, incoming.prepend)
                if refusal is not None:
                    incoming.abort()
                    self._log.refused(self._address, "DATA", envelope.sender, str(refusal))
                    return refusal
            held = rate_key is not None and self._limits.rate.accepted(rate_key)
            envelope = attrs.evolve(envelope, held=held)
            entry = await incoming.commit(envelope)
            self._log.accepted(entry, self._policy.describe(client))
            if held:
                self._log.held(entry, rate_key or "")
            self._accepted(entry)
            return Reply(250, "2.0.0", f"Ok: queued as {entry.queue_id}")

        self._await(commit(), self._send_reply)

    def _received_header(self, queue_id: str) -> bytes:
        hop = Hop(
            helo=self._helo,
            address=self._address,
            esmtp=self._esmtp,
            tls=tls_details(self.transport) if self._tls else None,
            authenticated=self._user is not None,
            smtputf8=self._txn.smtputf8,
        )
        recipients = [r.address for r in self._txn.recipients]
        return received_header(
            hop, self._settings.hostname, queue_id, recipients, self._clock.seconds()
        )

    def smtp_RSET(self, arg: str) -> None:
        self._txn = Transaction()
        self._send(reply.RESET)

    def smtp_NOOP(self, arg: str) -> None:
        self._send(reply.OK)

    def smtp_QUIT(self, arg: str) -> None:
        self._close(reply.BYE)

    def smtp_VRFY(self, arg: str) -> None:
        self._send(reply.VRFY if arg else reply.PARAM_SYNTAX)

    def smtp_EXPN(self, arg: str) -> None:
        self._send(NOT_ACCEPTED)

    def smtp_HELP(self, arg: str) -> None:
        self._send(HELP)


def _address_error(path: str, utf8: bool, default: Reply) -> Reply:
    if not utf8 and not path.isascii():
        return reply.SMTPUTF8_REQUIRED
    return default
