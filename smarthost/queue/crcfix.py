"""Undoing one flipped bit with the CRC-32 that caught it (for ``smarthost queue salvage``).

CRC-32 is linear: for two messages of equal length, ``crc32(a) ^ crc32(b)`` is the raw CRC
(no initial value, no final XOR) of ``a ^ b``. A single flipped bit at byte ``j`` of an
``n``-byte message therefore shows as the syndrome ``step^(n-1-j)(TABLE[1 << bit])``, where
``step`` feeds one zero byte through the CRC register. ``step`` is invertible, so walking the
syndrome back one byte at a time finds ``j`` in ``n`` steps. The IEEE polynomial has Hamming
distance 4 up to 91,607 bits and 3 beyond, so a single-bit error always has exactly one
explanation; a wider error may still be "explained" by a wrong bit, with odds of about
``8 * n / 2**32``, which is why every repair is checked again (the record must parse, and the
body must match its own CRC) and reported.
"""

from __future__ import annotations

import zlib

_POLY = 0xEDB88320  # reflected IEEE 802.3, as zlib


def _table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


TABLE = _table()
_BY_TOP = {value >> 24: n for n, value in enumerate(TABLE)}  # the top bytes are all distinct
_ONE_BIT = {TABLE[1 << bit]: bit for bit in range(8)}


def single_bit(data: bytes | bytearray | memoryview, expected: int) -> list[tuple[int, int]]:
    """Every (byte, bit) whose flip would give ``data`` the CRC ``expected``; empty when the
    CRC matches already or no single bit explains the difference."""
    syndrome = zlib.crc32(data) ^ expected
    if not syndrome:
        return []
    found = []
    n = len(data)
    for distance in range(n):
        bit = _ONE_BIT.get(syndrome)
        if bit is not None:
            found.append((n - 1 - distance, bit))
        top = _BY_TOP[syndrome >> 24]
        syndrome = ((syndrome ^ TABLE[top]) << 8) | top  # one zero byte, fed backwards
    return found


def stored_bit(data: bytes | bytearray | memoryview, stored: int) -> int | None:
    """The bit of a stored CRC that flipped, when the data itself is intact."""
    syndrome = zlib.crc32(data) ^ stored
    return syndrome.bit_length() - 1 if syndrome and not syndrome & (syndrome - 1) else None
