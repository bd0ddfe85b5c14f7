"""The probe's DNS checks, with twisted.names: the host's addresses, the names their PTR
records give (forward-confirmed reverse DNS), and DNSBL listings of the server's address.
Through ``--nameserver`` when given (and nothing else then), else the system's resolver."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any, Protocol, cast

import attrs
from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred
from twisted.names import dns, error

from smarthost.delivery.dns import Lookups, domain_key, make_resolver

PROBE_DNS_TIMEOUT = (1.0, 3.0)  # a lookup gives up after 4 s
_NO_ANSWER = (error.DomainError, defer.TimeoutError, OSError, internet_error.ConnectError)
_Sections = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


class Resolver(Protocol):
    def lookupAddress(self, name: str, timeout: Sequence[float] | None = None
                      ) -> Deferred[_Sections]: ...

    def lookupIPV6Address(self, name: str, timeout: Sequence[float] | None = None
                          ) -> Deferred[_Sections]: ...

    def lookupMailExchange(self, name: str, timeout: Sequence[float] | None = None
                           ) -> Deferred[_Sections]: ...

    def lookupPointer(self, name: str, timeout: Sequence[float] | None = None
                      ) -> Deferred[_Sections]: ...


@attrs.frozen
class Found:
    """Names or addresses, or why there are none."""

    values: tuple[str, ...] = ()
    nxdomain: bool = False
    problem: str = ""  # "SERVFAIL", "timeout", ...


def resolver(nameserver: str | None, reactor: Any) -> Resolver:
    servers = [nameserver] if nameserver else []
    return cast(Resolver, make_resolver(servers, reactor, timeout=PROBE_DNS_TIMEOUT))


async def addresses(dns_: Resolver, name: str) -> Found:
    answer = await Lookups(dns_).addresses(name)
    return Found(answer.records, answer.nxdomain, answer.temporary)


async def pointer_names(dns_: Resolver, address: str) -> Found:
    reverse = ipaddress.ip_address(address).reverse_pointer
    try:
        answers, _, _ = await dns_.lookupPointer(reverse)
    except error.DNSNameError:
        return Found(nxdomain=True)
    except _NO_ANSWER as e:
        return Found(problem=_describe(e))
    names = []
    for rr in answers:
        owner = domain_key(rr.name.name.decode("ascii", "replace"))
        if rr.type == dns.PTR and owner == reverse:
            payload: Any = rr.payload
            names.append(domain_key(payload.name.name.decode("ascii", "replace")))
    return Found(tuple(names))


def dnsbl_name(address: str, zone: str) -> str:
    """The name a DNSBL zone answers for ``address`` (RFC 5782 2.1 and 2.4)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        reverse = ".".join(reversed(str(ip).split(".")))
    else:
        reverse = ip.reverse_pointer.removesuffix(".ip6.arpa")
    return f"{reverse}.{zone.strip('.')}"


async def dnsbl(dns_: Resolver, address: str, zone: str) -> Found:
    """The A records a DNSBL has for ``address`` (none: not listed)."""
    try:
        answers, _, _ = await dns_.lookupAddress(dnsbl_name(address, zone))
    except error.DNSNameError:
        return Found(nxdomain=True)
    except _NO_ANSWER as e:
        return Found(problem=_describe(e))
    codes = []
    for rr in answers:
        payload: Any = rr.payload
        if rr.type == dns.A:
            codes.append(payload.dottedQuad())
    return Found(tuple(codes))


def _describe(failure: BaseException) -> str:
    if isinstance(failure, error.DNSServerError):
        return "SERVFAIL"
    if isinstance(failure, error.DNSQueryRefusedError):
        return "REFUSED"
    if isinstance(failure, defer.TimeoutError):
        return "timeout"
    return type(failure).__name__
