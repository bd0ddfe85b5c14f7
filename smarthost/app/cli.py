"""What every ``smarthost`` admin command shares: the error it prints without a traceback,
and the configuration loaded as the daemon would load it."""

from __future__ import annotations

from pathlib import Path

from smarthost.app.config import Config, ConfigError, load_config
from smarthost.auth import sasl

CONFIG_HELP = "the configuration file (default: the embedded default, relative to ./)"


class CLIError(Exception):
    """A problem the user can fix; printed without a traceback."""


def load(path: str | None) -> Config:
    try:
        return load_config(Path(path) if path else None, validate_mechanism=_mechanism)
    except ConfigError as e:
        raise CLIError(f"configuration error: {e}") from None


def _mechanism(name: str) -> None:
    sasl.build_mechanisms([name])
