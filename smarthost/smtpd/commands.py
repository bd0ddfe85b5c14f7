"""The SMTP commands (EHLO..QUIT) of one connection, and the state they build.

Per-connection state (who the client is: :class:`Peer`) is kept apart from per-transaction
state (the envelope under construction: :class:`~smarthost.smtpd.transaction.Transaction`):
RSET, EHLO and the end of each message clear the one, only STARTTLS clears the other.

The commands never touch bytes or timers: they answer through a
:class:`~smarthost.smtpd.channel.Channel` (the transport), which keeps replies in command
order and owns the connection. The AUTH exchange is delegated to
:class:`~smarthost.smtpd.authdialog.AuthDialog`, each message in DATA to
:class:`~smarthost.smtpd.reception.Reception`, and the chunks of a message sent with BDAT
(RFC 3030) to :class:`~smarthost.smtpd.bdat.ChunkedMessage`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

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
from smarthost.core.replies import Reply
from smarthost.smtpd.authdialog import AuthDialog, Login
from smarthost.smtpd.bdat import ChunkedMessage, ChunkReader, parse_bdat, read_chunk
from smarthost.smtpd.channel import Channel
from smarthost.smtpd.dotreader import DataResult
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits
from smarthost.smtpd.params import mail_params, rcpt_params, split_path
from smarthost.smtpd.policy import RelayPolicy
from smarthost.smtpd.reception import Intake, Reception, storage_error
from smarthost.smtpd.trace import Hop, received_header
from smarthost.smtpd.transaction import Transaction

FORBIDDEN_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"})


@attrs.frozen
class SessionSettings:
    """What a listener's sessions share; one per role."""

    role: Role
    hostname: str
    max_size: int
    max_recipients: int = 1000
    command_timeout: float = 300  # the transport's
    allow_plaintext_auth: bool = False
    tls: Any = None  # the transport's TLS options for STARTTLS; None: STARTTLS is not offered
    mechanisms: Sequence[ISASLMechanism] = ()

    @property
    def offers_auth(self) -> bool:
        return self.role != Role.SMTP and bool(self.mechanisms)


@attrs.define
class Peer:
    """Per-connection state: who the client says it is. STARTTLS forgets all of it but the
    address (RFC 3207 4.2)."""

    address: str
    helo: str = ""
    esmtp: bool = False
    user: str | None = None  # after a successful AUTH


