"""DNS for delivery: the client built from ``[delivery] nameservers``, and the two lookups
routing needs (MX, and A + AAAA), each answering an :class:`Answer` instead of raising.

An answer is records, NXDOMAIN, or why there is no answer now (SERVFAIL, timeout, ...): what
that means for a message (bounce, defer) is routing's business, not this module's. Also here:
the syntax of names and addresses that both the DNS side and the route texts use.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP
from twisted.names import cache, client, common, dns, error, hosts, resolve

DNS_TIMEOUT = (1, 3, 5)  # seconds per retransmission; a lookup gives up after 9 s

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")


# --- Names and addresses -------------------------------------------------------------------


def domain_key(domain: str) -> str:
    """Routing compares domains case-insensitively and without the root's trailing dot."""
    return domain.strip().lower().rstrip(".")


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_host_name(text: str) -> bool:
    """RFC 1123 2.1 labels; an all-numeric last label (RFC 3696 2) is a mistyped address."""
    labels = text.rstrip(".").split(".")
    return (
        len(text) <= 253
        and all(_HOST_LABEL.match(label) for label in labels)
        and not labels[-1].isdigit()
    )


def has_dns_form(name: str) -> bool:
    """Python's IDNA 2003 codec refuses some U-labels; such a name cannot be looked up."""
    try:
        dns.domainString(name)
    except UnicodeError:
        return False
    return True


