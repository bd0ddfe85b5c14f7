"""The ESMTP server protocol, one instance per connection: the transport (bytes, reply order,
STARTTLS, timers; :mod:`smarthost.smtpd.transport`) driving the commands (EHLO..QUIT and the
state they build; :mod:`smarthost.smtpd.commands`). This module only joins the two.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from smarthost.api import ISpool
from smarthost.core.enums import Role
from smarthost.core.envelope import QueueEntry
from smarthost.core.maillog import MailLog
from smarthost.smtpd.authdialog import Login
from smarthost.smtpd.channel import Channel
from smarthost.smtpd.commands import Commands, SessionSettings
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits
from smarthost.smtpd.policy import RelayPolicy
from smarthost.smtpd.transport import SMTPTransport, TransportSettings

__all__ = ["Session", "SessionSettings"]


class Session(SMTPTransport):
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
        plugins = hooks if hooks is not None else Hooks((), clock)

        def commands(channel: Channel) -> Commands:
            return Commands(
                channel, settings, policy, login, spool, maillog, clock, limits, plugins,
                accepted,
            )

        transport = TransportSettings(
            command_timeout=settings.command_timeout,
            soft_errors=limits.settings.soft_errors,
            hard_errors=limits.settings.hard_errors,
            tls=settings.tls,
            implicit_tls=settings.role == Role.SUBMISSIONS,
            tls_handshake_timeout=limits.settings.tls_handshake_timeout,
            min_data_rate=limits.settings.min_data_rate,
        )
        super().__init__(transport, clock, maillog, commands)