class Commands:
    """One connection's SMTP dialog; the transport's :class:`~smarthost.smtpd.channel.Handler`
    and the AUTH dialog's :class:`~smarthost.smtpd.authdialog.DialogHost`."""

    def __init__(
        self,
        channel: Channel,
        settings: SessionSettings,
        policy: RelayPolicy,
        login: Login,
        spool: ISpool,
        maillog: MailLog,
        clock: IReactorTime,
        limits: Limits,
        hooks: Hooks,
        accepted: Callable[[QueueEntry], None],
    ) -> None:
        self._channel = channel
        self._settings = settings
        self._policy = policy
        self._login = login
        self._spool = spool
        self._log = maillog
        self._clock = clock
        self._limits = limits
        self._hooks = hooks
        self._intake = Intake(hooks, limits, policy, maillog, accepted)
        self._peer = Peer("")
        self._txn = Transaction()
        self._chunks: ChunkedMessage | None = None  # the transaction's message, sent by BDAT
        self._bdat_refused = False  # a BDAT had no transaction since the last MAIL or RSET
        self._admitted = False  # counted by the connection limiter
        self._auth: AuthDialog | None = None  # made at the first AUTH
        self._auth_step: Callable[[bytes], None] | None = None  # the AUTH dialog's next line
        self._verbs: dict[str, Callable[[str], None]] = {
            "EHLO": self.ehlo, "HELO": self.helo, "STARTTLS": self.starttls, "AUTH": self.auth,
            "MAIL": self.mail, "RCPT": self.rcpt, "DATA": self.data, "BDAT": self.bdat,
            "RSET": self.rset, "NOOP": self.noop, "QUIT": self.quit, "VRFY": self.vrfy,
            "EXPN": self.expn, "HELP": self.help,
        }

    # -- Handler ---------------------------------------------------------------------------

    def connected(self) -> None:
        self._peer = Peer(self._channel.peer_address)
        refusal = self._limits.connections.admit(self._peer.address)
        if refusal is not None:
            self._channel.close(refusal)
            return
        self._admitted = True
        client = self._client()
        self._gate(
            "CONNECT", "", self._hooks.connect, lambda: self._hooks.check_connect(client),
            lambda: reply.greeting(self._settings.hostname),
            refused=self._channel.close,  # a client refused at connect gets no session at all
        )

    def connection_lost(self) -> None:
        self._new_transaction()  # a message half sent by BDAT is dropped
        if self._admitted:
            self._admitted = False
            self._limits.connections.release(self._peer.address)

    def line_received(self, line: bytes) -> None:
        if self._auth_step is not None:
            step, self._auth_step = self._auth_step, None
            step(line)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._channel.send(reply.SYNTAX)
            return
        verb, _, arg = text.partition(" ")
        if verb.upper() in FORBIDDEN_VERBS:
            # Cross-protocol requests (an HTTP proxy or browser pointed at us): answer and
            # close, as Postfix's smtpd_forbidden_commands does.
            self._channel.close(reply.PROTOCOL_PROBE)
            return
        handler = self._verbs.get(verb.upper())
        if handler is None:
            self._channel.send(reply.SYNTAX)
            return
        handler(arg.strip())

    # -- DialogHost (what the AUTH dialog asks of us) --------------------------------------

    def send(self, r: Reply) -> None:
        self._channel.send(r)

    def answer_later(self, work: Coroutine[Any, Any, Reply | None]) -> None:
        self._channel.answer_later(work)

    def next_line(self, handler: Callable[[bytes], None]) -> None:
        self._auth_step = handler

    def authenticated(self, user: str) -> None:
        self._peer.user = user
        self._limits.rate.prefetch(user)  # the fleet's count, learnt before this user's MAIL

    # -- helpers ---------------------------------------------------------------------------

    def _client(self) -> Client:
        return Client(
            address=self._peer.address,
            role=self._settings.role,
            tls=self._channel.encrypted,
            user=self._peer.user,
            helo=self._peer.helo,
        )

    def _gate(
        self,
        stage: str,
        subject: str,
        plugins: Sequence[object],
        check: Callable[[], Coroutine[Any, Any, Reply | None]],
        accept: Callable[[], Reply | None],
        refused: Callable[[Reply], None] | None = None,
        *,
        core: Callable[[], Reply | None] | None = None,
        wait: Deferred[None] | None = None,
    ) -> None:
        """Ask the plugins of one stage, then ``accept`` (which may answer).

        ``core``, the core's own check (relay rules, rate limit), comes first and logs its
        own refusal; ``wait`` must settle before anything is decided (the fleet's count of a
        sender that was asked for at AUTH and is still on its way, at most the fleet's
        timeout). With no plugin and nothing to wait for, the answer goes out at once, with no
        Deferred in the way; otherwise later, in command order. A plugin's refusal is logged
        and sent instead (or handed to ``refused``)."""
        if not plugins and wait is None:
            answer = (core() if core is not None else None) or accept()
            if answer is not None:
                self._channel.send(answer)
            return

        async def run() -> Reply | None:
            if wait is not None:
                await wait
            refusal = core() if core is not None else None
            if refusal is not None:
                return refusal
            refusal = await check() if plugins else None
            if refusal is None:
                return accept()
            self._log.refused(self._peer.address, stage, subject, str(refusal))
            if refused is None:
                return refusal
            refused(refusal)
            return None

        self._channel.answer_later(run())

    def _refuse(self, stage: str, subject: str, refusal: Reply) -> None:
        """A check of the core (relay rules, rate limit) said no: log it and answer."""
        self._log.refused(self._peer.address, stage, subject, str(refusal))
        self._channel.send(refusal)

    def _rate_key(self) -> str | None:
        """Whose hourly sending rate a message counts against: the user, or a trusted
        address (IPv6: its prefix) relaying without AUTH; None for anonymous mail (to local
        domains only), which counts against the client's address apart."""
        if self._peer.user is not None:
            return self._peer.user
        if self._policy.is_trusted(self._peer.address):
            return self._limits.address_key(self._peer.address)
        return None

    def _new_transaction(self) -> None:
        """Forget the transaction (RSET, EHLO, STARTTLS, the end of a message), dropping a
        message whose chunks had started to arrive."""
        self._txn = Transaction()
        self._bdat_refused = False
        if self._chunks is not None:
            self._chunks.abort()
            self._chunks = None

    def _rate_allowed(self, rate_key: str | None) -> bool:
        if rate_key is None:
            return self._limits.anonymous.allowed(self._peer.address)
        return self._limits.rate.allowed(rate_key)

    # -- EHLO, HELO, STARTTLS, AUTH: the connection ----------------------------------------

    def ehlo(self, arg: str) -> None:
        self._hello(arg, esmtp=True)

    def helo(self, arg: str) -> None:
        self._hello(arg, esmtp=False)

    def _hello(self, arg: str, *, esmtp: bool) -> None:
        if not arg:
            self._channel.send(reply.PARAM_SYNTAX)
            return

        def greet() -> Reply:
            self._peer.helo, self._peer.esmtp = arg, esmtp
            self._new_transaction()
            return reply.hello(self._settings.hostname, self._extensions() if esmtp else ())

        client = self._client()
        self._gate(
            "HELO", arg, self._hooks.helo, lambda: self._hooks.check_helo(client, arg), greet
        )

    def _extensions(self) -> list[str]:
        s = self._settings
        ext = [f"SIZE {s.max_size}", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"]
        if self._channel.can_start_tls():
            ext.append("STARTTLS")
        if self._auth_available():
            ext.append("AUTH " + " ".join(m.name for m in s.mechanisms))
        ext += ["SMTPUTF8", "DSN", "CHUNKING"]
        if self._channel.encrypted:
            ext.append("REQUIRETLS")  # RFC 8689 2: offered only once TLS is up
        return ext

    def _auth_available(self) -> bool:
        s = self._settings
        return (
            s.offers_auth
            and self._peer.user is None
            and (self._channel.encrypted or s.allow_plaintext_auth)
        )

    def starttls(self, arg: str) -> None:
        if arg:
            self._channel.send(reply.PARAM_SYNTAX)
        elif self._channel.encrypted:
            self._channel.send(reply.ALREADY_TLS)
        elif not self._channel.can_start_tls():
            self._channel.send(reply.TLS_UNAVAILABLE)
        else:
            self._channel.send(reply.READY_TLS)
            # RFC 3207 4.2: the client must start over with EHLO; the transport forgets
            # whatever was pipelined behind STARTTLS.
            self._peer = Peer(self._peer.address)
            self._new_transaction()
            self._channel.start_tls()

    def auth(self, arg: str) -> None:
        refusal = self._auth_refusal()
        if refusal is not None:
            self._channel.send(refusal)
            return
        name, _, initial = arg.partition(" ")
        factory = next((m for m in self._settings.mechanisms if m.name == name.upper()), None)
        if factory is None:
            self._channel.send(reply.UNKNOWN_MECHANISM)
            return
        if self._auth is None:
            self._auth = AuthDialog(
                self, self._login, self._limits, self._log, self._clock, self._peer.address
            )
        self._auth.start(factory, initial)

    def _auth_refusal(self) -> Reply | None:
        """Why AUTH may not start now, if it may not."""
        s = self._settings
        if not s.offers_auth:
            return reply.AUTH_NOT_OFFERED
        if not self._channel.encrypted and not s.allow_plaintext_auth:
            return reply.AUTH_NEEDS_TLS
        if not self._peer.esmtp:
            return reply.NEED_HELO
        if self._peer.user is not None:
            return reply.ALREADY_AUTHENTICATED
        if self._txn.sender_given:
            return reply.AUTH_IN_TRANSACTION
        if self._limits.auth.blocked(self._peer.address):
            return reply.AUTH_BLOCKED
        return None

    # -- MAIL, RCPT, DATA: the transaction -------------------------------------------------

    def mail(self, arg: str) -> None:
        if not self._peer.helo:
            self._channel.send(reply.NEED_HELO)
            return
        if self._txn.sender_given:
            self._channel.send(reply.NESTED_MAIL)
            return
        if not arg[:5].upper() == "FROM:":
            self._channel.send(reply.PARAM_SYNTAX)
            return
        path, text = split_path(arg[5:])
        parsed = mail_params(text, self._settings.max_size, tls=self._channel.encrypted)
        if isinstance(parsed, Reply):
            self._channel.send(parsed)
            return
        txn = Transaction(
            smtputf8=parsed.smtputf8, body=parsed.body, ret=parsed.ret, envid=parsed.envid,
            requiretls=parsed.requiretls,
        )
        try:
            sender = parse_path(path, utf8=txn.smtputf8, allow_null=True)
        except AddressError:
            self._channel.send(_address_error(path, txn.smtputf8, reply.BAD_SENDER))
            return
        client, subject = self._client(), str(sender or "")
        rate_key = self._rate_key()

        def core() -> Reply | None:
            if not self._rate_allowed(rate_key):
                self._log.refused(self._peer.address, "MAIL", subject, "rate limit")
                return reply.RATE_LIMITED
            refusal = self._policy.check_sender(client, sender)
            if refusal is not None:
                self._log.refused(self._peer.address, "MAIL", subject, str(refusal))
            return refusal

        def accept() -> Reply:
            txn.sender, txn.sender_given = sender, True
            self._txn, self._bdat_refused = txn, False
            return reply.SENDER_OK

        self._gate(
            "MAIL", subject, self._hooks.mail, lambda: self._hooks.check_mail(client, subject),
            accept, core=core, wait=self._limits.rate.learning(rate_key),
        )

    def rcpt(self, arg: str) -> None:
        if not self._txn.sender_given:
            self._channel.send(reply.NEED_MAIL)
            return
        if self._chunks is not None:
            self._channel.send(reply.RCPT_AFTER_BDAT)
            return
        if not arg[:3].upper() == "TO:":
            self._channel.send(reply.PARAM_SYNTAX)
            return
        if len(self._txn.recipients) >= self._settings.max_recipients:
            self._channel.send(reply.TOO_MANY_RECIPIENTS)
            return
        path, text = split_path(arg[3:])
        try:
            notify, orcpt = rcpt_params(text)
        except ValueError:
            self._channel.send(reply.PARAM_SYNTAX)
            return
        try:
            address = parse_path(path, utf8=self._txn.smtputf8)
        except AddressError:
            self._channel.send(_address_error(path, self._txn.smtputf8, reply.BAD_RECIPIENT))
            return
        assert address is not None
        refusal = self._policy.check_recipient(self._client(), address)
        if refusal is not None:
            self._refuse("RCPT", str(address), refusal)
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

    def data(self, arg: str) -> None:
        if arg:
            self._channel.send(reply.PARAM_SYNTAX)
            return
        if not self._txn.sender_given:
            self._channel.send(reply.NEED_MAIL)
            return
        if self._chunks is not None:  # RFC 3030 2: DATA and BDAT are not mixed
            self._channel.send(reply.DATA_AFTER_BDAT)
            return
        if not self._txn.recipients:
            self._channel.send(reply.NO_RECIPIENTS)
            return
        reception = self._begin_message()
        if isinstance(reception, Reply):
            self._channel.send(reception)
            return
        self._channel.read_data(reception, lambda result: self._end_of_data(reception, result))
        self._channel.send(reply.START_DATA)

    def _begin_message(self) -> Reception | Reply:
        """A new message in the spool, our Received: header first; NO_STORAGE if the spool
        cannot take even that."""
        incoming = self._spool.receive()
        try:
            incoming.write(self._received_header(incoming.queue_id.value))
        except OSError as e:
            incoming.abort()
            storage_error(self._log, incoming.queue_id.value, e)
            return reply.NO_STORAGE
        return Reception(
            incoming, self._settings.max_size, self._log,
            capture_headers=bool(self._hooks.data or self._hooks.headers),
        )

    def _received_header(self, queue_id: str) -> bytes:
        hop = Hop(
            helo=self._peer.helo,
            address=self._peer.address,
            esmtp=self._peer.esmtp,
            tls=self._channel.tls_details(),
            authenticated=self._peer.user is not None,
            smtputf8=self._txn.smtputf8,
        )
        recipients = [r.address for r in self._txn.recipients]
        return received_header(
            hop, self._settings.hostname, queue_id, recipients, self._clock.seconds()
        )

    def _end_of_data(self, reception: Reception, result: DataResult) -> None:
        txn, self._txn = self._txn, Transaction()
        error = reception.error(result)
        if error is not None:
            reception.abort()
            if result.fatal:
                self._channel.close(error)
            else:
                self._channel.send(error)
            return
        self._take(txn, reception, result.size, "DATA")

    def _take(self, txn: Transaction, reception: Reception, size: int, verb: str) -> None:
        """A complete message (DATA's end, or BDAT LAST): the last checks and the commit
        (:class:`~smarthost.smtpd.reception.Intake`), answered in command order."""
        rate_key = self._rate_key()
        envelope = txn.envelope(
            client_address=self._peer.address, client_name=self._peer.helo,
            user=self._peer.user, anonymous=rate_key is None,
            received_at=self._clock.seconds(),
        )
        self._channel.answer_later(
            self._intake.accept(reception, envelope, size, self._client(), rate_key, verb)
        )

    def bdat(self, arg: str) -> None:
        """RFC 3030 2. Whatever the answer, a well-formed BDAT's octets are read first (they
        could be anything, commands included); only a malformed one is answered at once, as
        its size is unknown (as Postfix does: what follows is read as commands)."""
        parsed = parse_bdat(arg)
        if parsed is None:
            self._channel.send(reply.BDAT_SYNTAX)
            return
        size, last = parsed
        if self._chunks is None:
            refusal = (reply.NEED_MAIL if not self._txn.sender_given
                       else reply.NEED_RCPT if not self._txn.recipients else None)
            if refusal is not None:  # no transaction to end, not even after LAST
                # Chunks pipelined behind a refused MAIL or RCPT: one error, not one each.
                if self._bdat_refused:
                    refusal = refusal.repeat()
                self._bdat_refused = True
                read_chunk(self._channel, ChunkReader(size),
                           lambda _: self._channel.send(refusal))
                return
            started = self._begin_message()
            if isinstance(started, Reply):
                self._chunks = ChunkedMessage(None, self._settings.max_size, started)
            else:
                self._chunks = ChunkedMessage(started, self._settings.max_size)
        chunks = self._chunks
        read_chunk(self._channel, chunks.chunk(size),
                   lambda _: self._end_of_chunk(chunks, size, last))

    def _end_of_chunk(self, chunks: ChunkedMessage, size: int, last: bool) -> None:
        error = chunks.verdict(last=last)
        if not last:
            self._channel.send(error or reply.chunk_received(size))
            return
        txn, self._txn, self._chunks = self._txn, Transaction(), None
        if error is not None:
            self._channel.send(error)
        else:
            assert chunks.reception is not None  # no reception: refused from the start
            self._take(txn, chunks.reception, chunks.size, "BDAT")

    # -- RSET, NOOP, QUIT, VRFY, EXPN, HELP ------------------------------------------------

    def rset(self, arg: str) -> None:
        self._new_transaction()
        self._channel.send(reply.RESET)

    def noop(self, arg: str) -> None:
        self._channel.send(reply.OK)

    def quit(self, arg: str) -> None:
        self._channel.close(reply.BYE)

    def vrfy(self, arg: str) -> None:
        self._channel.send(reply.VRFY if arg else reply.PARAM_SYNTAX)

    def expn(self, arg: str) -> None:
        self._channel.send(reply.NOT_ACCEPTED)

    def help(self, arg: str) -> None:
        self._channel.send(reply.HELP)


def _address_error(path: str, utf8: bool, default: Reply) -> Reply:
    if not utf8 and not path.isascii():
        return reply.SMTPUTF8_REQUIRED
    return default
