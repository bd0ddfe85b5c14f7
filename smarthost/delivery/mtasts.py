"""MTA-STS (RFC 8461): which MX hosts of a domain may take its mail, and that TLS to them must
verify. Three parts, each replaceable in tests: the policy text's strict parser, the on-disk
cache (one JSON file per domain, the daemon's own), and :class:`PolicySource`, which applies
RFC 8461 5.1's rule: a cached, unexpired policy is used as long as the ``_mta-sts`` TXT record
keeps its ``id``; a new id or an expired policy means fetching again, and a failed fetch keeps
the cached policy while it is unexpired (3.3). No policy at all means "deliver as usual".

The HTTPS fetch (:class:`HTTPSFetcher`) goes through treq with certificate verification,
no redirects (RFC 8461 3.3), a size limit and a timeout; what routing does with a policy
(enforce, testing, none) is routing's business.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from smarthost.core.safeio import atomic_write
from smarthost.delivery.dns import DNSLookups, Lookups, domain_key, is_host_name

ENFORCE, TESTING, NONE = "enforce", "testing", "none"
MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2: max_age is at most one year
MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 3.3: senders may limit the size they fetch
FETCH_TIMEOUT = 10.0  # seconds for the whole HTTPS fetch (connect, TLS, headers, body)
_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")  # RFC 8461 3.1: sts-id
_MX = re.compile(r"(\*\.)?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\Z")

_log = Logger(namespace="smarthost.delivery.mtasts")


class PolicyError(ValueError):
    """A policy text that RFC 8461 3.2 does not allow; the message says which line."""


@attrs.frozen
class Policy:
    mode: str  # ENFORCE | TESTING | NONE
    mx: tuple[str, ...]  # lower case, "*.example.test" matches one leftmost label
    max_age: int

    def allows(self, host: str) -> bool:
        """RFC 8461 4.1: exact match, or a wildcard standing for exactly one label."""
        name = domain_key(host)
        for pattern in self.mx:
            if pattern.startswith("*."):
                first, dot, rest = name.partition(".")
                if dot and first and rest == pattern[2:]:
                    return True
            elif name == pattern:
                return True
        return False


def parse_policy(text: str) -> Policy:
    """RFC 8461 3.2: ``key: value`` lines, version first; unknown keys are ignored (3.2 says
    they must be), missing or malformed required ones are errors."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    lines = text.replace("\r\n", "\n").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise PolicyError(f"line {number}: expected 'key: value'")
        if number == 1 and key != "version":
            raise PolicyError("the first line must be 'version: STSv1'")
        if key == "mx":
            if not _MX.match(value) or "*" in value[1:]:
                raise PolicyError(f"line {number}: {value!r} is not an MX pattern")
            mx.append(domain_key(value))
        elif key in fields:
            raise PolicyError(f"line {number}: {key} given twice")
        else:
            fields[key] = value
    if fields.get("version") != "STSv1":
        raise PolicyError("version must be STSv1")
    mode = fields.get("mode", "")
    if mode not in (ENFORCE, TESTING, NONE):
        raise PolicyError(f"mode {mode!r}: expected enforce, testing or none")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10 or int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {age!r}: expected 0 to {MAX_AGE_LIMIT}")
    if mode != NONE and not mx:
        raise PolicyError(f"mode {mode} needs at least one mx line")
    return Policy(mode, tuple(mx), int(age))


