"""MD5 (RFC 1321) with its chaining state exposed, for CRAM-MD5 without the password.

hashlib's MD5 can neither export nor import the chaining state, and CRAM-MD5 without the
password needs both: the users file keeps the HMAC-MD5 states after the key blocks
(:class:`smarthost.auth.derived.CramMD5Secret`), and each login continues from them.
"""

from __future__ import annotations

import math
import struct

_MASK = 0xFFFFFFFF
_MD5_SHIFTS = (7, 12, 17, 22) * 4 + (5, 9, 14, 20) * 4 + (4, 11, 16, 23) * 4 + (6, 10, 15, 21) * 4
_MD5_K = tuple(int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64))  # RFC 1321 3.4
MD5_IV = struct.pack("<4I", 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)


def md5_compress(state: bytes, block: bytes) -> bytes:
    """One MD5 compression: 16-octet state (little-endian words) and a 64-octet block."""
    a0, b0, c0, d0 = struct.unpack("<4I", state)
    words = struct.unpack("<16I", block)
    a, b, c, d = a0, b0, c0, d0
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | ~d), (7 * i) % 16
        f = (f + a + _MD5_K[i] + words[g]) & _MASK
        s = _MD5_SHIFTS[i]
        a, d, c = d, c, b
        b = (b + ((f << s) | (f >> (32 - s)))) & _MASK
    return struct.pack("<4I", (a0 + a) & _MASK, (b0 + b) & _MASK, (c0 + c) & _MASK,
                       (d0 + d) & _MASK)


def md5_resume(state: bytes, consumed: int, data: bytes) -> bytes:
    """The MD5 digest of a message whose first ``consumed`` octets (a multiple of 64) left
    the hash in ``state`` and whose remaining octets are ``data``."""
    if consumed % 64:
        raise ValueError("MD5 can only resume at a block boundary")
    length = consumed + len(data)
    padded = (data + b"\x80" + b"\0" * ((55 - length) % 64)
              + struct.pack("<Q", (length * 8) & 0xFFFFFFFFFFFFFFFF))
    for offset in range(0, len(padded), 64):
        state = md5_compress(state, padded[offset:offset + 64])
    return state
