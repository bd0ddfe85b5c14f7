"""twistd glue: ``twistd -n smarthost [--config PATH]``.

Found through the lazy ``ServiceMaker`` in ``twisted/plugins/smarthost_plugin.py``, which
imports this module only when ``twistd smarthost`` actually runs: twistd wants a module with
``Options`` and ``makeService``. The object graph is built in :mod:`smarthost.app.wiring`.

With ``[server] workers`` N > 1 twistd runs the master of N workers instead
(:mod:`smarthost.app.master`); each worker is this same plugin run with ``--worker I`` by
:mod:`smarthost.app.worker`, with the configuration :mod:`smarthost.app.workerconfig`
derives from the file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.application.service import MultiService
from twisted.cred import strcred
from twisted.cred.credentials import IUsernamePassword
from twisted.python import usage

from smarthost.app import master, workerconfig, workerlog, workerproc, workerspools
from smarthost.app.config import Config, ConfigError, load_config
from smarthost.app.logfiles import twistd_log_file, twistd_logs_to_stdout
from smarthost.app.wiring import make_service
from smarthost.auth import sasl


class Options(usage.Options, strcred.AuthOptionMixin):
    # `--auth file:PATH` etc.: more password checkers, asked after the users file
    # (smarthost.app.credfactory); `--help-auth` lists them.
    supportedInterfaces = (IUsernamePassword,)
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration (default: the embedded one)."],
        ["worker", None, None, "Run as worker I of a master (the master starts its workers "
         "so; see smarthost.app.master)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.auth_descriptions: list[str] = []  # passed on to the workers
        self.spec: workerconfig.WorkerSpec | None = None

    def opt_auth(self, description: str) -> None:
        """Specify an authentication method for the server."""
        super().opt_auth(description)
        self.auth_descriptions.append(description)

    def postOptions(self) -> None:
        if self["worker"] is not None:
            try:
                self.spec = workerconfig.WorkerSpec.from_environment(os.environ)
            except workerconfig.WorkerSpecError as e:
                raise usage.UsageError(str(e)) from None
            if str(self.spec.index) != self["worker"]:
                raise usage.UsageError(f"--worker {self['worker']}: the master said "
                                       f"{self.spec.index}")
        try:
            self.config = self.load()
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None

    def load(self) -> Config:
        """Read the config file (again, for a reload); raises ConfigError naming the key.
        A worker gets its derived configuration; a master's listeners are checked."""
        path = self["config"]
        config = load_config(Path(path) if path else None,
                             validate_mechanism=_validate_mechanism)
        if self.spec is not None:
            return workerconfig.worker_config(config, self.spec)
        if workerspools.worker_count(config) > 1:
            master.check_listeners(config)
        return config


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    spec = options.spec
    if spec is not None:
        return make_service(
            options.config, reactor, options.get("credCheckers", []), load=options.load,
            log_observer=workerlog.worker_observer(sys.stdout, reactor),
            http_listen=[spec.http_socket(options.config)],
            state_dir=workerconfig.state_directory(options.config, spec),
            orphan_spools=spec.orphans, shared_listeners=True,
        )
    count = workerspools.worker_count(options.config)
    if count > 1:
        return _master(options, reactor, count)
    return make_service(
        options.config,
        reactor,
        options.get("credCheckers", []),
        load=options.load,
        # twistd's own options (--logfile, --nodaemon, ...): the daemon opens twistd's log
        # file itself, to reopen it on SIGUSR1.
        log_file=twistd_log_file(options.parent),
    )


def _master(options: Options, reactor: object, count: int) -> MultiService:
    config = options.config
    path = options["config"]
    command = workerproc.WorkerCommand(
        config_path=os.path.abspath(path) if path else None,
        auth=tuple(options.auth_descriptions), directory=config.queue.directory, count=count,
        cpus=workerproc.usable_cpus() if config.server.cpu_affinity else (),
    )
    return master.make_master_service(
        config, reactor, count=count, command=command, load=options.load,
        log_file=twistd_log_file(options.parent),
        log_stdout=twistd_logs_to_stdout(options.parent),
    )


def _validate_mechanism(name: str) -> None:
    sasl.build_mechanisms([name])
