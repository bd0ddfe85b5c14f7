"""The queue changes behind ``smarthost queue``: which messages a command means, and who makes
the change.

When a daemon runs, it makes every change itself, through the control channel (it holds the
schedule, so nothing races a delivery in flight). When none runs, the admin tool changes the
spool directly, under the spool's lock, the way ``postsuper`` works on Postfix's queue files.
Either way each id comes back as done, unchanged (already held, or not held) or missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.protocols import amp

from smarthost.app import control, salvaging
from smarthost.core.envelope import QueueEntry, QueueId
from smarthost.core.types import RunBlocking
from smarthost.queue.spool import Spool, release_held

STATUSES = ("queued", "deferred", "held")


def status(entry: QueueEntry) -> str:
    """held (by the operator or the brake), deferred (tried before), or queued (not yet)."""
    if entry.envelope.held:
        return "held"
    return "deferred" if entry.attempts else "queued"


@attrs.frozen
class Selection:
    """Which messages a command means; every given criterion must match. An address
    matches case-insensitively; ``<>`` (or an empty string) is the null sender."""

    sender: str | None = None
    recipient: str | None = None
    status: str | None = None
    user: str | None = None

    def __call__(self, entry: QueueEntry) -> bool:
        if self.sender is not None and (
            _address(entry.envelope.sender) != _address(self.sender)
        ):
            return False
        if self.recipient is not None and not any(
            _address(r.recipient.address) == _address(self.recipient) for r in entry.recipients
        ):
            return False
        if self.status is not None and status(entry) != self.status:
            return False
        return self.user is None or control.owner(entry) == self.user


def _address(text: str) -> str:
    return text.strip().removeprefix("<").removesuffix(">").lower()


Wait = Callable[[Deferred[Any]], Any]


class QueueChanges:
    """Delete, hold and release, through ``daemon`` when one runs (else on ``spool`` itself).
    ``wait`` turns the local spool's Deferreds (which fire at once) into results."""

    def __init__(
        self, spool: Spool, daemon: control.ControlClient | None, wait: Wait
    ) -> None:
        self._spool = spool
        self._daemon = daemon
        self._wait = wait

    @property
    def through_daemon(self) -> bool:
        return self._daemon is not None

    def flush(self) -> int | None:
        """How many messages the daemon retries now; None when no daemon runs."""
        if self._daemon is None:
            return None
        count: int = self._daemon.call(control.Flush)["count"]
        return count

    def delete(self, ids: Sequence[QueueId]) -> dict[str, list[str]]:
        return self._each(control.Delete, ids, self._delete)

    def hold(self, ids: Sequence[QueueId]) -> dict[str, list[str]]:
        return self._each(control.Hold, ids, lambda e: self._held(e, True))

    def release(self, ids: Sequence[QueueId]) -> dict[str, list[str]]:
        return self._each(control.ReleaseIds, ids, lambda e: self._held(e, False))

    def salvage(self, run_blocking: RunBlocking) -> list[str]:
        if self._daemon is not None:
            lines: list[str] = self._daemon.call(control.Salvage)["lines"]
            return lines
        return salvaging.in_admin(self._spool, run_blocking, self._wait)

    def release_user(self, user: str) -> int:
        if self._daemon is not None:
            count: int = self._daemon.call(control.Release, user=user)["count"]
            return count
        return len(self._wait(Deferred.fromCoroutine(release_held(self._spool, user))))

    def _each(
        self,
        command: type[amp.Command],
        ids: Sequence[QueueId],
        change: Callable[[QueueEntry], str],
    ) -> dict[str, list[str]]:
        if self._daemon is not None:
            return self._daemon.each_chunk(command, [str(i) for i in ids])
        answer: dict[str, list[str]] = {control.DONE: [], control.UNCHANGED: [],
                                        control.MISSING: []}
        for queue_id in ids:
            try:
                entry = self._spool.load(queue_id)
                what = change(entry)
            except KeyError:
                what = control.MISSING
            answer[what].append(str(queue_id))
        return answer

    def _delete(self, entry: QueueEntry) -> str:
        self._wait(self._spool.remove(entry.queue_id))
        return control.DONE

    def _held(self, entry: QueueEntry, held: bool) -> str:
        if entry.envelope.held == held:
            return control.UNCHANGED
        self._wait(self._spool.update(
            attrs.evolve(entry, envelope=attrs.evolve(entry.envelope, held=held))
        ))
        return control.DONE


def select(entries: Iterable[QueueEntry], selection: Selection) -> list[QueueEntry]:
    return [entry for entry in entries if selection(entry)]
