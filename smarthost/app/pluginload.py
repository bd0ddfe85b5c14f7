"""Finds the plugins named in ``[plugins] enabled`` among those installed in the
``smarthost.plugins`` namespace and builds them with their settings; every error names the
config key, so ``check-config`` and start-up say which line to fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.plugin import getPlugins
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from smarthost.api import (
    IConnectCheck,
    IDataCheck,
    IDeliveryObserver,
    IHeaderAdder,
    IHeloCheck,
    IMailCheck,
    IRcptCheck,
    ISmarthostPlugin,
    ITokenVerifier,
    PluginContext,
)


class PluginError(ValueError):
    """A plugin named in the config is missing or refuses its settings; ``key`` names it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


def available_plugins() -> dict[str, ISmarthostPlugin]:
    """Every plugin installed in the ``smarthost.plugins`` namespace, by name."""
    import smarthost.plugins

    found: dict[str, ISmarthostPlugin] = {}
    for plugin in getPlugins(ISmarthostPlugin, smarthost.plugins):
        found.setdefault(plugin.name, plugin)
    return found


def build_plugins(
    enabled: Sequence[str], settings: Mapping[str, Mapping[str, Any]], context: PluginContext
) -> list[tuple[str, object]]:
    """Build the enabled plugins in order; errors name the config key."""
    available = available_plugins()
    built: list[tuple[str, object]] = []
    for i, name in enumerate(enabled):
        plugin = available.get(name)
        if plugin is None:
            known = ", ".join(sorted(available)) or "none installed"
            raise PluginError(f"plugins.enabled[{i}]", f"no plugin named {name!r} ({known})")
        try:
            obj = plugin.build(settings.get(name, {}), context)
        except ValueError as e:
            raise PluginError(f"plugins.{name}", str(e)) from None
        stages = [i for i in _STAGES if i.providedBy(obj)]
        if not stages:
            raise PluginError(f"plugins.{name}", "the plugin provides no stage interface")
        for interface in stages:
            try:
                verifyObject(interface, obj)
            except Invalid as e:
                raise PluginError(f"plugins.{name}", f"broken plugin: {e}") from None
        built.append((name, obj))
    return built


_STAGES = (
    IConnectCheck, IHeloCheck, IMailCheck, IRcptCheck, IDataCheck, IHeaderAdder,
    IDeliveryObserver, ITokenVerifier,
)
