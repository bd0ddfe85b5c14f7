"""Every operator-facing log line, in one place.

Each event is one method with named fields. The text goes to twistd's log through
``twisted.logger``; when ``[log] events`` is set, the same event is appended there as one JSON
object per line. Values that come from the network are escaped so a client cannot forge log
lines (a user name with a newline) or break fail2ban's patterns.
"""

from __future__ import annotations

import json
import os
from typing import Any, BinaryIO

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smarthost.core.envelope import Outcome, QueueEntry, QueueId


def clean(value: object) -> str:
    """One printable line: control characters and non-ASCII escaped, as repr does."""
    text = str(value)
    if text.isprintable() and text.isascii():
        return text
    return json.dumps(text)[1:-1]


class EventFile:
    """The JSON-lines audit log. Appends go through the OS buffer in one write each."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._file: BinaryIO = os.fdopen(fd, "ab", buffering=0)

    def write(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n")

    def close(self) -> None:
        self._file.close()


class MailLog:
    def __init__(self, clock: IReactorTime, events: EventFile | None = None) -> None:
        self._log = Logger(namespace="smarthost")
        self._clock = clock
        self._events = events

    def _emit(self, event: str, text: str, level: str = "info", **fields: Any) -> None:
        # The line is formatted here by str.format (in C) and handed on as a literal: the
        # log observer's own formatter is pure Python and took a tenth of the reactor's time
        # at three lines per message. The fields still travel with the event.
        try:
            line = text.format(**fields).replace("{", "{{").replace("}", "}}")
        except (KeyError, IndexError, ValueError, AttributeError):
            line = text  # not plain str.format syntax: twisted.logger renders it as before
        getattr(self._log, level)(line, **fields)
        if self._events is not None:
            self._events.write({"time": self._clock.seconds(), "event": event, **fields})

    def accepted(self, entry: QueueEntry, user: str) -> None:
        env = entry.envelope
        self._emit(
            "accepted",
            "{queue_id}: accepted from {client} as {user} sender=<{sender}> "
            "recipients={recipients} size={size}",
            queue_id=str(entry.queue_id),
            client=env.client_address,
            user=clean(user),
            sender=clean(env.sender),
            recipients=len(env.recipients),
            size=entry.size,
        )

    def held(self, entry: QueueEntry, user: str) -> None:
        self._emit(
            "held",
            "{queue_id}: HELD: user {user} passed the hourly hold threshold; release with "
            "`smarthost queue release --user {user}`",
            level="warn",
            queue_id=str(entry.queue_id),
            user=clean(user),
        )

    def auth_failed(self, client: str, user: str, mechanism: str) -> None:
        # Stable for fail2ban: failregex = ^.*smarthost: AUTH failed from <HOST> user=
        self._emit(
            "auth_failed",
            "smarthost: AUTH failed from {client} user={user} mechanism={mechanism}",
            level="warn",
            client=client,
            user=clean(user),
            mechanism=mechanism,
        )

    def auth_succeeded(self, client: str, user: str, mechanism: str) -> None:
        self._emit(
            "auth",
            "smarthost: AUTH ok from {client} user={user} mechanism={mechanism}",
            client=client,
            user=clean(user),
            mechanism=mechanism,
        )

    def refused(self, client: str, stage: str, address: str, reply: str) -> None:
        self._emit(
            "refused",
            "refused {stage} <{address}> from {client}: {reply}",
            client=client,
            stage=stage,
            address=clean(address),
            reply=reply,
        )

    def attempt(self, queue_id: QueueId, outcome: Outcome) -> None:
        self._emit(
            "delivery",
            "{queue_id}: to=<{recipient}> relay={relay} result={result} reply={reply}",
            level="info",
            queue_id=str(queue_id),
            recipient=clean(outcome.recipient.address),
            relay=outcome.remote or "none",
            result=outcome.result,
            reply=clean(outcome.reply),
        )

    def removed(self, queue_id: QueueId, why: str) -> None:
        self._emit("removed", "{queue_id}: removed ({why})", queue_id=str(queue_id), why=why)

    def bounce_sent(self, queue_id: QueueId, bounce_id: QueueId, kind: str) -> None:
        self._emit(
            "report",
            "{queue_id}: {kind} report to sender queued as {bounce_id}",
            queue_id=str(queue_id),
            bounce_id=str(bounce_id),
            kind=kind,
        )

    def notice(self, text: str, **fields: Any) -> None:
        """Start-up, recovery and configuration notices (not per-message)."""
        self._emit("notice", text, **fields)

    def warning(self, text: str, **fields: Any) -> None:
        self._emit("warning", text, level="warn", **fields)

    def error(self, text: str, **fields: Any) -> None:
        self._emit("error", text, level="error", **fields)

    def failure(self, text: str, **fields: Any) -> None:
        """An unexpected exception; call from an except block or errback."""
        self._log.failure(text, **fields)
