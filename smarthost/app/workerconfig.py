"""What a worker process is told by its master, and the configuration it runs with.

With ``[server] workers`` N > 1 the master (:mod:`smarthost.app.master`) opens the listeners
and starts N workers; each is the same daemon the single-process mode builds
(:func:`smarthost.app.wiring.make_service`), run with a configuration derived from the file:

- ``[listen]``: each listener becomes the socket the master passed at descriptor ``3 + k``,
  written as Twisted's ``systemd:domain=...:index=k`` endpoint (a ``haproxy:`` prefix kept,
  so the PROXY header is still read; implicit TLS on ``submissions`` is applied by our own
  factory wrapper, :func:`smarthost.smtpd.listen.wrap_factory`, whatever the endpoint);
- ``[queue] directory``: the worker's own spool, ``<directory>/worker-<i>``
  (:mod:`smarthost.app.workerspools`): a spool has one writer;
- ``[server] workers`` = 1 and ``[http] listen`` empty: a worker serves its HTTP side on the
  unix socket the master scrapes (``http.sock`` in its spool), not on the operator's port;
- ``[limits] connections``: the worker's share of the whole server's number,
  ``ceil(connections / N)``. The other limits stay per process: ``connections_per_ip`` and
  the per-IP and per-user hourly counts are counted by each worker on its own (the kernel
  spreads one client's connections over the workers), unless ``[fleet] redis`` shares the
  counts (:mod:`smarthost.app.fleet`).

Everything else is read from the file at each start and each SIGHUP, as the single daemon
does. What the master decided at its own start travels in :class:`WorkerSpec` (the
environment variable :data:`SPEC_VARIABLE`): the listeners as the master opened them, the
number of workers and the spool root. A worker restarted after the file changed therefore
still agrees with the sockets it inherits, and every worker agrees on N.
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Mapping
from pathlib import Path

import attrs

from smarthost.app import workerspools
from smarthost.app.config import Config, HTTPConfig, ListenConfig, ServerConfig
from smarthost.smtpd.listen import HAPROXY_PREFIX

SPEC_VARIABLE = "SMARTHOST_WORKER"
FIRST_LISTEN_FD = 3  # systemd's SD_LISTEN_FDS_START: the sockets start right after stderr
ROLES = ("submission", "submissions", "smtp")  # the [listen] keys, in the config's order
_DOMAINS: dict[int, str] = {
    socket.AF_INET: "INET", socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX",
}


class WorkerSpecError(ValueError):
    """The master's description of a worker is missing or malformed."""


@attrs.frozen
class WorkerSpec:
    """What the master tells worker ``index`` (1..``workers``)."""

    index: int
    workers: int
    directory: Path  # the master's [queue] directory: the root of every worker's spool
    listen: Mapping[str, tuple[str, ...]]  # role -> the adopted endpoint strings
    orphans: tuple[Path, ...] = ()  # spools no worker owns, served too (app.orphans)

    def to_environment(self) -> str:
        return json.dumps({
            "index": self.index, "workers": self.workers, "directory": str(self.directory),
            "listen": {role: list(self.listen.get(role, ())) for role in ROLES},
            "orphans": [str(p) for p in self.orphans],
        })

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> WorkerSpec:
        text = environ.get(SPEC_VARIABLE)
        if not text:
            raise WorkerSpecError(
                f"--worker is for the processes the master starts (no ${SPEC_VARIABLE})"
            )
        try:
            data = json.loads(text)
            spec = cls(
                index=int(data["index"]), workers=int(data["workers"]),
                directory=Path(data["directory"]),
                listen={role: tuple(str(d) for d in data["listen"][role]) for role in ROLES},
                orphans=tuple(Path(p) for p in data.get("orphans", ())),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise WorkerSpecError(f"${SPEC_VARIABLE} is malformed: {e}") from None
        if not 1 <= spec.index <= spec.workers:
            raise WorkerSpecError(f"worker {spec.index} of {spec.workers}?")
        return spec

    def spool(self, config: Config) -> Path:
        return workerspools.worker_spool(self.master_view(config), self.index)

    def http_socket(self, config: Config) -> Path:
        return workerspools.http_socket(self.master_view(config), self.index)

    def master_view(self, config: Config) -> Config:
        """``config`` with the master's N and spool root (workerspools' input)."""
        return attrs.evolve(
            config, server=ServerConfig(workers=self.workers),
            queue=attrs.evolve(config.queue, directory=self.directory),
        )


def adopted_description(description: str, family: int, index: int) -> str:
    """The endpoint string that adopts the master's socket for ``description``: the socket
    at descriptor ``FIRST_LISTEN_FD + index``, of address ``family``."""
    prefix = HAPROXY_PREFIX if description.startswith(HAPROXY_PREFIX) else ""
    return f"{prefix}systemd:domain={_DOMAINS[family]}:index={index}"


def share(connections: int, workers: int) -> int:
    """One worker's part of a whole-server limit (rounded up: never 0)."""
    return max(1, math.ceil(connections / workers))


def worker_config(config: Config, spec: WorkerSpec) -> Config:
    """The configuration worker ``spec.index`` runs with, derived from the file's."""
    limits = config.limits
    return attrs.evolve(
        config,
        listen=ListenConfig(**{role: tuple(spec.listen.get(role, ())) for role in ROLES}),
        queue=attrs.evolve(config.queue, directory=spec.spool(config)),
        server=ServerConfig(workers=1),
        http=HTTPConfig(listen=()),
        limits=attrs.evolve(limits, connections=share(limits.connections, spec.workers)),
    )


def listen_environment(count: int, names: list[str]) -> dict[str, str]:
    """The systemd variables naming ``count`` inherited sockets (``LISTEN_PID`` is set by the
    worker itself, :mod:`smarthost.app.worker`: only the child knows its pid before exec)."""
    return {"LISTEN_FDS": str(count), "LISTEN_FDNAMES": ":".join(names)}


def state_directory(config: Config, spec: WorkerSpec | None) -> Path:
    """Where the daemon keeps what is not mail (the MTA-STS policy cache): beside the
    configured spool, the same place with one process or many."""
    return (spec.directory if spec is not None else config.queue.directory).parent

