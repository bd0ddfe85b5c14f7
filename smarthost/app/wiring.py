"""The object graph of one running smart host, built from its config: read top to bottom,
this is the architecture. Every part receives what it uses (the reactor as a clock, a
resolver, ``run_blocking``); only this room knows the global reactor and the config.

    listeners -> Session (smtpd) -> Spool (queue) -> Scheduler -> Courier -> routing
                                                                 -> SMTP agent / maildir

What a reload (SIGHUP) replaces is one :class:`~smarthost.app.live.Generation`, built by
:func:`build_generation` from each loaded config; the listeners and the courier reach the
current one through :class:`~smarthost.app.live.Live`. The spool, the scheduler, the
failed-host memory and the log are built once, by :func:`make_service`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import attrs
from OpenSSL import SSL
from twisted.application.service import MultiService, Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import Portal
from twisted.internet import ssl
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.logfile import LogFile

from smarthost.api import Context
from smarthost.app import (
    control,
    credfactory,
    directory,
    drain,
    fleet,
    http,
    orphans,
    servertls,
    tlscert,
    workerspools,
)
from smarthost.app.checks import FD_RESERVE
from smarthost.app.config import Config, ConfigError
from smarthost.app.live import Generation, Live, LiveServerTLS, LiveSessionFactory
from smarthost.app.logfiles import LogReopener, observer_for
from smarthost.app.notify import SystemdNotify
from smarthost.app.pluginload import PluginError, build_plugins
from smarthost.app.reload import Reloader
from smarthost.app.services import (
    AccessCheck,
    DaemonService,
    Listener,
    ListenerService,
    QueueService,
)
from smarthost.app.signals import SignalService
from smarthost.app.startup import STEPS, ExitStatus, Startup
from smarthost.app.watch import Watch
from smarthost.auth import oauth, sasl
from smarthost.auth.cred import PortalLogin, build_portal
from smarthost.auth.decoys import decoy_key
from smarthost.auth.users import UsersFile, users_file_is_insecure
from smarthost.core.enums import Role
from smarthost.core.envelope import Outcome, QueueEntry
from smarthost.core.maillog import EventFile, MailLog
from smarthost.delivery.courier import Courier, Resolve
from smarthost.delivery.dns import DNSLookups, make_resolver
from smarthost.delivery.hostcache import HostCache
from smarthost.delivery.maildir import LocalRecipients, MaildirDelivery
from smarthost.delivery.mtasts import HTTPSFetcher, PolicySource, PolicyStore, txt_lookup
from smarthost.delivery.recording import RetryPolicy
from smarthost.delivery.reporting import Reporter
from smarthost.delivery.routing import Credentials, NextHopResolver
from smarthost.delivery.scheduler import Scheduler
from smarthost.delivery.smtpagent import SMTPDelivery
from smarthost.queue.spool import Spool
from smarthost.smtpd import listen
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits, LimitSettings, raise_nofile_limit
from smarthost.smtpd.policy import RelayPolicy
from smarthost.smtpd.session import Session, SessionSettings


@attrs.frozen
class Parts:
    """What the sessions of one generation share: the long-lived spool, log and scheduler,
    and the parts built from that generation's config."""

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
    watch: Watch  # what /metrics and the status page count
    keytab: sasl.Keytab | None = None  # [auth.gssapi]'s: GSSAPI's mechanism and checker share it


@attrs.frozen
class Durable:
    """What lives as long as the process, whatever a reload changes."""

    spool: Spool
    maillog: MailLog
    scheduler: Scheduler
    hosts: HostCache
    watch: Watch  # the counters: a reload keeps them
    state_dir: Path  # beside the spool(s): what is kept that is not mail (MTA-STS policies)


