"""The TOML configuration, read into frozen values.

Every key has a default, so a file only says what differs. Unknown keys are errors (a typo
such as ``trusted_network`` must not silently leave the default in force), and every error
names the key, so ``smarthost check-config`` can point at the line to fix.
"""

from __future__ import annotations

import ipaddress
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from smarthost.app.configtable import Table
from smarthost.core.enums import TLSPolicy
from smarthost.core.errors import ConfigError
from smarthost.core.types import Network

__all__ = ["Config", "ConfigError", "load_config", "parse_config"]


@attrs.frozen
class ListenConfig:
    submission: tuple[str, ...] = ("tcp:2587",)
    submissions: tuple[str, ...] = ("tcp:2465",)
    smtp: tuple[str, ...] = ("tcp:2525",)


@attrs.frozen
class TLSConfig:
    certificate: Path
    key: Path
    profile: str = "intermediate"  # a key of smtpd.tlsprofile.PROFILES
    ca_file: Path | None = None  # CAs we trust as a client (LDAP...); None: the system's


@attrs.frozen
class LdapConfig:
    url: str
    base: str
    bind_dn: str
    bind_password_file: Path
    starttls: bool = False
    filter: str = "(&(objectClass=person)(|(uid={user})(mail={user})(userPrincipalName={user})))"
    sender_attributes: tuple[str, ...] = ("mail",)
    require_group: str = ""


@attrs.frozen
class GssapiConfig:
    keytab: Path


@attrs.frozen
class AuthConfig:
    users: Path
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    allow_plaintext: bool = False
    backends: tuple[str, ...] = ("users",)  # password sources asked in order
    ldap: LdapConfig | None = None  # [auth.ldap], when the table is present
    gssapi: GssapiConfig | None = None  # [auth.gssapi], when the table is present


@attrs.frozen
class RelayConfig:
    local_domains: frozenset[str] = frozenset()
    trusted_networks: tuple[Network, ...] = ()
    senders: Mapping[str, frozenset[str]] = attrs.field(factory=dict)
    local_recipients: Path | None = None
    check_header_from: bool = True  # From:/Sender: addresses must be the user's own


@attrs.frozen
class QueueConfig:
    directory: Path
    max_size: int = 36700160
    retry: tuple[int, ...] = (60, 300, 900, 1800, 3600)
    lifetime: int = 432000
    delay_warning: int = 14400


@attrs.frozen
class UpstreamConfig:
    username: str
    password_file: Path


@attrs.frozen
class DeliveryConfig:
    local: str
    port: int = 25
    nameservers: tuple[str, ...] = ()
    tls: TLSPolicy = TLSPolicy.OPPORTUNISTIC
    routes: Mapping[str, str] = attrs.field(factory=dict)
    upstream: UpstreamConfig | None = None
    mta_sts: bool = True  # RFC 8461: fetch, cache and apply recipient domains' policies
    tls_policy: Mapping[str, TLSPolicy] = attrs.field(factory=dict)  # beats mta_sts and tls


@attrs.frozen
class LogConfig:
    events: Path | None = None


@attrs.frozen
class HTTPConfig:
    listen: tuple[str, ...] = ("tcp:2580:interface=127.0.0.1",)


@attrs.frozen
class LimitsConfig:
    connections: int = 1000
    connections_per_ip: int = 50
    auth_failures_per_ip: int = 10
    recipients_per_message: int = 1000
    messages_per_user_per_hour: int = 1000
    hold_user_after_per_hour: int = 5000
    command_timeout: int = 300
    tls_handshake_timeout: int = 30
    min_data_rate: int = 500  # bytes/s during DATA/BDAT, after the first command_timeout
    messages_per_ip_per_hour: int = 1000  # unauthenticated clients, mail to local domains
    ipv6_prefix: int = 64  # per-address limits count IPv6 clients per prefix


@attrs.frozen
class ServerConfig:
    workers: int = 1  # processes serving the listeners; 0 = one per CPU core
    drain: int = 0  # seconds SIGTERM keeps serving with /healthz at 503 (load balancers)
    cpu_affinity: bool = False  # with workers: worker i runs on the i-th CPU only (app.worker)


@attrs.frozen
class FleetConfig:
    redis: str = ""  # "redis://host:port/db": limits counted across every node and worker


@attrs.frozen
class PluginsConfig:
    enabled: tuple[str, ...] = ()
    settings: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)


