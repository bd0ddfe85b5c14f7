"""SIGHUP's logic without a daemon: which keys changed, which need a restart, a refused
config leaves the running one, and the live adapters read the current generation."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import provider

from smarthost.app import heap
from smarthost.app.config import Config, parse_config
from smarthost.app.live import Generation, Live, LiveSessionFactory
from smarthost.app.notify import SystemdNotify
from smarthost.app.reload import Reloader, changed_keys, keep_running_values, needs_restart
from smarthost.auth.users import UsersFile
from smarthost.core.enums import Role
from smarthost.core.errors import ConfigError
from smarthost.core.maillog import MailLog
from smarthost.delivery.courier import Resolve
from smarthost.smtpd.limits import Limits, LimitSettings

BASE = """
hostname = "mx.example.test"
[relay]
local_domains = ["example.test"]
"""


def config(extra: str = "") -> Config:
    return parse_config(BASE + extra, Path("/srv/smarthost"))


class Recorder(SystemdNotify):
    def __init__(self) -> None:
        super().__init__(None, lambda text: None)
        self.sent: list[str] = []

    def send(self, *fields: str) -> None:
        self.sent.append(fields[0])


def generation(cfg: Config, certificate: str = "CN=old", role_factory: Factory | None = None,
               resolve: Resolve | None = None) -> Generation:
    return Generation(
        config=cfg,
        factories={Role.SMTP: role_factory or Factory()},
        server_tls=None,
        certificate=certificate,
        users=UsersFile("/nonexistent/users"),
        limits=Limits(Clock(), LimitSettings()),
        resolve=resolve or (lambda domain, *, mta_sts=True: Deferred()),
        observe=lambda entry, outcome: None,
        dns=None,
    )


@pytest.fixture
def lines() -> Iterator[list[str]]:
    found: list[str] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "smarthost":
            found.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield found
    globalLogPublisher.removeObserver(observe)


def test_changed_keys_are_dotted_config_keys() -> None:
    old = config()
    new = config("""
trusted_networks = ["10.0.0.0/8"]
[relay.senders]
"alice" = ["alice@example.test"]
[listen]
smtp = ["tcp:25"]
[limits]
connections = 5
[delivery.routes]
"partner.test" = "smtp:10.1.2.3:25"
[plugins]
enabled = []
[plugins.dnsbl]
zones = ["zen.example"]
""")
    assert list(changed_keys(old, new)) == [
        "listen.smtp",
        "relay.trusted_networks",
        "relay.senders.alice",
        "delivery.routes.partner.test",
        "limits.connections",
        "plugins.dnsbl",
    ]
    assert list(changed_keys(old, config())) == []


def test_listen_and_the_spool_need_a_restart_the_rest_does_not() -> None:
    assert needs_restart("listen.smtp") and needs_restart("queue.directory")
    assert not needs_restart("queue.max_size") and not needs_restart("relay.trusted_networks")
    running = config()
    loaded = config('[queue]\ndirectory = "/elsewhere"\nmax_size = 2048\n[listen]\nsmtp = []\n')
    kept = keep_running_values(running, loaded)
    assert kept.queue.directory == running.queue.directory
    assert kept.listen == running.listen
    assert kept.queue.max_size == 2048  # applied by the next session


def test_a_good_reload_swaps_and_says_what_changed(lines: list[str]) -> None:
    notify = Recorder()
    live = Live()
    old = generation(config())
    live.swap(old)
    new_config = config('trusted_networks = []\n[listen]\nsmtp = ["tcp:25"]\n')

    def build(cfg: Config, previous: Generation | None) -> Generation:
        assert previous is old
        return generation(cfg, certificate="CN=new")

    assert Reloader(lambda: new_config, build, live, MailLog(Clock()), notify).reload()
    assert live.current is not old and live.current.certificate == "CN=new"
    # [listen] keeps its running value in the new generation: the ports stay as they are.
    assert live.current.config.listen == old.config.listen
    assert notify.sent == ["RELOADING=1", "READY=1"]
    assert lines[0] == ("reloaded the configuration: changed relay.trusted_networks, "
                        "tls certificate (CN=new)")
    assert lines[1:] == ["reload: listen.smtp changed; it needs a restart (the running value "
                         "stays)"]


@pytest.mark.parametrize("error", [
    ConfigError("tls.key", "/srv/k.pem is not the key of /srv/c.pem"),
    ConfigError("relay.trusted_networks[0]", "'x' is not an IP network"),
])
def test_a_config_that_does_not_load_is_refused(lines: list[str], error: ConfigError) -> None:
    notify = Recorder()
    live = Live()
    old = generation(config())
    live.swap(old)

    def build(cfg: Config, previous: Generation | None) -> Generation:
        raise error

    assert not Reloader(config, build, live, MailLog(Clock()), notify).reload()
    assert live.current is old
    assert notify.sent == ["RELOADING=1", "READY=1"]
    assert lines == [f"reload refused: {error}; the running configuration stays"]


def test_a_crashing_build_is_a_refusal_too(lines: list[str]) -> None:
    live = Live()
    old = generation(config())
    live.swap(old)

    def build(cfg: Config, previous: Generation | None) -> Generation:
        raise RuntimeError("a plugin's bug")

    assert not Reloader(config, build, live, MailLog(Clock()), Recorder()).reload()
    assert live.current is old
    assert lines[0].startswith("reload refused")


def test_new_connections_and_deliveries_use_the_current_generation() -> None:
    built: list[str] = []

    class Named(Factory):
        def __init__(self, name: str) -> None:
            self.name = name

        def buildProtocol(self, addr: Any) -> Protocol:
            built.append(self.name)
            return Protocol()

    route: Any = object()
    live = Live()
    live.swap(generation(config(), role_factory=Named("first")))
    factory = LiveSessionFactory(live, Role.SMTP)
    factory.buildProtocol(None)
    live.swap(generation(config(), role_factory=Named("second"),
                         resolve=lambda domain, *, mta_sts=True: succeed(route)))
    factory.buildProtocol(None)
    assert built == ["first", "second"]
    results: list[object] = []
    live.resolve("example.test").addCallback(results.append)
    assert results == [route]


class Cyclic(Factory):
    """A factory in a reference cycle, as real generations are (services and factories that
    point back at each other): only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def frozen() -> Iterator[None]:
    heap.settle()  # as the daemon's start-up leaves it
    yield
    gc.unfreeze()


def test_a_reload_frees_the_generation_it_replaced_despite_the_freeze(frozen: None) -> None:
    live = Live()
    live.swap(generation(config(), role_factory=Cyclic()))
    heap.settle()  # the first generation is frozen now, cycle and all
    replaced = weakref.ref(live.current.factories[Role.SMTP])

    def build(cfg: Config, previous: Generation | None) -> Generation:
        return generation(cfg, certificate="CN=new", role_factory=Cyclic())

    assert Reloader(lambda: config(), build, live, MailLog(Clock()), Recorder()).reload()
    assert replaced() is None  # unfrozen, collected: a reload leaks no generation
    assert gc.get_freeze_count() > 0  # and what lives on is frozen again


def test_settle_leaves_the_survivors_out_of_later_collections(frozen: None) -> None:
    survivor = Cyclic()
    heap.settle()
    assert gc.is_tracked(survivor) and gc.get_freeze_count() > 0
    before = gc.get_freeze_count()
    garbage = weakref.ref(Cyclic())  # made after the freeze: collected as usual
    gc.collect()
    assert garbage() is None and gc.get_freeze_count() == before
