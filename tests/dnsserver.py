"""A real, authoritative DNS server for tests, on loopback, built on ``twisted.names``.

Delivery must be tested against real DNS packets (UDP, TCP retry, timeouts), not a fake
resolver, so this serves a small zone over UDP and TCP on one port of 127.0.0.1.

In-process, from a trial ``TestCase`` (the global reactor)::

    from dnsserver import Zone, start
    zone = Zone.from_dict({
        "example.test": {"MX": [(10, "mx.example.test")]},
        "mx.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "nullmx.test": {"MX": [(0, ".")]},
        "broken.test": "SERVFAIL",                 # every query for the name
        "half.test": {"A": ["127.0.0.1"], "AAAA": "TIMEOUT"},  # one type only
    })
    server = start(reactor, zone)
    self.addCleanup(server.stop)
    make_resolver([server.nameserver], reactor)   # "127.0.0.1:PORT"

As a subprocess (end-to-end tests)::

    python tests/dnsserver.py --zone zone.txt [--port 0]

prints the chosen port on the first line of stdout, then serves until SIGTERM/SIGINT. The
zone file is the text form below (or JSON of the dict form when the name ends in ``.json``)::

    # name            type     data
    example.test      MX       10 mx.example.test
    mx.example.test   A        127.0.0.1
    mx.example.test   AAAA     ::1
    nullmx.test       MX       0 .
    alias.test        CNAME    mx.example.test
    nodata.test       TXT      exists, but has no MX, A or AAAA
    broken.test       SERVFAIL
    refused.test      REFUSED
    slow.test         TIMEOUT
    half.test         TIMEOUT  AAAA          # a failure can name one query type

A name with no records and no failure answers NXDOMAIN; a name with records of other types
answers NOERROR with no data (NODATA). Answers are authoritative and never recursive. The
zone can be changed while the server runs (``server.zone.add(...)``), and ``server.queries``
lists every ``(name, type)`` asked, so tests can assert that no lookup happened.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.names import dns, server

SERVFAIL, REFUSED, TIMEOUT = "SERVFAIL", "REFUSED", "TIMEOUT"
FAILURES = (SERVFAIL, REFUSED, TIMEOUT)
_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "CNAME": dns.CNAME, "TXT": dns.TXT}
_RCODES = {SERVFAIL: dns.ESERVER, REFUSED: dns.EREFUSED}
TTL = 60


def _key(name: str | bytes) -> str:
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    return text.lower().rstrip(".")


class Zone:
    """Records and failure behaviours by name; mutable so a test can change DNS mid-run."""

    def __init__(self) -> None:
        self._records: dict[str, list[tuple[int, Any]]] = {}
        self._failures: dict[tuple[str, int | None], str] = {}

    # -- building --

    def add(self, name: str, rrtype: str, data: str) -> Zone:
        """Add one record in zone-file form: ``add("x.test", "MX", "10 mx.x.test")``."""
        kind = rrtype.upper()
        if kind == "A":
            payload: Any = dns.Record_A(data, ttl=TTL)
        elif kind == "AAAA":
            payload = dns.Record_AAAA(data, ttl=TTL)
        elif kind == "MX":
            preference, _, exchange = data.strip().partition(" ")
            # The root name "." is written as the empty name on the wire (RFC 7505 null MX).
            target = b"" if exchange.strip() == "." else exchange.strip().encode("ascii")
            payload = dns.Record_MX(int(preference), target, ttl=TTL)
        elif kind == "CNAME":
            payload = dns.Record_CNAME(data.strip().encode("ascii"), ttl=TTL)
        elif kind == "TXT":  # lets a name exist with no A, AAAA or MX (NODATA)
            payload = dns.Record_TXT(data.encode("utf-8"), ttl=TTL)
        else:
            raise ValueError(f"unsupported record type {rrtype!r} for {name}")
        self._records.setdefault(_key(name), []).append((_TYPES[kind], payload))
        return self

    def fail(self, name: str, how: str, rrtype: str | None = None) -> Zone:
        """Make queries for ``name`` (of ``rrtype`` only, if given) answer ``how``:
        SERVFAIL, REFUSED, or TIMEOUT (no answer at all)."""
        if how not in FAILURES:
            raise ValueError(f"unknown failure {how!r}; expected one of {FAILURES}")
        self._failures[(_key(name), _TYPES[rrtype.upper()] if rrtype else None)] = how
        return self

    def remove(self, name: str) -> Zone:
        """Forget everything about ``name``: it answers NXDOMAIN again."""
        key = _key(name)
        self._records.pop(key, None)
        for failure in [f for f in self._failures if f[0] == key]:
            del self._failures[failure]
        return self

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Zone:
        """``{name: "SERVFAIL" | {TYPE: [values] | "TIMEOUT"...}}``; MX values are
        ``(preference, exchange)`` pairs or ``"10 mx.test"`` strings."""
        zone = cls()
        for name, entry in spec.items():
            if isinstance(entry, str):
                zone.fail(name, entry)
                continue
            for rrtype, values in entry.items():
                if isinstance(values, str) and values in FAILURES:
                    zone.fail(name, values, rrtype)
                    continue
                for value in [values] if isinstance(values, str) else values:
                    if isinstance(value, (list, tuple)):
                        value = " ".join(str(v) for v in value)
                    zone.add(name, rrtype, str(value))
        return zone

    @classmethod
    def parse(cls, text: str) -> Zone:
        """The text form shown in the module docstring; errors name the line."""
        zone = cls()
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split(None, 2)
            try:
                if len(fields) < 2:
                    raise ValueError("expected NAME TYPE [DATA]")
                name, kind = fields[0], fields[1].upper()
                if kind in FAILURES:
                    zone.fail(name, kind, fields[2] if len(fields) > 2 else None)
                elif len(fields) < 3:
                    raise ValueError(f"{kind} needs data")
                else:
                    zone.add(name, kind, fields[2])
            except (ValueError, KeyError) as e:
                raise ValueError(f"zone line {number}: {raw.strip()!r}: {e}") from None
        return zone

    @classmethod
    def load(cls, path: str | Path) -> Zone:
        text = Path(path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text)) if str(path).endswith(".json") else cls.parse(text)

    # -- answering --

    def answer(self, name: bytes, rrtype: int) -> tuple[str | int, list[dns.RRHeader]]:
        """``(TIMEOUT, [])``, or ``(rcode, answers)``; CNAMEs are followed within the zone."""
        key = _key(name)
        how = self._failures.get((key, rrtype)) or self._failures.get((key, None))
        if how is not None:
            return (how if how == TIMEOUT else _RCODES[how]), []
        if key not in self._records:
            return dns.ENAME, []
        answers: list[dns.RRHeader] = []
        owner, seen = key, set()
        while owner in self._records and owner not in seen:
            seen.add(owner)
            records = self._records[owner]
            matching = [p for t, p in records if t == rrtype]
            answers += [self._header(owner, rrtype, p) for p in matching]
            alias = [p for t, p in records if t == dns.CNAME]
            if matching or not alias or rrtype == dns.CNAME:
                break
            answers.append(self._header(owner, dns.CNAME, alias[0]))
            owner = _key(alias[0].name.name)
        return dns.OK, answers

    @staticmethod
    def _header(owner: str, rrtype: int, payload: Any) -> dns.RRHeader:
        return dns.RRHeader(owner.encode("ascii"), rrtype, dns.IN, TTL, payload, auth=True)


class _ZoneServerFactory(server.DNSServerFactory):
    """Answers from a :class:`Zone` directly: the stock authorities cannot answer SERVFAIL
    or stay silent, and the stock error path logs errors that fail trial tests."""

    def __init__(self, zone: Zone, queries: list[tuple[str, str]]) -> None:
        super().__init__(verbose=0)
        self.zone, self.queries = zone, queries
        self.noisy = False

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> None:
        query = message.queries[0]
        self.queries.append((_key(query.name.name), dns.QUERY_TYPES.get(query.type, "?")))
        rcode, answers = self.zone.answer(query.name.name, query.type)
        if not isinstance(rcode, int):
            return  # TIMEOUT: never answer, so the client's timeouts have to fire
        response = dns.Message(
            id=message.id, answer=True, opCode=message.opCode, auth=True, rCode=rcode,
            recDes=message.recDes, recAv=0,
            # RFC 1035 4.2.1: 512 octets over UDP (then the client retries over TCP);
            # TCP (no address) has no such limit.
            maxSize=512 if address is not None else 0,
        )
        response.queries = message.queries
        response.answers = answers
        if address is None:  # TCP
            protocol.writeMessage(response)
        else:
            protocol.writeMessage(response, address)


@attrs.define
class DNSTestServer:
    """A running server; ``nameserver`` is the ``[delivery] nameservers`` entry for it."""

    zone: Zone
    host: str
    port: int
    queries: list[tuple[str, str]]
    _listening: list[IListeningPort]
    _factory: _ZoneServerFactory
    _reactor: Any

    @property
    def nameserver(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def stop(self) -> defer.Deferred[None]:
        """Stop listening and close TCP connections still open (Twisted's client keeps its
        TCP connection after a truncated UDP answer); fires once they are all gone."""
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        listening, self._listening = self._listening, []
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in listening])
        for protocol in list(self._factory.connections):
            protocol.transport.loseConnection()
        await _until(self._reactor, lambda: not self._factory.connections)


async def close_client_connections(reactor: Any, resolver: Any) -> None:
    """Close the TCP connections a ``twisted.names.client.Resolver`` keeps open after a
    truncated answer, so a trial test ends with a clean reactor."""
    for protocol in list(resolver.connections):
        protocol.transport.loseConnection()
    await _until(reactor, lambda: not resolver.connections)


async def _until(reactor: Any, done: Callable[[], bool], limit: float = 5.0) -> None:
    """Let the reactor run until ``done()`` (closing sockets takes a turn or two), bounded."""
    step = 0.005
    for _ in range(int(limit / step)):
        if done():
            return
        await task.deferLater(reactor, step, lambda: None)
    raise TimeoutError("connections still open")


def start(reactor: Any, zone: Zone | Mapping[str, Any], host: str = "127.0.0.1",
          port: int = 0) -> DNSTestServer:
    """Serve ``zone`` on UDP and TCP (same port number) of a loopback ``host``.

    With ``port=0`` a free UDP port is chosen and the same TCP port is taken; a few tries
    cover the rare case of that TCP port being in use.
    """
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host}: the test DNS server only listens on loopback")
    if not isinstance(zone, Zone):
        zone = Zone.from_dict(zone)
    queries: list[tuple[str, str]] = []
    factory = _ZoneServerFactory(zone, queries)
    for _ in range(20):
        udp = reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=host)
        chosen = udp.getHost().port
        try:
            tcp = reactor.listenTCP(chosen, factory, interface=host)
        except CannotListenError:
            udp.stopListening()
            if port:
                raise
            continue
        return DNSTestServer(zone, host, chosen, queries, [udp, tcp], factory, reactor)
    raise RuntimeError("no port free for both UDP and TCP")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Authoritative test DNS server on loopback.")
    parser.add_argument("--zone", required=True, help="zone file (text, or .json)")
    parser.add_argument("--port", type=int, default=0, help="0 = choose one and print it")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    running = start(reactor, Zone.load(args.zone), host=args.host, port=args.port)
    print(running.port, flush=True)
    reactor.run()  # SIGTERM/SIGINT stop it


if __name__ == "__main__":
    main()