@attrs.frozen
class Config:
    hostname: str
    base_dir: Path  # relative paths in the file were resolved against this
    listen: ListenConfig
    tls: TLSConfig
    auth: AuthConfig
    relay: RelayConfig
    queue: QueueConfig
    delivery: DeliveryConfig
    log: LogConfig
    limits: LimitsConfig
    plugins: PluginsConfig
    http: HTTPConfig = attrs.field(factory=HTTPConfig)
    server: ServerConfig = attrs.field(factory=ServerConfig)
    fleet: FleetConfig = attrs.field(factory=FleetConfig)


MAX_WORKERS = 64
MAX_DRAIN = 600

_DEFAULT_TRUSTED = ("127.0.0.1/32", "::1/128")


class _Loader:
    def __init__(self, base_dir: Path, validate_mechanism: Callable[[str], None] | None) -> None:
        self._base = base_dir
        self._validate_mechanism = validate_mechanism

    def path(self, table: Table, name: str, default: str) -> Path:
        value = table.get(name, str, default)
        if not value:
            raise ConfigError(table.key(name), "must not be empty")
        return self._base / value

    def load(self, data: Mapping[str, Any]) -> Config:
        top = Table(data, "")
        hostname = top.get("hostname", str, "") or socket.getfqdn()
        _check_hostname(hostname)
        config = Config(
            hostname=hostname,
            base_dir=self._base,
            listen=self.listen(top.table("listen")),
            tls=self.tls(top.table("tls")),
            auth=self.auth(top.table("auth")),
            relay=self.relay(top.table("relay")),
            queue=self.queue(top.table("queue")),
            delivery=self.delivery(top.table("delivery")),
            log=self.log(top.table("log")),
            limits=self.limits(top.table("limits")),
            plugins=self.plugins(top.table("plugins")),
            http=self.http(top.table("http")),
            server=self.server(top.table("server")),
            fleet=self.fleet(top.table("fleet")),
        )
        top.check_unknown()
        return config

    def listen(self, t: Table) -> ListenConfig:
        d = ListenConfig()
        result = ListenConfig(
            submission=t.strings("submission", d.submission),
            submissions=t.strings("submissions", d.submissions),
            smtp=t.strings("smtp", d.smtp),
        )
        t.check_unknown()
        return result

    def tls(self, t: Table) -> TLSConfig:
        from smarthost.smtpd.tlsprofile import PROFILES

        profile = t.get("profile", str, "intermediate")
        if profile not in PROFILES:
            raise ConfigError("tls.profile", f"must be one of {', '.join(PROFILES)}")
        ca_file = t.get("ca_file", str, "")
        result = TLSConfig(
            certificate=self.path(t, "certificate", "certs/smarthost.pem"),
            key=self.path(t, "key", "certs/smarthost.key"),
            profile=profile,
            ca_file=self._base / ca_file if ca_file else None,
        )
        t.check_unknown()
        return result

    def auth(self, t: Table) -> AuthConfig:
        mechanisms = tuple(m.upper() for m in t.strings("mechanisms", ("PLAIN", "LOGIN")))
        for i, name in enumerate(mechanisms):
            if self._validate_mechanism is not None:
                try:
                    self._validate_mechanism(name)
                except ValueError as e:
                    raise ConfigError(f"auth.mechanisms[{i}]", str(e)) from None
        ldap = self.ldap(t.table("ldap")) if "ldap" in t._data else None
        backends = t.strings("backends", ("users",))
        for i, backend in enumerate(backends):
            if backend not in ("users", "ldap") or backends.index(backend) != i:
                raise ConfigError(f"auth.backends[{i}]", f"{backend!r}: expected \"users\" "
                                  "or \"ldap\", each at most once")
        if "ldap" in backends and ldap is None:
            raise ConfigError("auth.backends", "\"ldap\" needs an [auth.ldap] table")
        gssapi_table = t.table("gssapi")
        gssapi = (GssapiConfig(self.path(gssapi_table, "keytab", ""))
                  if "gssapi" in t._data else None)
        gssapi_table.check_unknown()
        if "GSSAPI" in mechanisms and gssapi is None:
            raise ConfigError("auth.mechanisms", "GSSAPI needs [auth.gssapi] keytab")
        result = AuthConfig(
            users=self.path(t, "users", "var/users"),
            mechanisms=mechanisms,
            allow_plaintext=t.get("allow_plaintext", bool, False),
            backends=backends,
            ldap=ldap,
            gssapi=gssapi,
        )
        t.check_unknown()
        return result

    def ldap(self, t: Table) -> LdapConfig:
        from smarthost.auth.ldap import url_problem

        d = LdapConfig(url="", base="", bind_dn="", bind_password_file=Path())
        url, starttls = t.get("url", str, ""), t.get("starttls", bool, False)
        problem = url_problem(url, starttls)
        if problem is not None:
            raise ConfigError("auth.ldap.url", problem)
        result = LdapConfig(
            url=url,
            base=t.get("base", str, ""),
            bind_dn=t.get("bind_dn", str, ""),
            bind_password_file=self.path(t, "bind_password_file", ""),
            starttls=starttls,
            filter=t.get("filter", str, d.filter),
            sender_attributes=t.strings("sender_attributes", d.sender_attributes),
            require_group=t.get("require_group", str, ""),
        )
        if "{user}" not in result.filter:
            raise ConfigError("auth.ldap.filter", "must contain {user}")
        for key in ("base", "bind_dn"):
            if not getattr(result, key):
                raise ConfigError(f"auth.ldap.{key}", "must not be empty")
        t.check_unknown()
        return result

    def relay(self, t: Table) -> RelayConfig:
        domains = []
        for i, domain in enumerate(t.strings("local_domains", ())):
            key = f"relay.local_domains[{i}]"
            _check_domain(key, domain)
            if domain.startswith("["):
                # The relay rule never treats an address literal as local (policy.is_local):
                # listing one would silently accept nothing.
                raise ConfigError(key, f"{domain!r}: an address literal cannot be a local domain")
            domains.append(domain.lower().rstrip("."))
        networks = []
        for i, text in enumerate(t.strings("trusted_networks", _DEFAULT_TRUSTED)):
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ConfigError(
                    f"relay.trusted_networks[{i}]", f"{text!r} is not an IP network"
                ) from None
        senders_table = t.table("senders")
        senders: dict[str, frozenset[str]] = {}
        for user in list(senders_table._data):
            senders[user] = frozenset(a.lower() for a in senders_table.strings(user, ()))
        local_recipients = t.get("local_recipients", str, "")
        result = RelayConfig(
            local_domains=frozenset(domains),
            trusted_networks=tuple(networks),
            senders=senders,
            local_recipients=self._base / local_recipients if local_recipients else None,
            check_header_from=t.get("check_header_from", bool, True),
        )
        t.check_unknown()
        return result

    def queue(self, t: Table) -> QueueConfig:
        d = QueueConfig(directory=Path())
        retry = t.get("retry", list, list(d.retry))
        if not retry:
            raise ConfigError("queue.retry", "needs at least one delay")
        for i, delay in enumerate(retry):
            if isinstance(delay, bool) or not isinstance(delay, int) or delay < 1:
                raise ConfigError(f"queue.retry[{i}]", "must be a positive number of seconds")
        result = QueueConfig(
            directory=self.path(t, "directory", "var/spool"),
            max_size=t.integer("max_size", d.max_size, minimum=1024),
            retry=tuple(retry),
            lifetime=t.integer("lifetime", d.lifetime, minimum=1),
            delay_warning=t.integer("delay_warning", d.delay_warning),
        )
        t.check_unknown()
        return result

    def delivery(self, t: Table) -> DeliveryConfig:
        from smarthost.delivery.dns import parse_nameserver

        port = t.integer("port", 25, minimum=1)
        if port > 65535:
            raise ConfigError("delivery.port", "must be a TCP port (1-65535)")
        nameservers = t.strings("nameservers", ())
        for i, server in enumerate(nameservers):
            try:
                parse_nameserver(server)
            except ValueError as e:
                raise ConfigError(f"delivery.nameservers[{i}]", str(e)) from None
        try:
            tls = TLSPolicy(t.get("tls", str, TLSPolicy.OPPORTUNISTIC))
        except ValueError:
            raise ConfigError("delivery.tls", f"must be one of {', '.join(TLSPolicy)}") from None
        local = t.get("local", str, "maildir:var/maildir")
        local = self._target("delivery.local", local, allow_maildir=True)
        routes_table = t.table("routes")
        routes = {}
        for domain in list(routes_table._data):
            key = f"delivery.routes.{domain}"
            if domain != "*":
                _check_domain(key, domain)
            target = routes_table.get(domain, str, "")
            routes[domain.lower().rstrip(".")] = self._target(key, target, allow_maildir=False)
        policy_table = t.table("tls_policy")
        tls_policy = {}
        for domain in list(policy_table._data):
            key = f"delivery.tls_policy.{domain}"
            _check_domain(key, domain)
            try:
                policy = TLSPolicy(policy_table.get(domain, str, ""))
            except ValueError:
                raise ConfigError(key, f"must be one of {', '.join(TLSPolicy)}") from None
            tls_policy[domain.lower().rstrip(".")] = policy
        upstream_table = t.table("upstream")
        upstream = None
        if upstream_table._data:
            username = upstream_table.get("username", str, "")
            password_file = upstream_table.get("password_file", str, "")
            if not username:
                raise ConfigError("delivery.upstream.username", "is required with [upstream]")
            if not password_file:
                raise ConfigError("delivery.upstream.password_file", "is required")
            upstream = UpstreamConfig(username, self._base / password_file)
            upstream_table.check_unknown()
        result = DeliveryConfig(
            local=local,
            port=port,
            nameservers=nameservers,
            tls=tls,
            routes=routes,
            upstream=upstream,
            mta_sts=t.get("mta_sts", bool, True),
            tls_policy=tls_policy,
        )
        t.check_unknown()
        return result

    def _target(self, key: str, text: str, *, allow_maildir: bool) -> str:
        from smarthost.delivery.routing import parse_target

        if allow_maildir and text.startswith("maildir:"):
            directory = text[len("maildir:") :]
            if not directory:
                raise ConfigError(key, "maildir: needs a directory")
            return f"maildir:{self._base / directory}"
        try:
            parse_target(text)
        except ValueError as e:
            raise ConfigError(key, str(e)) from None
        if text.startswith("maildir:"):
            raise ConfigError(key, "only [delivery] local may be a maildir")
        return text

    def log(self, t: Table) -> LogConfig:
        events = t.get("events", str, "")
        result = LogConfig(events=self._base / events if events else None)
        t.check_unknown()
        return result

    def http(self, t: Table) -> HTTPConfig:
        result = HTTPConfig(listen=t.strings("listen", HTTPConfig().listen))
        t.check_unknown()
        return result

    def server(self, t: Table) -> ServerConfig:
        result = ServerConfig(workers=t.integer("workers", ServerConfig().workers),
                              drain=t.integer("drain", ServerConfig().drain),
                              cpu_affinity=t.get("cpu_affinity", bool,
                                                 ServerConfig().cpu_affinity))
        if result.workers > MAX_WORKERS:
            raise ConfigError("server.workers", f"must be at most {MAX_WORKERS}")
        if result.drain > MAX_DRAIN:
            raise ConfigError("server.drain", f"must be at most {MAX_DRAIN} seconds")
        t.check_unknown()
        return result

    def fleet(self, t: Table) -> FleetConfig:
        result = FleetConfig(redis=t.get("redis", str, ""))
        if result.redis:
            _check_redis_url(result.redis)
        t.check_unknown()
        return result

    def limits(self, t: Table) -> LimitsConfig:
        d = LimitsConfig()
        result = LimitsConfig(
            **{
                field.name: t.integer(field.name, getattr(d, field.name), minimum=1)
                for field in attrs.fields(LimitsConfig)
            }
        )
        if result.ipv6_prefix > 128:
            raise ConfigError("limits.ipv6_prefix", "must be a prefix length from 1 to 128")
        t.check_unknown()
        return result

    def plugins(self, t: Table) -> PluginsConfig:
        enabled = t.strings("enabled", ())
        settings = {}
        for name in list(t._data):
            if name != "enabled":
                settings[name] = dict(t.table(name)._data)
        return PluginsConfig(enabled=enabled, settings=settings)


