"""SIGHUP: read the config file again and switch to it without dropping a connection or a
message, or refuse it and keep the running one.

The new configuration is loaded and every part a reload replaces is built from it (the
certificate and key loaded, the users file read, the plugins built with their settings, the
upstream password read) before anything changes; any error refuses the whole reload, so the
daemon never runs half old, half new. Then one swap of :class:`~smarthost.app.live.Live`.
Keys that only a restart can apply (the listeners, the spool, ...) are reported and keep
their running value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs

from smarthost.app import heap
from smarthost.app.config import Config
from smarthost.app.live import Generation, Live
from smarthost.app.notify import SystemdNotify
from smarthost.core.errors import ConfigError
from smarthost.core.maillog import MailLog
from smarthost.delivery.dns import close_resolver

# Keys a reload does not apply: the ports are open, the spool is locked, the retry schedule
# and the host name are built into the scheduler and the delivery agents.
RESTART_KEYS = (
    "listen",
    "queue.directory",
    "queue.retry",
    "queue.lifetime",
    "queue.delay_warning",
    "log.events",
    "hostname",
    "server.workers",  # the master spawned that many processes
    "server.cpu_affinity",  # each worker was pinned when it started
)


def changed_keys(old: Any, new: Any, prefix: str = "") -> Iterator[str]:
    """The dotted names of the keys whose values differ, in the order of the config."""
    if attrs.has(type(old)) and type(old) is type(new):
        for field in attrs.fields(type(old)):
            if field.name == "base_dir":
                continue  # not a key: where the relative paths start
            # [plugins.NAME] tables are the "settings" field of PluginsConfig.
            name = prefix if field.name == "settings" else _join(prefix, field.name)
            yield from changed_keys(getattr(old, field.name), getattr(new, field.name), name)
    elif isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*old, *(k for k in new if k not in old)]:
            if old.get(key) != new.get(key):
                yield _join(prefix, str(key))
    elif old != new:
        yield prefix


def needs_restart(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESTART_KEYS)


def keep_running_values(running: Config, loaded: Config) -> Config:
    """``loaded`` with the running value of every key in :data:`RESTART_KEYS`, so the new
    generation agrees with the ports, spool and scheduler that stay."""
    return attrs.evolve(
        loaded,
        hostname=running.hostname,
        listen=running.listen,
        log=running.log,
        queue=attrs.evolve(
            loaded.queue,
            directory=running.queue.directory,
            retry=running.queue.retry,
            lifetime=running.queue.lifetime,
            delay_warning=running.queue.delay_warning,
        ),
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class Reloader:
    """Loads, builds, swaps, and says what changed."""

    def __init__(
        self,
        load: Callable[[], Config],
        build: Callable[[Config, Generation], Generation],
        live: Live,
        maillog: MailLog,
        notify: SystemdNotify,
    ) -> None:
        self._load = load
        self._build = build
        self._live = live
        self._log = maillog
        self._notify = notify

    def reload(self) -> bool:
        """True when the new configuration is in force."""
        self._notify.reloading()
        try:
            return self._reload()
        finally:
            # systemd waits for READY=1 after RELOADING=1, refused reload or not.
            self._notify.ready()

    def _reload(self) -> bool:
        old = self._live.current
        try:
            loaded = self._load()
            new = self._build(keep_running_values(old.config, loaded), old)
        except ConfigError as e:
            self._refused(e.key or "config", str(e).removeprefix(f"{e.key}: "))
            return False
        except Exception:
            # A plugin or a library that raises what it should not: still only a refusal.
            self._log.failure("reload refused: the new configuration failed to build")
            return False
        changed = list(changed_keys(old.config, loaded))
        if new.certificate != old.certificate:
            changed.append(f"tls certificate ({new.certificate})")
        self._live.swap(new)
        if new.dns is not old.dns:  # new name servers: the old client's timers end here
            close_resolver(old.dns)
        del old, new  # this frame's hold on the replaced generation ends here
        heap.settle()  # collected now if no session holds it, else at the next reload
        applied = [key for key in changed if not needs_restart(key)]
        self._log.notice(
            "reloaded the configuration: {changes}",
            changes="changed " + ", ".join(applied) if applied else "nothing changed",
        )
        for key in changed:
            if needs_restart(key):
                self._log.warning(
                    "reload: {key} changed; it needs a restart (the running value stays)",
                    key=key,
                )
        return True

    def _refused(self, key: str, problem: str) -> None:
        self._log.error(
            "reload refused: {key}: {problem}; the running configuration stays",
            key=key, problem=problem,
        )
