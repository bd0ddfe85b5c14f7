"""twistd glue: ``twistd -n smarthost [--config PATH]``.

Found through the lazy ``ServiceMaker`` in ``twisted/plugins/smarthost_plugin.py``, which
imports this module only when ``twistd smarthost`` actually runs: twistd wants a module with
``Options`` and ``makeService``. The object graph is built in :mod:`smarthost.app.wiring`.
"""

from __future__ import annotations

from pathlib import Path

from twisted.application.service import MultiService
from twisted.cred import strcred
from twisted.cred.credentials import IUsernamePassword
from twisted.python import usage

from smarthost.app.config import Config, ConfigError, load_config
from smarthost.app.logfiles import twistd_log_file
from smarthost.app.wiring import make_service
from smarthost.auth import sasl


class Options(usage.Options, strcred.AuthOptionMixin):
    # `--auth file:PATH` etc.: more password checkers, asked after the users file
    # (smarthost.app.credfactory); `--help-auth` lists them.
    supportedInterfaces = (IUsernamePassword,)
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration (default: the embedded one)."],
    ]

    def postOptions(self) -> None:
        try:
            self.config = self.load()
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None

    def load(self) -> Config:
        """Read the config file (again, for a reload); raises ConfigError naming the key."""
        path = self["config"]
        return load_config(Path(path) if path else None, validate_mechanism=_validate_mechanism)


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    return make_service(
        options.config,
        reactor,
        options.get("credCheckers", []),
        load=options.load,
        # twistd's own options (--logfile, --nodaemon, ...): the daemon opens twistd's log
        # file itself, to reopen it on SIGUSR1.
        log_file=twistd_log_file(options.parent),
    )


def _validate_mechanism(name: str) -> None:
    sasl.build_mechanisms([name])