def _check_redis_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ConfigError("fleet.redis", f"{url!r} is not a redis://host[:port][/db] URL")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"database {db!r} is not a number")
    except ValueError as e:
        raise ConfigError("fleet.redis", f"{url!r}: {e}") from None


def _check_hostname(hostname: str) -> None:
    labels = hostname.rstrip(".").split(".")
    # ASCII only: it goes into the banner, EHLO and Received headers (RFC 5321 4.1.2).
    text = "".join(labels)
    if not all(labels) or not text.isascii() or any(not (c.isalnum() or c == "-") for c in text):
        raise ConfigError("hostname", f"{hostname!r} is not a valid host name")


def _check_domain(key: str, domain: str) -> None:
    from smarthost.core.envelope import AddressError, parse_mailbox

    try:
        parse_mailbox(f"postmaster@{domain}")
    except AddressError:
        raise ConfigError(key, f"{domain!r} is not a domain name") from None


def load_config(
    path: Path | None,
    *,
    validate_mechanism: Callable[[str], None] | None = None,
) -> Config:
    """Read ``path`` (None: the embedded default, relative to the working directory)."""
    if path is None:
        return parse_config(DEFAULT_TOML, Path.cwd(), validate_mechanism=validate_mechanism)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not UTF-8 text") from None
    return parse_config(text, path.resolve().parent, validate_mechanism=validate_mechanism)


def parse_config(
    text: str,
    base_dir: Path,
    *,
    validate_mechanism: Callable[[str], None] | None = None,
) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"not valid TOML: {e}") from None
    return _Loader(base_dir, validate_mechanism).load(data)


DEFAULT_TOML = (Path(__file__).parent / "smarthost.example.toml").read_text(encoding="utf-8")
