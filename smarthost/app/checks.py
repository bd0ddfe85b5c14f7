"""``smarthost check-config`` beyond loading the file: everything start-up checks except
binding ports, and warnings for settings that work but are risky.

Errors are what would stop the daemon (an endpoint string Twisted cannot parse, a certificate
and key that do not load or do not match, a file it must read and cannot); warnings are what
it would run with, to the operator's regret (an open relay through ``trusted_networks``,
passwords in clear on a public port, a certificate about to expire). Each names the key, so
the line to fix is known. What the checks read from outside the config (the time, the file
descriptor limit) arrives in :class:`Environment`, so tests can pin it.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import resource
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor

from smarthost.api import Context
from smarthost.app import directory, servertls, workerspools
from smarthost.app.config import Config, ConfigError
from smarthost.app.pluginload import PluginError, build_plugins
from smarthost.auth import oauth
from smarthost.auth.users import parse_users, users_file_is_insecure
from smarthost.core.types import Network
from smarthost.smtpd import listen

EXPIRY_WARNING = datetime.timedelta(days=14)
# Descriptors a daemon needs besides one per client connection: up to 100 deliveries at once
# (the scheduler's concurrency), listeners, spool segments, logs, DNS sockets, the thread pool.
FD_RESERVE = 200

# Addresses a trusted network may cover without being a danger: loopback, RFC 1918, link-local,
# and IPv6 unique-local (RFC 4193) and link-local.
_PRIVATE: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
              "::1/128", "fc00::/7", "fe80::/10")
)
_NOT_A_FQDN = re.compile(r"(^localhost$|^localhost\.|\.(localdomain|local|localhost)$)", re.I)


@attrs.frozen
class Problem:
    key: str
    text: str

    def __str__(self) -> str:
        return f"{self.key}: {self.text}"


@attrs.frozen
class Findings:
    errors: tuple[Problem, ...]
    warnings: tuple[Problem, ...]


@attrs.frozen
class Environment:
    """The outside world as the checks see it."""

    now: datetime.datetime
    nofile_hard_limit: int | None  # RLIMIT_NOFILE's hard limit; None when unlimited

    @classmethod
    def current(cls) -> Environment:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        return cls(
            now=datetime.datetime.now(datetime.UTC),
            nofile_hard_limit=None if hard == resource.RLIM_INFINITY else hard,
        )


class _NoLookups:
    """Plugins are built but never run: no DNS query may leave."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("no DNS lookups while checking a configuration")


def _run_now(f: Any, *args: Any, **kwargs: Any) -> Any:
    from twisted.internet.defer import maybeDeferred

    return maybeDeferred(f, *args, **kwargs)


def check_config(config: Config, env: Environment) -> Findings:
    checker = _Checker(config, env)
    checker.run()
    return Findings(tuple(checker.errors), tuple(checker.warnings))


def listeners(config: Config) -> Iterator[tuple[str, str, str]]:
    """(role, key, endpoint string) of every ``[listen]`` value."""
    for role in ("submission", "submissions", "smtp"):
        for i, description in enumerate(getattr(config.listen, role)):
            yield role, f"listen.{role}[{i}]", description


def endpoint_problem(description: str) -> str | None:
    """Why Twisted could not listen on ``description`` (parsed, never bound); None if fine."""
    inner = description.removeprefix(listen.HAPROXY_PREFIX)
    if inner.startswith("systemd:"):
        return _systemd_problem(inner)
    try:
        endpoint = _parse_endpoint(inner)
    except Exception as e:
        return f"{description!r} is not a server endpoint Twisted can open: {e}"
    port = getattr(endpoint, "_port", 0)  # TCP and SSL endpoints; parsing does not check it
    if isinstance(port, int) and not 0 <= port <= 65535:
        return f"{description!r}: {port} is not a TCP port (0-65535)"
    return None


def _parse_endpoint(description: str) -> object:
    """Parsed against a reactor in memory: nothing is bound. Parsers may read files (an ssl:
    certificate) or do anything else, so the callers count any exception as a bad string."""
    return serverFromString(MemoryReactor(), description)  # type: ignore[no-untyped-call]


