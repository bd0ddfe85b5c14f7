"""MTA-STS (RFC 8461): the strict policy parser, the TXT id, the cache and its id-change rule
(5.1) in virtual time, and routing under enforce, testing and [delivery.tls_policy]."""

from __future__ import annotations

from pathlib import Path
from random import Random

import pytest
from test_routing import ZONE, ZoneResolver
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from dnsserver import Zone
from smarthost.core.enums import TLSPolicy
from smarthost.delivery.hostcache import HostCache
from smarthost.delivery.mtasts import (
    ENFORCE,
    TESTING,
    Policy,
    PolicyError,
    PolicySource,
    PolicyStore,
    parse_policy,
    record_id,
)
from smarthost.delivery.routing import NextHopResolver, Route, TemporaryRouteError

POLICY = ("version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.b.test\r\n"
          "max_age: 86400\r\n")


def test_parser_accepts_the_rfc_form() -> None:
    policy = parse_policy(POLICY)
    assert policy == Policy(ENFORCE, ("mx1.example.test", "*.b.test"), 86400)
    assert policy.allows("MX1.example.test.") and policy.allows("x.b.test")
    assert not policy.allows("b.test") and not policy.allows("y.x.b.test")
    assert not policy.allows("mx2.example.test")
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\nfoo: bar\n").mode == "none"


@pytest.mark.parametrize("text", [
    "mode: enforce\nversion: STSv1\nmx: a.test\nmax_age: 1\n",  # version not first
    "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
    "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
    "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",
    "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
    "version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmode: none\nmx: a.test\nmax_age: 1\n",
    "version: STSv1\nmode enforce\n",
    "",
])
def test_parser_refuses(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_record_id() -> None:
    assert record_id(["v=STSv1; id=20240101T0000;"]) == "20240101T0000"
    assert record_id(["v=STSv1; id=abc123"]) == "abc123"
    assert record_id(["v=spf1 -all", "v=STSv1;id=x1"]) == "x1"
    assert record_id(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two records: none
    assert record_id(["v=STSv1; id=bad-id"]) is None
    assert record_id([]) is None


class Source:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.txt: list[str] = ["v=STSv1; id=one"]
        self.policy: str | Exception = POLICY
        self.fetches = 0
        self.store = PolicyStore(tmp_path / "mta-sts")
        self.source = self.make()

    def make(self) -> PolicySource:
        return PolicySource(self.texts, self.fetch, self.store, self.clock)

    def texts(self, name: str) -> Deferred[list[str]]:
        assert name == "_mta-sts.example.test"
        return succeed(list(self.txt))

    def fetch(self, domain: str) -> Deferred[str]:
        self.fetches += 1
        return fail(self.policy) if isinstance(self.policy, Exception) else succeed(self.policy)

    def get(self) -> Policy | None:
        result: list[Policy | None] = []
        self.source.policy("Example.Test").addCallback(result.append)
        assert len(result) == 1
        return result[0]


def test_id_change_rule_and_expiry(tmp_path: Path) -> None:
    s = Source(tmp_path)
    assert s.get() is not None and s.fetches == 1
    s.get()
    assert s.fetches == 1  # same id, unexpired: the cache
    s.txt = []
    assert s.get() is not None and s.fetches == 1  # TXT gone: keep the cached policy
    s.txt = ["v=STSv1; id=two"]
    s.policy = POLICY.replace("enforce", "testing")
    policy = s.get()
    assert policy is not None and policy.mode == TESTING and s.fetches == 2  # id changed
    s.txt = ["v=STSv1; id=three"]
    s.policy = OSError("connection refused")
    policy = s.get()
    assert policy is not None and policy.mode == TESTING and s.fetches == 3  # failed: cached
    s.clock.advance(86401)  # expired, and the fetch still fails: no policy
    assert s.get() is None


def test_cache_survives_a_restart_and_damage(tmp_path: Path) -> None:
    s = Source(tmp_path)
    s.get()
    again = s.make()
    s.source = again
    s.policy = OSError("down")
    s.txt = ["v=STSv1; id=new"]
    assert s.get() == parse_policy(POLICY)  # from disk, while the fetch fails
    (tmp_path / "mta-sts" / "example.test.json").write_text("{not json")
    s.source = s.make()
    assert s.get() is None


def test_no_record_no_policy(tmp_path: Path) -> None:
    s = Source(tmp_path)
    s.txt = ["v=spf1 -all"]
    assert s.get() is None and s.fetches == 0


class FixedPolicy:
    def __init__(self, policy: Policy | None) -> None:
        self._policy = policy

    def policy(self, domain: str) -> Deferred[Policy | None]:
        return succeed(self._policy)


def route_for(domain: str, policy: Policy | None, *, mta_sts: bool = True,
              **options: object) -> Route | Exception:
    resolver = NextHopResolver(
        ZoneResolver(Zone.from_dict(ZONE)), hosts=HostCache(Clock(), 60), random=Random(1),
        mta_sts=FixedPolicy(policy), **options,  # type: ignore[arg-type]
    )
    result: list[Route | Exception] = []
    resolver.resolve(domain, mta_sts=mta_sts).addCallbacks(
        result.append, lambda f: result.append(f.value))
    return result[0]


def test_routing_enforce_testing_and_tls_policy() -> None:
    enforce = parse_policy(POLICY)
    route = route_for("example.test", enforce)
    assert isinstance(route, Route)
    assert [h.name for h in route.hosts] == ["mx1.example.test"]
    assert route.tls == TLSPolicy.VERIFY
    nobody = Policy(ENFORCE, ("elsewhere.test",), 86400)
    refused = route_for("example.test", nobody)
    assert isinstance(refused, TemporaryRouteError) and refused.status == "4.7.5"
    testing = route_for("example.test", Policy(TESTING, ("elsewhere.test",), 86400))
    assert isinstance(testing, Route) and len(testing.hosts) == 3
    assert testing.tls == TLSPolicy.OPPORTUNISTIC
    # [delivery.tls_policy] overrides MTA-STS (and [delivery] tls) for its domain only.
    override = route_for("example.test", nobody, tls_policies={"EXAMPLE.test": "required"})
    assert isinstance(override, Route) and override.tls == TLSPolicy.REQUIRED
    assert len(override.hosts) == 3
    other = route_for("equal.test", None, tls_policies={"example.test": "verify"})
    assert isinstance(other, Route) and other.tls == TLSPolicy.OPPORTUNISTIC
    verify = route_for("equal.test", None, tls_policies={"equal.test": "verify"})
    assert isinstance(verify, Route) and verify.tls == TLSPolicy.VERIFY


def test_routing_without_mta_sts_keeps_the_operators_rules() -> None:
    """TLS-Required: No (RFC 8689 5): the domain's policy is left out, [delivery] tls and
    [delivery.tls_policy] are not."""
    nobody = Policy(ENFORCE, ("elsewhere.test",), 86400)
    waived = route_for("example.test", nobody, mta_sts=False)
    assert isinstance(waived, Route) and len(waived.hosts) == 3
    assert waived.tls == TLSPolicy.OPPORTUNISTIC
    required = route_for("example.test", nobody, mta_sts=False, tls=TLSPolicy.REQUIRED)
    assert isinstance(required, Route) and required.tls == TLSPolicy.REQUIRED
    pinned = route_for("example.test", nobody, mta_sts=False,
                       tls_policies={"example.test": "verify"})
    assert isinstance(pinned, Route) and pinned.tls == TLSPolicy.VERIFY
