"""``example``: refuses the recipients listed in ``[plugins.example] refuse``.

A plugin from a separately installed distribution: the discovery test installs this
directory with pip and runs a daemon with ``[plugins] enabled = ["example"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from smarthost.api import IRcptCheck, ISmarthostPlugin, PluginContext
from smarthost.core.envelope import Client
from smarthost.core.replies import Reply


@implementer(IRcptCheck)
class RefuseRecipients:
    def __init__(self, refuse: frozenset[str]) -> None:
        self._refuse = refuse

    async def check_rcpt(self, client: Client, sender: str, recipient: str) -> Reply | None:
        if recipient.lower() in self._refuse:
            return Reply(550, "5.7.1", "Refused by the example plugin")
        return None


@implementer(IPlugin, ISmarthostPlugin)
class ExamplePlugin:
    name = "example"

    def build(self, settings: Mapping[str, Any], context: PluginContext) -> RefuseRecipients:
        refuse = settings.get("refuse", [])
        if not isinstance(refuse, list) or not all(isinstance(r, str) for r in refuse):
            raise ValueError("refuse: expected a list of addresses")
        return RefuseRecipients(frozenset(r.lower() for r in refuse))


example = ExamplePlugin()