def _systemd_problem(description: str) -> str | None:
    """A socket-activation string, checked for form only: its descriptors exist only when
    systemd starts the daemon."""
    params = dict(part.partition("=")[::2] for part in description.split(":")[1:])
    if params.get("domain") not in ("INET", "INET6", "UNIX"):
        return f"{description!r}: systemd: needs domain=INET, INET6 or UNIX"
    if ("index" in params) == ("name" in params) or set(params) - {"domain", "index", "name"}:
        return f"{description!r}: systemd: needs index=N or name=NAME (and nothing else)"
    if "index" in params and not params["index"].isdigit():
        return f"{description!r}: systemd: index must be a number"
    return None


def is_loopback_listener(description: str) -> bool:
    """True when only this machine can connect: a unix socket, or TCP on a loopback
    interface. Behind HAProxy or systemd the clients may be anywhere."""
    if description.startswith((listen.HAPROXY_PREFIX, "systemd:")):
        return False
    try:
        endpoint = _parse_endpoint(description)
    except Exception:
        return False
    if hasattr(endpoint, "_address"):  # unix:
        return True
    interface = getattr(endpoint, "_interface", "")
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def _beyond_private(network: Network) -> bool:
    return not any(
        network.version == private.version and network.subnet_of(private)  # type: ignore[arg-type]
        for private in _PRIVATE
    )


