"""The DATA phase: turn the bytes after ``354`` into a message, or refuse them safely.

We do not use ``twisted.mail.smtp`` here because it accepts bare LF, bare CR and over-long
lines, which is what SMTP smuggling (2023) exploits: two servers that disagree on where a
message ends let a sender hide a second, forged transaction inside the first. So:

* the only end of data is ``<CRLF>.<CRLF>`` (RFC 5321 4.1.1.4);
* the first bare CR or LF stops everything at once: nothing after it can ever be read as a
  command, and the session closes the connection (as Postfix ``smtpd_forbid_bare_newline``);
* a line over 1000 octets (RFC 5321 4.5.3.1.6), a NUL octet (RFC 2045 2.7-2.8, which RFC 6152
  8BITMIME builds on; the smtpsmug scanner's NUL probes) or a message over the size limit is
  refused only at the real end, so the client stays in sync and can go on with its next
  command. A NUL never ends a message: ``<CRLF>.<NUL><CRLF>`` is content, and refused.

The work is done with ``bytes.find``/``count``/``replace`` on whole feeds, never per byte: only
the incomplete last line is kept between feeds, and not even that while a too-long line is
being skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from smarthost.core import replies as reply
from smarthost.core.replies import Reply

# RFC 5321 4.5.3.1.6: 1000 octets per line including the CRLF.
MAX_LINE = 998

_CR = 13
_END = b"\r\n.\r\n"


@attrs.frozen
class DataResult:
    """How the data phase ended; ``error`` None means a complete, valid message."""

    error: Reply | None
    fatal: bool  # the session must answer ``error`` and close: the stream cannot be trusted
    leftover: bytes  # bytes after <CRLF>.<CRLF>: pipelined commands; always b"" when fatal
    size: int  # unstuffed message size; equals the bytes written when ``error`` is None


class DataReader:
    """Reads one message's data; feed it every received chunk until it returns a result.

    ``write`` gets the dot-unstuffed bytes, CRLF kept, at most once per :meth:`feed`. Once the
    message is known to be refused (too long a line, a NUL, too big) nothing more is written;
    the caller discards what it got. ``max_size`` 0 means no limit.
    """

    def __init__(self, write: Callable[[bytes], None], max_size: int) -> None:
        self._write = write
        self._max_size = max_size
        self._tail = b""  # the incomplete last line, or just its CR while skipping a long line
        self._skipping = False  # inside a line already known to be too long
        self._too_long = False
        self._nul = False
        self._size = 0
        self._done = False

    def feed(self, data: bytes) -> DataResult | None:
        """Take the next received bytes; ``None`` means the message has not ended yet."""
        if self._done:
            raise RuntimeError("DataReader fed after the end of data")
        if self._tail:
            data, self._tail = self._tail + data, b""
        if self._skipping:
            lf = data.find(b"\n")
            if lf == -1:
                if data.find(b"\r", 0, len(data) - 1) != -1:
                    return self._fatal()
                keep = 1 if data.endswith(b"\r") else 0
                self._tail = data[len(data) - keep :]
                self._size += len(data) - keep
                return None
            if lf == 0 or data[lf - 1] != _CR or data.find(b"\r", 0, lf - 1) != -1:
                return self._fatal()
            self._skipping = False
            self._size += lf + 1
            data = data[lf + 1 :]
        # From here ``data`` starts at the beginning of a line.
        if data.startswith(b".\r\n"):
            return self._finish(b"", data[3:])
        end = data.find(_END)
        if end != -1:
            return self._finish(data[: end + 2], data[end + 5 :])
        lf = data.rfind(b"\n") + 1
        tail = data[lf:]
        # A CR is only allowed as the very last byte, where its LF may still be on the way.
        if not self._take(data[:lf]) or tail.find(b"\r", 0, len(tail) - 1) != -1:
            return self._fatal()
        cr = 1 if tail.endswith(b"\r") else 0
        unstuffed_length = len(tail) - cr - (1 if tail.startswith(b".") else 0)
        if unstuffed_length > MAX_LINE:
            self._too_long = self._skipping = True
            self._size += unstuffed_length
            tail = tail[len(tail) - cr :]
        self._tail = tail
        return None

    def _take(self, body: bytes) -> bool:
        """Check and write complete lines; False when they hold a bare CR or LF."""
        crlf = body.count(b"\r\n")
        if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
            return False
        # RFC 5321 4.5.2: the sender doubled every leading dot; the stuffed ones do not count.
        lead = body.startswith(b".")
        self._size += len(body) - body.count(b"\r\n.") - lead
        if self._too_long or self._over_size or not body:
            return True  # the verdict is made: NUL (the weakest) could not change it
        unstuffed = body.replace(b"\r\n.", b"\r\n")
        if lead:
            unstuffed = unstuffed[1:]
        # RFC 5321 4.5.3.1.6 does not count the stuffed dot, so measure unstuffed lines. A
        # batch no longer than one maximal line cannot hold a too-long one.
        if len(unstuffed) > MAX_LINE + 2 and max(map(len, unstuffed.split(b"\r\n"))) > MAX_LINE:
            self._too_long = True
        elif self._nul or b"\0" in unstuffed:
            self._nul = True  # nothing more is written; lines are still measured
        else:
            self._write(unstuffed)
        return True

    @property
    def _over_size(self) -> bool:
        return 0 < self._max_size < self._size

    def _finish(self, body: bytes, leftover: bytes) -> DataResult:
        if not self._take(body):
            return self._fatal()
        self._done = True
        # Size wins over line length, and line length over NUL, so the verdict does not depend
        # on how bytes were chunked (the first part of a too-long line may never be looked at).
        error = None
        if self._over_size:
            error = reply.TOO_BIG
        elif self._too_long:
            error = reply.DATA_LINE_TOO_LONG
        elif self._nul:
            error = reply.NUL_IN_DATA
        return DataResult(error, fatal=False, leftover=leftover, size=self._size)

    def _fatal(self) -> DataResult:
        self._done = True
        self._tail = b""
        return DataResult(reply.BARE_LINE_ENDING, fatal=True, leftover=b"", size=self._size)


class HeaderCapture:
    """Keeps the header section of a message as it streams past (for plugins that look at
    headers), so nobody has to read the spooled file back for them. Bounded: a header section
    longer than ``limit`` is cut there (the message itself is not)."""

    def __init__(self, limit: int = 256 * 1024) -> None:
        self._buffer = bytearray()
        self._limit = limit
        self._done = False

    def feed(self, data: bytes) -> None:
        if self._done:
            return
        start = max(0, len(self._buffer) - 3)
        self._buffer += data
        if self._buffer.startswith(b"\r\n"):  # no header section at all
            self._buffer.clear()
            self._done = True
            return
        end = self._buffer.find(b"\r\n\r\n", start)
        if end >= 0:
            del self._buffer[end + 2 :]
            self._done = True
        elif len(self._buffer) > self._limit:
            del self._buffer[self._limit :]
            self._done = True

    @property
    def value(self) -> bytes:
        return bytes(self._buffer)
