"""One delivery attempt of one queued message: find each recipient's next hop, then hand each
next hop all of its recipients at once (one connection per next hop).

The courier never touches the spool: it returns one :class:`Outcome` per pending recipient and
the scheduler records them. Anything unexpected inside an attempt becomes a deferral, so a bug
can delay mail but never lose it.

Before handing a route to the SMTP agent the courier asks the failed-host memory
(:mod:`smarthost.delivery.hostcache`) whether the route is suspended (every host failed lately)
and if so defers its recipients at once, as Postfix's queue manager does with dead destinations
instead of letting each message pay a connect timeout. The hosts the agent found unreachable go
back in the result; the scheduler records them, with the time the attempt started.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from smarthost.core.envelope import BOUNCED, DEFERRED, Envelope, Outcome, QueueEntry, Recipient
from smarthost.delivery.hostcache import HostCache
from smarthost.delivery.routing import MAILDIR, HostFailure, PermanentRouteError, Route, RouteError
from smarthost.delivery.smtpagent import HopResult
from smarthost.delivery.tlsrequired import policies_apply

_log = Logger(namespace="smarthost.delivery.courier")

OpenBody = Callable[[], BinaryIO]


@attrs.frozen
class AttemptResult:
    """One attempt of one message: an outcome per pending recipient, and the hosts that took
    no connection (for the failed-host memory)."""

    outcomes: tuple[Outcome, ...]
    unreachable: tuple[HostFailure, ...] = ()


class Resolve(Protocol):
    """Routing (:meth:`smarthost.delivery.routing.NextHopResolver.resolve`). ``mta_sts=False``
    leaves the recipient domain's MTA-STS policy out, for a message that says
    ``TLS-Required: No`` (RFC 8689 5)."""

    def __call__(self, domain: str, *, mta_sts: bool = True) -> Deferred[Route]: ...


class SMTPAgent(Protocol):
    async def deliver(
        self,
        route: Route,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        open_body: OpenBody,
        size: int,
    ) -> HopResult: ...


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
        hosts: HostCache,
    ) -> None:
        self._resolve = resolve
        self._smtp = smtp
        self._maildir = maildir
        self._hosts = hosts
        self._mailboxes: dict[str, LocalAgent] = {}

    async def attempt(self, entry: QueueEntry, open_body: OpenBody) -> AttemptResult:
        pending = [state.recipient for state in entry.pending]
        by_domain: dict[str, list[Recipient]] = {}
        for recipient in pending:
            by_domain.setdefault(recipient.domain, []).append(recipient)
        outcomes: list[Outcome] = []
        by_route: dict[Route, list[Recipient]] = {}
        mta_sts = self._policies_apply(entry, open_body)
        for domain, recipients in by_domain.items():
            try:
                route = await self._resolve(domain, mta_sts=mta_sts)
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
        if len(by_route) == 1:
            # One next hop (nearly every message): its coroutine awaited as it is, with no
            # Deferred of its own and no list gathering one result. _hop never fails, so no
            # hop's failure can hide another's either way.
            [(route, rcpts)] = by_route.items()
            results = [await self._hop(route, entry, rcpts, open_body)]
        else:
            results = await gatherResults(
                [Deferred.fromCoroutine(self._hop(route, entry, rcpts, open_body))
                 for route, rcpts in by_route.items()]
            )
        unreachable: list[HostFailure] = []
        for hop in results:
            outcomes += hop.outcomes
            unreachable += hop.unreachable
        return AttemptResult(tuple(outcomes), tuple(unreachable))

    def _policies_apply(self, entry: QueueEntry, open_body: OpenBody) -> bool:
        """RFC 8689 5: ``TLS-Required: No`` (without REQUIRETLS) waives the recipient domains'
        MTA-STS policies. A body that cannot be read keeps them: the safe side; the agent will
        meet the same trouble and defer."""
        try:
            applies = policies_apply(entry.envelope, open_body)
        except Exception as e:
            _log.warn("{queue_id}: cannot read the header section: {error}",
                      queue_id=str(entry.queue_id), error=str(e) or type(e).__name__)
            return True
        if not applies:
            _log.info("{queue_id}: TLS-Required: No, recipient domains' MTA-STS policies not "
                      "applied (RFC 8689 5)", queue_id=str(entry.queue_id))
        return applies

    async def _hop(
        self, route: Route, entry: QueueEntry, recipients: list[Recipient], open_body: OpenBody
    ) -> HopResult:
        try:
            if route.kind == MAILDIR:
                agent = self._mailboxes.get(route.maildir)
                if agent is None:
                    agent = self._mailboxes[route.maildir] = self._maildir(Path(route.maildir))
                return HopResult(tuple(await agent.deliver(entry.envelope, recipients, open_body)))
            suspended = self._hosts.suspended(route.hosts)
            if suspended is not None:
                return _deferred(recipients, f"delivery temporarily suspended: {suspended.reason}",
                                 suspended.host.remote, suspended.status)
            return await self._smtp.deliver(
                route, entry.envelope, recipients, open_body, entry.size
            )
        except Exception:
            _log.failure("{queue_id}: delivery attempt crashed", queue_id=str(entry.queue_id))
            return _deferred(recipients, "internal error during delivery", "", "4.3.0")


def _deferred(recipients: list[Recipient], why: str, remote: str, status: str) -> HopResult:
    return HopResult(tuple(Outcome(r, DEFERRED, why, remote, status) for r in recipients))
