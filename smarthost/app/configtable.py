"""One TOML table of the config file as the loader reads it: typed values, and every key not
asked for reported as unknown (a typo must not be silently ignored)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from smarthost.core.errors import ConfigError

T = TypeVar("T")


class Table:
    """One TOML table being read: hands out typed values and remembers which keys were used,
    so that whatever is left over can be reported as unknown."""

    def __init__(self, data: Mapping[str, Any], prefix: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(prefix, "must be a table")
        self._data = data
        self._prefix = prefix
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        self._used.add(name)
        if name not in self._data:
            return default
        value = self._data[name]
        # bool is an int in Python; a port of `true` is still a mistake.
        if isinstance(value, bool) and kind is not bool:
            raise ConfigError(self.key(name), f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(
                self.key(name), f"expected {_kind_name(kind)}, got {type(value).__name__}"
            )
        return value  # type: ignore[return-value]

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, list(default))
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self.key(name)}[{i}]", "expected a string")
        return tuple(value)

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.get(name, int, default)
        if value < minimum:
            raise ConfigError(self.key(name), f"must be at least {minimum}")
        return value

    def table(self, name: str) -> Table:
        self._used.add(name)
        return Table(self._data.get(name, {}), self.key(name))

    def check_unknown(self, allowed_tables: tuple[str, ...] = ()) -> None:
        for name in self._data:
            if name not in self._used and name not in allowed_tables:
                raise ConfigError(self.key(name), "unknown key")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)
