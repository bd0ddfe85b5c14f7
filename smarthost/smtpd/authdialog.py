"""One connection's SMTP AUTH (RFC 4954): the SASL exchange framed in base64, the login
through the cred portal, and the accounting of failures (the fail2ban log line, the
per-address throttle, the per-connection cap). A mechanism the user has no secret for is
not a failure: it is logged apart and answered at once, so the client falls back.

The commands check whether AUTH may start at all (TLS, EHLO, not in a transaction) and the
transport owns the connection; this class only talks to the commands through
:class:`DialogHost`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from smarthost.auth.sasl import Challenge, Credentials, ISASLMechanism, Rejected
from smarthost.core import replies as reply
from smarthost.core.maillog import MailLog
from smarthost.core.replies import BAD_BASE64, Reply
from smarthost.smtpd.limits import Limits


class Login(Protocol):
    """Checks credentials through the cred portal; fires with the user name, fails with
    ``UnauthorizedLogin`` for wrong credentials (anything else is our fault: 454)."""

    def __call__(self, credentials: ICredentials) -> Deferred[str]: ...


class DialogHost(Protocol):
    """What the dialog needs from the commands."""

    def send(self, r: Reply) -> None:
        """Answer now."""

    def answer_later(self, work: Coroutine[Any, Any, Reply | None]) -> None:
        """Answer when ``work`` is done; later pipelined commands wait."""

    def next_line(self, handler: Callable[[bytes], None]) -> None:
        """Give the client's next line to ``handler`` instead of the command parser."""

    def authenticated(self, user: str) -> None: ...


class AuthDialog:
    def __init__(
        self,
        host: DialogHost,
        login: Login,
        limits: Limits,
        log: MailLog,
        clock: IReactorTime,
        address: str,
    ) -> None:
        self._host = host
        self._login = login
        self._limits = limits
        self._log = log
        self._clock = clock
        self._address = address
        self._failures = 0  # on this connection

    def start(self, factory: ISASLMechanism, initial: str) -> None:
        exchange = factory.new()
        mechanism = factory.name

        def respond(raw: bytes | None) -> None:
            if raw is not None and raw.strip() == b"*":
                self._host.send(reply.AUTH_CANCELLED)  # RFC 4954 4: "*" cancels
                return
            data: bytes | None = None
            if raw is not None:
                try:
                    # RFC 4954 4: "=" is an empty initial response.
                    data = b"" if raw == b"=" else base64.b64decode(raw, validate=True)
                except (binascii.Error, ValueError):
                    self._host.send(BAD_BASE64)
                    return
            step = exchange.step(data)
            if isinstance(step, Challenge):
                self._host.send(reply.challenge(step.data))
                self._host.next_line(respond)
            elif isinstance(step, Credentials):
                self._host.answer_later(self._check(step, mechanism))
            else:
                assert isinstance(step, Rejected)
                if step.no_secret:
                    self._without_secret(step.username or "", mechanism)
                    return
                failed = self._failed(step.username or "", mechanism)
                if step.malformed:
                    failed.close()  # counted and logged above; the answer is a syntax error
                    self._host.send(BAD_BASE64)
                else:
                    self._host.answer_later(failed)

        respond(initial.encode("ascii", "replace") if initial else None)

    async def _check(self, step: Credentials, mechanism: str) -> Reply:
        try:
            user = await self._login(step.credentials)
        except UnauthorizedLogin:
            failed = self._failed(step.username, mechanism)
            if step.failure_challenge is None:
                return await failed
            # RFC 7628 3.2.2: the failure goes out as one more challenge (a JSON error); the
            # client answers it with %x01 (or "*") and only then gets the 535. The failure
            # is already logged and counted; the throttle's delay runs meanwhile.
            answer = Deferred.fromCoroutine(failed)

            def finish(raw: bytes) -> None:
                async def last() -> Reply:
                    r = await answer
                    cancelled = raw.strip() == b"*" and r == reply.AUTH_FAILED
                    return reply.AUTH_CANCELLED if cancelled else r  # RFC 4954 4

                self._host.answer_later(last())

            self._host.next_line(finish)
            return reply.challenge(step.failure_challenge)
        except Exception:
            self._log.failure("password check failed")
            return reply.AUTH_TEMP
        self._host.authenticated(user)
        self._log.auth_succeeded(self._address, user, mechanism)
        return reply.AUTH_OK

    def _without_secret(self, user: str, mechanism: str) -> None:
        """The user exists but has no secret for this mechanism (an ``htpasswd -B`` line and
        CRAM-MD5 or SCRAM): no password was guessed, so this is neither the fail2ban line nor
        a failure the throttle counts. ``535`` at once, and the client tries its next
        mechanism (smtplib, Thunderbird and Outlook do)."""
        self._log.auth_without_secret(self._address, user, mechanism)
        self._host.send(reply.AUTH_FAILED)

    def _failed(self, user: str, mechanism: str) -> Coroutine[Any, Any, Reply]:
        """Log and count a failure now; the returned coroutine answers after the throttle's
        delay (a growing pause per address), or closes after too many on one connection."""
        self._log.auth_failed(self._address, user, mechanism)
        delay = self._limits.auth.failed(self._address)
        self._failures += 1
        too_many = self._failures >= self._limits.settings.auth_failures_per_connection

        async def answer() -> Reply:
            await deferLater(self._clock, delay)
            return reply.TOO_MANY_AUTH_FAILURES if too_many else reply.AUTH_FAILED

        return answer()
