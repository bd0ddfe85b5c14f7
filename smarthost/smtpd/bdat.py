"""CHUNKING (RFC 3030): a message sent as ``BDAT <size> [LAST]`` chunks instead of DATA.

A chunk is exactly ``size`` octets read straight from the connection's buffer (through the
transport's :meth:`~smarthost.smtpd.channel.Channel.read_data`, so BDAT has DATA's deadlines,
data-rate credit and flow control): nothing in it is a command or an end of data, it is never
dot-unstuffed, and what is taken is stored byte for byte.

The content rules are DATA's, checked across chunk boundaries (a line, even a CRLF, may be
split between two chunks):

* a NUL octet is refused (RFC 2045 2.7-2.8, as in DATA: we offer 8BITMIME, not BINARYMIME);
* a line over 1000 octets with its CRLF is refused (RFC 5321 4.5.3.1.6);
* a bare CR or LF is refused too. Here it cannot end the message or smuggle a command into
  *our* session: a BDAT body is framed by its octet count. But we relay: the message goes to
  the next hop over DATA when that hop lacks CHUNKING, and a hop that takes a bare LF or CR as
  a line end would read ``<LF>.<CR><LF>`` or ``<CR>.<CR>`` inside it as the end of data and
  what follows as a new, forged transaction (SMTP smuggling, 2023). Only CRLF-clean content
  cannot be misread anywhere, so only that is taken (Postfix's ``smtpd_forbid_bare_newline``
  applies to BDAT the same way). Unlike in DATA the session stays usable: the stream is in
  sync, so the answer is ``550 5.6.0`` and the client may go on.
* the sum of the chunks is held to the SIZE limit; a chunk that would pass it is refused
  ``552 5.3.4`` when it is announced, so it is never stored.

RFC 3030 2: every chunk's octets are read before it is answered, whatever the answer. Once a
chunk of a transaction is refused, the message is dropped (the spool file goes at once), and
every later chunk of that transaction (a pipelining client may have sent them already) is
still read by its declared size, discarded as it streams past and answered with the same
refusal, until ``BDAT ... LAST`` or RSET ends the transaction. The session's error limits
count that refusal once (a client pipelining a big message may have dozens of chunks in
flight). A message the client leaves without a final CRLF is stored as it came: delivery
completes its last line, as for DATA.
"""

from __future__ import annotations

from collections.abc import Callable

from smarthost.core import replies as reply
from smarthost.core.replies import Reply
from smarthost.smtpd.channel import Channel
from smarthost.smtpd.dotreader import MAX_LINE, DataResult
from smarthost.smtpd.reception import Reception

# A chunk size has at most this many digits: 10^18 octets is more than any client can send,
# and Python's int() would take any length.
MAX_SIZE_DIGITS = 18


def parse_bdat(arg: str) -> tuple[int, bool] | None:
    """RFC 3030 2: ``BDAT SP chunk-size [SP end-marker]``, chunk-size ``1*DIGIT``, the end
    marker ``LAST``; (size, last), or None for anything else."""
    words = arg.split(" ")
    size = words[0]
    if not 1 <= len(words) <= 2 or not (size.isascii() and size.isdigit()):
        return None
    if len(size) > MAX_SIZE_DIGITS or (len(words) == 2 and words[1].upper() != "LAST"):
        return None
    return int(size), len(words) == 2


class ChunkReader:
    """Takes exactly one chunk's octets from the stream (a
    :class:`~smarthost.smtpd.channel.DataSink`): they go to ``take`` as they arrive, and the
    bytes after the chunk come back as ``leftover`` (pipelined commands). Nothing is kept."""

    def __init__(self, size: int, take: Callable[[bytes], None] | None = None,
                 on_abort: Callable[[], None] = lambda: None) -> None:
        """``take`` None: the octets are discarded (a chunk refused outright)."""
        self.size = size
        self.remaining = size  # the transport hands it no more (channel.DataSink)
        self._take = take if take is not None else _discard
        self._on_abort = on_abort

    def feed(self, data: bytes) -> DataResult | None:
        n = min(self.remaining, len(data))
        if n:
            self._take(data[:n] if n < len(data) else data)
            self.remaining -= n
        if self.remaining:
            return None
        return DataResult(None, fatal=False, leftover=data[n:], size=self.size)

    def abort(self) -> None:
        self._on_abort()


def read_chunk(
    channel: Channel, reader: ChunkReader, done: Callable[[DataResult], None]
) -> None:
    """Read one chunk, then call ``done``. ``BDAT 0`` has no octets to wait for: ``done`` is
    called at once (the transport only feeds a reader when bytes are buffered)."""
    if reader.size == 0:
        done(DataResult(None, fatal=False, leftover=b"", size=0))
    else:
        channel.read_data(reader, done)


# When several rules are broken, the refusal names the worst (as DATA's reader does): size,
# then a bare line ending, then line length, then NUL; a storage failure outranks them all.
_RANK = {reply.NUL_IN_DATA: 1, reply.DATA_LINE_TOO_LONG: 2, reply.BDAT_BARE_LINE_ENDING: 3,
         reply.TOO_BIG: 4}
_WORST = 5


