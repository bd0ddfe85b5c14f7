"""The DATA reader: end of data, SMTP smuggling, line and size limits, chunking."""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smarthost.core import replies as reply
from smarthost.smtpd.dotreader import MAX_LINE, DataReader, DataResult

COMMANDS = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"


def run(chunks: Iterable[bytes], max_size: int = 0) -> tuple[DataResult | None, bytes, bytes]:
    """Feed ``chunks`` as a session would; return the result, the bytes written, and every
    byte the session would read as commands (leftover plus the chunks not fed)."""
    written: list[bytes] = []
    reader = DataReader(written.append, max_size)
    chunks = iter(chunks)
    for chunk in chunks:
        result = reader.feed(chunk)
        if result is not None:
            with pytest.raises(RuntimeError):
                reader.feed(b"x")
            assert b"" not in written
            return result, b"".join(written), result.leftover + b"".join(chunks)
    return None, b"".join(written), b""


def split_at(data: bytes, points: Iterable[int]) -> list[bytes]:
    cuts = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


def reference(data: bytes, max_size: int) -> tuple[DataResult, bytes] | None:
    """A slow, obviously-correct model: byte by byte, line by line."""
    pos, size, too_long, nul, out = 0, 0, False, False, bytearray()
    while True:
        i = pos
        while i < len(data) and data[i] not in b"\r\n":
            i += 1
        if i == len(data) or (data[i] == 13 and i + 1 == len(data)):
            return None
        if data[i] == 10 or data[i + 1] != 10:
            return DataResult(reply.BARE_LINE_ENDING, True, b"", -1), bytes(out)
        line, pos = data[pos:i], i + 2
        if line == b".":
            error = None
            if 0 < max_size < size:
                error = reply.TOO_BIG
            elif too_long:
                error = reply.DATA_LINE_TOO_LONG
            elif nul:
                error = reply.NUL_IN_DATA
            return DataResult(error, False, data[pos:], size), bytes(out)
        if line.startswith(b"."):
            line = line[1:]
        too_long = too_long or len(line) > MAX_LINE
        nul = nul or b"\0" in line
        size += len(line) + 2
        out += line + b"\r\n"


# --- the normal cases -------------------------------------------------------------------------


def test_normal_message() -> None:
    message = b"Subject: hi\r\nFrom: <a@example.com>\r\n\r\nHello.\r\n"
    result, written, rest = run([message + b".\r\n"])
    assert result == DataResult(None, False, b"", len(message))
    assert written == message
    assert rest == b""


def test_empty_message() -> None:
    result, written, _ = run([b".\r\nQUIT\r\n"])
    assert result == DataResult(None, False, b"QUIT\r\n", 0)
    assert written == b""


def test_empty_line_then_end() -> None:
    result, written, _ = run([b"\r\n.\r\n"])
    assert result is not None and result.error is None
    assert written == b"\r\n"


def test_dot_unstuffing() -> None:
    wire = b"..first\r\nplain\r\n..\r\n...\r\n.x\r\n. \r\n\r\n.\r\n"
    result, written, _ = run([wire])
    assert result is not None and result.error is None
    assert written == b".first\r\nplain\r\n.\r\n..\r\nx\r\n \r\n\r\n"
    assert result.size == len(written)


def test_leftover_pipelined_commands() -> None:
    result, written, _ = run([b"hi\r\n.\r\n" + COMMANDS])
    assert result is not None and result.error is None
    assert result.leftover == COMMANDS
    assert written == b"hi\r\n"


def test_leftover_is_not_checked_for_bare_line_endings() -> None:
    """What follows the end is command input: the session, not the reader, judges it."""
    result, _, _ = run([b"hi\r\n.\r\nQUIT\n"])
    assert result == DataResult(None, False, b"QUIT\n", 4)


def test_one_write_per_feed() -> None:
    calls: list[bytes] = []
    reader = DataReader(calls.append, 0)
    assert reader.feed(b"a\r\nb\r\n.c\r\nd") is None
    assert calls == [b"a\r\nb\r\nc\r\n"]
    assert reader.feed(b"\r\n.\r\n") is not None
    assert calls == [b"a\r\nb\r\nc\r\n", b"d\r\n"]


# --- SMTP smuggling -----------------------------------------------------------------------------

