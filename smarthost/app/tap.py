"""twistd glue: ``twistd -n smarthost [--config PATH]``.

The only module that touches the global reactor: everything else receives the reactor (or a
clock, an endpoint, a ``run_blocking``) as an argument, so tests can pass their own.
"""

from __future__ import annotations

import gc
import hmac
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.application.service import IServiceMaker, MultiService, Service
from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

from smarthost.api import Context
from smarthost.app import control, credfactory, tlscert
from smarthost.app.config import Config, ConfigError, load_config
from smarthost.app.pluginload import PluginError, build_plugins
from smarthost.auth import oauth, sasl
from smarthost.auth import users as auth
from smarthost.core.enums import Role
from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.core.maillog import EventFile, MailLog
from smarthost.delivery.courier import Courier
from smarthost.delivery.maildir import MaildirDelivery
from smarthost.delivery.routing import Credentials, DNSLookups, NextHopResolver, make_resolver
from smarthost.delivery.scheduler import Reporter, RetryPolicy, Scheduler
from smarthost.delivery.smtpagent import SMTPDelivery
from smarthost.queue.spool import Spool, release_held
from smarthost.smtpd import listen
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits, LimitSettings
from smarthost.smtpd.policy import RelayPolicy
from smarthost.smtpd.session import Session, SessionSettings


class Options(usage.Options, strcred.AuthOptionMixin):
    # `--auth file:PATH` etc.: more password checkers, asked after the users file
    # (smarthost.app.credfactory); `--help-auth` lists them.
    supportedInterfaces = (IUsernamePassword,)
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration (default: the embedded one)."],
    ]

    def postOptions(self) -> None:
        path = self["config"]
        try:
            self.config = load_config(
                Path(path) if path else None, validate_mechanism=_validate_mechanism
            )
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None


class SessionFactory(Factory):
    """Builds one :class:`Session` per connection for one role."""

    def __init__(self, build: Any) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> Session:
        session: Session = self._build()
        session.factory = self
        return session


class ListenerService(Service):
    """Opens every configured listener on start and closes them on stop."""

    def __init__(
        self, reactor: Any, maillog: MailLog, listeners: list[tuple[str, str, Factory, Any]]
    ) -> None:
        self._reactor = reactor
        self._log = maillog
        self._listeners = listeners
        self._ports: list[IListeningPort] = []

    def privilegedStartService(self) -> None:
        # Before twistd drops to --uid/--gid: ports below 1024 (25, 465, 587) need root.
        super().privilegedStartService()
        Deferred.fromCoroutine(self._start()).addErrback(self._failed)

    async def _start(self) -> None:
        for role, description, factory, tls in self._listeners:
            port = await listen.start_listener(
                self._reactor, description, factory, implicit_tls=tls, clock=self._reactor
            )
            self._ports.append(port)
            host = port.getHost()
            self._log.notice(
                "{role} listening on {address} ({description})",
                role=role,
                address=f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}",
                description=description,
            )
        # "ready" once everything has started: the spool is recovered in startService, after
        # the listeners (opened before twistd drops privileges) but before any connection.
        self._reactor.callWhenRunning(self._log.notice, "ready")

    def _failed(self, failure: Any) -> None:
        # A port that cannot be opened is fatal: an MTA silently missing a listener is worse.
        self._log.failure("cannot open a listener", failure=failure)
        if self._reactor.running:
            self._reactor.stop()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ports, self._ports = self._ports, []
        return DeferredList([Deferred.fromCoroutine(_stop(p)) for p in ports])


