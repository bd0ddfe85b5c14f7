"""``smarthost config``: the configuration in effect, as TOML that loads back the same.

Every key of every table is written from the loaded :class:`Config` (so a key added to the
loader shows up here without a change), defaults filled in; ``changed_only`` keeps what differs
from the defaults, like ``postconf -n``. Paths are written absolute, as the daemon uses them.
Secrets never appear: the config holds only the files that hold them, and a plugin setting
whose name says it is a secret, or a ``[fleet] redis`` URL with a password, is replaced by a
comment.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import json
import math
import re
import typing
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from smarthost.app.config import Config, parse_config

SECTIONS = (
    "listen", "tls", "auth", "relay", "queue", "delivery", "log", "limits", "http", "server",
    "fleet", "plugins",
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_SECRET_NAME = re.compile(r"secret|passw|token|credential", re.I)
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
                 "\r": "\\r"}


def dump(config: Config, *, changed_only: bool = False, source: str = "") -> str:
    defaults = parse_config("", config.base_dir)
    lines = [f"# smarthost configuration in effect{f' ({source})' if source else ''}: "
             + ("only what differs from the defaults" if changed_only
                else "every key, defaults filled in")]
    if not changed_only or config.hostname != defaults.hostname:
        lines.append(f"hostname = {_value(config.hostname)}")
    for name in SECTIONS:
        section, default = getattr(config, name), getattr(defaults, name)
        lines += _table(name, section, default if changed_only else None)
    return "\n".join(lines) + "\n"


def _table(name: str, section: Any, default: Any | None) -> list[str]:
    """``[name]`` with its plain keys, then its sub-tables; nothing when nothing differs."""
    plain: list[str] = []
    subtables: list[str] = []
    hints = typing.get_type_hints(type(section))
    for field in attrs.fields(type(section)):
        value = getattr(section, field.name)
        if default is not None and value == getattr(default, field.name):
            continue
        if name == "plugins" and field.name == "settings":
            for plugin, settings in value.items():
                subtables += ["", f"[plugins.{_key(plugin)}]", *_settings(settings)]
        elif isinstance(value, Mapping):
            subtables += ["", f"[{name}.{field.name}]"]
            subtables += [f"{_key(k)} = {_value(v)}" for k, v in value.items()]
        elif attrs.has(type(value)):
            subtables += _table(f"{name}.{field.name}", value, None)
        elif value is None and Path in typing.get_args(hints[field.name]):
            plain.append(f'{field.name} = ""  # not set')
        elif name == "fleet" and field.name == "redis" and urllib.parse.urlsplit(value).password:
            plain.append("# redis = (the URL holds a password: not shown)")
        elif value is not None:
            plain.append(f"{field.name} = {_value(value)}")
    if not plain and not subtables:
        return []
    return ["", f"[{name}]", *plain, *subtables]


def _settings(settings: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, value in settings.items():
        if _SECRET_NAME.search(key) and not key.endswith(("_file", "_path")):
            lines.append(f"# {_key(key)} = (a secret: not shown)")
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    return lines


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else _string(name)


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _value(value.value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else json.dumps(value)
    if isinstance(value, (Path, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return _string(str(value))
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (frozenset, set)):
        return _value(sorted(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