def record_id(texts: list[str]) -> str | None:
    """The ``id`` of the one ``v=STSv1`` TXT record (RFC 8461 3.1); None when there is none,
    or more than one (3.1: then no policy)."""
    found = [t for t in texts if t.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields = dict(
        part.strip().partition("=")[::2] for part in found[0].split(";") if part.strip()
    )
    value = fields.get("id", "").strip()
    return value if _ID.match(value) else None


@attrs.frozen
class Cached:
    id: str
    fetched: float
    policy: Policy

    def fresh(self, now: float) -> bool:
        return now < self.fetched + self.policy.max_age


class PolicyStore:
    """One JSON file per domain under ``directory``; a damaged file is a cache miss."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def _path(self, domain: str) -> Path | None:
        return self._directory / f"{domain}.json" if is_host_name(domain) else None

    def load(self, domain: str) -> Cached | None:
        path = self._path(domain)
        try:
            data = json.loads(path.read_text("utf-8")) if path is not None else None
            if not isinstance(data, dict):
                return None
            return Cached(str(data["id"]), float(data["fetched"]), parse_policy(data["policy"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, domain: str, cached: Cached, text: str) -> None:
        path = self._path(domain)
        if path is None:
            return
        data = {"id": cached.id, "fetched": cached.fetched, "policy": text}
        try:
            self._directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(path, json.dumps(data).encode("utf-8"))
        except OSError as e:  # a cache that cannot be written costs a fetch, never mail
            _log.warn("MTA-STS: cannot cache the policy of {domain}: {error}",
                      domain=domain, error=str(e))


class Texts(Protocol):
    def __call__(self, name: str) -> Deferred[list[str]]: ...


class PolicySource:
    """The policy in force for a domain, or None. Concurrent asks for one domain share one
    lookup and fetch."""

    def __init__(
        self,
        texts: Texts,
        fetch: Callable[[str], Deferred[str]],
        store: PolicyStore,
        clock: IReactorTime,
    ) -> None:
        self._texts, self._fetch, self._store, self._clock = texts, fetch, store, clock
        self._memory: dict[str, Cached] = {}
        self._pending: dict[str, Deferred[Policy | None]] = {}

    def policy(self, domain: str) -> Deferred[Policy | None]:
        key = domain_key(domain)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = Deferred.fromCoroutine(self._policy(key))

            def done(result: Policy | None) -> Policy | None:
                del self._pending[key]
                return result

            pending.addCallback(done)
        # Each caller gets its own Deferred: one caller's callbacks cannot change another's.
        mine: Deferred[Policy | None] = Deferred()

        def tell(result: Policy | None) -> Policy | None:
            mine.callback(result)
            return result

        pending.addCallback(tell)
        return mine

    async def _policy(self, domain: str) -> Policy | None:
        now = self._clock.seconds()
        cached = self._memory.get(domain) or self._store.load(domain)
        usable = cached if cached is not None and cached.fresh(now) else None
        try:
            found = record_id(await self._texts(f"_mta-sts.{domain}"))
        except Exception as e:
            _log.info("MTA-STS: TXT lookup for {domain} failed: {error}", domain=domain,
                      error=str(e))
            found = None
        if found is None or (usable is not None and usable.id == found):
            # RFC 8461 5.1: no record, or the same id, keeps the cached policy until it ends.
            return usable.policy if usable is not None else None
        try:
            text = await self._fetch(domain)
            policy = parse_policy(text)
        except Exception as e:
            _log.warn("MTA-STS: no policy for {domain} from its policy host: {error}",
                      domain=domain, error=str(e) or type(e).__name__)
            return usable.policy if usable is not None else None
        fresh = Cached(found, now, policy)
        self._memory[domain] = fresh
        self._store.save(domain, fresh, text)
        return policy


class HTTPSFetcher:
    """``GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` (RFC 8461 3.3): the certificate
    verified against ``trust_root`` (None: the system's CAs), no redirects, 200 and text/plain
    only, at most :data:`MAX_POLICY_SIZE` octets within :data:`FETCH_TIMEOUT` seconds."""

    def __init__(self, reactor: Any, trust_root: Any = None,
                 timeout: float = FETCH_TIMEOUT, resolver: DNSLookups | None = None) -> None:
        import treq.client
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

        tls = BrowserLikePolicyForHTTPS(trust_root)  # type: ignore[no-untyped-call]
        if resolver is None:
            agent = Agent(reactor, tls, connectTimeout=timeout)  # type: ignore[no-untyped-call]
        else:
            agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
                reactor, _ThroughDNS(reactor, Lookups(resolver), tls, timeout))
        self._http = treq.client.HTTPClient(agent)
        self._timeout = timeout
        self._clock: IReactorTime = reactor

    def __call__(self, domain: str) -> Deferred[str]:
        d = Deferred.fromCoroutine(self._get(domain))
        call = self._clock.callLater(self._timeout, d.cancel)

        def stop_timer(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        d.addBoth(stop_timer)
        return d

    async def _get(self, domain: str) -> str:
        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
        response = await self._http.get(url, allow_redirects=False)
        if response.code != 200:
            raise PolicyError(f"{url} answered HTTP {response.code}")
        kind = (response.headers.getRawHeaders("content-type") or [""])[0]
        if kind.split(";")[0].strip().lower() != "text/plain":
            raise PolicyError(f"{url} is {kind or 'untyped'}, not text/plain")
        body = bytearray()

        def collect(data: bytes) -> None:
            body.extend(data)
            if len(body) > MAX_POLICY_SIZE:
                raise PolicyError(f"{url} is larger than {MAX_POLICY_SIZE} octets")

        import treq

        await treq.collect(response, collect)
        return body.decode("utf-8")


@implementer(IAgentEndpointFactory)
class _ThroughDNS:
    """Connects to a policy host at the addresses the delivery DNS client gives (the one that
    found the ``_mta-sts`` record and the MX hosts: ``[delivery] nameservers``), each in turn,
    TLS verified for the host's name."""

    def __init__(self, reactor: Any, lookups: Lookups, tls: Any, timeout: float) -> None:
        self._reactor, self._lookups, self._tls, self._timeout = reactor, lookups, tls, timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return _Resolved(self, uri.host.decode("ascii"), uri.port)

    async def connect(self, host: str, port: int, factory: IProtocolFactory) -> Any:
        from twisted.internet.endpoints import (
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
            wrapClientTLS,
        )

        answer = await self._lookups.addresses(host)
        if not answer.records:
            raise PolicyError(f"policy host {host} has no address"
                              f"{': ' + answer.temporary if answer.temporary else ''}")
        last: Exception | None = None
        for address in answer.records:
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            tcp = kind(self._reactor, address, port, self._timeout)
            creator = self._tls.creatorForNetloc(host.encode("ascii"), port)
            try:
                return await wrapClientTLS(creator, tcp).connect(factory)
            except ConnectError as e:
                last = e
        assert last is not None
        raise last


@implementer(IStreamClientEndpoint)
class _Resolved:
    def __init__(self, through: _ThroughDNS, host: str, port: int) -> None:
        self._through, self._host, self._port = through, host, port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        return Deferred.fromCoroutine(
            self._through.connect(self._host, self._port, protocolFactory))


def txt_lookup(resolver: DNSLookups) -> Texts:
    """The TXT strings of a name, each record's strings joined (RFC 7208 3.3's rule, which
    RFC 8461 3.1 follows); NXDOMAIN or no record is an empty list."""
    from twisted.names import dns, error

    async def texts(name: str) -> list[str]:
        lookup: Any = resolver.lookupText  # type: ignore[attr-defined]
        try:
            answers, _authority, _additional = await lookup(name)
        except error.DNSNameError:
            return []
        owner = domain_key(name)
        return [
            b"".join(rr.payload.data).decode("utf-8", "replace")
            for rr in answers
            if rr.type == dns.TXT and domain_key(rr.name.name.decode("ascii", "replace")) == owner
        ]

    return lambda name: Deferred.fromCoroutine(texts(name))