BARE_ENDINGS = [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\rX"]
NUL_ENDINGS = [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n\x00.\x00\r\n"]


@pytest.mark.parametrize("fake_end", BARE_ENDINGS)
def test_smuggling_bare_endings_are_fatal(fake_end: bytes) -> None:
    wire = b"Subject: a\r\n\r\nhi" + fake_end + COMMANDS + b"evil\r\n.\r\n" + COMMANDS
    result, _, _ = run([wire])
    assert result is not None
    assert (result.error, result.fatal, result.leftover) == (reply.BARE_LINE_ENDING, True, b"")
    for chunks in ([wire[i : i + 1] for i in range(len(wire))], split_at(wire, [len(wire) // 2])):
        result, _, _ = run(chunks)
        assert result is not None and result.fatal
        assert result.leftover == b""


@pytest.mark.parametrize("fake_end", NUL_ENDINGS)
def test_smuggling_nul_endings_are_message_content_and_refused(fake_end: bytes) -> None:
    """A NUL never ends the message early, and a message with one is refused at its real end
    (RFC 2045 2.7-2.8, RFC 6152): the client stays in sync, nothing is kept."""
    wire = b"hi" + fake_end + COMMANDS
    result, written, _ = run([wire])
    assert result is None
    for chunks in ([wire, b".\r\nQUIT\r\n"], [wire[i : i + 1] for i in range(len(wire))]
                   + [b".\r\nQUIT\r\n"]):
        result, written, rest = run(chunks)
        assert result is not None
        assert (result.error, result.fatal) == (reply.NUL_IN_DATA, False)
        assert b"\0" not in written and COMMANDS not in written
        assert rest == b"QUIT\r\n"


def test_nul_is_refused_anywhere_and_weaker_than_the_other_verdicts() -> None:
    for wire in (b"a\0b\r\n.\r\n", b"Subject: \0\r\n\r\nx\r\n.\r\n", b"\0\r\n.\r\n"):
        result, _, _ = run([wire])
        assert result is not None and result.error == reply.NUL_IN_DATA, wire
    long_line = b"y" * (MAX_LINE + 1) + b"\r\n"
    result, _, _ = run([b"\0\r\n" + long_line + b".\r\n"])
    assert result is not None and result.error == reply.DATA_LINE_TOO_LONG
    result, _, _ = run([b"\0\r\n" + b"x" * 50 + b"\r\n.\r\n"], max_size=20)
    assert result is not None and result.error == reply.TOO_BIG


def test_bare_line_ending_is_fatal_at_once() -> None:
    """No need to wait for an end that a smuggler would supply: stop at the first bare LF."""
    for wire in (b"abc\ndef", b"abc\rdef", b"abc\r\n\n", b"\n", b"\rX"):
        result, _, _ = run([wire])
        assert result is not None and result.fatal, wire


def test_cr_at_chunk_end_is_not_bare() -> None:
    result, written, rest = run([b"abc\r", b"\ndef\r", b"\n.\r", b"\nQUIT\r\n"])
    assert result is not None and result.error is None
    assert written == b"abc\r\ndef\r\n"
    assert rest == b"QUIT\r\n"


def test_bare_line_ending_inside_long_line_is_fatal() -> None:
    for tail in (b"\n", b"\rX", b"\r\r\n", b"\r\r"):
        result, _, _ = run([b"x" * 2000, b"y" * 10 + tail, b"\r\n.\r\n"])
        assert result is not None and result.fatal, tail
    for after_cr in (b"X", b"\r\n", b"\r"):
        result, _, _ = run([b"x" * 2000 + b"\r", after_cr])
        assert result is not None and result.fatal, after_cr


# --- chunking -----------------------------------------------------------------------------------

SPLIT_WIRE = b"A: b\r\n\r\n.dot\r\n\r\nend\r\n.\r\nQUIT\r\n"
SPLIT_BODY = b"A: b\r\n\r\ndot\r\n\r\nend\r\n"


def test_every_single_split_point() -> None:
    for i in range(len(SPLIT_WIRE) + 1):
        result, written, rest = run(split_at(SPLIT_WIRE, [i]))
        assert result is not None and result.error is None, i
        assert (written, rest) == (SPLIT_BODY, b"QUIT\r\n"), i


def test_every_pair_of_split_points() -> None:
    for i, j in itertools.combinations_with_replacement(range(len(SPLIT_WIRE) + 1), 2):
        result, written, rest = run(split_at(SPLIT_WIRE, [i, j]))
        assert result is not None and result.error is None, (i, j)
        assert (written, rest) == (SPLIT_BODY, b"QUIT\r\n"), (i, j)


def test_byte_by_byte() -> None:
    result, written, rest = run(SPLIT_WIRE[i : i + 1] for i in range(len(SPLIT_WIRE)))
    assert result is not None and result.error is None
    assert (written, rest) == (SPLIT_BODY, b"QUIT\r\n")


# --- line length --------------------------------------------------------------------------------


@pytest.mark.parametrize("stuffed", [False, True])
def test_line_of_998_is_accepted(stuffed: bool) -> None:
    line = (b"." if stuffed else b"") + b"x" * MAX_LINE
    for chunks in ([line + b"\r\n.\r\nQUIT\r\n"], [line + b"\r", b"\n.\r\nQUIT\r\n"]):
        result, written, rest = run(chunks)
        assert result is not None and result.error is None
        assert written == line.removeprefix(b".") + b"\r\n"
        assert rest == b"QUIT\r\n"


@pytest.mark.parametrize("where", ["one chunk", "line alone", "cr split", "byte by byte"])
def test_line_of_999_is_refused_at_the_end(where: str) -> None:
    line = b"y" * (MAX_LINE + 1)
    wire = b"ok\r\n" + line + b"\r\nmore\r\n.\r\nQUIT\r\n"
    chunks = {
        "one chunk": [wire],
        "line alone": [b"ok\r\n", line, b"\r\nmore\r\n.\r\nQUIT\r\n"],
        "cr split": [b"ok\r\n" + line + b"\r", b"\nmore\r\n.\r\nQUIT\r\n"],
        "byte by byte": [wire[i : i + 1] for i in range(len(wire))],
    }[where]
    result, written, rest = run(chunks)
    assert result is not None
    assert (result.error, result.fatal) == (reply.DATA_LINE_TOO_LONG, False)
    assert result.size == len(wire) - len(b".\r\nQUIT\r\n")
    assert rest == b"QUIT\r\n"
    assert line not in written


def test_too_long_line_is_never_cut_into_an_end() -> None:
    """A cutting server would see ".\r\n" at byte 1000 as a line of its own: we do not."""
    wire = b"z" * 998 + b"\r\n" + b"z" * 999 + b".\r\n" + COMMANDS
    assert run([wire])[0] is None
    result, written, rest = run([wire, b".\r\nQUIT\r\n"])
    assert result is not None and result.error == reply.DATA_LINE_TOO_LONG
    assert rest == b"QUIT\r\n"
    assert COMMANDS not in written


def test_too_long_line_is_not_accumulated() -> None:
    chunk = b"x" * 65536
    reader = DataReader(lambda data: None, 0)
    tracemalloc.start()
    try:
        for _ in range(200):
            assert reader.feed(chunk) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(chunk)
    result = reader.feed(b"\r\n.\r\n")
    assert result is not None and result.error == reply.DATA_LINE_TOO_LONG
    assert result.size == 200 * len(chunk) + 2


# --- size limit ---------------------------------------------------------------------------------


def test_size_limit_exact_boundary() -> None:
    body = b"..1234567\r\n" * 10  # 110 bytes on the wire, 100 unstuffed
    result, written, _ = run([body[:50], body[50:] + b".\r\n"], max_size=100)
    assert result == DataResult(None, False, b"", 100)
    assert written == body.replace(b"..", b".")


def test_size_limit_exceeded_by_one() -> None:
    body = b"..1234567\r\n" * 10 + b"x\r\n"
    result, written, rest = run([body[:50], body[50:], b".\r\nQUIT\r\n"], max_size=102)
    assert result == DataResult(reply.TOO_BIG, False, b"QUIT\r\n", 103)
    assert len(written) <= 102
    assert rest == b"QUIT\r\n"


def test_size_limit_zero_is_unlimited() -> None:
    body = b"x" * 900 + b"\r\n"
    result, _, _ = run([body] * 2000 + [b".\r\n"], max_size=0)
    assert result == DataResult(None, False, b"", len(body) * 2000)


def test_size_wins_over_line_length() -> None:
    result, _, _ = run([b"x" * 1200 + b"\r\n.\r\n"], max_size=1000)
    assert result is not None and result.error == reply.TOO_BIG


# --- properties ---------------------------------------------------------------------------------

LINES = st.lists(
    st.one_of(
        st.binary(max_size=80).map(
            lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
        ),
        st.sampled_from([b"", b".", b"..", b".x", b"\x01.", b"." * 5]),
    ),
    max_size=30,
)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    points = draw(st.lists(st.integers(0, len(data)), max_size=8))
    return split_at(data, points)


@settings(max_examples=300, deadline=None)
@given(lines=LINES, after=st.binary(max_size=20), data=st.data())
def test_round_trip(lines: list[bytes], after: bytes, data: st.DataObject) -> None:
    wire = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
    message = b"".join(x + b"\r\n" for x in lines)
    result, written, rest = run(data.draw(chunked(wire + b".\r\n" + after)))
    assert result == DataResult(None, False, result.leftover if result else b"", len(message))
    assert written == message
    assert rest == after


NOISE = st.lists(
    st.sampled_from(
        [b"\r", b"\n", b"\r\n", b".", b"a", b"\x00", b"\r\n.\r\n", b"\r\n..", b"x" * 500]
    ),
    max_size=25,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(wire=NOISE, max_size=st.sampled_from([0, 20, 600]), data=st.data())
def test_random_bytes_match_the_reference(wire: bytes, max_size: int, data: st.DataObject) -> None:
    """Never raises, ends at most once, and agrees with the slow model however it is chunked."""
    result, written, rest = run(data.draw(chunked(wire)), max_size)
    expected = reference(wire, max_size)
    if expected is None:
        assert result is None
        return
    want, content = expected
    assert result is not None
    assert (result.error, result.fatal) == (want.error, want.fatal)
    assert content.startswith(written)
    if not want.fatal:
        assert (result.size, rest) == (want.size, want.leftover)
        if want.error is None:
            assert written == content