def make_service(
    config: Config,
    reactor: Any,
    checkers: Sequence[ICredentialsChecker] = (),
    *,
    load: Callable[[], Config] | None = None,
    environ: Mapping[str, str] = os.environ,
    log_file: LogFile | None = None,
    log_observer: ILogObserver | None = None,
    http_listen: Sequence[str | Path] | None = None,
    state_dir: Path | None = None,
    orphan_spools: Sequence[Path] | None = None,
    shared_listeners: bool = False,
) -> MultiService:
    """The whole daemon as one twistd service. ``load`` reads the config again for a reload
    (by default the same config: only the files it names are read again); ``log_file`` is
    twistd's log, which SIGUSR1 reopens.

    A worker of a master (:mod:`smarthost.app.workerconfig`) passes its own ``log_observer``
    (lines for the master to re-emit), ``http_listen`` (its ``http.sock`` instead of
    ``[http] listen``), ``state_dir`` (where the MTA-STS cache lives, by default beside
    the spool), ``orphan_spools``, the spools no worker owns that it serves as well (by
    default the single daemon looks for them itself: :mod:`smarthost.app.orphans`) and
    ``shared_listeners`` (other workers accept on the same sockets)."""
    maillog = _maillog(config, reactor)
    _raise_open_files(config, maillog)
    notify = SystemdNotify.from_environment(
        environ, lambda text: maillog.warning("{detail}", detail=text)
    )
    http_listen = config.http.listen if http_listen is None else http_listen
    if orphan_spools is None:
        orphan_spools = orphans.unserved(config, 1, reactor, maillog)
    steps = (*STEPS, *((http.STEP,) if http_listen else ()),
             *(step for path in orphan_spools for step in _orphan_steps(path)))
    starting = Startup(reactor, maillog, notify, ExitStatus(), steps)
    top = DaemonService(log_observer or observer_for(log_file))
    live = Live()
    state = config.queue.directory.parent if state_dir is None else state_dir
    durable = _durable(config, reactor, maillog, live, state)

    def build(new: Config, previous: Generation | None) -> Generation:
        return build_generation(new, reactor, checkers, durable, previous)

    try:
        live.swap(build(config, None))
    except ConfigError as e:
        _FailedStart(starting, e).setServiceParent(top)
        return top
    commands = control.ControlCommands(durable.spool, durable.scheduler, maillog)
    # First, so that it stops last: /healthz answers 503 while the rest stops.
    site = _http(reactor, http_listen, durable, starting, live)
    site.setServiceParent(top)
    drain.on_term(reactor, config, maillog, site).setServiceParent(top)
    for service in (
        AccessCheck(live, maillog, starting),
        QueueService(reactor, durable.spool, durable.scheduler, maillog, commands, starting),
        *(_orphan_queue(config, reactor, maillog, live, state, path, starting)
          for path in orphan_spools),
        ListenerService(reactor, maillog, _listeners(config, live, durable.watch), starting,
                        shared=shared_listeners),
    ):
        service.setServiceParent(top)
    reloader = Reloader(load or (lambda: config), build, live, maillog, notify)
    _signals(reactor, reloader, LogReopener(log_file, maillog), starting, maillog
             ).setServiceParent(top)
    return top


def _maillog(config: Config, reactor: Any) -> MailLog:
    events = EventFile(str(config.log.events)) if config.log.events else None
    maillog = MailLog(reactor, events)
    # Warnings and failures logged by other smarthost.* namespaces reach [log] events too.
    globalLogPublisher.addObserver(cast(ILogObserver, maillog.forward))
    return maillog


def _http(reactor: Any, listen: Sequence[str | Path], durable: Durable, starting: Startup,
          live: Live) -> http.SiteService:
    return http.make_http_service(reactor, listen, http.StatusSources(
        watch=durable.watch, spool=durable.spool, maillog=durable.maillog, startup=starting,
        ready=lambda: starting.ready, hostname=lambda: live.current.config.hostname,
        certificate=lambda: http.leaf_of(live.current.server_tls),
    ))


def _raise_open_files(config: Config, maillog: MailLog) -> None:
    # Every connection is a descriptor: [limits] connections, not EMFILE at accept(), must be
    # what refuses clients (check-config warns where the hard limit is too low).
    open_files, _ = raise_nofile_limit()
    if open_files < config.limits.connections + FD_RESERVE:
        maillog.warning(
            "limits.connections: {connections} connections do not fit in the open-files limit "
            "{limit} (ulimit -n; LimitNOFILE= under systemd)",
            connections=config.limits.connections, limit=open_files,
        )