class _Checker:
    def __init__(self, config: Config, env: Environment) -> None:
        self._config = config
        self._env = env
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []

    def error(self, key: str, text: str) -> None:
        self.errors.append(Problem(key, text))

    def warn(self, key: str, text: str) -> None:
        self.warnings.append(Problem(key, text))

    def run(self) -> None:
        self.hostname()
        self.listeners()
        self.workers()
        self.tls()
        self.users()
        self.directories()
        self.files()
        self.secrets()
        self.relay()
        self.limits()
        self.plugins()

    def hostname(self) -> None:
        name = self._config.hostname.rstrip(".")
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            self.warn("hostname", f"{name} is an address; use this host's fully qualified "
                                  "domain name (the name its PTR record gives)")
            return
        if "." not in name or _NOT_A_FQDN.search(name):
            self.warn("hostname", f"{name!r} is not a fully qualified domain name: other "
                                  "servers check the EHLO name, set hostname = "
                                  "\"mail.example.org\" (the name its PTR record gives)")

    def listeners(self) -> None:
        plaintext = self._config.auth.allow_plaintext
        for role, key, description in listeners(self._config):
            problem = endpoint_problem(description)
            if problem is not None:
                self.error(key, problem)
            elif plaintext and role == "submission" and not is_loopback_listener(description):
                self.warn("auth.allow_plaintext", f"AUTH is offered before STARTTLS on {key} "
                          f"({description}), which is not loopback: passwords would cross "
                          "the network in clear")
        for i, description in enumerate(self._config.http.listen):
            problem = endpoint_problem(description)
            if problem is not None:
                self.error(f"http.listen[{i}]", problem)
            elif not is_loopback_listener(description):
                self.warn(f"http.listen[{i}]", f"the status page and metrics ({description}) "
                          "have no login and are not on loopback")

    def workers(self) -> None:
        """With [server] workers > 1 every listener is a socket the workers adopt."""
        if workerspools.worker_count(self._config) > 1:
            from smarthost.app import master  # imported here: master imports this module

            try:
                master.check_listeners(self._config)
            except ConfigError as e:
                self.error(e.key, str(e).removeprefix(f"{e.key}: "))

    def tls(self) -> None:
        tls = self._config.tls
        if not tls.certificate.exists() and not tls.key.exists():
            self.warn("tls.certificate", f"neither {tls.certificate} nor {tls.key} exists: the "
                      "daemon will generate a self-signed certificate, which clients that "
                      "verify will refuse")
            return
        try:  # as start-up loads them (app.wiring)
            servertls.check_pair(tls.certificate, tls.key)
            listen.server_tls_options(tls.certificate, tls.key, tls.profile)
        except ConfigError as e:
            self.error(e.key, str(e).removeprefix(f"{e.key}: "))
            return
        except Exception as e:  # OpenSSL refuses what cryptography could read
            self.error("tls.certificate", f"cannot load the certificate and key: {e}")
            return
        leaf = x509.load_pem_x509_certificates(tls.certificate.read_bytes())[0]
        left = leaf.not_valid_after_utc - self._env.now
        if left <= datetime.timedelta(0):
            self.warn("tls.certificate", f"{tls.certificate} expired on "
                      f"{leaf.not_valid_after_utc:%Y-%m-%d}: clients that verify refuse it")
        elif left <= EXPIRY_WARNING:
            self.warn("tls.certificate", f"{tls.certificate} expires on "
                      f"{leaf.not_valid_after_utc:%Y-%m-%d}, in {left.days} days: renew it")

    def users(self) -> None:
        path = self._config.auth.users
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.warn("auth.users", f"{path} does not exist: nobody can log in until "
                      f"`smarthost passwd --users {path} NAME`")
            return
        except OSError as e:
            self.error("auth.users", f"cannot read {path}: {e.strerror or e}")
            return
        for problem in parse_users(data).problems:
            self.warn("auth.users", f"{path}: {problem}")
        if users_file_is_insecure(path):
            self.warn("auth.users", f"{path} is readable by other users; chmod 600 it")

    def directories(self) -> None:
        """What [auth] backends and [tls] ca_file need, read as start-up reads it."""
        ldap, ca_file = self._config.auth.ldap, self._config.tls.ca_file
        steps: list[Callable[[], object]] = []
        if ca_file is not None:
            steps.append(lambda: directory.trust_root(ca_file))
        if ldap is not None:
            steps.append(lambda: directory.read_bind_password(ldap.bind_password_file))
        for step in steps:
            try:
                step()
            except ConfigError as e:
                self.error(e.key, str(e).removeprefix(f"{e.key}: "))

    def files(self) -> None:
        config = self._config
        upstream = config.delivery.upstream
        if upstream is not None:
            self._readable("delivery.upstream.password_file", upstream.password_file)
        if config.relay.local_recipients is not None:
            self._readable("relay.local_recipients", config.relay.local_recipients)
        spool = config.queue.directory
        if spool.exists() and not spool.is_dir():
            self.error("queue.directory", f"{spool} exists and is not a directory")
        events = config.log.events
        if events is not None and events.is_dir():
            self.error("log.events", f"{events} is a directory, not a file")

    def secrets(self) -> None:
        """Secret files readable by every user on the machine, and the Kerberos keytab when
        GSSAPI is offered (the daemon reads it at start and at every reload)."""
        auth = self._config.auth
        if auth.ldap is not None:
            secret = auth.ldap.bind_password_file
            if secret.exists() and secret.stat().st_mode & 0o004:
                self.warn("auth.ldap.bind_password_file",
                          f"{secret} is readable by every user; chmod 600 it")
        if "GSSAPI" in auth.mechanisms and auth.gssapi is not None:
            self._readable("auth.gssapi.keytab", auth.gssapi.keytab)

    def _readable(self, key: str, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            self.error(key, f"cannot read {path}: {e.strerror or e}")

    def relay(self) -> None:
        relay = self._config.relay
        for i, network in enumerate(relay.trusted_networks):
            if _beyond_private(network):
                self.warn(f"relay.trusted_networks[{i}]", f"{network} reaches beyond private "
                          "and loopback addresses: every host there may relay without AUTH")
        if (self._config.listen.smtp and relay.local_domains and relay.local_recipients is None
                and self._config.delivery.local.startswith("maildir:")):
            self.warn("relay.local_recipients", "not set, so the smtp listener accepts mail "
                      "for any local part of the local domains and makes a maildir for each: "
                      "anyone can fill the disk; list the addresses that exist")

    def limits(self) -> None:
        hard = self._env.nofile_hard_limit
        needed = self._config.limits.connections + FD_RESERVE
        if hard is not None and needed > hard:
            self.warn("limits.connections", f"{self._config.limits.connections} connections "
                      f"need about {needed} file descriptors but the hard limit "
                      f"(RLIMIT_NOFILE) here is {hard}: raise it (LimitNOFILE= in the systemd "
                      "unit) or lower connections")

    def plugins(self) -> None:
        config = self._config
        # Plugins validate their own settings when built; nothing is started.
        context = Context(Clock(), config.hostname, _NoLookups(), _run_now, config.base_dir)
        try:
            plugins = build_plugins(config.plugins.enabled, config.plugins.settings, context)
            oauth.require_verifier(config.auth.mechanisms, plugins)
        except (PluginError, ConfigError) as e:
            self.error(e.key, str(e).removeprefix(f"{e.key}: "))