def usable_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Addresses no mail server can be at: 0.0.0.0, multicast, 240/4 and broadcast.

    Loopback is allowed: tests run MX hosts there, and delivering to our own port 25 is
    harmless (the inbound listener refuses to relay). A DNS answer of 0.0.0.0 or 127.0.0.2 is
    sometimes used to say "no mail here"; the unspecified address is refused for that reason.
    """
    if address.is_unspecified or address.is_multicast:
        return False
    # IPv4's 240/4 (and 255.255.255.255) only; IPv6's "reserved" ::/8 includes ::1.
    return not (address.version == 4 and address.is_reserved)


def split_host_port(text: str, default_port: int, *, what: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT``; errors quote ``what``."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"{what!r}: missing ']' after the IPv6 address")
        host, after = text[1:close], text[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what!r}: {host!r} in brackets is not an IPv6 address") from None
        if after and not after.startswith(":"):
            raise ValueError(f"{what!r}: expected ':PORT' after ']'")
        port_text = after[1:] if after else None
    else:
        if text.count(":") > 1:
            raise ValueError(f"{what!r}: write an IPv6 address in brackets, e.g. [::1]:25")
        host, sep, port_text_ = text.partition(":")
        port_text = port_text_ if sep else None
        if not is_ip(host) and not is_host_name(host):
            raise ValueError(f"{what!r}: {host!r} is not a host name or IP address")
    if port_text is None:
        return host, default_port
    if not _PORT.match(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError(f"{what!r}: port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def parse_nameserver(text: str) -> tuple[str, int]:
    """Parse ``127.0.0.1``, ``127.0.0.1:5353``, ``::1`` or ``[::1]:5353`` (port 53 by default).

    Only addresses: looking up the name of a name server would need a name server.
    """
    stripped = text.strip()
    try:
        return str(ipaddress.ip_address(stripped)), 53  # bare IPv4 or unbracketed IPv6
    except ValueError:
        pass
    host, port = split_host_port(stripped, 53, what=text)
    if not is_ip(host):
        raise ValueError(f"nameserver {text!r}: must be an IP address, optionally with :PORT")
    return host, port


# --- The client ------------------------------------------------------------------------------

_Sections = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


class DNSLookups(Protocol):
    """The slice of ``IResolver`` we use, typed: Twisted's annotations say tuples of records
    where it returns lists, and make ``timeout`` mandatory where every resolver defaults it."""

    def lookupMailExchange(
        self, name: str, timeout: Sequence[float] | None = None
    ) -> Deferred[_Sections]: ...

    def lookupAddress(
        self, name: str, timeout: Sequence[float] | None = None
    ) -> Deferred[_Sections]: ...

    def lookupIPV6Address(
        self, name: str, timeout: Sequence[float] | None = None
    ) -> Deferred[_Sections]: ...


def make_resolver(
    nameservers: Sequence[str], reactor: IReactorTCP, timeout: Sequence[float] = DNS_TIMEOUT
) -> DNSLookups:
    """The DNS client for ``[delivery] nameservers``.

    With name servers we build ``client.Resolver(servers=..., resolv=None)`` and nothing else:
    ``client.createResolver(servers=...)`` would also merge /etc/resolv.conf and /etc/hosts, so
    a test (or an operator pointing at a filtering resolver) would silently get answers from
    elsewhere. Without them we use the system's ``createResolver()``, hosts file included.

    ``reactor`` must also provide IReactorUDP and IReactorTime; it is typed IReactorTCP
    because that is what the typed global reactor offers (truncated answers go over TCP).
    Twisted's default timeouts add up to a minute per lookup, far too long when one delivery
    needs an MX lookup and two address lookups per MX host.
    """
    if not nameservers:
        return _DefaultTimeout(_system_resolver(reactor), timeout)
    servers = [parse_nameserver(text) for text in nameservers]
    resolver: DNSLookups = client.Resolver(  # type: ignore[no-untyped-call]
        servers=servers, resolv=None, timeout=tuple(timeout), reactor=reactor
    )
    return resolver


def _system_resolver(reactor: IReactorTCP) -> DNSLookups:
    """What ``client.createResolver()`` builds on posix (hosts file, a cache, resolv.conf's
    servers), on our reactor rather than the global one."""
    chain: DNSLookups = resolve.ResolverChain([  # type: ignore[no-untyped-call]
        hosts.Resolver(b"/etc/hosts"),  # type: ignore[no-untyped-call]
        cache.CacheResolver(reactor=reactor),  # type: ignore[no-untyped-call]
        client.Resolver(b"/etc/resolv.conf", reactor=reactor),  # type: ignore[no-untyped-call]
    ])
    return chain


def close_resolver(resolver: DNSLookups) -> None:
    """Stop what a resolver left scheduled, once a reload has replaced it: the system
    resolver re-reads resolv.conf every minute and its cache expires entries on timers, for
    ever; lookups still in flight finish."""
    inner = resolver._inner if isinstance(resolver, _DefaultTimeout) else resolver
    for part in getattr(inner, "resolvers", [inner]):
        if isinstance(part, client.Resolver):
            part.resolv = None  # maybeParseConfig schedules nothing more
            call = getattr(part, "_parseCall", None)  # only once resolv.conf was read
            if call is not None and call.active():
                call.cancel()
        elif isinstance(part, cache.CacheResolver):
            for call in part.cancel.values():
                if call.active():
                    call.cancel()
            part.cancel.clear()


class _DefaultTimeout(common.ResolverBase):
    """Gives a resolver chain our timeouts: ``createResolver()`` takes no timeout argument."""

    def __init__(self, inner: DNSLookups, timeout: Sequence[float]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._inner, self._timeout = inner, tuple(timeout)

    def _lookup(
        self, name: bytes, cls: int, type: int, timeout: Sequence[float] | None
    ) -> Deferred[_Sections]:
        query = dns.Query(name, type, cls)
        result: Deferred[_Sections] = self._inner.query(  # type: ignore[attr-defined]
            query, self._timeout if timeout is None else timeout
        )
        return result


# --- Lookups ---------------------------------------------------------------------------------

# Errors a lookup may fail with that mean "no answer now", as opposed to a definite answer.
_TEMPORARY_DNS_ERRORS: tuple[type[BaseException], ...] = (
    error.DomainError,  # SERVFAIL, REFUSED, FORMERR, NOTIMP (not NXDOMAIN: checked first)
    defer.TimeoutError,  # includes DNSQueryTimeoutError
    OSError,  # "No domain name servers available", ICMP port unreachable
    internet_error.ConnectError,  # the TCP retry of a truncated answer
)

T = TypeVar("T")


@attrs.frozen
class Answer(Generic[T]):
    """One lookup's outcome; never raised, so parallel lookups all report."""

    records: tuple[T, ...] = ()
    nxdomain: bool = False
    temporary: str = ""  # why there is no answer now, e.g. "SERVFAIL"