def _signals(reactor: Any, reloader: Reloader, reopener: LogReopener, starting: Startup,
             maillog: MailLog) -> SignalService:
    """SIGHUP reloads (once the daemon is ready), SIGUSR1 reopens the log files."""

    def hangup() -> None:
        if not starting.ready:
            maillog.warning("SIGHUP ignored: the daemon is still starting")
            return
        reloader.reload()

    return SignalService(reactor, {signal.SIGHUP: hangup, signal.SIGUSR1: reopener.reopen})


def _orphan_steps(path: Path) -> tuple[str, str]:
    return f"queue {path}", f"control {path}"


def _orphan_queue(config: Config, reactor: Any, maillog: MailLog, live: Live, state: Path,
                  path: Path, starting: Startup) -> QueueService:
    """Delivery (and the control socket) for a spool no process owns: its own spool and
    scheduler, the same routing and plugins; no listener writes to it."""
    moved = attrs.evolve(config, queue=attrs.evolve(config.queue, directory=path))
    durable = _durable(moved, reactor, maillog, live, state)
    commands = control.ControlCommands(durable.spool, durable.scheduler, maillog)
    return QueueService(reactor, durable.spool, durable.scheduler, maillog, commands, starting,
                        _orphan_steps(path))


class _FailedStart(Service):
    """What twistd runs when the config's files do not load: the failure, at start."""

    def __init__(self, starting: Startup, error: ConfigError) -> None:
        self._startup, self._error = starting, error

    def startService(self) -> None:
        super().startService()
        key = self._error.key or "config"
        self._startup.fail(key, str(self._error).removeprefix(f"{key}: "))


def _listeners(config: Config, live: Live, watch: Watch) -> list[Listener]:
    found = []
    for role, descriptions in (
        (Role.SUBMISSION, config.listen.submission),
        (Role.SUBMISSIONS, config.listen.submissions),
        (Role.SMTP, config.listen.smtp),
    ):
        # Implicit TLS asks the current generation for its certificate at each handshake.
        tls = LiveServerTLS(live) if role == Role.SUBMISSIONS else None
        found += [
            Listener(f"listen.{role}[{i}]", role, description,
                     watch.counted(role, description, LiveSessionFactory(live, role)), tls)
            for i, description in enumerate(descriptions)
        ]
    return found


def _durable(
    config: Config, reactor: Any, maillog: MailLog, live: Live, state_dir: Path
) -> Durable:
    from twisted.internet.threads import deferToThread

    # Recovery (which creates the directories) waits for startService, after twistd has
    # dropped to --uid/--gid, so the spool belongs to the user that runs the daemon.
    spool = Spool(config.queue.directory, clock=reactor, run_blocking=deferToThread,
                  maillog=maillog, id_origin=workerspools.id_origin(config.queue.directory),
                  gather=True)
    policy = retry_policy(config)
    # The one memory of failed hosts, held no longer than the first retry interval: routing
    # orders by it, the courier defers suspended routes by it, the scheduler records each
    # attempt's unreachable hosts in it and empties it on a flush.
    hosts = HostCache(reactor, first_retry=policy.delay(1))
    scheduler = build_scheduler(
        config, reactor, spool, maillog, hosts, policy, resolve=live.resolve,
        observe=live.observe,
    )
    return Durable(spool, maillog, scheduler, hosts, Watch(reactor), state_dir)


