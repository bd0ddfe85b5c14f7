"""``dnsbl``: refuse inbound (MX) clients listed in DNS blocklists, at connect.

Settings (``[plugins.dnsbl]``)::

    zones   = ["zen.spamhaus.org"]       # required: one or more DNSBL zones, asked in parallel
    reply   = "554 5.7.1 Service unavailable; client [{address}] blocked using {zone}"
    allow   = ["192.0.2.0/24"]           # client networks never looked up (default: none)
    timeout = 5                          # seconds per zone lookup (less than the 30 s limit)

Only the ``smtp`` listener (the inbound MX) is checked. Submission clients are ours: they
authenticate, and a home or mobile address on a blocklist must not stop them sending.

How a lookup is read (RFC 5782 2.1, 2.3): the client's IPv4 octets (IPv6 nibbles) reversed,
then the zone, queried for A records. Any A record in 127.0.0.0/8 means listed, except
127.255.255.0/24: Spamhaus answers those to say the *query* was refused (sent through a public
resolver, over quota, ...), which says nothing about the client. NXDOMAIN (or no A record)
means not listed.

A lookup that fails (SERVFAIL, REFUSED, timeout, an error code) counts as *not listed*, with a
warning in the log: Postfix does the same, because a blocklist is an opinion from a third
party, and its outage must not make our MX refuse every sender. This is not a plugin failure
(which answers 451, failing closed): the plugin did its work and has an answer, "no evidence".
Failing closed is right when we cannot tell what a check would have said; here we can. For the
same reason each lookup has its own ``timeout``, shorter than the time limit the core puts on
every check, so a slow list is reported as such instead of turning into a 451.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.plugin import IPlugin
from zope.interface import implementer

from smarthost.api import (
    PLUGIN_TIMEOUT,
    Client,
    IConnectCheck,
    ISmarthostPlugin,
    PluginContext,
    Reply,
)

DEFAULT_REPLY = "554 5.7.1 Service unavailable; client [{address}] blocked using {zone}"
DEFAULT_LOOKUP_TIMEOUT = 5.0
_SETTINGS = ("zones", "reply", "allow", "timeout")
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
# Spamhaus answers 127.255.255.252 (typing error in the zone name), .254 (query through a
# public/open resolver) and .255 (too many queries): codes about the query, not listings.
_ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\Z")
_REPLY = re.compile(r"([45])\d\d ([45])\.\d{1,3}\.\d{1,3} (\S.*)\Z", re.DOTALL)
_FIELDS = ("zone", "address", "result")
# Lookup failures that mean "the list could not answer", as opposed to a bug in this module.
_DNS_FAILURES = (
    dns_error.DNSServerError,
    dns_error.DNSQueryRefusedError,
    dns_error.DNSQueryTimeoutError,
    dns_error.DNSFormatError,
    dns_error.DNSNotImplementedError,
    dns_error.DNSUnknownError,
    dns_error.ResolverError,
    defer.TimeoutError,  # which DNSQueryTimeoutError extends (not the builtin one)
    OSError,  # no route to the name server, and the like
)

_log = Logger(namespace="smarthost.plugins.dnsbl")

_Sections = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


class _AddressLookups(Protocol):
    """The slice of ``IResolver`` used here (Twisted types ``timeout`` as ints)."""

    def lookupAddress(
        self, name: str, timeout: Sequence[float] | None = None
    ) -> Deferred[_Sections]: ...


@attrs.frozen
class Settings:
    zones: tuple[str, ...]
    reply: str = DEFAULT_REPLY
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    timeout: float = DEFAULT_LOOKUP_TIMEOUT


def parse_settings(settings: Mapping[str, Any]) -> Settings:
    """Validate the ``[plugins.dnsbl]`` table; a ValueError names the bad setting."""
    for key in settings:
        if key not in _SETTINGS:
            raise ValueError(f"{key}: unknown setting (known: {', '.join(_SETTINGS)})")
    zones = _strings(settings, "zones")
    if not zones:
        raise ValueError("zones: name at least one DNSBL zone")
    checked = []
    for i, zone in enumerate(zones):
        name = zone.lower().rstrip(".")
        labels = name.split(".")
        if len(labels) < 2 or len(name) > 200 or not all(_LABEL.match(x) for x in labels):
            raise ValueError(f"zones[{i}]: {zone!r} is not a DNS zone name")
        checked.append(name)
    reply = settings.get("reply", DEFAULT_REPLY)
    if not isinstance(reply, str):
        raise ValueError("reply: expected a string")
    _parse_reply(reply, checked[0], "192.0.2.1", "127.0.0.2")  # raises ValueError("reply: ...")
    allow = []
    for i, text in enumerate(_strings(settings, "allow")):
        try:
            allow.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"allow[{i}]: {text!r} is not an IP network") from None
    timeout = settings.get("timeout", DEFAULT_LOOKUP_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError("timeout: expected a number of seconds")
    if not 0 < timeout < PLUGIN_TIMEOUT:
        # At the core's limit the check would be cut off and answer 451 instead.
        raise ValueError(f"timeout: must be more than 0 and less than {PLUGIN_TIMEOUT:g}")
    return Settings(tuple(checked), reply, tuple(allow), float(timeout))


def _strings(settings: Mapping[str, Any], key: str) -> list[str]:
    value = settings.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{key}: expected a list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"{key}[{i}]: expected a string")
    return value


def _parse_reply(template: str, zone: str, address: str, result: str) -> Reply:
    """``"554 5.7.1 text with {zone}, {address} and {result}"`` filled in, as a Reply."""
    try:
        for _, field, _, _ in string.Formatter().parse(template):
            if field is not None and field not in _FIELDS:
                raise ValueError(f"unknown placeholder {{{field}}} (known: zone, address, "
                                 "result)")
        text = template.format(zone=zone, address=address, result=result)
    except (ValueError, IndexError) as e:
        raise ValueError(f"reply: {e}") from None
    match = _REPLY.match(text)
    if match is None or match.group(1) != match.group(2) or "\r" in text or "\n" in text:
        raise ValueError("reply: expected '4xx 4.x.x text' or '5xx 5.x.x text' on one line")
    code, enhanced, rest = text.split(" ", 2)
    return Reply(int(code), enhanced, rest)


def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address as listed: IPv4-mapped IPv6 addresses are IPv4 clients."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None  # not an IP client (a UNIX socket)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def reverse_name(address: str) -> str | None:
    """The DNSBL query label for an address (RFC 5782 2.1, 2.4), or None if not an IP."""
    ip = client_ip(address)
    return None if ip is None else _reverse(ip)


def _reverse(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(ip, ipaddress.IPv4Address):
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


@attrs.frozen
class _Answer:
    zone: str
    listed: str | None = None  # the listing's A record, e.g. "127.0.0.2"


@implementer(IConnectCheck)
class DNSBLCheck:
    def __init__(self, settings: Settings, resolver: _AddressLookups) -> None:
        self._settings = settings
        self._resolver = resolver
        # Retransmit once (UDP loses packets), within the per-lookup timeout.
        total = settings.timeout
        self._retries = (total / 3, total * 2 / 3) if total >= 1 else (total,)

    async def check_connect(self, client: Client) -> Reply | None:
        if client.role != "smtp" or client.user is not None:
            return None
        address = client_ip(client.address)
        if address is None or any(address in net for net in self._settings.allow):
            return None
        label, text = _reverse(address), str(address)
        answers: list[_Answer] = await gatherResults(
            [Deferred.fromCoroutine(self._ask(zone, label, text))
             for zone in self._settings.zones],
            consumeErrors=True,
        )
        for answer in answers:  # in configured order: the first listing names the reply
            if answer.listed is not None:
                return _parse_reply(self._settings.reply, answer.zone, text, answer.listed)
        return None

    async def _ask(self, zone: str, label: str, address: str) -> _Answer:
        try:
            answers, _, _ = await self._resolver.lookupAddress(
                f"{label}.{zone}", timeout=self._retries
            )
        except _DNS_FAILURES as e:  # first: Twisted makes them DomainErrors too
            _log.warn(
                "dnsbl {zone}: lookup for {address} failed ({error}); treating it as not "
                "listed", zone=zone, address=address, error=type(e).__name__,
            )
            return _Answer(zone)
        except dns_error.DomainError:  # NXDOMAIN (DNSNameError): not listed
            return _Answer(zone)
        for record in answers:
            if record.type != dns.A:
                continue  # the CNAMEs a list may answer with on the way
            result = ipaddress.IPv4Address(cast(dns.Record_A, record.payload).address)
            if result in _ERROR_CODES:
                _log.warn(
                    "dnsbl {zone}: the list refused the query for {address} (answer "
                    "{result}); treating it as not listed", zone=zone, address=address,
                    result=str(result),
                )
                continue
            if result in _LOOPBACK:
                return _Answer(zone, str(result))
        return _Answer(zone)


@implementer(IPlugin, ISmarthostPlugin)
class DNSBLPlugin:
    name = "dnsbl"

    def build(self, settings: Mapping[str, Any], context: PluginContext) -> DNSBLCheck:
        return DNSBLCheck(parse_settings(settings), cast(_AddressLookups, context.resolver))


dnsbl = DNSBLPlugin()