class Lookups:
    """MX and address lookups over a :class:`DNSLookups`, answers parsed and filtered."""

    def __init__(self, resolver: DNSLookups) -> None:
        self._dns = resolver

    async def mail_exchangers(self, domain: str) -> Answer[tuple[int, str]]:
        """``(preference, exchange)`` pairs; the exchange is "" for the root (RFC 7505)."""
        answer = await _lookup(self._dns.lookupMailExchange, domain, dns.MX)
        return Answer(
            records=tuple((r.preference, _exchange(r)) for r in answer.records),
            nxdomain=answer.nxdomain,
            temporary=answer.temporary,
        )

    async def addresses(self, name: str) -> Answer[str]:
        """A and AAAA of ``name`` (IPv4 first), usable addresses only, as text."""
        a, aaaa = await defer.gatherResults(
            [
                Deferred.fromCoroutine(_lookup(self._dns.lookupAddress, name, dns.A)),
                Deferred.fromCoroutine(_lookup(self._dns.lookupIPV6Address, name, dns.AAAA)),
            ]
        )
        addresses: list[str] = []
        for record in (*a.records, *aaaa.records):
            family = socket.AF_INET if record.TYPE == dns.A else socket.AF_INET6
            address = ipaddress.ip_address(socket.inet_ntop(family, record.address))
            if usable_address(address) and str(address) not in addresses:
                addresses.append(str(address))
        if addresses:
            # One family answering is enough; the other family's failure does not matter.
            return Answer(records=tuple(addresses))
        return Answer(
            nxdomain=a.nxdomain and aaaa.nxdomain, temporary=a.temporary or aaaa.temporary
        )


async def _lookup(
    method: Callable[[str], Deferred[_Sections]], name: str, rrtype: int
) -> Answer[Any]:
    try:
        answers, _authority, _additional = await method(name)
    except error.DNSNameError:
        return Answer(nxdomain=True)
    except _TEMPORARY_DNS_ERRORS as e:
        return Answer(temporary=_describe(e))
    return Answer(records=tuple(_records(answers, name, rrtype)))


# --- Records ---------------------------------------------------------------------------------


def _records(answers: list[dns.RRHeader], name: str, rrtype: int) -> list[Any]:
    """Payloads of type ``rrtype`` owned by ``name`` or by an alias the answer leads to.

    Records for other owners are ignored: they were not asked for and could be injected.
    """
    owners = {domain_key(dns.domainString(name).decode("ascii"))}
    for _ in answers:  # each pass follows one more CNAME; a chain is never longer than this
        more = {
            domain_key(_payload(rr).name.name.decode("ascii", "replace"))
            for rr in answers
            if rr.type == dns.CNAME and _owner(rr) in owners
        }
        if more <= owners:
            break
        owners |= more
    return [rr.payload for rr in answers if rr.type == rrtype and _owner(rr) in owners]


def _payload(rr: dns.RRHeader) -> Any:
    """The record inside ``rr``; Twisted types it as an interface without the fields."""
    return rr.payload


def _owner(rr: dns.RRHeader) -> str:
    return domain_key(rr.name.name.decode("ascii", "replace"))


def _exchange(record: Any) -> str:
    """The MX exchange as text; "" for the root (RFC 7505 null MX)."""
    name: bytes = record.name.name
    return domain_key(name.decode("ascii", "replace"))


def _describe(failure: BaseException) -> str:
    names = {
        error.DNSServerError: "SERVFAIL",
        error.DNSQueryRefusedError: "REFUSED",
        error.DNSFormatError: "FORMERR",
        error.DNSNotImplementedError: "NOTIMP",
    }
    for kind, text in names.items():
        if isinstance(failure, kind):
            return text
    if isinstance(failure, defer.TimeoutError):
        return "timeout"
    return type(failure).__name__