def build_generation(
    config: Config,
    reactor: Any,
    checkers: Sequence[ICredentialsChecker],
    durable: Durable,
    previous: Generation | None = None,
) -> Generation:
    """Everything a reload replaces, built from ``config``; raises :class:`ConfigError` naming
    the key when a file it names does not load (nothing is changed then)."""
    maillog = durable.maillog
    server_tls, certificate = _server_tls(config, maillog)
    users = _users(config, maillog)
    dns = previous.dns if previous is not None and (
        previous.config.delivery.nameservers == config.delivery.nameservers
    ) else make_resolver(list(config.delivery.nameservers), reactor)
    parts = build_parts(config, reactor, checkers, durable, server_tls, users, dns, previous)
    routing = _routing(config, dns, durable.hosts, reactor, durable.state_dir)
    return Generation(
        config=config,
        factories={role: session_factory(parts, role, reactor) for role in Role},
        server_tls=server_tls,
        certificate=certificate,
        users=users,
        limits=parts.limits,
        resolve=routing.resolve,
        observe=parts.hooks.observe,
        dns=dns,
    )


def build_parts(
    config: Config,
    reactor: Any,
    checkers: Sequence[ICredentialsChecker],
    durable: Durable,
    server_tls: ssl.CertificateOptions,
    users: UsersFile,
    dns: DNSLookups,
    previous: Generation | None = None,
) -> Parts:
    from twisted.internet.threads import deferToThread

    hooks = _hooks(config, reactor, dns, durable.maillog)
    # OAUTHBEARER and XOAUTH2: the token verifier plugins say whose a token is.
    token_checkers = [oauth.BearerTokenChecker(hooks.verifiers, reactor)] if hooks.verifiers else []
    backends = directory.build_backends(config, reactor, users, deferToThread)
    keytab = directory.gssapi_keytab(config)
    portal = credfactory.with_checkers(
        build_portal(users, deferToThread, backends.checkers),
        [*checkers, *token_checkers, *directory.principal_checkers(keytab)],
    )
    return Parts(
        config=config,
        spool=durable.spool,
        maillog=durable.maillog,
        policy=_relay_policy(config, backends.senders),
        portal=portal,
        server_tls=server_tls,
        scheduler=durable.scheduler,
        limits=_limits(config, reactor, previous),
        hooks=hooks,
        users=users,
        watch=durable.watch,
        keytab=keytab,
    )


def _limits(config: Config, reactor: Any, previous: Generation | None) -> Limits:
    return fleet.make_limits(config, limit_settings(config), reactor, previous)


def _server_tls(config: Config, maillog: MailLog) -> tuple[ssl.CertificateOptions, str]:
    """The server's TLS options and a description of its certificate."""
    try:
        made = tlscert.ensure_self_signed(config.hostname, config.tls.certificate, config.tls.key)
    except OSError as e:
        raise ConfigError(
            "tls.certificate", f"cannot write a self-signed certificate: {e}"
        ) from None
    if made:
        maillog.notice(
            "generated a self-signed certificate for {hostname} in {path}",
            hostname=config.hostname,
            path=str(config.tls.certificate),
        )
    certificate = servertls.check_pair(config.tls.certificate, config.tls.key)
    try:
        tls = config.tls
        return listen.server_tls_options(tls.certificate, tls.key, tls.profile), certificate
    except (OSError, ValueError, SSL.Error) as e:
        raise ConfigError("tls.certificate", f"cannot load the certificate and key: {e}") from None


def _users(config: Config, maillog: MailLog) -> UsersFile:
    # The decoy secrets for unknown names are keyed from the TLS private key (auth.decoys
    # says why); the key was made or loaded just before.
    users = UsersFile(config.auth.users, decoy_key=decoy_key(config.tls.key.read_bytes()))
    try:
        problems = users.reload().problems
    except OSError as e:
        raise ConfigError(
            "auth.users", f"cannot read {users.path}: {e.strerror or e}"
        ) from None
    for problem in problems:
        maillog.warning("users file {path}: {problem}", path=str(users.path), problem=problem)
    if users_file_is_insecure(config.auth.users):
        maillog.warning(
            "users file {path} is readable by other users; chmod 600 it", path=str(users.path)
        )
    return users


def _relay_policy(config: Config, senders: Mapping[str, frozenset[str]]) -> RelayPolicy:
    relay = config.relay
    local_recipients = None
    if relay.local_recipients is not None:
        local_recipients = LocalRecipients(relay.local_recipients)
    return RelayPolicy(
        relay.local_domains, relay.trusted_networks, senders, local_recipients,
        check_header_from=relay.check_header_from,
    )