class ChunkedBody:
    """The content rules of the module docstring, applied to a message's chunks in order;
    ``write`` gets the octets unchanged while no rule is broken, and nothing after.

    A chunk's verdict is the worst fault in the message up to its end, whatever packets its
    octets came in (a NUL seen first does not hide a bare LF later in the same chunk); once a
    refused chunk has been answered (:meth:`seal`), the verdict stands.

    Work is done per feed with ``bytes.count``/``find``/``split``, never per octet; between
    feeds only two numbers are kept: the length of the line not yet ended, and whether the
    last octet was a CR (whose LF may open the next chunk)."""

    def __init__(self, write: Callable[[bytes], None], max_size: int) -> None:
        self._write = write
        self._max_size = max_size  # 0: no limit
        self.announced = 0  # octets of every chunk announced so far
        self._line = 0  # octets of the line not yet ended, its CR not counted
        self._cr = False  # the last octet fed was a CR
        self._sealed = False  # a refusal has been answered: nothing more is looked at
        self.error: Reply | None = None

    def announce(self, size: int) -> None:
        """A chunk of ``size`` octets is about to come: over the SIZE limit it is refused
        before any of it is read."""
        self.announced += size
        if 0 < self._max_size < self.announced:
            self.fail(reply.TOO_BIG)

    def fail(self, error: Reply) -> None:
        """Refuse the message with ``error``, unless it is refused for worse already (or
        the refusal has been answered)."""
        if self._sealed:
            return
        if self.error is None or _RANK.get(error, _WORST) > _RANK.get(self.error, _WORST):
            self.error = error

    def seal(self) -> None:
        """A chunk has been answered: a refusal stands from here on."""
        self._sealed = self.error is not None

    def feed(self, data: bytes) -> None:
        if not data or self._sealed or self._rank() >= _RANK[reply.BDAT_BARE_LINE_ENDING]:
            return  # answered, or nothing worse could be found
        error = self._check(data)
        if error is not None:
            self.fail(error)
        elif self.error is None:
            self._write(data)

    def finish(self) -> Reply | None:
        """The message has ended (``LAST``): a CR as its very last octet is bare."""
        if self._cr and not self._sealed:
            self.fail(reply.BDAT_BARE_LINE_ENDING)
        return self.error

    def _rank(self) -> int:
        return 0 if self.error is None else _RANK.get(self.error, _WORST)

    def _check(self, data: bytes) -> Reply | None:
        """Which rule ``data`` breaks, if any (the worst first); keeps the line state."""
        start = 0
        if self._cr:
            if data[0] != 0x0A:  # the CR that ended the previous chunk was bare
                return reply.BDAT_BARE_LINE_ENDING
            start = 1
        end = len(data) - 1 if data.endswith(b"\r") else len(data)
        crlf = data.count(b"\r\n", start, end)
        if data.count(b"\r", start, end) != crlf or data.count(b"\n", start, end) != crlf:
            return reply.BDAT_BARE_LINE_ENDING
        if self._too_long(data, start, end):
            return reply.DATA_LINE_TOO_LONG
        if b"\0" in data:
            return reply.NUL_IN_DATA
        return None

    def _too_long(self, data: bytes, start: int, end: int) -> bool:
        """Whether a line of ``data[:end]`` (the unfinished one included) is over MAX_LINE
        octets; every LF in it is known to follow a CR. Updates the line state."""
        if start:
            self._line = 0  # the LF of the previous chunk's CR ended its line
        self._cr = end < len(data)
        first = data.find(b"\n", start, end)
        if first == -1:
            self._line += end - start
            return self._line > MAX_LINE
        if self._line + first - 1 - start > MAX_LINE:  # the open line, ended by a CRLF here
            return True
        last = data.rfind(b"\n", start, end)
        self._line = end - last - 1
        if self._line > MAX_LINE:
            return True
        # A stretch no longer than one maximal line cannot hold a too-long line.
        middle = last - first
        if middle <= MAX_LINE + 2:
            return False
        return max(map(len, data[first + 1 : last].split(b"\n"))) - 1 > MAX_LINE


class ChunkedMessage:
    """One transaction's BDAT chunks on their way into the spool (``reception``; None when
    the spool could not even start the message, whose refusal is ``initial_error``)."""

    def __init__(
        self, reception: Reception | None, max_size: int, initial_error: Reply | None = None
    ) -> None:
        self.reception = reception
        write = reception.write if reception is not None else _discard
        self._body = ChunkedBody(write, max_size)
        self._told = False  # the client has had the refusal once
        if initial_error is not None:
            self._body.fail(initial_error)

    @property
    def size(self) -> int:
        """Octets announced so far: the message's size once ``LAST`` has been read."""
        return self._body.announced

    def chunk(self, size: int) -> ChunkReader:
        """The reader for the next chunk; refused chunks are read all the same."""
        self._body.announce(size)
        return ChunkReader(size, self._body.feed, self.abort)

    def verdict(self, *, last: bool) -> Reply | None:
        """After a chunk: the refusal of the whole message, if it has one by now (after the
        first time, marked ``repeated``). A refused message is dropped from the spool at
        once."""
        error = self._body.finish() if last else self._body.error
        if error is None and self.reception is not None and self.reception.write_failed:
            self._body.fail(reply.NO_STORAGE)
            error = reply.NO_STORAGE
        self._body.seal()
        if error is None:
            return None
        self.abort()
        if self._told:
            return error.repeat()
        self._told = True
        return error

    def abort(self) -> None:
        """Drop the message (refused, RSET, a new EHLO, the connection gone); idempotent."""
        if self.reception is not None:
            self.reception.abort()


def _discard(data: bytes) -> None:
    """Where the octets of a chunk nobody will keep go."""
