"""The object graph of one running smart host, built from its config: read top to bottom,
this is the architecture. Every part receives what it uses (the reactor as a clock, a
resolver, ``run_blocking``); only this room knows the global reactor and the config.

    listeners -> Session (smtpd) -> Spool (queue) -> Scheduler -> Courier -> routing
                                                                 -> SMTP agent / maildir
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.application.service import MultiService
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import Portal
from twisted.internet import ssl
from twisted.internet.protocol import Factory
from twisted.python import usage

from smarthost.api import Context
from smarthost.app import control, credfactory, tlscert
from smarthost.app.config import Config, ConfigError
from smarthost.app.pluginload import PluginError, build_plugins
from smarthost.app.services import ListenerService, QueueService
from smarthost.auth import oauth, sasl
from smarthost.auth.cred import PortalLogin, build_portal
from smarthost.auth.decoys import decoy_key
from smarthost.auth.users import UsersFile, users_file_is_insecure
from smarthost.core.enums import Role
from smarthost.core.maillog import EventFile, MailLog
from smarthost.delivery.courier import Courier
from smarthost.delivery.dns import DNSLookups, make_resolver
from smarthost.delivery.hostcache import HostCache
from smarthost.delivery.maildir import LocalRecipients, MaildirDelivery
from smarthost.delivery.routing import Credentials, NextHopResolver
from smarthost.delivery.scheduler import Reporter, RetryPolicy, Scheduler
from smarthost.delivery.smtpagent import SMTPDelivery
from smarthost.queue.spool import Spool
from smarthost.smtpd import listen
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits, LimitSettings
from smarthost.smtpd.policy import RelayPolicy
from smarthost.smtpd.session import Session, SessionSettings


@attrs.frozen
class Parts:
    """The long-lived objects of one running smart host, built from its config."""

    config: Config
    spool: Spool
    maillog: MailLog
    policy: RelayPolicy
    portal: Portal
    server_tls: ssl.CertificateOptions
    scheduler: Scheduler
    limits: Limits
    hooks: Hooks
    users: UsersFile  # the portal's; CRAM-MD5 and SCRAM read their secrets from it


def make_service(
    config: Config, reactor: Any, checkers: Sequence[ICredentialsChecker] = ()
) -> MultiService:
    """The whole daemon as one twistd service: the queue first, then the listeners."""
    parts = build_parts(config, reactor, checkers)
    top = MultiService()
    listeners: list[tuple[str, str, Factory, Any]] = []
    for role, descriptions in (
        (Role.SUBMISSION, config.listen.submission),
        (Role.SUBMISSIONS, config.listen.submissions),
        (Role.SMTP, config.listen.smtp),
    ):
        factory = session_factory(parts, role, reactor)
        tls = parts.server_tls if role == Role.SUBMISSIONS else None
        listeners += [(role, description, factory, tls) for description in descriptions]
    commands = control.ControlCommands(parts.spool, parts.scheduler, parts.maillog)
    QueueService(reactor, parts.spool, parts.scheduler, parts.maillog, commands).setServiceParent(
        top
    )
    ListenerService(reactor, parts.maillog, listeners).setServiceParent(top)
    return top


def build_parts(
    config: Config, reactor: Any, checkers: Sequence[ICredentialsChecker] = ()
) -> Parts:
    from twisted.internet.threads import deferToThread

    events = EventFile(str(config.log.events)) if config.log.events else None
    maillog = MailLog(reactor, events)
    server_tls = _server_tls(config, maillog)
    # Recovery (which creates the directories) waits for startService, after twistd has
    # dropped to --uid/--gid, so the spool belongs to the user that runs the daemon.
    spool = Spool(config.queue.directory, clock=reactor, run_blocking=deferToThread)
    users = _users(config, maillog)
    resolver = make_resolver(list(config.delivery.nameservers), reactor)
    hooks = _hooks(config, reactor, resolver, maillog)
    # OAUTHBEARER and XOAUTH2: the token verifier plugins say whose a token is.
    token_checkers = [oauth.BearerTokenChecker(hooks.verifiers, reactor)] if hooks.verifiers else []
    portal = credfactory.with_checkers(
        build_portal(users, deferToThread), [*checkers, *token_checkers]
    )
    return Parts(
        config=config,
        spool=spool,
        maillog=maillog,
        policy=_relay_policy(config),
        portal=portal,
        server_tls=server_tls,
        scheduler=build_scheduler(config, reactor, spool, maillog, resolver, hooks),
        limits=Limits(reactor, limit_settings(config)),
        hooks=hooks,
        users=users,
    )


def _server_tls(config: Config, maillog: MailLog) -> ssl.CertificateOptions:
    if tlscert.ensure_self_signed(config.hostname, config.tls.certificate, config.tls.key):
        maillog.notice(
            "generated a self-signed certificate for {hostname} in {path}",
            hostname=config.hostname,
            path=str(config.tls.certificate),
        )
    try:
        return listen.server_tls_options(config.tls.certificate, config.tls.key)
    except (OSError, ValueError, SSL.Error) as e:
        raise usage.UsageError(f"tls: cannot load certificate/key: {e}") from None


def _users(config: Config, maillog: MailLog) -> UsersFile:
    # The decoy secrets for unknown names are keyed from the TLS private key (auth.decoys
    # says why); the key was made or loaded just before.
    users = UsersFile(config.auth.users, decoy_key=decoy_key(config.tls.key.read_bytes()))
    for problem in users.reload().problems:
        maillog.warning("users file {path}: {problem}", path=str(users.path), problem=problem)
    if users_file_is_insecure(config.auth.users):
        maillog.warning(
            "users file {path} is readable by other users; chmod 600 it", path=str(users.path)
        )
    return users


def _relay_policy(config: Config) -> RelayPolicy:
    relay = config.relay
    local_recipients = None
    if relay.local_recipients is not None:
        local_recipients = LocalRecipients(relay.local_recipients)
    return RelayPolicy(
        relay.local_domains, relay.trusted_networks, relay.senders, local_recipients
    )


def _hooks(config: Config, reactor: Any, resolver: DNSLookups, maillog: MailLog) -> Hooks:
    from twisted.internet.threads import deferToThread

    context = Context(reactor, config.hostname, resolver, deferToThread, config.base_dir)
    try:
        plugins = build_plugins(config.plugins.enabled, config.plugins.settings, context)
        oauth.require_verifier(config.auth.mechanisms, plugins)
    except (PluginError, ConfigError) as e:
        raise usage.UsageError(f"configuration error: {e}") from None
    for name, _ in plugins:
        maillog.notice("plugin {name} enabled", name=name)
    return Hooks(plugins, reactor)


def limit_settings(config: Config) -> LimitSettings:
    limits = config.limits
    return LimitSettings(
        connections=limits.connections,
        connections_per_ip=limits.connections_per_ip,
        auth_failures_per_ip=limits.auth_failures_per_ip,
        messages_per_user_per_hour=limits.messages_per_user_per_hour,
        hold_user_after_per_hour=limits.hold_user_after_per_hour,
    )


def _upstream(config: Config) -> Credentials | None:
    upstream = config.delivery.upstream
    if upstream is None:
        return None
    try:
        password = upstream.password_file.read_text(encoding="utf-8").strip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise usage.UsageError(
            f"delivery.upstream.password_file: cannot read {upstream.password_file}: {e}"
        ) from None
    return Credentials(upstream.username, password)


def build_scheduler(
    config: Config, reactor: Any, spool: Spool, maillog: MailLog, dns: DNSLookups, hooks: Hooks
) -> Scheduler:
    from twisted.internet.threads import deferToThread

    # Forward only: each object is built from those before it, none calls back into a later one.
    queue = config.queue
    policy = RetryPolicy(
        delays=tuple(float(d) for d in queue.retry),
        lifetime=queue.lifetime,
        delay_warning=queue.delay_warning,
    )
    # The one memory of failed hosts, held no longer than the first retry interval: routing
    # orders by it, the courier defers suspended routes by it, the scheduler records each
    # attempt's unreachable hosts in it and empties it on a flush.
    hosts = HostCache(reactor, first_retry=policy.delay(1))
    delivery = config.delivery
    resolver = NextHopResolver(
        dns,
        hosts=hosts,
        local_domains=config.relay.local_domains,
        local=delivery.local,
        routes=delivery.routes,
        port=delivery.port,
        tls=delivery.tls,
        credentials=_upstream(config),
    )

    def maildir(root: Path) -> MaildirDelivery:
        return MaildirDelivery(root, deferToThread, reactor, config.hostname)

    smtp = SMTPDelivery(reactor, config.hostname)
    # Connections parked for reuse get a polite QUIT when the daemon stops.
    reactor.addSystemEventTrigger("before", "shutdown", smtp.close_all)
    courier = Courier(resolver.resolve, smtp, maildir, hosts)
    reporter = Reporter(spool, config.hostname, reactor, maillog)
    return Scheduler(
        reactor, spool, courier.attempt, reporter, policy, maillog, hosts, observe=hooks.observe
    )


class SessionFactory(Factory):
    """Builds one :class:`Session` per connection for one role."""

    def __init__(self, parts: Parts, role: Role, reactor: Any) -> None:
        config = parts.config
        self._parts, self._reactor = parts, reactor
        self._settings = SessionSettings(
            role=role,
            hostname=config.hostname,
            max_size=config.queue.max_size,
            max_recipients=config.limits.recipients_per_message,
            command_timeout=config.limits.command_timeout,
            allow_plaintext_auth=config.auth.allow_plaintext,
            tls=parts.server_tls,
            mechanisms=sasl.build_mechanisms(
                config.auth.mechanisms, users=parts.users, hostname=config.hostname,
                clock=reactor,
            ) if role != Role.SMTP else (),
        )
        self._login = PortalLogin(parts.portal)

    def buildProtocol(self, addr: Any) -> Session:
        parts = self._parts
        session = Session(
            self._settings,
            parts.policy,
            self._login,
            parts.spool,
            parts.maillog,
            self._reactor,
            parts.limits,
            parts.hooks,
            accepted=parts.scheduler.enqueue,
        )
        session.factory = self
        return session


def session_factory(parts: Parts, role: Role, reactor: Any) -> SessionFactory:
    return SessionFactory(parts, role, reactor)
