"""Runs the enabled plugins' checks for the session: in order, each with a time limit, and
failing closed — a plugin that raises or does not answer makes the session say 451 4.3.0.

Plugins can only refuse: the first Reply wins and later plugins are not asked.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface.interface import InterfaceClass

from smarthost.api import (
    PLUGIN_TIMEOUT,
    IConnectCheck,
    IDataCheck,
    IDeliveryObserver,
    IHeaderAdder,
    IHeloCheck,
    IMailCheck,
    IRcptCheck,
    ITokenVerifier,
    MessageView,
)
from smarthost.core.envelope import Client, Outcome, QueueEntry
from smarthost.core.replies import PLUGIN_FAILED, Reply

_log = Logger(namespace="smarthost.plugins")


class Hooks:
    def __init__(
        self, plugins: Sequence[tuple[str, object]], clock: IReactorTime,
        timeout: float = PLUGIN_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._timeout = timeout

        def providing(interface: InterfaceClass) -> list[tuple[str, Any]]:
            return [(name, p) for name, p in plugins if interface.providedBy(p)]

        self.connect = providing(IConnectCheck)
        self.helo = providing(IHeloCheck)
        self.mail = providing(IMailCheck)
        self.rcpt = providing(IRcptCheck)
        self.data = providing(IDataCheck)
        self.headers = providing(IHeaderAdder)
        self.observers = providing(IDeliveryObserver)
        self.verifiers = providing(ITokenVerifier)  # asked by smarthost.auth.oauth's checker

    async def check_connect(self, client: Client) -> Reply | None:
        return await self._first(self.connect, lambda p: p.check_connect(client))

    async def check_helo(self, client: Client, helo: str) -> Reply | None:
        return await self._first(self.helo, lambda p: p.check_helo(client, helo))

    async def check_mail(self, client: Client, sender: str) -> Reply | None:
        return await self._first(self.mail, lambda p: p.check_mail(client, sender))

    async def check_rcpt(self, client: Client, sender: str, recipient: str) -> Reply | None:
        return await self._first(self.rcpt, lambda p: p.check_rcpt(client, sender, recipient))

    async def check_data(self, client: Client, message: MessageView) -> Reply | None:
        return await self._first(self.data, lambda p: p.check_data(client, message))

    async def added_headers(
        self, client: Client, message: MessageView
    ) -> list[tuple[str, str]] | Reply:
        added: list[tuple[str, str]] = []
        for name, plugin in self.headers:
            try:
                headers = await self._call(plugin.add_headers(client, message))
            except Exception:
                _log.failure("plugin {plugin} failed adding headers", plugin=name)
                return PLUGIN_FAILED
            for field, value in headers:
                if not _safe_header(field, value):
                    _log.error("plugin {plugin} returned a malformed header", plugin=name)
                    return PLUGIN_FAILED
                added.append((field, value))
        return added

    async def screen(
        self, client: Client, message: MessageView, prepend: Callable[[bytes], None]
    ) -> Reply | None:
        """The DATA stage: every data check, then the header adders (whose headers go on top
        of the message through ``prepend``); a refusal or a failure stops there."""
        refusal = await self.check_data(client, message)
        if refusal is not None:
            return refusal
        added = await self.added_headers(client, message)
        if isinstance(added, Reply):
            return added
        if added:
            prepend(format_headers(added))
        return None

    def observe(self, entry: QueueEntry, outcome: Outcome) -> None:
        for name, plugin in self.observers:
            try:
                plugin.delivery(entry, outcome)
            except Exception:
                _log.failure("plugin {plugin} failed observing a delivery", plugin=name)

    async def _first(
        self, plugins: list[tuple[str, Any]], call: Callable[[Any], Awaitable[Reply | None]]
    ) -> Reply | None:
        for name, plugin in plugins:
            try:
                verdict = await self._call(call(plugin))
            except Exception:
                _log.failure("plugin {plugin} failed; answering 451", plugin=name)
                return PLUGIN_FAILED
            if verdict is not None:
                if not isinstance(verdict, Reply) or verdict.code < 400:
                    # Plugins may only refuse: anything else is a broken plugin.
                    _log.error("plugin {plugin} returned {verdict!r}", plugin=name,
                               verdict=verdict)
                    return PLUGIN_FAILED
                return verdict
        return None

    async def _call(self, result: Awaitable[Any] | Any) -> Any:
        """A plugin's answer, awaited under the time limit (a plain value is taken as is)."""
        if not inspect.isawaitable(result):
            return result
        d = result if isinstance(result, Deferred) else Deferred.fromCoroutine(_wait(result))
        d.addTimeout(self._timeout, self._clock)
        return await d


async def _wait(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _safe_header(field: str, value: str) -> bool:
    return (
        bool(field)
        and all(33 <= ord(c) <= 126 and c != ":" for c in field)
        and "\r" not in value.replace("\r\n\t", "").replace("\r\n ", "")
        and "\n" not in value.replace("\r\n\t", "").replace("\r\n ", "")
    )


def format_headers(headers: Sequence[tuple[str, str]]) -> bytes:
    return b"".join(f"{field}: {value}\r\n".encode() for field, value in headers)
