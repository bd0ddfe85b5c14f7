"""One delivery attempt of one queued message: find each recipient's next hop, then hand each
next hop all of its recipients at once (one connection per next hop).

The courier never touches the spool: it returns one :class:`Outcome` per pending recipient and
the scheduler records them. Anything unexpected inside an attempt becomes a deferral, so a bug
can delay mail but never lose it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from smarthost.core.envelope import BOUNCED, DEFERRED, Envelope, Outcome, QueueEntry, Recipient
from smarthost.delivery.routing import MAILDIR, PermanentRouteError, Route, RouteError

_log = Logger(namespace="smarthost.delivery.courier")

OpenBody = Callable[[], BinaryIO]


class Resolve(Protocol):
    def __call__(self, domain: str) -> Deferred[Route]: ...


class SMTPAgent(Protocol):
    async def deliver(
        self,
        route: Route,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        open_body: OpenBody,
        size: int,
    ) -> list[Outcome]: ...


class LocalAgent(Protocol):
    async def deliver(
        self, envelope: Envelope, recipients: Sequence[Recipient], open_body: OpenBody
    ) -> list[Outcome]: ...


class Courier:
    def __init__(
        self,
        resolve: Resolve,
        smtp: SMTPAgent,
        maildir: Callable[[Path], LocalAgent],
    ) -> None:
        self._resolve = resolve
        self._smtp = smtp
        self._maildir = maildir
        self._mailboxes: dict[str, LocalAgent] = {}

    async def attempt(self, entry: QueueEntry, open_body: OpenBody) -> list[Outcome]:
        pending = [state.recipient for state in entry.pending]
        by_domain: dict[str, list[Recipient]] = {}
        for recipient in pending:
            by_domain.setdefault(recipient.domain, []).append(recipient)
        outcomes: list[Outcome] = []
        by_route: dict[Route, list[Recipient]] = {}
        for domain, recipients in by_domain.items():
            try:
                route = await self._resolve(domain)
            except RouteError as e:
                result = BOUNCED if isinstance(e, PermanentRouteError) else DEFERRED
                outcomes += [Outcome(r, result, e.reply, "", e.status) for r in recipients]
                continue
            except Exception:
                # A bug in routing defers this domain only; the other domains still go out.
                _log.failure("{queue_id}: routing {domain} crashed",
                             queue_id=str(entry.queue_id), domain=domain)
                outcomes += [
                    Outcome(r, DEFERRED, "internal error during delivery", "", "4.3.0")
                    for r in recipients
                ]
                continue
            by_route.setdefault(route, []).extend(recipients)
        groups = list(by_route.items())
        results = await gatherResults(
            [Deferred.fromCoroutine(self._hop(route, entry, rcpts, open_body))
             for route, rcpts in groups]
        )
        for delivered in results:
            outcomes += delivered
        return outcomes

    async def _hop(
        self, route: Route, entry: QueueEntry, recipients: list[Recipient], open_body: OpenBody
    ) -> list[Outcome]:
        try:
            if route.kind == MAILDIR:
                agent = self._mailboxes.get(route.maildir)
                if agent is None:
                    agent = self._mailboxes[route.maildir] = self._maildir(Path(route.maildir))
                return await agent.deliver(entry.envelope, recipients, open_body)
            return await self._smtp.deliver(
                route, entry.envelope, recipients, open_body, entry.size
            )
        except Exception:
            _log.failure("{queue_id}: delivery attempt crashed", queue_id=str(entry.queue_id))
            return [
                Outcome(r, DEFERRED, "internal error during delivery", "", "4.3.0")
                for r in recipients
            ]
