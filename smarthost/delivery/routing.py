"""Where a recipient's mail goes next: local maildir, a static route, or the domain's MX hosts.

Resolution answers a :class:`Route` or raises :class:`PermanentRouteError` (NXDOMAIN, null
MX: bounce now) or :class:`TemporaryRouteError` (SERVFAIL, timeout: try again later). The
rules live here; asking DNS and reading its answers is :mod:`smarthost.delivery.dns`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from random import Random
from typing import Protocol

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from smarthost.core.enums import TLSPolicy
from smarthost.delivery.dns import (
    DNSLookups,
    Lookups,
    domain_key,
    has_dns_form,
    is_host_name,
    is_ip,
    split_host_port,
    usable_address,
)
from smarthost.delivery.mtasts import ENFORCE, TESTING, PolicySource

_log = Logger(namespace="smarthost.delivery.routing")

SMTP, MAILDIR = "smtp", "maildir"


@attrs.frozen
class Credentials:
    username: str
    password: str = attrs.field(repr=False)  # never in repr, logs or exception text


@attrs.frozen
class Host:
    """One server to try: ``name`` for TLS verification and logs, ``address`` to connect to."""

    name: str
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.name}[{self.address}]:{self.port}"

    @property
    def remote(self) -> str:
        """How outcomes, logs and the queue listing name it: ``name[address]``."""
        return f"{self.name}[{self.address}]"


@attrs.frozen
class HostFailure:
    """A host that took no connection, as a delivery agent reports it; the failed-host memory
    (:mod:`smarthost.delivery.hostcache`) keeps it, and a suspended route's deferral repeats
    its ``reason`` and ``status``."""

    host: Host
    reason: str  # e.g. "connection refused by mx.example.test[192.0.2.1]:25"
    status: str  # RFC 3463, e.g. "4.4.1"


@attrs.frozen
class Route:
    kind: str  # SMTP | MAILDIR
    hosts: tuple[Host, ...] = ()  # in the order to try them (SMTP)
    tls: TLSPolicy = TLSPolicy.OPPORTUNISTIC
    implicit_tls: bool = False  # port 465 routes: TLS from the first byte (RFC 8314)
    credentials: Credentials | None = None  # static routes only, never MX hosts
    maildir: str = ""  # MAILDIR: the root directory
    # A route is also the unit of connection reuse: recipients with equal routes share one
    # connection (one per next hop).


class RouteError(Exception):
    """No route now; ``reply`` is what the bounce or the queue listing says."""

    def __init__(self, reply: str, status: str) -> None:
        super().__init__(reply)
        self.reply = reply
        self.status = status


class PermanentRouteError(RouteError):
    """NXDOMAIN, null MX (RFC 7505), no address at all: bounce."""


class TemporaryRouteError(RouteError):
    """SERVFAIL, REFUSED, timeout: defer and retry."""


# --- Targets: the text forms of "[delivery] local" and "[delivery.routes]" values -------------

DEFAULT_SMTP_PORT = 25
IMPLICIT_TLS_PORT = 465  # RFC 8314 3.3: submissions, TLS from the first byte
MAX_MX_HOSTS = 10  # a domain with hundreds of MX records must not cost hundreds of lookups

_TARGET_FORMS = {SMTP: "smtp:HOST:PORT", MAILDIR: "maildir:DIR"}


@attrs.frozen
class Target:
    """A parsed next-hop text: ``smtp:HOST:PORT`` or ``maildir:DIR``."""

    kind: str  # SMTP | MAILDIR
    host: str = ""  # SMTP: a host name or a bare IP address (no brackets)
    port: int = 0
    directory: str = ""  # MAILDIR
    # The host is an IP address: no lookup. Worked out once here, not at every delivery.
    host_is_ip: bool = attrs.field(init=False, eq=False, repr=False)

    @host_is_ip.default
    def _ip(self) -> bool:
        return self.kind == SMTP and is_ip(self.host)


def parse_target(text: str, *, kinds: Iterable[str] = (SMTP, MAILDIR)) -> Target:
    """Parse a next-hop text; the ValueError says what is wrong so config errors are clear.

    IPv6 addresses must be bracketed (``smtp:[::1]:25``): without brackets the port could not
    be told apart from the address. A missing port means 25, as in Postfix's ``relayhost``.
    """
    allowed = tuple(kinds)
    expected = " or ".join(f'"{_TARGET_FORMS[k]}"' for k in allowed)
    kind, sep, rest = text.partition(":")
    if not sep or kind not in allowed:
        raise ValueError(f"{text!r}: expected {expected}")
    if kind == MAILDIR:
        if not rest:
            raise ValueError(f"{text!r}: maildir needs a directory")
        return Target(MAILDIR, directory=rest)
    host, port = split_host_port(rest, DEFAULT_SMTP_PORT, what=text)
    return Target(SMTP, host=host, port=port)


# --- The resolver ----------------------------------------------------------------------------


class HostOrder(Protocol):
    """What routing asks the failed-host memory (:class:`smarthost.delivery.hostcache.HostCache`):
    the order to try a route's hosts in. A protocol, not an import: the delivery agents import
    this module for its values, and must not reach that memory even indirectly."""

    def order(self, hosts: Sequence[Host]) -> tuple[Host, ...]: ...


class NextHopResolver:
    """Turns a recipient domain into the next hop, in the order Postfix's trivial-rewrite and
    smtp client would: local domain, exact static route, ``"*"``, then the domain's MX hosts.

    Every collaborator is passed in (the DNS client, the failed-host memory that orders a
    route's hosts, the random source that shuffles equal MX preferences), so tests run on a
    fake resolver in virtual time with deterministic ordering.
    """

    def __init__(
        self,
        resolver: DNSLookups,
        *,
        hosts: HostOrder,
        local_domains: Iterable[str] = frozenset(),
        local: str = "maildir:var/maildir",
        routes: Mapping[str, str] | None = None,
        port: int = DEFAULT_SMTP_PORT,
        tls: TLSPolicy = TLSPolicy.OPPORTUNISTIC,
        credentials: Credentials | None = None,
        random: Random | None = None,
        address_literals: bool = True,
        tls_policies: Mapping[str, TLSPolicy] | None = None,
        mta_sts: PolicySource | None = None,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port {port}: expected 1 to 65535")
        self._dns = Lookups(resolver)
        self._hosts = hosts
        self._local_domains = frozenset(domain_key(d) for d in local_domains)
        self._local = parse_target(local)
        self._routes = {
            (key if key == "*" else domain_key(key)): parse_target(value, kinds=(SMTP,))
            for key, value in (routes or {}).items()
        }
        self._port = port
        self._tls = tls
        self._credentials = credentials
        self._random = random if random is not None else Random()  # noqa: S311 (not crypto)
        self._address_literals = address_literals
        # [delivery.tls_policy]: the operator's word for a domain beats MTA-STS and tls.
        self._tls_policies = {domain_key(d): TLSPolicy(p) for d, p in (tls_policies or {}).items()}
        self._mta_sts = mta_sts

    # -- public API --

    def resolve(self, domain: str, *, mta_sts: bool = True) -> Deferred[Route]:
        """The route for ``domain``; fails with :class:`PermanentRouteError` (bounce) or
        :class:`TemporaryRouteError` (defer). Any other failure is a bug and, like every crash
        in delivery, should be treated as temporary by the caller. ``mta_sts=False`` leaves the
        domain's MTA-STS policy out (a message with ``TLS-Required: No``, RFC 8689 5); the
        operator's ``tls`` and ``tls_policies`` still apply.

        A route known without asking DNS (a local maildir, a static route to an IP address, an
        address literal: nearly every message of a smart host) comes back already fired, with
        no coroutine to run; the rest goes through :meth:`_resolve`. Either way a failure is
        the Deferred's, never raised here."""
        try:
            key = domain_key(domain)
            route = self._known(key)
            if route is not None:
                return succeed(self._override(key, route))
        except Exception:
            return fail()
        return Deferred.fromCoroutine(self._resolve(key, mta_sts))

    # -- routing --

    async def _resolve(self, key: str, mta_sts: bool) -> Route:
        return self._override(key, await self._next_hop(key, mta_sts))

    def _override(self, key: str, route: Route) -> Route:
        """``[delivery.tls_policy]``: the operator's word for the domain replaces the route's."""
        override = self._tls_policies.get(key)
        if route.kind != SMTP or override is None:
            return route
        if route.credentials is not None and override == TLSPolicy.OPPORTUNISTIC:
            override = TLSPolicy.REQUIRED  # never send a password in the clear
        return attrs.evolve(route, tls=override)

    def _known(self, key: str) -> Route | None:
        """The route when no DNS answer is needed for it, else None (then :meth:`_next_hop`
        asks): the same rules in the same order, stopped at the first that needs a lookup."""
        target = self._target(key)
        if target is None:
            return self._literal(key) if key.startswith("[") and key.endswith("]") else None
        if target.kind == MAILDIR:
            return Route(MAILDIR, maildir=target.directory)
        if not target.host_is_ip:
            return None
        return self._static_route(
            [Host(target.host, target.host, target.port)], target, self._credentials_for(key)
        )

    def _target(self, key: str) -> Target | None:
        """The configured next hop of ``key``: the local target for a local domain, else its
        static route or ``"*"``; None for a domain routed by its MX hosts."""
        if key in self._local_domains:
            return self._local
        return self._routes.get(key) or self._routes.get("*")

    def _credentials_for(self, key: str) -> Credentials | None:
        # The local SMTP target is an internal mail store, not the upstream relay: the
        # [delivery.upstream] credentials are not sent to it.
        return None if key in self._local_domains else self._credentials

    async def _next_hop(self, key: str, mta_sts: bool) -> Route:
        target = self._target(key)
        if target is not None:
            if target.kind == MAILDIR:
                return Route(MAILDIR, maildir=target.directory)
            return await self._static(target, credentials=self._credentials_for(key))
        if key.startswith("[") and key.endswith("]"):
            return self._literal(key)
        route = await self._mx(key)
        if self._mta_sts is None or not mta_sts or key in self._tls_policies:
            return route
        return await self._sts(key, route)

    async def _sts(self, domain: str, route: Route) -> Route:
        """RFC 8461 4.2: under ``enforce`` only the MX hosts the policy names, over TLS
        verified for that name; none of them left defers (5.1: never a bounce for a policy
        failure). ``testing`` only logs what enforce would have done."""
        assert self._mta_sts is not None
        policy = await self._mta_sts.policy(domain)
        if policy is None or policy.mode not in (ENFORCE, TESTING):
            return route
        allowed = tuple(h for h in route.hosts if policy.allows(h.name))
        if policy.mode == TESTING:
            refused = sorted({h.name for h in route.hosts if h not in allowed})
            _log.info(
                "MTA-STS testing for {domain}: enforce would deliver only over verified TLS"
                "{more}", domain=domain,
                more=f" and never to {', '.join(refused)}" if refused else "",
            )
            return route
        if not allowed:
            names = ", ".join(sorted({h.name for h in route.hosts}))
            raise TemporaryRouteError(
                f"MTA-STS policy of {domain} names none of its MX hosts ({names})", "4.7.5"
            )
        return attrs.evolve(route, hosts=allowed, tls=TLSPolicy.VERIFY)

    async def _static(self, target: Target, credentials: Credentials | None) -> Route:
        """A configured host: its failures are the operator's to fix, so they never bounce."""
        if target.host_is_ip:
            hosts = [Host(target.host, target.host, target.port)]
        else:
            addresses = await self._dns.addresses(target.host)
            if addresses.temporary:
                raise TemporaryRouteError(
                    f"cannot resolve route host {target.host}: {addresses.temporary}", "4.4.3"
                )
            if not addresses.records:
                raise TemporaryRouteError(
                    f"route host {target.host} has no usable address", "4.4.4"
                )
            hosts = [Host(target.host, a, target.port) for a in addresses.records]
        return self._static_route(hosts, target, credentials)

    def _static_route(
        self, hosts: list[Host], target: Target, credentials: Credentials | None
    ) -> Route:
        tls = self._tls
        if credentials is not None and tls == TLSPolicy.OPPORTUNISTIC:
            tls = TLSPolicy.REQUIRED  # never send a password in the clear
        return Route(
            SMTP,
            hosts=self._order(hosts),
            tls=tls,
            implicit_tls=target.port == IMPLICIT_TLS_PORT,
            credentials=credentials,
        )

    def _literal(self, key: str) -> Route:
        """``user@[192.0.2.1]`` (RFC 5321 4.1.3): no DNS, the address is the next hop.

        Safe because routing only happens after the relay rule accepted the recipient; an
        operator who wants no literals at all passes ``address_literals=False``.
        """
        if not self._address_literals:
            raise PermanentRouteError("address literals are not accepted for delivery", "5.1.2")
        inner = key[1:-1]
        text = inner[5:] if inner.startswith("ipv6:") else inner
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise PermanentRouteError(f"invalid address literal {key}", "5.1.2") from None
        if not usable_address(address):
            raise PermanentRouteError(f"address literal {key} is not a usable address", "5.1.2")
        host = Host(str(address), str(address), self._port)
        return self._mx_route([host])

    async def _mx(self, domain: str) -> Route:
        """RFC 5321 5.1: MX hosts by preference, else the implicit MX (the domain itself)."""
        if not has_dns_form(domain):
            raise PermanentRouteError(f"domain {domain} has no DNS form", "5.1.2")
        answer = await self._dns.mail_exchangers(domain)
        if answer.nxdomain:
            raise PermanentRouteError(f"domain {domain} does not exist", "5.1.2")
        if answer.temporary:
            raise TemporaryRouteError(f"MX lookup for {domain} failed: {answer.temporary}", "4.4.3")
        records = list(answer.records)
        if len(records) == 1 and records[0][1] == "":
            # RFC 7505 3: a single MX of "." means the domain accepts no mail; 4.2: 5.1.10.
            raise PermanentRouteError(f"domain {domain} does not accept mail (null MX)", "5.1.10")
        if not records:
            return await self._implicit_mx(domain)
        exchanges = self._by_preference(records)
        # RFC 1035 3.3.9: an exchange is a host name. "10.0.0.1" as an MX is a common mistake
        # that resolvers would treat as a (nonexistent) name; "." among real MX hosts is a
        # broken null MX (RFC 7505 3 forbids mixing). Neither is a host to try.
        exchanges = [e for e in exchanges if is_host_name(e)]
        exchanges = exchanges[:MAX_MX_HOSTS]
        answers = await defer.gatherResults(
            [Deferred.fromCoroutine(self._dns.addresses(name)) for name in exchanges]
        )
        hosts = [
            Host(name, address, self._port)
            for name, addresses in zip(exchanges, answers, strict=True)
            for address in addresses.records
        ]
        if hosts:
            # RFC 5321 5.1: try the other MX hosts; lookup failures of some are not fatal.
            return self._mx_route(hosts)
        # MX records exist but none gives an address. Postfix bounces this (5.4.4) unless
        # smtp_defer_if_no_mx_address_found=yes; we defer: the domain said it takes mail, a
        # dangling MX is usually a DNS change in progress, and the queue lifetime still ends
        # it. RFC 5321 5.1 only asks that it be reported as an error.
        if any(a.temporary for a in answers):
            reason = next(a.temporary for a in answers if a.temporary)
            raise TemporaryRouteError(
                f"cannot resolve the MX hosts of {domain}: {reason}", "4.4.3"
            )
        raise TemporaryRouteError(f"no MX host of {domain} has a usable address", "4.4.4")

    async def _implicit_mx(self, domain: str) -> Route:
        addresses = await self._dns.addresses(domain)
        if addresses.records:
            return self._mx_route([Host(domain, a, self._port) for a in addresses.records])
        if addresses.temporary:
            raise TemporaryRouteError(
                f"address lookup for {domain} failed: {addresses.temporary}", "4.4.3"
            )
        if addresses.nxdomain:
            raise PermanentRouteError(f"domain {domain} does not exist", "5.1.2")
        # RFC 3463 X.4.4 names exactly this case: the name exists with neither MX nor address.
        raise PermanentRouteError(f"domain {domain} has no MX and no address", "5.4.4")

    def _mx_route(self, hosts: list[Host]) -> Route:
        # Credentials are for the configured upstream only: never offer them to a host that
        # a DNS answer chose.
        return Route(
            SMTP,
            hosts=self._order(hosts),
            tls=self._tls,
            implicit_tls=self._port == IMPLICIT_TLS_PORT,
        )

    def _by_preference(self, records: list[tuple[int, str]]) -> list[str]:
        """RFC 5321 5.1: lowest preference first, equal preferences in random order."""
        groups: dict[int, list[str]] = {}
        for preference, name in records:
            if name not in groups.setdefault(preference, []):
                groups[preference].append(name)
        ordered: list[str] = []
        seen: set[str] = set()
        for preference in sorted(groups):
            group = groups[preference]
            self._random.shuffle(group)
            ordered.extend(n for n in group if n not in seen)
            seen.update(group)
        return ordered

    def _order(self, hosts: list[Host]) -> tuple[Host, ...]:
        """Drop duplicate addresses (keeping the best place); recently unreachable hosts go
        last (the failed-host memory's rule)."""
        unique: dict[tuple[str, int], Host] = {}
        for host in hosts:
            unique.setdefault((host.address, host.port), host)
        return self._hosts.order(list(unique.values()))
