"""Every operator-facing log line, in one place.

Each event is one method with named fields. The line is formatted here and goes to twistd's
log through ``twisted.logger``; when ``[log] events`` is set, the same event (its name, time,
level, structured fields and the line itself) is appended there as one JSON object per line.

No value from outside (a client, a remote server, a plugin's reply, a DNS name) can forge a
line or a fail2ban match for someone else. Each is written in one of three ways:

- a *token* (user names, client and relay names, mechanisms) is bare when it is made only
  of characters that need no care, and otherwise in double quotes with every space, quote,
  backslash, control and non-ASCII character escaped: ``user=alice``, ``user="a\\x20b"``;
- an *address* inside ``<...>`` gets the same escapes, ``<`` and ``>`` included;
- *prose* (replies from remote servers and plugins, reasons) keeps its spaces but has ``=``,
  backslash, control and non-ASCII characters escaped: ``reply=550 5.1.1 <b@y>: unknown``.

So no value ever holds a line break (the shipped fail2ban filter anchors on the start of a
line, which only twistd writes); a token or an address never holds a space, so never a
phrase of another line such as ``AUTH failed from``; and prose never holds ``key=``, so never
a field. The escapes are ``\\\\``, ``\\"``, ``\\n``, ``\\r``, ``\\t``, ``\\xHH``, ``\\uHHHH`` and
``\\UHHHHHHHH``. The JSON events carry the values as received (JSON escapes them itself).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from time import time as wall_clock
from typing import Any, BinaryIO

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.python.reflect import qual

from smarthost.core.envelope import Outcome, QueueEntry, QueueId

# Printable ASCII that a bare token may hold: no space, quote, backslash, "=", "<", ">",
# parentheses, comma or semicolon, which frame the fields of our lines.
_BARE_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-./:?@^_`{|}~\[\]]+\Z")
_SHORT = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What each kind escapes besides control and non-ASCII characters (always escaped).
_TOKEN_SPECIALS = frozenset(' "\\')
_ADDRESS_SPECIALS = frozenset(' "\\<>')
_PROSE_SPECIALS = frozenset("\\=")
_LINE_SPECIALS = frozenset("\\")
# The error text of a failure in the events file: enough to act on, never a traceback.
_MAX_ERROR = 1000
_FORWARDED_LEVELS = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}
# The key under which each per-message event of :class:`MailLog` carries its line, already
# text: a text observer that knows it (smarthost.app.textlog) writes it as it is, and may let
# it wait for the end of the reactor's iteration. A notice has no such key: it is rare, and
# someone may be waiting for it (systemd's READY=1 follows "ready" at once).
TEXT_KEY = "log_smarthost_text"
# The name of a per-message event (as in ``[log] events``: "accepted", "delivery",
# "auth_failed"...), under which an observer (smarthost.app.activity) recognises it.
EVENT_KEY = "log_smarthost_event"


def _needs_escape(specials: frozenset[str]) -> re.Pattern[str]:
    """What :func:`_escape` changes: a character outside printable ASCII, or a special."""
    return re.compile(r"[^\x20-\x7e]|[" + re.escape("".join(sorted(specials))) + "]")


_NEEDS_ESCAPE = {
    specials: _needs_escape(specials)
    for specials in (_TOKEN_SPECIALS, _ADDRESS_SPECIALS, _PROSE_SPECIALS, _LINE_SPECIALS)
}


def _escape(text: str, specials: frozenset[str]) -> str:
    # Nearly every value is plain (an address, a remote's reply): one regex search in C
    # instead of a Python loop over its characters.
    if _NEEDS_ESCAPE[specials].search(text) is None:
        return text
    out: list[str] = []
    for char in text:
        code = ord(char)
        if 0x20 <= code < 0x7F and char not in specials:
            out.append(char)
        elif char in _SHORT:
            out.append(_SHORT[char])
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def token(value: object) -> str:
    """A name as one word: bare when plain, otherwise quoted with nothing a reader (or a
    regex) could take for a space, a quote or a line break."""
    text = str(value)
    if _BARE_TOKEN.match(text):
        return text
    return f'"{_escape(text, _TOKEN_SPECIALS)}"'


def address(value: object) -> str:
    """An address for ``<...>``: no space, no angle bracket, no quote left unescaped."""
    return _escape(str(value), _ADDRESS_SPECIALS)


def prose(value: object) -> str:
    """Free text at the end of a line (a remote reply): spaces kept, no field, no break."""
    return _escape(str(value), _PROSE_SPECIALS)


def one_line(value: object) -> str:
    """A value in a notice: on this line, whatever it holds."""
    return _escape(str(value), _LINE_SPECIALS)


def _literal(line: str) -> str:
    # twisted.logger formats the text it is given; ours is already formatted.
    return line.replace("{", "{{").replace("}", "}}")


def _shown(value: Any) -> Any:
    """A notice field as the text line shows it: numbers stay numbers (format specs work
    on them), anything else becomes one escaped line."""
    if isinstance(value, int | float):
        return value
    return one_line(value)


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


_events_log = Logger(namespace="smarthost.events")


class EventFile:
    """The JSON-lines audit log. Appends go through the OS buffer in one write each.

    :meth:`reopen` opens the path again (for logrotate, on SIGUSR1): the new file is opened
    before the old one is closed, so no event is lost in between.

    A write that fails (the log's disk full, the file closed) never reaches the mail: the
    event is lost, the first loss of an outage is logged (to twistd's log; this warning's own
    trip to this file fails quietly) and so is the first write that works again. An audit log
    must not stop the mail it records: the 250 a message earned must still go out.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
        self._file = self._open()
        self._failing = False

    def _open(self) -> BinaryIO:
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return os.fdopen(fd, "ab", buffering=0)

    def write(self, event: Mapping[str, Any]) -> None:
        # ASCII only: a U+2028 or U+0085 from a client stays an escape, so every reader's
        # idea of a line (Python's splitlines() included) is one event.
        data = json.dumps(event, ensure_ascii=True, default=str).encode("ascii") + b"\n"
        try:
            self._file.write(data)
        except (OSError, ValueError) as e:  # ValueError: written after close()
            if not self._failing:
                self._failing = True
                _events_log.warn("cannot write the events file {path}: {error}; events are "
                                 "lost until it can be written again", path=self._path,
                                 error=str(e))
            return
        if self._failing:
            self._failing = False
            _events_log.info("the events file {path} is written again", path=self._path)

    def reopen(self) -> None:
        new = self._open()
        old, self._file = self._file, new
        old.close()

    def close(self) -> None:
        self._file.close()


class MailLog:
    def __init__(self, clock: IReactorTime, events: EventFile | None = None) -> None:
        self._log = Logger(namespace="smarthost")
        self._clock = clock
        self._events = events

    # -- the plumbing ------------------------------------------------------------------------

    def _emit(self, event: str, line: str, level: str = "info", **fields: Any) -> None:
        # The line is formatted here (in C, by f-strings and str.format) and handed on as a
        # literal: the log observer's own formatter is pure Python and took a tenth of the
        # reactor's time at three lines per message. The fields still travel with the event.
        self._publish(_LEVELS[level], line, fields, event)
        self._write(event, level, line, fields)

    def _publish(self, level: LogLevel, line: str, fields: dict[str, Any],
                 per_message: str | None = None) -> None:
        """What ``Logger.emit`` does, for a line that is already text: the same event keys,
        without its check that the level is one (ours always are), and marked flattened
        (``log_flattened``, empty: the format is a literal, it has no fields), so a text
        observer renders it with one pass of ``flatFormat`` instead of
        ``string.Formatter``'s Python loop; the text is the same. A per-message event
        (``per_message``, its name) carries its line under :data:`TEXT_KEY` as well, for the
        daemon's own text observers, which write it without rendering anything, and its
        name under :data:`EVENT_KEY`. Two lines or more per message: it counts (one
        dict literal instead of ``dict()`` and ``update``: 0.63 µs an event instead of 0.72)."""
        log = self._log
        event = {
            **fields, "log_logger": log, "log_level": level, "log_namespace": log.namespace,
            "log_source": log.source,
            "log_format": _literal(line) if "{" in line or "}" in line else line,
            "log_time": wall_clock(), "log_flattened": {},
        }
        if per_message is not None:
            event[TEXT_KEY] = line
            event[EVENT_KEY] = per_message
        log.observer(event)

    def _write(self, event: str, level: str, line: str, fields: Mapping[str, Any],
               time: float | None = None) -> None:
        if self._events is None:
            return
        record: dict[str, Any] = {
            "time": self._clock.seconds() if time is None else time,
            "event": event,
            "level": level,
        }
        for key, value in fields.items():
            record.setdefault(key, _json_value(value))  # the names above win
        record["text"] = line
        self._events.write(record)

    def _free(self, event: str, text: str, level: str, fields: dict[str, Any]) -> None:
        """A notice with a format of its own: its values escaped onto one line."""
        shown = {key: _shown(value) for key, value in fields.items()}
        try:
            line = text.format(**shown)
        except (KeyError, IndexError, ValueError, AttributeError):
            # Not plain str.format syntax: twisted.logger renders it (or says it cannot),
            # from the escaped values all the same.
            getattr(self._log, level)(text, **shown)
            self._write(event, level, formatEvent({"log_format": text, **shown}), fields)
            return
        self._publish(_LEVELS[level], line, fields)
        self._write(event, level, line, fields)

    def reopen(self) -> None:
        """Reopen the events file, if any (SIGUSR1, after logrotate moved it)."""
        if self._events is not None:
            self._events.reopen()

    def forward(self, event: Mapping[str, Any]) -> None:
        """A ``twisted.logger`` observer: warnings, errors and failures that other parts
        log under their own ``smarthost.*`` namespace (a delivery crash, a plugin that
        failed) go to the events file too. Add it to the global log publisher; this
        class's own events (namespace ``smarthost``) are written directly and skipped."""
        # The level first: nearly every event is info, and this sees every event.
        level: LogLevel | None = event.get("log_level")
        if level is None or level not in _FORWARDED_LEVELS or self._events is None:
            return
        namespace = str(event.get("log_namespace", ""))
        if not namespace.startswith("smarthost."):
            return
        fields: dict[str, Any] = {
            key: value for key, value in event.items()
            if not key.startswith("log_") and isinstance(value, str | int | float | bool)
        }
        fields["namespace"] = namespace
        failure = event.get("log_failure")
        kind = "warning" if level is LogLevel.warn else "error"
        if isinstance(failure, Failure):
            kind = "failure"
            fields.update(_failure_fields(failure))
        line = one_line(formatEvent(dict(event)))
        self._write(kind, level.name, line, fields, time=event.get("log_time"))

    # -- per message -------------------------------------------------------------------------

    def accepted(self, entry: QueueEntry, user: str) -> None:
        env = entry.envelope
        self._emit(
            "accepted",
            f"{token(entry.queue_id)}: accepted from {token(env.client_address)} as "
            f"{token(user)} sender=<{address(env.sender)}> "
            f"recipients={len(env.recipients)} size={entry.size}",
            queue_id=str(entry.queue_id),
            client=env.client_address,
            user=user,
            sender=env.sender,
            recipients=len(env.recipients),
            size=entry.size,
        )

    def held(self, entry: QueueEntry, user: str) -> None:
        self._emit(
            "held",
            f"{token(entry.queue_id)}: HELD: user {token(user)} passed the hourly hold "
            f"threshold; release with `smarthost queue release --user {token(user)}`",
            level="warn",
            queue_id=str(entry.queue_id),
            user=user,
        )

    def refused(self, client: str, stage: str, subject: str, reply: str) -> None:
        self._emit(
            "refused",
            f"refused {token(stage)} <{address(subject)}> from {token(client)}: {prose(reply)}",
            client=client,
            stage=stage,
            address=subject,
            reply=reply,
        )

    # -- AUTH --------------------------------------------------------------------------------

    def auth_failed(self, client: str, user: str, mechanism: str) -> None:
        # Stable for fail2ban (contrib/fail2ban/filter.d/smarthost.conf anchors on it).
        self._emit(
            "auth_failed",
            f"smarthost: AUTH failed from {token(client)} user={token(user)} "
            f"mechanism={token(mechanism)}",
            level="warn",
            client=client,
            user=user,
            mechanism=mechanism,
        )

    def auth_without_secret(self, client: str, user: str, mechanism: str) -> None:
        """A user who exists tried a mechanism the users file has no secret for (an
        ``htpasswd -B`` line and CRAM-MD5): nothing was guessed, the client falls back to
        another mechanism. Deliberately not the fail2ban line."""
        self._emit(
            "auth_without_secret",
            f"smarthost: AUTH without secret from {token(client)} user={token(user)} "
            f"mechanism={token(mechanism)}: the users file has no {token(mechanism)} secret "
            "for this user (smarthost passwd derives it); not counted as a failure",
            client=client,
            user=user,
            mechanism=mechanism,
        )

    def auth_succeeded(self, client: str, user: str, mechanism: str) -> None:
        self._emit(
            "auth",
            f"smarthost: AUTH ok from {token(client)} user={token(user)} "
            f"mechanism={token(mechanism)}",
            client=client,
            user=user,
            mechanism=mechanism,
        )

    # -- delivery ----------------------------------------------------------------------------

    def attempt(self, queue_id: QueueId, outcome: Outcome) -> None:
        relay = outcome.remote or "none"
        self._emit(
            "delivery",
            f"{token(queue_id)}: to=<{address(outcome.recipient.address)}> "
            f"relay={token(relay)} result={token(outcome.result)} reply={prose(outcome.reply)}",
            queue_id=str(queue_id),
            recipient=outcome.recipient.address,
            relay=relay,
            result=str(outcome.result),
            reply=outcome.reply,
        )

    def removed(self, queue_id: QueueId, why: str) -> None:
        self._emit("removed", f"{token(queue_id)}: removed ({prose(why)})",
                   queue_id=str(queue_id), why=why)

    def bounce_sent(self, queue_id: QueueId, bounce_id: QueueId, kind: str) -> None:
        self._emit(
            "report",
            f"{token(queue_id)}: {token(kind)} report to sender queued as {token(bounce_id)}",
            queue_id=str(queue_id),
            bounce_id=str(bounce_id),
            kind=kind,
        )

    # -- the daemon --------------------------------------------------------------------------

    def notice(self, text: str, **fields: Any) -> None:
        """Start-up, recovery and configuration notices (not per-message)."""
        self._free("notice", text, "info", fields)

    def warning(self, text: str, **fields: Any) -> None:
        self._free("warning", text, "warn", fields)

    def error(self, text: str, **fields: Any) -> None:
        self._free("error", text, "error", fields)

    def failure(self, text: str, failure: Failure | None = None, **fields: Any) -> None:
        """An unexpected exception; call from an except block or errback. The text log gets
        the traceback; the events file the exception's type and message, never the
        traceback (whose frames may show what a client sent)."""
        failure = failure if failure is not None else Failure()  # type: ignore[no-untyped-call]
        try:
            line = text.format(**{key: _shown(value) for key, value in fields.items()})
        except (KeyError, IndexError, ValueError, AttributeError):
            line = one_line(formatEvent({"log_format": text, **fields}))
        self._log.failure(_literal(line), failure, **fields)
        self._write("failure", "critical", line, {**fields, **_failure_fields(failure)})


def _failure_fields(failure: Failure) -> dict[str, str]:
    kind = failure.type
    return {"error_type": qual(kind) if kind is not None else "unknown",
            "error": failure.getErrorMessage()[:_MAX_ERROR]}