def _hooks(config: Config, reactor: Any, resolver: DNSLookups, maillog: MailLog) -> Hooks:
    from twisted.internet.threads import deferToThread

    context = Context(reactor, config.hostname, resolver, deferToThread, config.base_dir)
    try:
        plugins = build_plugins(config.plugins.enabled, config.plugins.settings, context)
        oauth.require_verifier(config.auth.mechanisms, plugins)
    except PluginError as e:
        raise ConfigError(e.key, str(e).removeprefix(f"{e.key}: ")) from None
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
        messages_per_ip_per_hour=limits.messages_per_ip_per_hour,
        ipv6_prefix=limits.ipv6_prefix,
        tls_handshake_timeout=limits.tls_handshake_timeout,
        min_data_rate=limits.min_data_rate,
    )


def _upstream(config: Config) -> Credentials | None:
    upstream = config.delivery.upstream
    if upstream is None:
        return None
    try:
        password = upstream.password_file.read_text(encoding="utf-8").strip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            "delivery.upstream.password_file", f"cannot read {upstream.password_file}: {e}"
        ) from None
    return Credentials(upstream.username, password)


def retry_policy(config: Config) -> RetryPolicy:
    queue = config.queue
    return RetryPolicy(
        delays=tuple(float(d) for d in queue.retry),
        lifetime=queue.lifetime,
        delay_warning=queue.delay_warning,
    )


def _routing(
    config: Config, dns: DNSLookups, hosts: HostCache, reactor: Any, state_dir: Path
) -> NextHopResolver:
    delivery = config.delivery
    # MTA-STS policies are cached beside the spool, so a reload or a restart keeps them. The
    # policy host is found through the same DNS client as its _mta-sts record and the MX hosts.
    mta_sts = PolicySource(
        txt_lookup(dns),
        HTTPSFetcher(reactor, directory.trust_root(config.tls.ca_file), resolver=dns),
        PolicyStore(state_dir / "mta-sts"),
        reactor,
    ) if delivery.mta_sts else None
    return NextHopResolver(
        dns,
        hosts=hosts,
        local_domains=config.relay.local_domains,
        local=delivery.local,
        routes=delivery.routes,
        port=delivery.port,
        tls=delivery.tls,
        credentials=_upstream(config),
        tls_policies=delivery.tls_policy,
        mta_sts=mta_sts,
    )


def build_scheduler(
    config: Config,
    reactor: Any,
    spool: Spool,
    maillog: MailLog,
    hosts: HostCache,
    policy: RetryPolicy,
    *,
    resolve: Resolve,
    observe: Callable[[QueueEntry, Outcome], None],
) -> Scheduler:
    """Forward only: each object is built from those before it, none calls back into a later
    one. ``resolve`` (routing) and ``observe`` (the plugins) are the current generation's."""
    from twisted.internet.threads import deferToThread

    def maildir(root: Path) -> MaildirDelivery:
        return MaildirDelivery(root, deferToThread, reactor, config.hostname)

    smtp = SMTPDelivery(reactor, config.hostname,
                        trust_root=directory.trust_root(config.tls.ca_file))
    # Connections parked for reuse get a polite QUIT when the daemon stops.
    reactor.addSystemEventTrigger("before", "shutdown", smtp.close_all)
    courier = Courier(resolve, smtp, maildir, hosts)
    reporter = Reporter(spool, config.hostname, reactor, maillog)
    return Scheduler(reactor, spool, courier.attempt, reporter, policy, maillog, hosts,
                     observe=observe)


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
                clock=reactor, keytab=parts.keytab,
            ) if role != Role.SMTP else (),
        )
        self._login = PortalLogin(parts.portal)
        # Commits timed, and counted as accepted on this listener.
        self._spool = parts.watch.receiving(role, parts.spool)

    def buildProtocol(self, addr: Any) -> Session:
        parts = self._parts
        session = Session(
            self._settings,
            parts.policy,
            self._login,
            self._spool,
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
