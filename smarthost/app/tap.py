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

from smarthost.app.config import ConfigError, load_config
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
        path = self["config"]
        try:
            self.config = load_config(
                Path(path) if path else None, validate_mechanism=_validate_mechanism
            )
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    return make_service(options.config, reactor, options.get("credCheckers", []))


def _validate_mechanism(name: str) -> None:
    sasl.build_mechanisms([name])