async def _stop(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


@attrs.frozen
class Parts:
    """The long-lived objects of one running smart host, built from its config."""

    config: Config
    spool: Spool
    maillog: MailLog
    policy: RelayPolicy
    portal: Any
    server_tls: ssl.CertificateOptions
    scheduler: Scheduler
    limits: Limits
    hooks: Hooks
    users: auth.UsersFile  # the portal's; CRAM-MD5 and SCRAM read their secrets from it


def build_parts(
    config: Config, reactor: Any, checkers: Sequence[ICredentialsChecker] = ()
) -> Parts:
    from twisted.internet.threads import deferToThread

    events = EventFile(str(config.log.events)) if config.log.events else None
    maillog = MailLog(reactor, events)
    if tlscert.ensure_self_signed(config.hostname, config.tls.certificate, config.tls.key):
        maillog.notice(
            "generated a self-signed certificate for {hostname} in {path}",
            hostname=config.hostname,
            path=str(config.tls.certificate),
        )
    try:
        server_tls = listen.server_tls_options(config.tls.certificate, config.tls.key)
    except (OSError, ValueError, SSL.Error) as e:
        raise usage.UsageError(f"tls: cannot load certificate/key: {e}") from None
    # Recovery (which creates the directories) waits for startService, after twistd has
    # dropped to --uid/--gid, so the spool belongs to the user that runs the daemon.
    spool = Spool(config.queue.directory, clock=reactor, run_blocking=deferToThread)
    # Decoy SCRAM salts for unknown names must not change on restart, or recording them across
    # one would tell real names from made-up ones: key them with a one-way derivative of our
    # TLS private key, a secret that already lives as long as the installation.
    decoy_key = hmac.digest(config.tls.key.read_bytes(), b"smarthost SCRAM decoys", "sha256")
    users = auth.UsersFile(config.auth.users, decoy_key=decoy_key)
    for problem in users.reload().problems:
        maillog.warning("users file {path}: {problem}", path=str(users.path), problem=problem)
    if auth.users_file_is_insecure(config.auth.users):
        maillog.warning(
            "users file {path} is readable by other users; chmod 600 it", path=str(users.path)
        )
    relay = config.relay
    local_recipients = None
    if relay.local_recipients is not None:
        from smarthost.delivery.maildir import LocalRecipients

        local_recipients = LocalRecipients(relay.local_recipients)
    policy = RelayPolicy(
        relay.local_domains, relay.trusted_networks, relay.senders, local_recipients
    )
    resolver = make_resolver(list(config.delivery.nameservers), reactor)
    context = Context(reactor, config.hostname, resolver, deferToThread, config.base_dir)
    try:
        plugins = build_plugins(config.plugins.enabled, config.plugins.settings, context)
        oauth.require_verifier(config.auth.mechanisms, plugins)
    except (PluginError, ConfigError) as e:
        raise usage.UsageError(f"configuration error: {e}") from None
    for name, _ in plugins:
        maillog.notice("plugin {name} enabled", name=name)
    hooks = Hooks(plugins, reactor)
    # OAUTHBEARER and XOAUTH2: the token verifier plugins say whose a token is.
    token_checkers = [oauth.BearerTokenChecker(hooks.verifiers, reactor)] if hooks.verifiers else []
    return Parts(
        config=config,
        spool=spool,
        maillog=maillog,
        policy=policy,
        portal=credfactory.with_checkers(
            auth.build_portal(users, deferToThread), [*checkers, *token_checkers]
        ),
        server_tls=server_tls,
        scheduler=build_scheduler(config, reactor, spool, maillog, resolver, hooks),
        limits=Limits(reactor, limit_settings(config)),
        hooks=hooks,
        users=users,
    )


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

    delivery = config.delivery
    resolver = NextHopResolver(
        dns,
        clock=reactor,
        local_domains=config.relay.local_domains,
        local=delivery.local,
        routes=delivery.routes,
        port=delivery.port,
        tls=delivery.tls,
        credentials=_upstream(config),
    )

    def maildir(root: Path) -> MaildirDelivery:
        return MaildirDelivery(root, deferToThread, reactor, config.hostname)

    smtp = SMTPDelivery(reactor, config.hostname, unreachable=resolver.mark_unreachable)
    # Connections parked for reuse get a polite QUIT when the daemon stops.
    reactor.addSystemEventTrigger("before", "shutdown", smtp.close_all)
    courier = Courier(resolver.resolve, smtp, maildir)
    queue = config.queue
    policy = RetryPolicy(
        delays=tuple(float(d) for d in queue.retry),
        lifetime=queue.lifetime,
        delay_warning=queue.delay_warning,
    )
    scheduler: Scheduler

    def queued(entry: QueueEntry) -> None:
        scheduler.enqueue(entry)

    reporter = Reporter(spool, config.hostname, reactor, queued, maillog)
    scheduler = Scheduler(
        reactor, spool, courier.attempt, reporter, policy, maillog, observe=hooks.observe,
        on_flush=smtp.forget_failures,
    )
    return scheduler


class DeliveryService(Service):
    """Runs the scheduler and the control socket the admin tool talks to."""

    def __init__(self, reactor: Any, parts: Parts) -> None:
        self._reactor = reactor
        self._parts = parts
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        # Start-up reads every queued entry and schedules each: with 100,000 deferred messages
        # that is as many long-lived objects, and with the collector on every generation-2
        # pass walks all of them again (a fifth of recovery and half of scheduling, measured).
        collecting = gc.isenabled()
        gc.disable()
        try:
            started = self._start_queue()
        finally:
            if collecting:
                gc.enable()
        if started:
            self._listen_control()

    def _start_queue(self) -> bool:
        """Recover the spool and schedule what it holds; False when the spool is unusable."""
        parts = self._parts
        try:
            report = parts.spool.recover()
        except OSError as e:
            # No spool, no mail: refusing to run beats accepting what cannot be kept.
            parts.maillog.error(
                "cannot use the spool {directory}: {error}; stopping",
                directory=parts.spool.directory, error=str(e),
            )
            self._reactor.callWhenRunning(self._reactor.stop)
            return False
        parts.maillog.notice(
            "spool {directory}: {queued} queued, {tmp} unfinished receptions removed, "
            "{torn} unfinished writes dropped, {corrupt} damaged places copied to corrupt/",
            directory=parts.spool.directory,
            queued=report.queued,
            tmp=len(report.removed_tmp),
            torn=len(report.torn),
            corrupt=len(report.corrupt),
        )
        for damage in report.corrupt:
            parts.maillog.warning(
                "spool: {segment} bytes {start}-{end} copied to {moved_to}: {reason}",
                segment=damage.segment, start=damage.start, end=damage.end,
                moved_to=damage.moved_to, reason=damage.reason,
            )
        count = parts.scheduler.start()
        parts.maillog.notice("scheduler started with {count} queued", count=count)
        return True

    def _listen_control(self) -> None:
        parts = self._parts
        path = Path(parts.spool.directory) / control.SOCKET_NAME
        endpoint = UNIXServerEndpoint(self._reactor, str(path), mode=0o600, wantPID=True)
        factory = control.ControlFactory(
            {"flush": self._flush, "delete": self._delete, "release": self._release}
        )
        endpoint.listen(factory).addCallbacks(
            self._listening, lambda f: parts.maillog.failure("control socket", failure=f)
        )

    def _listening(self, port: IListeningPort) -> None:
        self._port = port

    def _flush(self, args: list[str]) -> str:
        count = self._parts.scheduler.flush()
        self._parts.maillog.notice("queue flush requested: {count} messages", count=count)
        return f"flushed: {count} messages will be retried now"

    async def _delete(self, args: list[str]) -> str:
        spool, deleted = self._parts.spool, 0
        for text in args:
            queue_id = QueueId(text)
            self._parts.scheduler.forget(queue_id)
            try:
                await spool.remove(queue_id)
            except KeyError:
                continue
            self._parts.maillog.removed(queue_id, "deleted by the operator")
            deleted += 1
        return f"deleted {deleted}"

    async def _release(self, args: list[str]) -> str:
        if len(args) != 1:
            return "error: release needs one user name"
        released = await release_held(self._parts.spool, args[0])
        for entry in released:
            self._parts.maillog.notice(
                "{queue_id}: released by the operator", queue_id=str(entry.queue_id)
            )
            self._parts.scheduler.enqueue(entry)
        return f"released {len(released)}"

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        self._parts.scheduler.stop()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None


def session_factory(parts: Parts, role: Role, reactor: Any) -> SessionFactory:
    config = parts.config
    settings = SessionSettings(
        role=role,
        hostname=config.hostname,
        max_size=config.queue.max_size,
        max_recipients=config.limits.recipients_per_message,
        command_timeout=config.limits.command_timeout,
        allow_plaintext_auth=config.auth.allow_plaintext,
        tls=parts.server_tls,
        mechanisms=sasl.build_mechanisms(
            config.auth.mechanisms, users=parts.users, hostname=config.hostname, clock=reactor
        ) if role != Role.SMTP else (),
    )

    login = auth.PortalLogin(parts.portal)

    def build() -> Session:
        return Session(
            settings,
            parts.policy,
            login,
            parts.spool,
            parts.maillog,
            reactor,
            parts.limits,
            parts.hooks,
            accepted=parts.scheduler.enqueue,
        )

    return SessionFactory(build)


def make_service(
    config: Config, reactor: Any, checkers: Sequence[ICredentialsChecker] = ()
) -> MultiService:
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
    DeliveryService(reactor, parts).setServiceParent(top)
    ListenerService(reactor, parts.maillog, listeners).setServiceParent(top)
    return top


@implementer(IServiceMaker, IPlugin)
class ServiceMaker:
    tapname = "smarthost"
    description = "An authenticated SMTP smart host (submission, relay, delivery)."
    options = Options

    def makeService(self, options: Options) -> MultiService:
        from twisted.internet import reactor

        return make_service(options.config, reactor, options.get("credCheckers", []))


service_maker = ServiceMaker()


def _validate_mechanism(name: str) -> None:
    sasl.build_mechanisms([name])
